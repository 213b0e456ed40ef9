"""Helpers shared by the LoRA implementations: adapter stacking, padding.

One adapter `a [K, r]`, `b [r, N]` and many adapters `a [n, K, r]`,
`b [n, r, N]` with `adapter_ids [M]` are both run as one stacked adapter
`a_cat [K, n*r]`, `b_cat [n*r, N]`: row m keeps only the columns
`[ids[m]*r, (ids[m]+1)*r)` of `x @ a_cat`, which is exactly
`(x[m] @ a[ids[m]]) @ b[ids[m]]`. This costs `n*r` columns of low-rank work
per row (cheap while `n*r` is a few hundred); rows need no sorting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_LANES = 128


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def stack_adapters(a, b):
  """`a [n,K,r]`, `b [n,r,N]` -> `a_cat [K, n*r]`, `b_cat [n*r, N]`, r."""
  num, k, rank = a.shape
  a_cat = jnp.transpose(a, (1, 0, 2)).reshape(k, num * rank)
  b_cat = b.reshape(num * rank, b.shape[-1])
  return a_cat, b_cat, rank


def pad_axis(x, axis: int, size: int):
  """Zero-pads `x` along `axis` up to `size` (no-op when already there)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def check_adapter_ids_eagerly(adapter_ids, num: int) -> None:
  """Raises on ids outside `[0, num)` when they are concrete.

  Under `jit` the ids are traced and cannot be checked; the kernels then
  give a row with an out-of-range id the frozen product only (no adapter).
  """
  if isinstance(adapter_ids, jax.core.Tracer) or adapter_ids.size == 0:
    return
  # numpy, not jnp: under jit a jnp reduction of concrete (closed-over) ids
  # would be traced.
  ids = np.asarray(adapter_ids)
  low, high = int(ids.min()), int(ids.max())
  if low < 0 or high >= num:
    raise ValueError(f"adapter_ids must lie in [0, {num}) (a has {num} "
                     f"adapters), got values in [{low}, {high}]")


KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_lora_matmul_args(x, w, a, b, *, scale, adapter_ids, w_scale):
  """Validates `ops.lora_matmul`'s arguments; raises naming the argument.

  Raises:
    TypeError: a non-floating input, `w` of another dtype than `x` (other
      than int8 with `w_scale`), `a`/`b` of different dtypes, non-integer
      `adapter_ids`, a `scale` that is not a Python number.
    ValueError: shapes that do not fit `x [..., K]`, `w [K, N]`,
      `a [K, r]`/`b [r, N]` (or `[n, K, r]`/`[n, r, N]` with `adapter_ids`
      of shape `x.shape[:-1]`), ids out of range when concrete.
  """
  for name, array in (("x", x), ("a", a), ("b", b)):
    dtype = getattr(array, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating array, got dtype {dtype}")
  if isinstance(scale, bool) or not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a Python number (alpha / rank), got "
                    f"{type(scale).__name__}")
  if w_scale is None:
    if getattr(w, "dtype", None) != x.dtype:
      raise TypeError(f"w must have x's dtype {x.dtype} (or be int8 with "
                      f"w_scale), got {getattr(w, 'dtype', None)}")
  else:
    if getattr(w, "dtype", None) != jnp.int8:
      raise TypeError(f"w_scale is for an int8 w, got w of dtype "
                      f"{getattr(w, 'dtype', None)}")
    if not jnp.issubdtype(getattr(w_scale, "dtype", jnp.int32), jnp.floating):
      raise TypeError(f"w_scale must be floating, got "
                      f"{getattr(w_scale, 'dtype', None)}")
  if a.dtype != b.dtype:
    raise TypeError(f"a and b must share a dtype, got a {a.dtype} and b "
                    f"{b.dtype}")
  if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"x must be [..., K] and w [K, N] with the same K, got "
                     f"x {x.shape} and w {w.shape}")
  (k, n) = w.shape
  if w_scale is not None and w_scale.shape != (n,):
    raise ValueError(f"w_scale must be [N] = ({n},), got {w_scale.shape}")
  lead = 0 if adapter_ids is None else 1
  want = "[K, r] and b [r, N]" if adapter_ids is None else (
      "[n, K, r] and b [n, r, N] (with adapter_ids)")
  if a.ndim != 2 + lead or b.ndim != 2 + lead:
    raise ValueError(f"a must be {want}, got a {a.shape} and b {b.shape}")
  if a.shape[-2] != k:
    raise ValueError(f"a's K must match w's K={k}: a must be {want}, got a "
                     f"{a.shape}")
  if b.shape[-1] != n:
    raise ValueError(f"b's N must match w's N={n}: a must be {want}, got b "
                     f"{b.shape}")
  if a.shape[-1] != b.shape[-2]:
    raise ValueError(f"rank mismatch: a {a.shape} has r={a.shape[-1]} but "
                     f"b {b.shape} has r={b.shape[-2]}")
  if adapter_ids is not None:
    if a.shape[0] != b.shape[0]:
      raise ValueError(f"a has {a.shape[0]} adapters and b {b.shape[0]}")
    ids_dtype = getattr(adapter_ids, "dtype", None)
    if ids_dtype is None or not jnp.issubdtype(ids_dtype, jnp.integer):
      raise TypeError(f"adapter_ids must be an integer array, got dtype "
                      f"{ids_dtype}")
    if adapter_ids.shape != x.shape[:-1]:
      raise ValueError(f"adapter_ids must have shape x.shape[:-1] = "
                       f"{x.shape[:-1]}, got {adapter_ids.shape}")
    check_adapter_ids_eagerly(adapter_ids, a.shape[0])
