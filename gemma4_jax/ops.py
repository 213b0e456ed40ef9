"""Public functional ops; each picks an implementation for the platform.

`implementation=None` picks Pallas on TPU and the XLA version elsewhere (the
env var `GEMMA4_JAX_IMPLEMENTATION` overrides the default); `"pallas_tpu"`,
`"xla"` and `"reference"` force one and raise if it cannot run here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma4_jax import implementations
from gemma4_jax import masks
from gemma4_jax.kernels.attention import xla as attention_xla
from gemma4_jax.kernels.lora import common as lora_common
from gemma4_jax.kernels.lora import einsum as lora_einsum_lib
from gemma4_jax.kernels.lora import pallas as lora_pallas
from gemma4_jax.kernels.lora import sharding as lora_sharding
from gemma4_jax.kernels.lora import xla as lora_xla
from gemma4_jax.reference import attention as attention_reference
from gemma4_jax.reference import lora as lora_reference

_ATTENTION = {
    implementations.XLA: attention_xla.attention,
    implementations.REFERENCE: attention_reference.attention,
}
# op name -> implementations it has, in order of preference.
AVAILABLE = {
    "attention": tuple(_ATTENTION),
    "lora_matmul": (implementations.PALLAS_TPU, implementations.XLA,
                    implementations.REFERENCE),
}


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
    `[B, T, N, H]` in q's dtype. A query with no visible key gives 0.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_attention_args(q, k, v, mask=mask, segment_ids=segment_ids,
                        sliding_window=sliding_window, softcap=softcap,
                        scale=scale)
  name = implementations.resolve("attention", implementation,
                                 tuple(_ATTENTION), interpret=interpret)
  return _ATTENTION[name](q, k, v, mask=mask, segment_ids=segment_ids,
                          causal=causal, sliding_window=sliding_window,
                          softcap=softcap, scale=scale)


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


def lora_matmul(x, w, a, b, *, scale, adapter_ids=None, w_scale=None,
                implementation=None, interpret=False):
  """`x @ w + scale * (x @ a) @ b` with `w` frozen; one or many adapters.

  The Pallas kernel reads each `x` tile once for `w` and `a`, keeps `x @ a`
  in float32 VMEM and adds `@ b` in the epilogue; the XLA version computes
  the same in float32. Neither rounds `x @ a` to x's dtype (qwix does, in
  bfloat16), so they are at least as accurate as qwix.

  Args:
    x: `[..., K]`, float32 or bfloat16 (XLA and reference: any float).
    w: the frozen weight `[K, N]` in x's dtype, or int8 with `w_scale`. Its
      gradient is zero (not computed).
    a: `[K, r]`, or `[n, K, r]` with `adapter_ids`; any float dtype, b's.
    b: `[r, N]`, or `[n, r, N]` with `adapter_ids`.
    scale: `alpha / rank`, a Python number.
    adapter_ids: optional integer `x.shape[:-1]`: row m uses adapter
      `adapter_ids[m]`. Concrete ids outside `[0, n)` raise; under `jit`
      they cannot be checked and such a row gets `x @ w` only (the
      reference implementation instead clamps the index).
    w_scale: `[N]` per-output-channel scales of an int8 `w` (QLoRA):
      `w_float = w * w_scale`.
    implementation: None, "pallas_tpu", "xla" or "reference" (see the module
      docstring).
    interpret: run the Pallas kernel in interpret mode (CPU).

  Returns:
    `[..., N]` in x's dtype.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
    RuntimeError: a forced implementation cannot run here.
  """
  lora_common.check_lora_matmul_args(x, w, a, b, scale=scale,
                                     adapter_ids=adapter_ids,
                                     w_scale=w_scale)
  name = implementations.resolve("lora_matmul", implementation,
                                 AVAILABLE["lora_matmul"], interpret=interpret)
  if name == implementations.PALLAS_TPU and x.dtype not in (
      lora_common.KERNEL_DTYPES):
    raise TypeError(f"lora_matmul: the Pallas kernel takes float32 or "
                    f"bfloat16 x, got {x.dtype}")
  lead, (k, n) = x.shape[:-1], w.shape
  x2 = x.reshape(-1, k)
  ids = None if adapter_ids is None else adapter_ids.reshape(-1)
  if name == implementations.REFERENCE:
    if w_scale is not None:
      w = w.astype(jnp.float32) * w_scale
    out = lora_reference.lora_matmul(x2, w, a, b, scale=scale,
                                     adapter_ids=ids)
  elif name == implementations.XLA:
    out = lora_xla.lora_matmul(x2, w, a, b, scale=scale, adapter_ids=ids,
                               w_scale=w_scale)
  else:
    out = lora_pallas.lora_matmul(x2, w, a, b, scale=scale, adapter_ids=ids,
                                  w_scale=w_scale, interpret=interpret)
  return out.reshape(*lead, n)


def lora_einsum(equation, x, w, lora_a, lora_b, *, scale, w_scale=None,
                mesh=None, w_axes=None, implementation=None,
                interpret=False):
  """qwix's LoRA einsum `einsum(equation, x, w) + scale * einsum(x, a, b)`.

  `lora_a` holds w's axes shared with x (in w's order) and the rank,
  `lora_b` the rank and w's other axes, as qwix creates them. Runs on the
  `lora_matmul` kernel by reshapes (`kernels/lora/einsum.py` lists the
  forms: every one qwix produces on Gemma 4).

  Args:
    equation: two operands, letters only, e.g. `"BTD,NDH->BTNH"`.
    x, w: the einsum's operands; same floating dtype (float32 or bfloat16
      for the Pallas kernel), or an int8 `w` with `w_scale`.
    lora_a, lora_b: the adapter; one floating dtype.
    scale: `alpha / rank`.
    w_scale: per-channel scales of an int8 `w`: w's shape with 1 on the
      contracted axes (qwix's channelwise int8), `w_float = w * w_scale`.
    mesh: optional mesh (e.g. Tunix's `('fsdp','tp')`): run per shard in
      `jax.shard_map` (`kernels/lora/sharding.py`); needs `w_axes`.
    w_axes: the mesh axis (or None) of each dim of `w`, as Tunix shards it.
    implementation, interpret: as `lora_matmul`.

  Returns:
    The einsum's output in x's dtype.

  Raises:
    ValueError: an equation the op cannot express (see `lora_einsum_plan`)
      or adapter shapes that do not fit it.
    TypeError: dtypes, as `lora_matmul`.
  """
  plan = lora_einsum_plan(equation, x.shape, w.shape)
  if plan is None:
    raise ValueError(f"lora_einsum cannot express {equation!r} with x "
                     f"{x.shape} and w {w.shape} (an axis shared by x and "
                     f"w must be contracted and x's contracted axes last)")
  rank = lora_b.shape[0] if lora_b.ndim else 0
  want_a, want_b = (*plan.contracted_shape, rank), (
      rank, *plan.group_shape, *plan.column_shape)
  if lora_a.shape != want_a or lora_b.shape != want_b:
    raise ValueError(f"for {equation!r} with w {w.shape}, lora_a must be "
                     f"{want_a} and lora_b {want_b}, got lora_a "
                     f"{lora_a.shape} and lora_b {lora_b.shape}")
  scale_2d = None
  if w_scale is not None:
    want = tuple(1 if c in equation.split(",")[0] else d for c, d in zip(
        equation.split("->")[0].split(",")[1], w.shape))
    if getattr(w_scale, "shape", None) != want:
      raise ValueError(f"w_scale must be {want} (w's shape with 1 on the "
                       f"contracted axes), got "
                       f"{getattr(w_scale, 'shape', None)}")
    scale_2d = jax.ShapeDtypeStruct((plan.n,), w_scale.dtype)
  lora_common.check_lora_matmul_args(
      x.reshape(plan.m, plan.k), jax.ShapeDtypeStruct((plan.k, plan.n),
                                                      w.dtype),
      jax.ShapeDtypeStruct((plan.k, rank), lora_a.dtype),
      jax.ShapeDtypeStruct((rank, plan.n), lora_b.dtype), scale=scale,
      adapter_ids=None, w_scale=scale_2d)
  name = implementations.resolve("lora_matmul", implementation,
                                 AVAILABLE["lora_matmul"], interpret=interpret)
  if name == implementations.PALLAS_TPU and x.dtype not in (
      lora_common.KERNEL_DTYPES):
    raise TypeError(f"lora_einsum: the Pallas kernel takes float32 or "
                    f"bfloat16 x, got {x.dtype}")

  def local(x, w, lora_a, lora_b, w_scale):
    if name == implementations.REFERENCE:
      if w_scale is not None:
        w = w.astype(jnp.float32) * w_scale
      return lora_reference.lora_einsum(equation, x, w, lora_a, lora_b,
                                        scale=scale)
    local_plan = lora_einsum_lib.plan(equation, x.shape, w.shape)
    if name == implementations.XLA:
      return lora_einsum_lib.run_xla(local_plan, equation, x, w, lora_a,
                                     lora_b, scale=scale, w_scale=w_scale)
    return lora_einsum_lib.run_pallas(local_plan, x, w, lora_a, lora_b,
                                      scale=scale, w_scale=w_scale,
                                      interpret=interpret)

  if mesh is None:
    return local(x, w, lora_a, lora_b, w_scale)
  if w_axes is None or len(w_axes) > w.ndim:
    raise ValueError(f"lora_einsum: with a mesh, w_axes must name a mesh "
                     f"axis or None for each of w's {w.ndim} dims, got "
                     f"{w_axes!r}")
  return lora_sharding.shard_einsum(local, equation, x, w, lora_a, lora_b,
                                    mesh=mesh, w_axes=w_axes,
                                    w_scale=w_scale)


def lora_einsum_plan(equation, x_shape, w_shape):
  """How `lora_einsum` maps `equation`, or None if it cannot express it."""
  if not isinstance(equation, str):
    raise TypeError(f"equation must be a str, got {type(equation).__name__}")
  return lora_einsum_lib.plan(equation, tuple(x_shape), tuple(w_shape))
