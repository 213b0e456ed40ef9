"""Gemma 4 attention in plain XLA: grouped heads, float32 softmax.

Runs anywhere XLA does. K/V are never repeated per query head (MQA reads one
K/V head for all eight query heads); scores and softmax are float32 whatever
the input dtype; rows with no visible key give 0 and zero gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma4_jax import masks


def attention(q, k, v, *, mask=None, segment_ids=None, causal=True,
              sliding_window=None, softcap=None, scale=None):
  """See `gemma4_jax.ops.attention`; arguments are assumed validated."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  scale = head_dim ** -0.5 if scale is None else scale

  q = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k,
                      preferred_element_type=jnp.float32)
  logits = logits * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)

  visible = masks.visibility(
      batch=batch, num_heads=num_heads, q_len=q_len, kv_len=kv_len, mask=mask,
      segment_ids=segment_ids, causal=causal, sliding_window=sliding_window)
  if visible.shape[1] == num_heads:  # per-head mask: split heads into groups
    visible = visible.reshape(visible.shape[0], num_kv_heads, group, q_len,
                              kv_len)
  else:  # one mask for all heads
    visible = visible[:, :, None]

  row_max = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1,
                    keepdims=True)
  row_max = jax.lax.stop_gradient(
      jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.where(visible, jnp.exp(jnp.where(visible, logits, row_max)
                                       - row_max), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
