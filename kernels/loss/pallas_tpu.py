"""Pallas TPU kernels of the fused loss: vocab tiles stream through VMEM.

Three kernels, each over a `(token block, vocab block)` grid:
- forward: a `[tn, D]` block of hidden stays in VMEM while `[tv, D]` tiles of
  the embedding stream past it; per tile the `[tn, tv]` softcapped logits
  update an online max and sum of exp, and the target logit is picked out
  by comparing column ids with the targets, all in float32;
- hidden gradient: the same stream recomputes each tile's logits and
  accumulates `dz @ E` into the resident `[tn, D]` output;
- embedding gradient: the grid is transposed (vocab outer, tokens inner) and
  `dz^T @ hidden` accumulates into a resident `[tv, D]` output.

Arithmetic intensity against the streamed operand is `tn` (forward, hidden
gradient) or `tv` (embedding gradient) flops per byte; v5e needs ~240
(197 TFLOP/s / 819 GB/s), so the defaults are 1024 tokens x 512 vocab.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from gemma4_jax.kernels.loss import common
from gemma4_jax.kernels.loss import fused

# The [tn, D] hidden and [tv, D] embedding blocks double-buffered, float32
# accumulators and a few [tn, tv] float32 temporaries: ~30 MiB at E2B (D =
# 1536, bf16) with the default blocks, over v5e's default scoped limit.
VMEM_LIMIT_BYTES = 64 * 1024 * 1024
# Second-minor block dims must be multiples of the sublane tiling (16 for
# bf16); the vocab block is the lane dim of the logit tile.
TOKEN_MULTIPLE = 16
VOCAB_MULTIPLE = 128
NUM_LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Token and vocab block sizes of the three kernels.

  `block_tokens` must be a multiple of 16 and `block_vocab` of 128 (TPU
  tiling); smaller inputs use one block rounded up to those multiples. On
  TPU, more than one token block needs `block_tokens` a multiple of 128:
  per-token values are lane-major `[1, N]` rows.
  """
  block_tokens: int = 1024
  block_vocab: int = 512

  def __post_init__(self):
    for name, multiple in (("block_tokens", TOKEN_MULTIPLE),
                           ("block_vocab", VOCAB_MULTIPLE)):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1 or value % multiple:
        raise ValueError(f"BlockSizes.{name} must be a positive multiple of "
                         f"{multiple}, got {value!r}")

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()


def passes(block_sizes: BlockSizes, *, interpret: bool = False
           ) -> fused.Passes:
  """The three kernels as `fused.Passes`."""
  bound = dict(block_sizes=block_sizes, interpret=interpret)
  return fused.Passes(
      forward_stats=functools.partial(forward_stats, **bound),
      backward_hidden=functools.partial(backward_hidden, **bound),
      backward_embedding=functools.partial(backward_embedding, **bound))


def forward_stats(hidden, embedding, targets, *, softcap, block_sizes,
                  interpret=False):
  """See `xla.forward_stats`: float32 `(row_max, sum_exp, target_logit)`."""
  n = hidden.shape[0]
  h, e, t, tn, tv, vocab = _padded(hidden, embedding, targets, block_sizes,
                                   interpret)
  num_tokens, dim = h.shape
  grid = (num_tokens // tn, e.shape[0] // tv)
  row = pl.BlockSpec((1, tn), lambda i, j: (0, i))
  stats = jax.ShapeDtypeStruct((1, num_tokens), jnp.float32)
  out = pl.pallas_call(
      functools.partial(_forward_kernel, softcap=softcap, vocab=vocab,
                        block_vocab=tv),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid,
          in_specs=[pl.BlockSpec((tn, dim), lambda i, j: (i, 0)),
                    pl.BlockSpec((tv, dim), lambda i, j: (j, 0)), row],
          out_specs=[row] * 3,
          scratch_shapes=[pltpu.VMEM((tn, 1), jnp.float32)] * 3),
      out_shape=[stats] * 3,
      compiler_params=_compiler_params(),
      cost_estimate=_cost(h, e, passes_over_vocab=grid[0],
                          passes_over_tokens=1, matmuls=1),
      interpret=interpret,
  )(h, e, t)
  return tuple(x[0, :n] for x in out)


def backward_hidden(hidden, embedding, targets, lse, scale, *, softcap,
                    block_sizes, interpret=False, out_dtype=jnp.float32):
  """See `xla.backward_hidden`: `[N, D]` in `out_dtype`."""
  n = hidden.shape[0]
  h, e, t, tn, tv, vocab = _padded(hidden, embedding, targets, block_sizes,
                                   interpret)
  lse, scale = (_pad_row(x, h.shape[0]) for x in (lse, scale))
  num_tokens, dim = h.shape
  grid = (num_tokens // tn, e.shape[0] // tv)
  row = pl.BlockSpec((1, tn), lambda i, j: (0, i))
  # A float32 output is its own accumulator; any other gets a float32 one
  # in VMEM, written out once per token block.
  scratch = ([] if jnp.dtype(out_dtype) == jnp.float32 else
             [pltpu.VMEM((tn, dim), jnp.float32)])
  d_hidden = pl.pallas_call(
      functools.partial(_hidden_grad_kernel, softcap=softcap, vocab=vocab,
                        block_vocab=tv),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid,
          in_specs=[pl.BlockSpec((tn, dim), lambda i, j: (i, 0)),
                    pl.BlockSpec((tv, dim), lambda i, j: (j, 0)),
                    row, row, row],
          out_specs=pl.BlockSpec((tn, dim), lambda i, j: (i, 0)),
          scratch_shapes=scratch),
      out_shape=jax.ShapeDtypeStruct((num_tokens, dim), out_dtype),
      compiler_params=_compiler_params(),
      cost_estimate=_cost(h, e, passes_over_vocab=grid[0],
                          passes_over_tokens=1, matmuls=2),
      interpret=interpret,
  )(h, e, t, lse, scale)
  return d_hidden[:n]


def backward_embedding(hidden, embedding, targets, lse, scale, *, softcap,
                       block_sizes, interpret=False):
  """See `xla.backward_embedding`: float32 `[Vs, D]`."""
  h, e, t, tn, tv, vocab = _padded(hidden, embedding, targets, block_sizes,
                                   interpret)
  lse, scale = (_pad_row(x, h.shape[0]) for x in (lse, scale))
  num_tokens, dim = h.shape
  grid = (e.shape[0] // tv, num_tokens // tn)
  row = pl.BlockSpec((1, tn), lambda j, i: (0, i))
  d_embedding = pl.pallas_call(
      functools.partial(_embedding_grad_kernel, softcap=softcap, vocab=vocab,
                        block_vocab=tv),
      grid=grid,
      in_specs=[pl.BlockSpec((tn, dim), lambda j, i: (i, 0)),
                pl.BlockSpec((tv, dim), lambda j, i: (j, 0)),
                row, row, row],
      out_specs=pl.BlockSpec((tv, dim), lambda j, i: (j, 0)),
      out_shape=jax.ShapeDtypeStruct((e.shape[0], dim), jnp.float32),
      compiler_params=_compiler_params(),
      cost_estimate=_cost(h, e, passes_over_vocab=1,
                          passes_over_tokens=grid[0], matmuls=2),
      interpret=interpret,
  )(h, e, t, lse, scale)
  return d_embedding[:vocab]


def _forward_kernel(h_ref, e_ref, t_ref, max_out, sum_out, picked_out,
                    max_ref, sum_ref, picked_ref, *, softcap, vocab,
                    block_vocab):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def init():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
    picked_ref[...] = jnp.zeros(picked_ref.shape, jnp.float32)

  logits, _, cols = _tile(h_ref[...], e_ref[...], j, block_vocab, softcap,
                          vocab)  # [tn, tv]
  row_max = max_ref[...]  # [tn, 1]
  new_max = jnp.maximum(row_max, jnp.max(logits, axis=1, keepdims=True))
  sum_ref[...] = (sum_ref[...] * jnp.exp(row_max - new_max) +
                  jnp.sum(jnp.exp(logits - new_max), axis=1, keepdims=True))
  picked_ref[...] += jnp.sum(
      jnp.where(cols == _column(t_ref[...]), logits, 0.0), axis=1,
      keepdims=True)
  max_ref[...] = new_max

  @pl.when(j == pl.num_programs(1) - 1)
  def finish():
    for out, ref in ((max_out, max_ref), (sum_out, sum_ref),
                     (picked_out, picked_ref)):
      out[...] = _row(ref[...])


def _hidden_grad_kernel(h_ref, e_ref, t_ref, lse_ref, scale_ref, dh_ref,
                        *acc_ref, softcap, vocab, block_vocab):
  j = pl.program_id(1)
  acc_ref = acc_ref[0] if acc_ref else dh_ref

  @pl.when(j == 0)
  def init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  e = e_ref[...]
  dz = _dz(h_ref[...], e, j, block_vocab, t_ref, lse_ref, scale_ref, softcap,
           vocab)
  acc_ref[...] += common.matmul(dz.astype(e.dtype), e)

  if acc_ref is not dh_ref:
    @pl.when(j == pl.num_programs(1) - 1)
    def finish():
      dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _embedding_grad_kernel(h_ref, e_ref, t_ref, lse_ref, scale_ref, de_ref,
                           *, softcap, vocab, block_vocab):
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def init():
    de_ref[...] = jnp.zeros(de_ref.shape, jnp.float32)

  h = h_ref[...]
  dz = _dz(h, e_ref[...], j, block_vocab, t_ref, lse_ref, scale_ref, softcap,
           vocab)
  de_ref[...] += common.matmul(dz.T.astype(h.dtype), h)


def _tile(h, e, j, block_vocab, softcap, vocab):
  """The tile's softcapped logits (padding columns -inf), tanh, column ids."""
  z = common.matmul_nt(h, e)
  cols = j * block_vocab + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
  logits, tanh = common.softcap_logits(z, softcap)
  return jnp.where(cols < vocab, logits, -jnp.inf), tanh, cols


def _dz(h, e, j, block_vocab, t_ref, lse_ref, scale_ref, softcap, vocab):
  logits, tanh, cols = _tile(h, e, j, block_vocab, softcap, vocab)
  return common.logit_grad(logits, tanh, cols == _column(t_ref[...]),
                           _column(lse_ref[...]), _column(scale_ref[...]),
                           softcap)


# Per-token values travel as lane-major [1, N] rows: a [N, 1] column would
# be padded to 128 lanes in HBM (512 B a token: 16 MiB each at 32k tokens).

def _column(row):
  """A `(1, tn)` row as a `(tn, 1)` column."""
  return jnp.broadcast_to(row, (NUM_LANES, row.shape[1])).T[:, :1]


def _row(column):
  """A `(tn, 1)` column as a `(1, tn)` row."""
  return jnp.broadcast_to(column, (column.shape[0], NUM_LANES)).T[:1]


def _padded(hidden, embedding, targets, block_sizes, interpret):
  """Pads tokens and vocab to whole blocks (zeros; targets -1).

  The vocab is only copied when it is not a multiple of the block (Gemma 4's
  262144 is); padded columns are masked to -inf in the kernels.
  """
  n, vocab = hidden.shape[0], embedding.shape[0]
  tn = min(block_sizes.block_tokens, _round_up(n, TOKEN_MULTIPLE))
  tv = min(block_sizes.block_vocab, _round_up(vocab, VOCAB_MULTIPLE))
  if not interpret and tn < n and tn % NUM_LANES:
    raise ValueError(f"block_tokens must be a multiple of {NUM_LANES} on TPU "
                     f"when the {n} tokens need more than one block (per-"
                     f"token rows are lane-major), got {tn}")
  h = jnp.pad(hidden, ((0, -n % tn), (0, 0)))
  e = embedding
  if vocab % tv:
    e = jnp.pad(embedding, ((0, -vocab % tv), (0, 0)))
  t = _pad_row(jnp.pad(targets, (0, -n % tn), constant_values=-1), h.shape[0])
  return h, e, t, tn, tv, vocab


def _pad_row(x, size):
  return jnp.pad(x, (0, size - x.shape[0]))[None, :]


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


def _compiler_params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "arbitrary"),
      vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _cost(h, e, *, passes_over_vocab, passes_over_tokens, matmuls):
  """Each logit tile costs one matmul (two in the backward: the logits and
  the gradient product), a tanh and an exp per element."""
  tokens, dim = h.shape
  vocab = e.shape[0]
  return pl.CostEstimate(
      flops=2 * matmuls * tokens * vocab * dim,
      transcendentals=2 * tokens * vocab,
      bytes_accessed=(passes_over_tokens * h.size * h.dtype.itemsize +
                      passes_over_vocab * e.size * e.dtype.itemsize +
                      tokens * 4 * 4))
