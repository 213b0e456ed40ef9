"""Public functional ops; each picks an implementation for the platform.

`implementation=None` picks Pallas on TPU and the XLA version elsewhere (the
env var `GEMMA4_JAX_IMPLEMENTATION` overrides the default); `"pallas_tpu"`,
`"xla"` and `"reference"` force one and raise if it cannot run here.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from gemma4_jax import implementations
from gemma4_jax import masks
from gemma4_jax.kernels.attention import sharding as attention_sharding
from gemma4_jax.kernels.attention import xla as attention_xla
from gemma4_jax.reference import attention as attention_reference

_ATTENTION = {
    implementations.XLA: attention_xla.attention,
    implementations.REFERENCE: attention_reference.attention,
}
# op name -> implementations it has, in order of preference.
AVAILABLE = {"attention": tuple(_ATTENTION)}


def attention(q, k, v, *, mask=None, segment_ids=None, causal=True,
              sliding_window=None, softcap=None, scale=None,
              implementation=None, interpret=False):
  """Gemma 4 attention for any mask rank, any length, MHA/GQA/MQA.

  Args:
    q: queries `[B, T, N, H]`.
    k, v: keys and values `[B, S, K, H]`, `N % K == 0`; floating, same dtype
      as q.
    mask: optional boolean, True = may attend: `[T,S]`, `[B,T,S]`,
      `[B,1,T,S]` or `[B,N,T,S]`.
    segment_ids: optional `[B,T]` ints (T == S) or a `(q [B,T], kv [B,S])`
      pair; a query sees only keys of its own segment.
    causal: query i (at position i + S - T) sees key j iff j <= i + S - T.
    sliding_window: W; additionally j > i + S - T - W (W keys including
      itself, Tunix's convention).
    softcap: c; logits become c * tanh(logits / c) before masking.
    scale: multiplies q k^T; defaults to H ** -0.5 (Gemma 4 uses 1.0).
    implementation: None, "xla" or "reference" (see module docstring).
    interpret: run a Pallas kernel in interpret mode (CPU).

  Returns:
    `[B, T, N, H]` in q's dtype. A query with no visible key gives 0. Under
    a mesh with Tunix's axes (`jax.set_mesh` or `with mesh:`), batch over
    `fsdp` and query heads over `tp` (see `kernels.attention.sharding`).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_attention_args(q, k, v, mask=mask, segment_ids=segment_ids,
                        sliding_window=sliding_window, softcap=softcap,
                        scale=scale)
  name = implementations.resolve("attention", implementation,
                                 tuple(_ATTENTION), interpret=interpret)
  run = functools.partial(_ATTENTION[name], causal=causal,
                          sliding_window=sliding_window, softcap=softcap,
                          scale=scale)
  # Under a ('fsdp', 'tp') mesh each shard runs `run` in shard_map.
  return attention_sharding.attention(run, q, k, v, mask=mask,
                                      segment_ids=segment_ids)


def _check_attention_args(q, k, v, *, mask, segment_ids, sliding_window,
                          softcap, scale):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D ({'[B,T,N,H]' if name == 'q' else '[B,S,K,H]'}), "
                       f"got shape {getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating, got {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} "
                     f"and v {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")
  (batch, q_len, num_heads, head_dim), (kv_batch, kv_len, num_kv_heads, kv_dim) = q.shape, k.shape
  if kv_batch != batch:
    raise ValueError(f"q batch B={batch} but k/v batch is {kv_batch}")
  if kv_dim != head_dim:
    raise ValueError(f"q head_dim H={head_dim} but k/v head_dim is {kv_dim}")
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(f"query heads N={num_heads} must be a multiple of kv "
                     f"heads K={num_kv_heads}")
  if sliding_window is not None and (not isinstance(sliding_window, int)
                                     or sliding_window < 1):
    raise ValueError(f"sliding_window must be a positive int or None, got "
                     f"{sliding_window!r}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be positive or None, got {softcap!r}")
  if scale is not None and not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a Python number or None, got "
                    f"{type(scale).__name__}")
  if mask is not None:
    masks.canonical_mask(mask, batch=batch, num_heads=num_heads, q_len=q_len,
                         kv_len=kv_len)
  if segment_ids is not None:
    masks.canonical_segment_ids(segment_ids, batch=batch, q_len=q_len,
                                kv_len=kv_len)
