"""Bodies of the fused loss's three Pallas TPU kernels (see `pallas_tpu`).

Each runs over a `(token block, vocab block)` grid (the embedding
gradient's transposed) and takes the static `block_vocab`, `vocab` and
`softcap` as keyword-only arguments (see `tile.logits`). Per-token values
arrive and leave as lane-major `[1, tn]` rows; the tile math (`tile`) wants
`[tn, 1]` columns.
"""

from __future__ import annotations

from jax.experimental import pallas as pl
import jax.numpy as jnp

from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels.loss import tile


def forward_kernel(h_ref, e_ref, t_ref, row_max_ref, sum_exp_ref,
                   target_logit_ref, max_acc_ref, sum_acc_ref,
                   picked_acc_ref, *, block_vocab, vocab, softcap):
  """Online max, sum of exp and target logit of a `[tn, D]` hidden block
  over the streamed vocab blocks."""
  j = pl.program_id(1)

  @pl.when(j == 0)
  def init():
    max_acc_ref[...] = jnp.full(max_acc_ref.shape, -jnp.inf, jnp.float32)
    sum_acc_ref[...] = jnp.zeros(sum_acc_ref.shape, jnp.float32)
    picked_acc_ref[...] = jnp.zeros(picked_acc_ref.shape, jnp.float32)

  logits, _, ids = tile.logits(h_ref[...], e_ref[...], j,
                               block_vocab=block_vocab, vocab=vocab,
                               softcap=softcap)  # [tn, tv]
  max_acc_ref[...], sum_acc_ref[...] = tile.online_logsumexp(
      max_acc_ref[...], sum_acc_ref[...], logits)  # [tn, 1] each
  picked_acc_ref[...] += tile.target_logit(logits, ids,
                                           _tpu.row_to_column(t_ref[...]))

  @pl.when(j == pl.num_programs(1) - 1)
  def finish():
    for out_ref, acc_ref in ((row_max_ref, max_acc_ref),
                             (sum_exp_ref, sum_acc_ref),
                             (target_logit_ref, picked_acc_ref)):
      out_ref[...] = _tpu.column_to_row(acc_ref[...])


def hidden_grad_kernel(h_ref, e_ref, t_ref, lse_ref, scale_ref, dh_ref,
                       *acc_ref, block_vocab, vocab, softcap):
  """`dz @ E` accumulated over the vocab blocks into a `[tn, D]` block."""
  j = pl.program_id(1)
  acc_ref = acc_ref[0] if acc_ref else dh_ref

  @pl.when(j == 0)
  def init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  e = e_ref[...]
  dz = _logit_grad(h_ref[...], e, j, t_ref, lse_ref, scale_ref,
                   block_vocab=block_vocab, vocab=vocab, softcap=softcap)
  acc_ref[...] += tile.matmul(dz.astype(e.dtype), e)

  if acc_ref is not dh_ref:
    @pl.when(j == pl.num_programs(1) - 1)
    def finish():
      dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def embedding_grad_kernel(h_ref, e_ref, t_ref, lse_ref, scale_ref, de_ref,
                          *, block_vocab, vocab, softcap):
  """`dz^T @ hidden` accumulated over the token blocks into `[tv, D]`."""
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def init():
    de_ref[...] = jnp.zeros(de_ref.shape, jnp.float32)

  h = h_ref[...]
  dz = _logit_grad(h, e_ref[...], j, t_ref, lse_ref, scale_ref,
                   block_vocab=block_vocab, vocab=vocab, softcap=softcap)
  de_ref[...] += tile.matmul(dz.T.astype(h.dtype), h)


def _logit_grad(h, e, j, t_ref, lse_ref, scale_ref, **static):
  column = _tpu.row_to_column
  return tile.logit_grad(h, e, j, column(t_ref[...]), column(lse_ref[...]),
                         column(scale_ref[...]), **static)
