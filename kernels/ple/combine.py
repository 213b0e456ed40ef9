"""Fused per-layer-input combine: projection, RMS norm, rows, in one op.

`(rms_norm(x @ (W * D**-0.5)) * scale + rows * sqrt(P)) * rsqrt(2)`, with
Tunix's dtype casts: the projection runs in the embeddings' dtype, the norm
in float32 (cast back to the embeddings' dtype), the rows are scaled in the
table's dtype, and the sum is in their promoted dtype.

Autodiff of Tunix's expression keeps several `[B, T, L, P]` intermediates
alive for the backward pass (the projection, its float32 copy, the inverse
RMS, the normed values). Here a `custom_vjp` keeps only the projection,
written once by the matmul, and the backward pass recomputes the rest in one
elementwise pass: the `[B, T, L, P]` intermediates are written once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

RMS_NORM_EPS = 1e-6


def per_layer_inputs(embeddings, rows, model_projection, projection_norm_scale,
                     *, num_layers: int, per_layer_dim: int):
  """The combine, given the gathered rows.

  Args:
    embeddings: `[B, T, D]`, floating (the compute dtype).
    rows: `[B, T, L, P]` gathered per-layer rows, in the table's dtype.
    model_projection: `[D, L, P]` or `[D, L*P]`, unscaled.
    projection_norm_scale: `[P]`.
    num_layers, per_layer_dim: L and P.

  Returns:
    `[B, T, L, P]` in `result_type(embeddings, rows)` (Tunix's dtype).
  """
  return _combine(embeddings, rows, model_projection, projection_norm_scale,
                  (num_layers, per_layer_dim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _combine(x, rows, w, scale, dims):
  return _combine_fwd(x, rows, w, scale, dims)[0]


def _project(x, w, dims):
  embed_dim = x.shape[-1]
  w = (w * embed_dim ** -0.5).astype(x.dtype).reshape(embed_dim, *dims)
  return jnp.einsum("btd,dlp->btlp", x, w), w


def _normalize(projected, scale):
  p32 = projected.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(p32), axis=-1, keepdims=True)
                          + RMS_NORM_EPS)
  return p32, inv_rms, p32 * inv_rms * scale.astype(jnp.float32)


def _combine_fwd(x, rows, w, scale, dims):
  projected, _ = _project(x, w, dims)
  _, _, normed = _normalize(projected, scale)
  normed = normed.astype(x.dtype)
  per_layer_dim = dims[1]
  scaled_rows = rows * jnp.asarray(math.sqrt(per_layer_dim), rows.dtype)
  out = (normed + scaled_rows) * jnp.asarray(2.0 ** -0.5, x.dtype)
  residuals = (x, w, scale, projected, jax.ShapeDtypeStruct((), rows.dtype))
  return out, residuals


def _combine_bwd(dims, residuals, d_out):
  x, w, scale, projected, rows_dtype = residuals
  embed_dim = x.shape[-1]
  d_sum = d_out.astype(jnp.float32) * 2.0 ** -0.5
  d_rows = (d_sum * math.sqrt(dims[1])).astype(rows_dtype.dtype)
  p32, inv_rms, _ = _normalize(projected, scale)
  d_scale = jnp.sum(d_sum * p32 * inv_rms, axis=(0, 1, 2))
  d_unit = d_sum * scale.astype(jnp.float32)  # d of p32 * inv_rms
  d_p32 = inv_rms * (d_unit - p32 * jnp.square(inv_rms) *
                     jnp.mean(d_unit * p32, axis=-1, keepdims=True))
  d_projected = d_p32.astype(x.dtype)
  _, w_used = _project(x, w, dims)
  d_x = jnp.einsum("btlp,dlp->btd", d_projected, w_used)
  d_w = jnp.einsum("btd,btlp->dlp", x, d_projected)
  d_w = (d_w.astype(jnp.float32) * embed_dim ** -0.5).reshape(w.shape)
  return (d_x.astype(x.dtype), d_rows, d_w.astype(w.dtype),
          d_scale.astype(scale.dtype))


_combine.defvjp(_combine_fwd, _combine_bwd)
