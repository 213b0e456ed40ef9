"""The fused loss's three passes in plain XLA: token and vocab chunks, scans.

Each function sees one shard: tokens `[N, D]`, an embedding slice `[Vs, D]`
and targets already shifted into the slice (a target outside `[0, Vs)` picks
no column here). Logit tiles `[block_tokens, block_vocab]` are computed one
at a time inside nested `lax.scan`s, so no more than one tile is live; the
float32 logsumexp runs online across vocab tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels.loss import tile
from gemma4_jax.kernels.loss import vjp


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Chunk sizes of the XLA version (any positive ints).

  A `[block_tokens, block_vocab]` float32 tile and a handful of same-sized
  temporaries are what the scans hold at once: 16 MiB per tile by default.
  """
  block_tokens: int = 1024
  block_vocab: int = 4096

  def __post_init__(self):
    _tpu.check_block_sizes(self, block_tokens=1, block_vocab=1)

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()


def passes(block_sizes: BlockSizes, *, interpret: bool = False
           ) -> vjp.Passes:
  """The three chunked passes as `vjp.Passes` (`interpret` is unused)."""
  del interpret  # no Pallas kernel here
  bound = dict(block_sizes=block_sizes)
  return vjp.Passes(
      forward_stats=functools.partial(forward_stats, **bound),
      backward_hidden=functools.partial(backward_hidden, **bound),
      backward_embedding=functools.partial(backward_embedding, **bound))


def forward_stats(hidden, embedding, targets, *, softcap, block_sizes):
  """Online max, sum of exp and target logit over this vocab slice.

  Args:
    hidden: `[N, D]`.
    embedding: `[Vs, D]`, same dtype as hidden.
    targets: `[N]` int32, shifted into this slice.
    softcap: c, or None.
    block_sizes: `BlockSizes`.

  Returns:
    float32 `row_max [N]`, `sum_exp [N]` (relative to row_max) and
    `target_logit [N]` (0 where the target is not in this slice).
  """
  h, e, t, tn, tv = _tiled(hidden, embedding, targets, block_sizes)
  tile_args = dict(block_vocab=tv, vocab=embedding.shape[0], softcap=softcap)

  def token_chunk(args):
    h_c, t_c = args

    def vocab_chunk(carry, j):
      row_max, sum_exp, picked = carry
      logits, _, ids = tile.logits(h_c, e(j), j, **tile_args)
      row_max, sum_exp = tile.online_logsumexp(row_max, sum_exp, logits)
      picked += tile.target_logit(logits, ids, t_c)
      return (row_max, sum_exp, picked), None

    init = (jnp.full((tn, 1), -jnp.inf, jnp.float32),
            jnp.zeros((tn, 1), jnp.float32), jnp.zeros((tn, 1), jnp.float32))
    out, _ = jax.lax.scan(vocab_chunk, init, jnp.arange(e.count))
    return out

  stats = jax.lax.map(token_chunk, (h, t))
  n = hidden.shape[0]
  return tuple(x.reshape(-1)[:n] for x in stats)


def backward_hidden(hidden, embedding, targets, lse, scale, *, softcap,
                    block_sizes, out_dtype=jnp.float32):
  """`sum_v dz[:, v] E[v]` over this vocab slice, `[N, D]` in `out_dtype`
  (accumulated in float32).

  `dz = scale * (softmax - onehot) * (1 - tanh^2)`, with `lse` the full
  logsumexp `[N]` and `scale` the loss cotangent times the weight `[N]`.
  """
  h, e, t, tn, tv = _tiled(hidden, embedding, targets, block_sizes)
  lse, scale = (_token_columns(x, tn) for x in (lse, scale))
  tile_args = dict(block_vocab=tv, vocab=embedding.shape[0], softcap=softcap)

  def token_chunk(args):
    h_c, t_c, lse_c, scale_c = args

    def vocab_chunk(acc, j):
      e_j = e(j)
      dz = tile.logit_grad(h_c, e_j, j, t_c, lse_c, scale_c, **tile_args)
      return acc + tile.matmul(dz.astype(e_j.dtype), e_j), None

    acc, _ = jax.lax.scan(vocab_chunk,
                          jnp.zeros((tn, hidden.shape[1]), jnp.float32),
                          jnp.arange(e.count))
    return acc.astype(out_dtype)

  dh = jax.lax.map(token_chunk, (h, t, lse, scale))
  return dh.reshape(-1, hidden.shape[1])[:hidden.shape[0]]


def backward_embedding(hidden, embedding, targets, lse, scale, *, softcap,
                       block_sizes):
  """`sum_n dz[n, v] h[n]` for this vocab slice, float32 `[Vs, D]`."""
  h, e, t, tn, tv = _tiled(hidden, embedding, targets, block_sizes)
  lse, scale = (_token_columns(x, tn) for x in (lse, scale))
  tile_args = dict(block_vocab=tv, vocab=embedding.shape[0], softcap=softcap)

  def vocab_chunk(j):
    def token_chunk(acc, i):
      dz = tile.logit_grad(h[i], e(j), j, t[i], lse[i], scale[i],
                           **tile_args)
      return acc + tile.matmul_t(dz.astype(h.dtype), h[i]), None

    acc, _ = jax.lax.scan(token_chunk,
                          jnp.zeros((tv, hidden.shape[1]), jnp.float32),
                          jnp.arange(h.shape[0]))
    return acc

  de = jax.lax.map(vocab_chunk, jnp.arange(e.count))
  return de.reshape(-1, hidden.shape[1])[:embedding.shape[0]]


class _Chunks:
  """`[block, D]` row blocks of a `[n * block, D]` array, read one at a time
  inside a loop by `dynamic_slice` of the array itself.

  XLA:CPU computes bf16 dots in float32; without the barrier it converts
  the whole operand once, outside the loop (1.5 GiB for E2B's embedding),
  instead of one chunk per iteration.
  """

  def __init__(self, rows, block):
    self.dtype = rows.dtype
    self.count = rows.shape[0] // block
    self._rows, self._block = rows, block

  def __call__(self, j):
    # The barrier keeps a later dtype conversion on this chunk.
    return jax.lax.optimization_barrier(jax.lax.dynamic_slice_in_dim(
        self._rows, j * self._block, self._block))


def _tiled(hidden, embedding, targets, block_sizes):
  """Pads and splits into chunks: h `[nt, tn, D]`, e `[nv, tv, D]` (read
  with `e(j)`), target columns `[nt, tn, 1]`; and tn, tv."""
  tn = min(block_sizes.block_tokens, hidden.shape[0])
  tv = min(block_sizes.block_vocab, embedding.shape[0])
  h, e, t = tile.pad_to_blocks(hidden, embedding, targets, tn, tv)
  return (h.reshape(-1, tn, hidden.shape[1]), _Chunks(e, tv),
          t.reshape(-1, tn, 1), tn, tv)


def _token_columns(x, tn):
  """Per-token `[N]` values as `[nt, tn, 1]` columns (zero padding)."""
  return _tpu.pad_axis(x, 0, _tpu.round_up(x.shape[0], tn)).reshape(-1, tn, 1)
