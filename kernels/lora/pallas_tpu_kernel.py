"""The body of the fused LoRA matmul kernel (`pallas_tpu.fused_matmul`).

Per `(row block i, output column block j, contraction block k)`: the `x`
tile is multiplied by the `W` tile into a float32 accumulator and, in the
first column block only, by the `A` tile into the float32 `x @ A`
accumulator of the row block; the last contraction step adds
`scale * mask(x @ A) @ B` and writes the output tile.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp


def lora_matmul_kernel(*refs, scale, rank, num_k, has_ids, has_w_scale,
                       transpose_w, save_down):
  """Refs, in order: `adapter_ids_ref` (with `has_ids`), `x_ref`, `w_ref`,
  `w_scale_ref` (with `has_w_scale`), `a_ref`, `b_ref`; outputs `out_ref`,
  `down_out_ref` (with `save_down`); scratch `acc_ref`, `down_ref`."""
  refs = list(refs)
  ids_ref = refs.pop(0) if has_ids else None
  x_ref, w_ref = refs.pop(0), refs.pop(0)
  ws_ref = refs.pop(0) if has_w_scale else None
  a_ref, b_ref, out_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  down_out_ref = refs.pop(0) if save_down else None
  acc_ref, down_ref = refs
  j, k = pl.program_id(1), pl.program_id(2)

  @pl.when(k == 0)
  def _init_acc():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when((j == 0) & (k == 0))
  def _init_down():
    down_ref[...] = jnp.zeros_like(down_ref)

  x = x_ref[...]
  w = w_ref[...]
  if has_w_scale:  # int8 weight: dequantize the tile for the MXU
    w = (w.astype(jnp.float32) * ws_ref[...]).astype(x.dtype)
  if transpose_w:
    base = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
  else:
    base = jnp.dot(x, w, preferred_element_type=jnp.float32)
  acc_ref[...] += base

  @pl.when(j == 0)
  def _down():
    down_ref[...] += jnp.dot(x, a_ref[...].astype(x.dtype),
                             preferred_element_type=jnp.float32)

  @pl.when(k == num_k - 1)
  def _epilogue():
    down = down_ref[...]
    if has_ids:
      column_adapter = jax.lax.div(
          jax.lax.broadcasted_iota(jnp.int32, down.shape, 1), rank)
      down = jnp.where(column_adapter == ids_ref[...], down, 0.0)
    if save_down:
      down_out_ref[...] = down
    # Kept in float32: the rank-R intermediate is not rounded to x's dtype.
    delta = jnp.dot(down * scale, b_ref[...].astype(jnp.float32),
                    preferred_element_type=jnp.float32)
    out_ref[...] = (acc_ref[...] + delta).astype(out_ref.dtype)
