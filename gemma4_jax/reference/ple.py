"""Float32 reference per-layer inputs (PLE): a table gather plus a projection.

Gemma 4 feeds every decoder layer l an extra `[P]` vector per token, built
from the token id (a row of the per-layer table) and the token's embedding
(a projection, RMS-normed). Tunix stores the table as `[V, L, P]`
(google-tunix 0.1.7) or `[V, L*P]` (current Tunix, with the projection as
`[D, L*P]`); both mean the same numbers, and both map token ids outside
`[0, V)` to id 0 before the gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
RMS_NORM_EPS = 1e-6


def ple_lookup(per_layer_table, tokens, *, num_layers, per_layer_dim):
  """Gathers each token's per-layer rows; ids outside `[0, V)` read row 0.

  Args:
    per_layer_table: `[V, L, P]` or `[V, L*P]`.
    tokens: integer ids `[B, T]`.
    num_layers: L.
    per_layer_dim: P.

  Returns:
    `[B, T, L, P]` in the table's dtype, unscaled.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_lookup(per_layer_table, tokens, num_layers=num_layers,
                per_layer_dim=per_layer_dim)
  return _lookup(per_layer_table, tokens, num_layers, per_layer_dim)


def per_layer_inputs(embeddings, tokens, per_layer_table, model_projection,
                     projection_norm_scale, *, num_layers, per_layer_dim):
  """Tunix's `Embedder.encode_per_layer_input`, in float32.

  `(rms_norm(embeddings @ (model_projection * D**-0.5)) * norm_scale
  + sqrt(P) * table[tokens]) / sqrt(2)`, the norm taken over P per layer.

  Args:
    embeddings: the scaled token embeddings `[B, T, D]` (`Embedder.encode`).
    tokens: integer ids `[B, T]`; ids outside `[0, V)` read row 0, as Tunix.
    per_layer_table: `[V, L, P]` or `[V, L*P]`.
    model_projection: the raw `per_layer_model_projection.w`, `[D, L, P]` or
      `[D, L*P]` (the `D**-0.5` runtime scale is applied here).
    projection_norm_scale: `per_layer_projection_norm.scale`, `[P]`.
    num_layers: L.
    per_layer_dim: P.

  Returns:
    `[B, T, L, P]` in the embeddings' dtype.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_lookup(per_layer_table, tokens, num_layers=num_layers,
                per_layer_dim=per_layer_dim)
  check_combine_args(embeddings, tokens, model_projection,
                     projection_norm_scale, num_layers=num_layers,
                     per_layer_dim=per_layer_dim)
  embed_dim = embeddings.shape[-1]

  x = embeddings.astype(jnp.float32)
  w = model_projection.astype(jnp.float32).reshape(embed_dim, num_layers,
                                                   per_layer_dim)
  projected = jnp.einsum("btd,dlp->btlp", x, w * embed_dim ** -0.5,
                         precision=HIGHEST)
  variance = jnp.mean(jnp.square(projected), axis=-1, keepdims=True)
  normed = (projected * jax.lax.rsqrt(variance + RMS_NORM_EPS)
            * projection_norm_scale.astype(jnp.float32))
  rows = _lookup(per_layer_table, tokens, num_layers, per_layer_dim)
  rows = rows.astype(jnp.float32) * jnp.sqrt(jnp.float32(per_layer_dim))
  return ((normed + rows) * 2.0 ** -0.5).astype(embeddings.dtype)


# The checks below are the reference's own (its tests assert that it raises)
# and the shape checks `gemma4_jax.ops.ple` runs, once, in front of every
# implementation: one copy of each message.


def check_table(per_layer_table, *, num_layers, per_layer_dim):
  """`per_layer_table` is `[V, L, P]` or `[V, L*P]` for these L and P.

  Raises:
    ValueError: naming the table's shape and the expected one.
  """
  shape = getattr(per_layer_table, "shape", None)
  if shape is None or len(shape) not in (2, 3):
    raise ValueError(f"per_layer_table must be [V, L, P] or [V, L*P], got "
                     f"shape {shape}")
  want = ((num_layers, per_layer_dim) if len(shape) == 3
          else (num_layers * per_layer_dim,))
  if tuple(shape[1:]) != want:
    raise ValueError(f"per_layer_table of shape {tuple(shape)} does not match "
                     f"num_layers={num_layers}, per_layer_dim={per_layer_dim}: "
                     f"expected [V, *{want}]")


def check_tokens(tokens):
  """`tokens` is an integer `[B, T]` array.

  Raises:
    TypeError / ValueError: naming the dtype or shape given.
  """
  dtype = getattr(tokens, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"tokens must be an integer array, got dtype {dtype}")
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")


def check_combine_args(embeddings, tokens, model_projection,
                       projection_norm_scale, *, num_layers, per_layer_dim):
  """`per_layer_inputs`' arguments other than the table agree in shape.

  Raises:
    ValueError: naming the argument, the expected and the actual shape.
  """
  if getattr(embeddings, "ndim", None) != 3:
    raise ValueError(f"embeddings must be [B, T, D], got shape "
                     f"{getattr(embeddings, 'shape', type(embeddings))}")
  if embeddings.shape[:2] != tokens.shape:
    raise ValueError(f"embeddings [B, T, D] and tokens [B, T] disagree: "
                     f"{embeddings.shape} vs {tokens.shape}")
  embed_dim = embeddings.shape[-1]
  layouts = ((embed_dim, num_layers, per_layer_dim),
             (embed_dim, num_layers * per_layer_dim))
  if getattr(model_projection, "shape", None) not in layouts:
    raise ValueError(f"model_projection must be [D, L, P] = {layouts[0]} or "
                     f"[D, L*P] = {layouts[1]}, got shape "
                     f"{getattr(model_projection, 'shape', None)}")
  if getattr(projection_norm_scale, "shape", None) != (per_layer_dim,):
    raise ValueError(f"projection_norm_scale must be [P] = "
                     f"{(per_layer_dim,)}, got shape "
                     f"{getattr(projection_norm_scale, 'shape', None)}")


def _lookup(per_layer_table, tokens, num_layers, per_layer_dim):
  vocab_size = per_layer_table.shape[0]
  in_range = (tokens >= 0) & (tokens < vocab_size)
  tokens = jnp.where(in_range, tokens, 0)
  table = per_layer_table.reshape(vocab_size, num_layers, per_layer_dim)
  return table[tokens]  # [B, T, L, P]


def _check_lookup(per_layer_table, tokens, *, num_layers, per_layer_dim):
  for name, value in (("num_layers", num_layers),
                      ("per_layer_dim", per_layer_dim)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  check_table(per_layer_table, num_layers=num_layers,
              per_layer_dim=per_layer_dim)
  check_tokens(tokens)
