"""TPU tiling facts and the small array helpers every kernel folder uses.

A TPU vector register is 8 sublanes x 128 lanes of 32-bit words; Mosaic
tiles a block's last two dims by (8, 128) for 32-bit types, (16, 128) for
16-bit ones and (32, 128) for 8-bit ones. Block shapes that are not
multiples of these are padded in VMEM or refused.
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
