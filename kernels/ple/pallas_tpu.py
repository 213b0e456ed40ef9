"""PLE row gather as a Pallas TPU kernel.

The table never leaves HBM (`memory_space=pl.ANY`) and is read in the layout
XLA:TPU gives a parameter of its shape, so no relayout of the table (a copy
of gigabytes) is ever materialized. The ids arrive by scalar prefetch; each
grid step fills the output block of `block_tokens` tokens with `in_flight`
DMAs outstanding. XLA tiles an HBM array's two minor dimensions by
`(ROW_TILE, 128)` (bf16 packs two rows per 32-bit word inside the tile), and
Mosaic only slices a tiled dimension at tile-aligned offsets, which decides
the kernel:

- rows on an untiled dimension (`[V, L, P]` with `L % ROW_TILE == 0`: XLA
  lays it out row-major) -> one DMA per row, straight into the output block;
- rows on a tiled dimension (`[V, L*P]`, Tunix main; and `[V, L, P]` with
  `L % ROW_TILE != 0`, google-tunix 0.1.7 at L=35, which XLA lays out
  L-major, `{2,0,1}`, so that L is not padded) -> one DMA per row of the
  whole `ROW_TILE`-row tile holding it into VMEM, then the row is picked with
  32-bit word loads and shifts. The kernel reads the table through the
  row-major view that is a bitcast of that layout (`[1, V, W]`, `[L, V, P]`).

A whole-tile DMA reads `ROW_TILE` times the row's bytes (8x at any dtype):
at E2B 4096 tokens read 587 MB of table for 73 MB of rows: 660 MB of HBM
traffic, where a gather that is not held to Mosaic's tile alignment (XLA's)
needs 147 MB (rows in, rows out) to 220 MB (bf16 rows in pairs, as they
share 32-bit words). By that roofline the XLA gather is the better default
on both Tunix layouts; this kernel runs when it is asked for.

This module holds the block sizes, the entry point with its `custom_vjp`
and the two `pallas_call`s; the kernel bodies are in `pallas_tpu_kernel`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels.ple import pallas_tpu_kernel

# Rows per sublane tile: a block's token count is a multiple of it for every
# dtype up to 8-bit packing.
NUM_SUBLANES_PACKED = 32
# Rows of XLA:TPU's HBM tile `T(8,128)` for 32-, 16- and 8-bit arrays (the
# packed dtypes add a sub-tile inside it, `(2,1)` for bf16).
ROW_TILE = _tpu.NUM_SUBLANES
# Unsigned word the tile kernel moves rows in: Mosaic loads and stores one
# 32-bit sublane at a dynamic offset, but not one packed 16-bit row.
WORD_BITS = 32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tokens per grid step and DMAs kept outstanding while copying them.

  At E2B (`L*P = 8960` bf16) 128 tokens make a 2.3 MB output block, 4.6 MB
  double-buffered, plus 8 in-flight tiles of 143 KB when rows are tiled:
  inside v5e's default 16 MB scoped VMEM.
  """
  block_tokens: int = 128
  in_flight: int = 8

  def __post_init__(self):
    if self.block_tokens < 1 or self.block_tokens % NUM_SUBLANES_PACKED:
      raise ValueError(f"block_tokens must be a positive multiple of "
                       f"{NUM_SUBLANES_PACKED}, got {self.block_tokens}")
    if self.in_flight < 1:
      raise ValueError(f"in_flight must be >= 1, got {self.in_flight}")

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()


def gather_rows(table, ids, *, block_sizes: BlockSizes | None = None,
                interpret: bool = False):
  """`table[ids]` for in-range ids, as a Pallas TPU kernel.

  Args:
    table: `[V, W]` or `[V, L, P]`, any dtype of at most 32 bits on TPU; stays
      in HBM. Read in place when `V % ROW_TILE == 0` (Gemma's vocab), else
      padded to a whole tile first (a copy).
    ids: int32 `[N]`, every id in `[0, V)` (callers map the rest to 0; an
      out-of-range id here reads out of bounds).
    block_sizes: tile sizes; `BlockSizes.get_default()` if None.
    interpret: run the kernel in interpret mode (CPU).

  Returns:
    `[N, *table.shape[1:]]` in the table's dtype. Differentiable in `table`
    (the cotangent is scattered back, for full fine-tuning).
  """
  block_sizes = block_sizes or BlockSizes.get_default()
  return _gather(table, ids, block_sizes, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gather(table, ids, block_sizes, interpret):
  return _gather_forward(table, ids, block_sizes, interpret)


def _gather_fwd(table, ids, block_sizes, interpret):
  rows = _gather_forward(table, ids, block_sizes, interpret)
  return rows, (ids, jax.ShapeDtypeStruct(table.shape, table.dtype))


def _gather_bwd(block_sizes, interpret, residuals, d_rows):
  del block_sizes, interpret
  ids, table_struct = residuals
  d_table = jnp.zeros(table_struct.shape, d_rows.dtype).at[ids].add(d_rows)
  return d_table.astype(table_struct.dtype), None


_gather.defvjp(_gather_fwd, _gather_bwd)


def rows_tiled(shape) -> bool:
  """Whether XLA:TPU tiles the vocab dimension of a table of `shape` in HBM
  (so a row cannot be sliced out by DMA). XLA lays `[V, L, P]` out L-major
  (`{2,0,1}`) unless `L` fills whole tiles."""
  return len(shape) == 2 or shape[1] % ROW_TILE != 0


def _gather_forward(table, ids, block_sizes, interpret):
  num_tokens = ids.shape[0]
  block_tokens = min(block_sizes.block_tokens,
                     _tpu.round_up(num_tokens, NUM_SUBLANES_PACKED))
  padded = _tpu.round_up(num_tokens, block_tokens)
  ids = _tpu.pad_axis(ids.astype(jnp.int32), 0, padded)
  in_flight = min(block_sizes.in_flight, block_tokens)
  if rows_tiled(table.shape):
    rows = _gather_tiles(table, ids, block_tokens, in_flight, interpret)
  else:
    rows = _gather_slabs(table, ids, block_tokens, in_flight, interpret)
  return rows[:num_tokens]


def _gather_slabs(table, ids, block_tokens, in_flight, interpret):
  """`[V, L, P]` laid out row-major: each row is one contiguous slab."""
  padded = ids.shape[0]
  row_shape = table.shape[1:]
  row_bytes = table.dtype.itemsize * math.prod(row_shape)
  kernel = functools.partial(pallas_tpu_kernel.slab_kernel,
                             block_tokens=block_tokens, in_flight=in_flight)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(padded // block_tokens,),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((block_tokens, *row_shape),
                                 lambda i, ids_ref: (i, 0, 0)),
          scratch_shapes=[pltpu.SemaphoreType.DMA((in_flight,))],
      ),
      out_shape=jax.ShapeDtypeStruct((padded, *row_shape), table.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel",)),
      cost_estimate=pl.CostEstimate(flops=0, transcendentals=0,
                                    bytes_accessed=2 * padded * row_bytes),
      interpret=interpret,
      name="ple_gather_slabs",
  )(ids, table)


def _gather_tiles(table, ids, block_tokens, in_flight, interpret):
  """Tables whose vocab dimension XLA tiles: whole tiles in, rows picked."""
  padded = ids.shape[0]
  vocab = table.shape[0]
  # Only small tables (tests) are padded: Gemma's vocab fills whole tiles.
  table = _tpu.pad_axis(table, 0, _tpu.round_up(vocab, ROW_TILE))
  # The row-major views that are bitcasts of XLA's layout: [planes, V, W].
  view = table[None] if table.ndim == 2 else jnp.transpose(table, (1, 0, 2))
  planes, _, width = view.shape
  bits = 8 * table.dtype.itemsize
  word = jnp.dtype(f"uint{max(WORD_BITS, bits)}")
  packing = max(WORD_BITS, bits) // bits
  kernel = functools.partial(pallas_tpu_kernel.tile_kernel,
                             block_tokens=block_tokens, in_flight=in_flight,
                             packing=packing, word=word, bits=bits)
  row_bytes = table.dtype.itemsize * planes * width
  rows = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(padded // block_tokens,),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((planes, block_tokens, width),
                                 lambda i, ids_ref: (0, i, 0)),
          scratch_shapes=[
              pltpu.VMEM((in_flight, planes, ROW_TILE, width), table.dtype),
              pltpu.SemaphoreType.DMA((in_flight,))],
      ),
      out_shape=jax.ShapeDtypeStruct((planes, padded, width), table.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel",)),
      cost_estimate=pl.CostEstimate(
          flops=0, transcendentals=0,
          bytes_accessed=(ROW_TILE + 1) * padded * row_bytes),
      interpret=interpret,
      name="ple_gather_tiles",
  )(ids, view)
  return rows[0] if table.ndim == 2 else jnp.transpose(rows, (1, 0, 2))

