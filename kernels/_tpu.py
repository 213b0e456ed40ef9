"""TPU tiling facts and the small array helpers every kernel folder uses.

A TPU vector register is 8 sublanes x 128 lanes of 32-bit words; Mosaic
tiles a block's last two dims by (8, 128) for 32-bit types, (16, 128) for
16-bit ones and (32, 128) for 8-bit ones. Block shapes that are not
multiples of these are padded in VMEM or refused. Hence each kernel's
`BlockSizes` checks its fields against a multiple (`check_block_sizes`).
"""

from __future__ import annotations

import jax.numpy as jnp

NUM_LANES = 128
NUM_SUBLANES = 8


def round_up(value: int, multiple: int) -> int:
  """The least multiple of `multiple` that is >= `value`."""
  return -(-value // multiple) * multiple


def pad_axis(x, axis: int, size: int):
  """Zero-pads `x` along `axis` up to `size` (no-op when already there)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


# Per-row statistics (a logsumexp, a target id) travel between kernels as
# lane-major `(1, n)` rows: an `(n, 1)` column would be padded to 128 lanes
# in HBM (512 B a value: 16 MiB at 32k tokens). Mosaic transposes whole
# (8, 128) tiles, hence the broadcasts to 128 lanes around each transpose.


def row_to_column(row, width: int = 1):
  """A lane-major `(1, n)` row as an `(n, width)` column (each value
  repeated over `width` <= NUM_LANES lanes)."""
  return jnp.broadcast_to(row, (NUM_LANES, row.shape[-1])).T[:, :width]


def column_to_row(column):
  """An `(n, 1)` or lane-replicated `(n, NUM_LANES)` column as a lane-major
  `(1, n)` row."""
  return jnp.broadcast_to(column, (column.shape[0], NUM_LANES)).T[:1]


def check_block_sizes(block_sizes, **multiples: int) -> None:
  """Checks a `BlockSizes`: each named field is a positive int and a
  multiple of its entry in `multiples` (1: any positive int).

  Raises:
    ValueError: `BlockSizes.<name> must be a positive multiple of <m>` (or
      `a positive int`), with the value given.
  """
  for name, multiple in multiples.items():
    value = getattr(block_sizes, name)
    if not isinstance(value, int) or value < 1 or value % multiple:
      what = "int" if multiple == 1 else f"multiple of {multiple}"
      raise ValueError(f"BlockSizes.{name} must be a positive {what}, got "
                       f"{value!r}")
