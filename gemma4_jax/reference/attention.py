"""Float32 reference attention: dense scores, explicit masks, no tricks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma4_jax import masks

HIGHEST = jax.lax.Precision.HIGHEST


def attention(q, k, v, *, mask=None, segment_ids=None, causal=True,
              sliding_window=None, softcap=None, scale=None):
  """softmax(softcap(scale * q k^T) masked) v, in float32; empty rows give 0.

  q `[B,T,N,H]`, k/v `[B,S,K,H]` with N % K == 0; queries are end-aligned
  to keys (query i sits at position i + S - T). Returns `[B,T,N,H]` in q's
  dtype.
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  scale = head_dim ** -0.5 if scale is None else scale
  group = num_heads // num_kv_heads
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  k32 = jnp.repeat(k32, group, axis=2)  # query head n reads kv head n // group
  v32 = jnp.repeat(v32, group, axis=2)

  logits = jnp.einsum("btnh,bsnh->bnts", q32, k32, precision=HIGHEST) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  visible = masks.visibility(
      batch=batch, num_heads=num_heads, q_len=q_len, kv_len=kv_len, mask=mask,
      segment_ids=segment_ids, causal=causal, sliding_window=sliding_window)
  visible = jnp.broadcast_to(visible, logits.shape)

  # Masked logits are replaced by the row max before exp, so that neither the
  # value nor the gradient of a masked entry can be inf or NaN.
  row_max = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1,
                    keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(visible, jnp.exp(jnp.where(visible, logits, row_max)
                                       - row_max), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)  # empty row -> all 0
  out = jnp.einsum("bnts,bsnh->btnh", probs, v32, precision=HIGHEST)
  return out.astype(q.dtype)
