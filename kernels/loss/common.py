"""Tile math shared by the XLA and Pallas versions of the fused loss.

Everything here works on one `[tokens, vocab]` tile in float32, so it runs
unchanged inside `lax.scan` bodies and Pallas kernel bodies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def precision(dtype):
  """float32 inputs keep float32 products (as the reference); bf16 needs no
  extra passes."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


def matmul_nt(a, b):
  """`a [M, K] @ b [N, K].T` accumulated in float32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             precision=precision(a.dtype),
                             preferred_element_type=jnp.float32)


def matmul(a, b):
  """`a [M, K] @ b [K, N]` accumulated in float32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             precision=precision(a.dtype),
                             preferred_element_type=jnp.float32)


def matmul_t(a, b):
  """`a [K, M].T @ b [K, N]` accumulated in float32."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             precision=precision(a.dtype),
                             preferred_element_type=jnp.float32)


def softcap_logits(z, softcap):
  """`(c * tanh(z / c), tanh(z / c))`, or `(z, None)` without a softcap."""
  if softcap is None:
    return z, None
  tanh = jnp.tanh(z / softcap)
  return softcap * tanh, tanh


def logit_grad(logits, tanh, is_target, lse, scale, softcap):
  """d loss / d z for one tile: `scale * (softmax - onehot) * (1 - tanh^2)`.

  Columns at -inf logits (vocab padding) get 0.
  """
  dlogits = jnp.exp(logits - lse) - is_target.astype(jnp.float32)
  if softcap is not None:
    dlogits = dlogits * (1.0 - tanh * tanh)
  return scale * dlogits
