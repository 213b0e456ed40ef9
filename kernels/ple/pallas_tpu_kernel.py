"""Kernel bodies of the Pallas TPU row gather (`pallas_tpu`).

Both take the ids by scalar prefetch and the table in HBM, and fill the
output block of `block_tokens` tokens with `in_flight` DMAs outstanding:
`slab_kernel` copies a row straight into the block (rows on an untiled
dimension), `tile_kernel` copies the whole tile holding it into VMEM and
picks the row out with 32-bit word loads and shifts (rows on a tiled
dimension).
"""

from __future__ import annotations

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp


def slab_kernel(ids_ref, table_hbm_ref, rows_ref, copy_sems_ref, *,
                block_tokens: int, in_flight: int):
  first = pl.program_id(0) * block_tokens

  def copy(j):
    return pltpu.make_async_copy(
        table_hbm_ref.at[pl.ds(ids_ref[first + j], 1)],
        rows_ref.at[pl.ds(j, 1)], copy_sems_ref.at[lax.rem(j, in_flight)])

  def start(j, carry):
    # Reuse a semaphore only once the copy that last signalled it is done.
    @pl.when(j >= in_flight)
    def _():
      copy(j - in_flight).wait()

    copy(j).start()
    return carry

  def finish(j, carry):
    copy(j).wait()
    return carry

  lax.fori_loop(0, block_tokens, start, None)
  lax.fori_loop(block_tokens - in_flight, block_tokens, finish, None)


def tile_kernel(ids_ref, table_hbm_ref, rows_ref, tiles_ref, copy_sems_ref, *,
                block_tokens: int, in_flight: int, packing: int, word,
                bits: int):
  # table_hbm_ref [planes, V, W]; rows_ref [planes, block_tokens, W];
  # tiles_ref [in_flight, planes, ROW_TILE, W]. Token j's tile sits in slot
  # j % in_flight. `packing` rows share a word (rows 2k, 2k+1 of bf16: the
  # low half is row 2k), in the tile as in the output block.
  first = pl.program_id(0) * block_tokens
  row_tile = tiles_ref.shape[2]  # pallas_tpu.ROW_TILE
  tile_words = tiles_ref.bitcast(word)  # [in_flight, planes, ROW_TILE/p, W]
  planes, _, width = rows_ref.shape
  # The output is stored a full 32-bit tile at a time, ROW_TILE words of
  # `packing` rows: Mosaic stores a packed dtype's block at a dynamic row
  # offset only if it is a multiple of its VMEM tile (8/16/32 rows for
  # 32/16/8 bits), and the interpreter cannot store through a bitcast ref.
  group_rows = row_tile * packing
  group_shape = (planes, row_tile, width)
  word_index = lax.broadcasted_iota(jnp.int32, group_shape, 1)

  def copy(j):
    return _tile_copy(ids_ref, table_hbm_ref, tiles_ref, copy_sems_ref,
                      token=first + j, slot=lax.rem(j, in_flight))

  def start(j, carry):
    copy(j).start()
    return carry

  def row_word(j, k):
    """Token j's row, shifted into its place k in the output's word."""
    copy(j).wait()
    within = lax.rem(ids_ref[first + j], row_tile)
    value = _packed_row(tile_words, lax.rem(j, in_flight), within, k,
                        packing=packing, word=word, bits=bits)

    # The tile's word is in registers: refill the slot for token j+in_flight.
    @pl.when(j + in_flight < block_tokens)
    def _():
      copy(j + in_flight).start()

    return value

  def fill_group(g, carry):
    first_row = g * group_rows
    group = jnp.zeros(group_shape, word)
    for w in range(row_tile):
      value = row_word(first_row + w * packing, 0)
      for k in range(1, packing):
        value = value | row_word(first_row + w * packing + k, k)
      group = jnp.where(word_index == w,
                        jnp.broadcast_to(value, group_shape), group)
    rows_ref[:, pl.ds(pl.multiple_of(first_row, group_rows), group_rows),
             :] = pltpu.bitcast(group, rows_ref.dtype)
    return carry

  lax.fori_loop(0, in_flight, start, None)
  lax.fori_loop(0, block_tokens // group_rows, fill_group, None)


def _tile_copy(ids_ref, table_hbm_ref, tiles_ref, copy_sems_ref, *, token,
               slot):
  """The DMA of the tile holding `token`'s row into `tiles_ref[slot]`."""
  row_tile = tiles_ref.shape[2]  # pallas_tpu.ROW_TILE
  # lax.div/rem, not // and %: ids are non-negative, and Python's floor
  # semantics would lower through `sign`, which asks for the TPU's
  # generation at trace time (unknown when compiling from a CPU host).
  tile_start = lax.div(ids_ref[token], row_tile) * row_tile
  return pltpu.make_async_copy(
      table_hbm_ref.at[:, pl.ds(pl.multiple_of(tile_start, row_tile),
                                row_tile)],
      tiles_ref.at[slot], copy_sems_ref.at[slot])


def _packed_row(tile_words, slot, within, k, *, packing: int, word,
                bits: int):
  """Row `within` of the tile in `slot`, shifted into place k of a word."""
  # One 32-bit sublane at a dynamic offset: Mosaic cannot load a single
  # packed row, and its shifts are cheap next to the tile's DMA.
  value = tile_words[slot, :, pl.ds(lax.div(within, packing), 1), :]
  if packing > 1:
    mask = word.type((1 << bits) - 1)
    shift = (lax.rem(within, packing) * bits).astype(word)
    value = ((value >> shift) & mask) << word.type(k * bits)
  return value
