"""The LoRA matmul in plain XLA: the default everywhere (`ops.TPU_DEFAULT`).

The same math as the Pallas kernel: float32 accumulation, the rank-r
product `x @ A` kept in float32 (not rounded to x's dtype), `W` frozen
(`stop_gradient`: no `dW`), an int8 `W` dequantized per output
channel, and many adapters run as one stacked adapter with a per-row column
mask (`adapters.py`). XLA tiles the dots itself, so no explicit
blocking is needed; autodiff gives `dx`, `dA`, `dB`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma4_jax.kernels.lora import adapters


def lora_matmul(x, w, a, b, *, scale: float, adapter_ids=None, w_scale=None):
  """`x @ w + scale * (x @ a) @ b`; arguments as `pallas_tpu.lora_matmul`.

  Returns:
    `[M, N]` in x's dtype.
  """
  delta = lora_delta(x, a, b, scale=scale, adapter_ids=adapter_ids)
  return (frozen_matmul(x, w, w_scale=w_scale) + delta).astype(x.dtype)


def frozen_matmul(x, w, *, w_scale=None):
  """`x @ w` with `w` frozen (dequantized when int8), accumulated in float32.

  A bf16 product is rounded to bf16 before the float32 add of the LoRA term
  (the kernel adds before rounding): XLA:TPU then fuses the add and the
  cast into the matmul. Kept in float32, the product is a float32 `[M, N]`
  temporary of twice y's size: compiled for v5e, fwd + bwd of 1536 -> 6144
  at 32768 tokens needed 1152 MiB of temporaries, against 384 MiB for
  qwix's path and 385 MiB this way.
  """
  w = jax.lax.stop_gradient(w)
  if w_scale is not None:
    w = w.astype(jnp.float32) * jax.lax.stop_gradient(w_scale)
    return jnp.dot(x.astype(jnp.float32), w)
  dtype = jnp.promote_types(x.dtype, w.dtype)
  return jnp.dot(x.astype(dtype), w.astype(dtype),
                 preferred_element_type=dtype).astype(jnp.float32)


def lora_delta(x, a, b, *, scale: float, adapter_ids=None):
  """`scale * (x @ a) @ b` in float32, `[M, N]`."""
  if adapter_ids is None:
    a_cat, b_cat = a, b
  else:
    a_cat, b_cat, rank = adapters.stack_adapters(a, b)
  down = jnp.dot(x.astype(jnp.float32), a_cat.astype(jnp.float32))
  if adapter_ids is not None:
    down = adapters.own_adapter_columns(down, adapter_ids[:, None], rank)
  return jnp.dot(scale * down, b_cat.astype(jnp.float32))
