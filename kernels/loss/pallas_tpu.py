"""Pallas TPU kernels of the fused loss: vocab tiles stream through VMEM.

Three kernels, each over a `(token block, vocab block)` grid (bodies in
`pallas_tpu_kernel`; the `custom_vjp` around them in `vjp`):
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

from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels.loss import pallas_tpu_kernel as kernel
from gemma4_jax.kernels.loss import tile
from gemma4_jax.kernels.loss import vjp

# The [tn, D] hidden and [tv, D] embedding blocks double-buffered, float32
# accumulators and a few [tn, tv] float32 temporaries: ~30 MiB at E2B (D =
# 1536, bf16) with the default blocks, over v5e's default scoped limit.
VMEM_LIMIT_BYTES = 64 * 1024 * 1024
# Second-minor block dims must be multiples of the sublane tiling (16 for
# bf16); the vocab block is the lane dim of the logit tile.
TOKEN_MULTIPLE = 16
VOCAB_MULTIPLE = _tpu.NUM_LANES


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
    _tpu.check_block_sizes(self, block_tokens=TOKEN_MULTIPLE,
                           block_vocab=VOCAB_MULTIPLE)

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()


def passes(block_sizes: BlockSizes, *, interpret: bool = False
           ) -> vjp.Passes:
  """The three kernels as `vjp.Passes`."""
  bound = dict(block_sizes=block_sizes, interpret=interpret)
  return vjp.Passes(
      forward_stats=functools.partial(forward_stats, **bound),
      backward_hidden=functools.partial(backward_hidden, **bound),
      backward_embedding=functools.partial(backward_embedding, **bound))


def forward_stats(hidden, embedding, targets, *, softcap, block_sizes,
                  interpret=False):
  """See `xla.forward_stats`: float32 `(row_max, sum_exp, target_logit)`."""
  n = hidden.shape[0]
  h, e, t, tn, tv = _padded(hidden, embedding, targets, block_sizes,
                            interpret)
  stats = jax.ShapeDtypeStruct((1, h.shape[0]), jnp.float32)
  out = _pallas_call(
      kernel.forward_kernel, h, e, [t], tn=tn, tv=tv,
      vocab=embedding.shape[0], softcap=softcap,
      out_shape=[stats] * 3, out_blocks=["row"] * 3,
      scratch_shapes=[pltpu.VMEM((tn, 1), jnp.float32)] * 3,
      matmuls=1, name="loss_forward", interpret=interpret)
  return tuple(x[0, :n] for x in out)


def backward_hidden(hidden, embedding, targets, lse, scale, *, softcap,
                    block_sizes, interpret=False, out_dtype=jnp.float32):
  """See `xla.backward_hidden`: `[N, D]` in `out_dtype`."""
  n = hidden.shape[0]
  h, e, t, tn, tv = _padded(hidden, embedding, targets, block_sizes,
                            interpret)
  lse, scale = (_token_row(x, h.shape[0]) for x in (lse, scale))
  # A float32 output is its own accumulator; any other gets a float32 one
  # in VMEM, written out once per token block.
  scratch = ([] if jnp.dtype(out_dtype) == jnp.float32 else
             [pltpu.VMEM((tn, h.shape[1]), jnp.float32)])
  d_hidden = _pallas_call(
      kernel.hidden_grad_kernel, h, e, [t, lse, scale], tn=tn, tv=tv,
      vocab=embedding.shape[0], softcap=softcap,
      out_shape=jax.ShapeDtypeStruct(h.shape, out_dtype),
      out_blocks="hidden", scratch_shapes=scratch,
      matmuls=2, name="loss_hidden_grad", interpret=interpret)
  return d_hidden[:n]


def backward_embedding(hidden, embedding, targets, lse, scale, *, softcap,
                       block_sizes, interpret=False):
  """See `xla.backward_embedding`: float32 `[Vs, D]`."""
  vocab = embedding.shape[0]
  h, e, t, tn, tv = _padded(hidden, embedding, targets, block_sizes,
                            interpret)
  lse, scale = (_token_row(x, h.shape[0]) for x in (lse, scale))
  d_embedding = _pallas_call(
      kernel.embedding_grad_kernel, h, e, [t, lse, scale], tn=tn, tv=tv,
      vocab=vocab, softcap=softcap,
      out_shape=jax.ShapeDtypeStruct(e.shape, jnp.float32),
      out_blocks="embedding", vocab_outer=True,
      matmuls=2, name="loss_embedding_grad", interpret=interpret)
  return d_embedding[:vocab]


def _pallas_call(body, h, e, rows, *, tn, tv, vocab, softcap, out_shape,
                 out_blocks, matmuls, name, interpret, scratch_shapes=(),
                 vocab_outer=False):
  """Runs a kernel body over the `(token block i, vocab block j)` grid.

  The outer grid axis holds its operand's block resident while the inner
  one's blocks stream past: tokens outer for the forward and the hidden
  gradient, vocab outer (`vocab_outer`, the grid transposed to `(j, i)`)
  for the embedding gradient.

  Args:
    body: a `pallas_tpu_kernel` body; it also gets `block_vocab`, `vocab`
      and `softcap`.
    h, e: the padded hidden `[N, D]` and embedding `[Vp, D]`, read in
      `[tn, D]` and `[tv, D]` blocks.
    rows: per-token `[1, N]` inputs after `h` and `e`, read in `[1, tn]`
      blocks.
    tn, tv: the token and vocab block sizes.
    vocab: the unpadded vocab.
    softcap: c, or None.
    out_shape: the output's `jax.ShapeDtypeStruct` or a list of them.
    out_blocks: how each output is blocked, in `out_shape`'s structure:
      "row" (a per-token row), "hidden" or "embedding".
    matmuls: per logit tile, for the cost estimate.
    name: the pallas_call's name.
    interpret: Pallas interpret mode.
    scratch_shapes: the body's VMEM scratch.
    vocab_outer: transpose the grid.

  Returns:
    The pallas_call's output(s).
  """
  num_tokens, dim = h.shape
  token_blocks, vocab_blocks = num_tokens // tn, e.shape[0] // tv
  # The inner operand is read once per outer block.
  if vocab_outer:
    grid = (vocab_blocks, token_blocks)
    passes = dict(passes_over_vocab=1, passes_over_tokens=vocab_blocks)
  else:
    grid = (token_blocks, vocab_blocks)
    passes = dict(passes_over_vocab=token_blocks, passes_over_tokens=1)

  def at(index_map):  # the maps below are written over (i, j)
    return (lambda j, i: index_map(i, j)) if vocab_outer else index_map

  blocks = {"hidden": pl.BlockSpec((tn, dim), at(lambda i, j: (i, 0))),
            "embedding": pl.BlockSpec((tv, dim), at(lambda i, j: (j, 0))),
            "row": pl.BlockSpec((1, tn), at(lambda i, j: (0, i)))}
  return pl.pallas_call(
      functools.partial(body, block_vocab=tv, vocab=vocab, softcap=softcap),
      grid=grid,
      in_specs=[blocks["hidden"], blocks["embedding"],
                *[blocks["row"]] * len(rows)],
      out_specs=jax.tree.map(blocks.__getitem__, out_blocks),
      scratch_shapes=scratch_shapes,
      out_shape=out_shape,
      compiler_params=_compiler_params(),
      cost_estimate=_cost(h, e, matmuls=matmuls, **passes),
      interpret=interpret,
      name=name,
  )(h, e, *rows)


def _padded(hidden, embedding, targets, block_sizes, interpret):
  """Pads tokens and vocab to whole blocks (`tile.pad_to_blocks`): `(h, e,
  targets as a [1, N] row, tn, tv)`."""
  n, vocab = hidden.shape[0], embedding.shape[0]
  tn = min(block_sizes.block_tokens, _tpu.round_up(n, TOKEN_MULTIPLE))
  tv = min(block_sizes.block_vocab, _tpu.round_up(vocab, VOCAB_MULTIPLE))
  if not interpret and tn < n and tn % _tpu.NUM_LANES:
    raise ValueError(f"block_tokens must be a multiple of {_tpu.NUM_LANES} "
                     f"on TPU when the {n} tokens need more than one block "
                     f"(per-token rows are lane-major), got {tn}")
  h, e, t = tile.pad_to_blocks(hidden, embedding, targets, tn, tv)
  return h, e, t[None, :], tn, tv


def _token_row(x, size):
  """Per-token `[N]` values as a lane-major `[1, size]` row (zero padding)."""
  return _tpu.pad_axis(x, 0, size)[None, :]


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
