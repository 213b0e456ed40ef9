"""Fused per-layer-input combine: RMS norm of the projection plus the rows.

`(rms_norm(x @ (W * D**-0.5)) * scale + rows * sqrt(P)) * rsqrt(2)`, with
Tunix's dtype casts: the projection runs in the embeddings' dtype, the norm
in float32 (cast back to the embeddings' dtype), the rows are scaled in the
table's dtype, and the sum is in their promoted dtype.

Autodiff of Tunix's expression keeps several `[B, T, L, P]` intermediates
alive for the backward pass (the projection, its float32 copy, the inverse
RMS, the normed values). Here the part after the matmul is one `custom_vjp`
whose only residual is the projection, which the matmul writes anyway; its
forward and backward passes are each one elementwise pass, so the
`[B, T, L, P]` intermediates are written once. The matmul stays a matmul
(XLA's, or the caller's: a qwix-LoRA'd Einsum passes its own projection).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gemma4_jax.reference import ple as ple_reference


def per_layer_inputs(embeddings, rows, model_projection, projection_norm_scale,
                     *, num_layers: int, per_layer_dim: int):
  """The whole combine, given the gathered rows.

  Args:
    embeddings: `[B, T, D]`, floating (the compute dtype).
    rows: `[B, T, L, P]` gathered per-layer rows, in the table's dtype.
    model_projection: `[D, L, P]` or `[D, L*P]`, unscaled.
    projection_norm_scale: `[P]`.
    num_layers, per_layer_dim: L and P.

  Returns:
    `[B, T, L, P]` in `result_type(embeddings, rows)` (Tunix's dtype).
  """
  embed_dim = embeddings.shape[-1]
  w = (model_projection * embed_dim ** -0.5).astype(embeddings.dtype)
  w = w.reshape(embed_dim, num_layers, per_layer_dim)
  projected = jnp.einsum("btd,dlp->btlp", embeddings, w)
  return normalize_and_add(projected, rows, projection_norm_scale)


def normalize_and_add(projected, rows, projection_norm_scale):
  """`(rms_norm(projected) * scale + rows * sqrt(P)) * rsqrt(2)`, fused.

  Args:
    projected: `[B, T, L, P]` in the compute dtype.
    rows: `[B, T, L, P]` in the table's dtype.
    projection_norm_scale: `[P]`.

  Returns:
    `[B, T, L, P]` in `result_type(projected, rows)`.
  """
  return _normalize_and_add(projected, rows, projection_norm_scale)


def _normalize(projected, scale):
  p32 = projected.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(p32), axis=-1, keepdims=True)
                          + ple_reference.RMS_NORM_EPS)
  return p32, inv_rms, p32 * inv_rms * scale.astype(jnp.float32)


@jax.custom_vjp
def _normalize_and_add(projected, rows, scale):
  return _normalize_and_add_fwd(projected, rows, scale)[0]


def _normalize_and_add_fwd(projected, rows, scale):
  _, _, normed = _normalize(projected, scale)
  scaled_rows = rows * jnp.asarray(math.sqrt(rows.shape[-1]), rows.dtype)
  out = ((normed.astype(projected.dtype) + scaled_rows)
         * jnp.asarray(2.0 ** -0.5, projected.dtype))
  residuals = (projected, scale, jax.ShapeDtypeStruct((), rows.dtype))
  return out, residuals


def _normalize_and_add_bwd(residuals, d_out):
  projected, scale, rows_dtype = residuals
  d_sum = d_out.astype(jnp.float32) * 2.0 ** -0.5
  d_rows = (d_sum * math.sqrt(projected.shape[-1])).astype(rows_dtype.dtype)
  p32, inv_rms, _ = _normalize(projected, scale)
  d_scale = jnp.sum(d_sum * p32 * inv_rms, axis=tuple(range(p32.ndim - 1)))
  d_unit = d_sum * scale.astype(jnp.float32)  # d of p32 * inv_rms
  d_p32 = inv_rms * (d_unit - p32 * jnp.square(inv_rms) *
                     jnp.mean(d_unit * p32, axis=-1, keepdims=True))
  return (d_p32.astype(projected.dtype), d_rows,
          d_scale.astype(scale.dtype))


_normalize_and_add.defvjp(_normalize_and_add_fwd, _normalize_and_add_bwd)
