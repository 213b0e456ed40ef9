"""Gemma 4 attention: any mask rank and length, softcap, sliding window, MQA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gemma4_jax import implementations
from gemma4_jax import masks
from gemma4_jax import validation
from gemma4_jax.kernels import attention as attention_names
from gemma4_jax.kernels.attention import pallas_tpu as attention_pallas_tpu
from gemma4_jax.kernels.attention import sharding as attention_sharding
from gemma4_jax.kernels.attention import xla as attention_xla
from gemma4_jax.reference import attention as attention_reference

# Remat policies may save these (`patches.apply(remat="attention")`).
ATTENTION_OUTPUT = attention_names.OUTPUT
ATTENTION_LOGSUMEXP = attention_names.LOGSUMEXP


def _pallas_tpu(q, k, v, *, sliding_window, softcap, scale, **options):
  """The Pallas kernel, behind the checks of what only it refuses.

  Checked when the kernel is traced (lowered for TPU, or in interpret mode),
  so the XLA version still takes these inputs on other platforms.
  """
  _check_pallas_tpu_args(q, sliding_window=sliding_window, softcap=softcap,
                         scale=scale)
  return attention_pallas_tpu.attention(
      q, k, v, sliding_window=sliding_window, softcap=softcap, scale=scale,
      **options)


_ATTENTION = {
    implementations.PALLAS_TPU: _pallas_tpu,
    implementations.XLA: attention_xla.attention,
    implementations.REFERENCE: attention_reference.attention,
}
IMPLEMENTATIONS = tuple(_ATTENTION)
# What `implementation=None` runs when lowered for TPU (the XLA version
# elsewhere): Pallas where the kernel needs no more HBM than the XLA version
# compiled for v5e and is not slower by the roofline; README's "TPU defaults"
# gives the figures.
TPU_DEFAULT = implementations.PALLAS_TPU


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
    implementation: None, "pallas_tpu", "xla" or "reference" (see module
      docstring).
    interpret: run a Pallas kernel in interpret mode (CPU).

  Returns:
    `[B, T, N, H]` in q's dtype. A query with no visible key gives 0. Under
    a mesh with Tunix's axes (`jax.set_mesh` or `with mesh:`), batch over
    `fsdp` and query heads over `tp` (see `kernels.attention.sharding`).
    An empty dimension (B, T, N, H or S of 0) gives that result without
    running a kernel: an empty array, or zeros when only S is 0 (no query
    sees a key).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual; for
      the Pallas kernel, also a dtype other than float32 and bfloat16 and
      numpy scalars as options (when the kernel is traced).
  """
  _check_attention_args(q, k, v, mask=mask, segment_ids=segment_ids,
                        causal=causal, sliding_window=sliding_window,
                        softcap=softcap, scale=scale)
  name = implementations.resolve("attention", implementation,
                                 IMPLEMENTATIONS, interpret=interpret)
  if validation.has_empty_dim(q.shape, k.shape):
    # Every kernel tiles T and S and the default scale is H ** -0.5.
    return jnp.zeros(q.shape, q.dtype)
  options = dict(causal=causal, sliding_window=sliding_window,
                 softcap=softcap, scale=scale)
  # Only the Pallas kernel has an interpret mode.
  table = {impl: functools.partial(
      fn, **options, **({"interpret": interpret}
                        if impl == implementations.PALLAS_TPU else {}))
           for impl, fn in _ATTENTION.items()}
  run = implementations.select("attention", name, table, interpret=interpret,
                               tpu_default=TPU_DEFAULT)
  # Under a ('fsdp', 'tp') mesh each shard runs `run` in shard_map.
  return attention_sharding.attention(run, q, k, v, mask=mask,
                                      segment_ids=segment_ids)


def _check_attention_args(q, k, v, *, mask, segment_ids, causal,
                          sliding_window, softcap, scale):
  for name, x, form in (("q", q, "[B,T,N,H]"), ("k", k, "[B,S,K,H]"),
                        ("v", v, "[B,S,K,H]")):
    validation.check_floating(name, x, ndim=4, form=f"4-D ({form})")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} "
                     f"and v {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")
  batch, q_len, num_heads, head_dim = q.shape
  kv_batch, kv_len, num_kv_heads, kv_dim = k.shape
  if kv_batch != batch:
    raise ValueError(f"q batch B={batch} but k/v batch is {kv_batch}")
  if kv_dim != head_dim:
    raise ValueError(f"q head_dim H={head_dim} but k/v head_dim is {kv_dim}")
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(f"query heads N={num_heads} must be a multiple of kv "
                     f"heads K={num_kv_heads}")
  # None or a string would silently pick one of the two behaviours.
  validation.check_bool("causal", causal)
  validation.check_int("sliding_window", sliding_window, minimum=1,
                       allow_none=True)
  validation.check_number("softcap", softcap, positive=True, allow_none=True)
  validation.check_number("scale", scale, allow_none=True,
                          what="Gemma 4 uses 1.0")
  if mask is not None:
    validation.check_array("mask", mask, what="a boolean array")
    masks.canonical_mask(mask, batch=batch, num_heads=num_heads, q_len=q_len,
                         kv_len=kv_len)
  if segment_ids is not None:
    masks.canonical_segment_ids(segment_ids, batch=batch, q_len=q_len,
                                kv_len=kv_len)


def _check_pallas_tpu_args(q, *, sliding_window, softcap, scale):
  """What the Pallas kernel refuses beyond `_check_attention_args`: dtypes
  other than float32 and bfloat16 (q, k and v share q's), and numpy
  scalars as its static options."""
  if q.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"q must be float32 or bfloat16, got {q.dtype}")
  if sliding_window is not None and not isinstance(sliding_window, int):
    raise ValueError(f"sliding_window must be a positive int or None, got "
                     f"{sliding_window!r}")
  if softcap is not None and not isinstance(softcap, (int, float)):
    raise ValueError(f"softcap must be a positive number or None, got "
                     f"{softcap!r}")
  if scale is not None and not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a Python number or None, got "
                    f"{type(scale).__name__}")
