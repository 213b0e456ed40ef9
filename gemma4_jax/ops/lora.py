"""The LoRA ops: the fused LoRA matmul and qwix's LoRA einsum on it.

`lora_matmul` computes `x @ w + scale * (x @ a) @ b` with `w` frozen, for
one adapter or many (`adapter_ids`); `lora_einsum` runs qwix's LoRA einsums
on it by reshapes (`kernels/lora/einsum.py`). Their arguments are checked
here, once; the implementations behind them assume valid input:

- "pallas_tpu": the fused kernel (`kernels/lora/pallas_tpu.py`), float32 or
  bfloat16 `x` only (`kernel_takes`);
- "xla": the same math in XLA (`kernels/lora/xla.py`), any float dtype;
- "reference": the float32 oracle (`gemma4_jax.reference.lora`).

`mesh=None` is the mesh in context (`gemma4_jax.mesh.in_context()`). The
op runs per shard in `jax.shard_map` (`kernels/lora/sharding.py`) only when
it also knows how `w` lies on the mesh (`w_axes`); a mesh in context
without `w_axes` runs unsharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import implementations
from gemma4_jax import mesh as mesh_lib
from gemma4_jax import validation
from gemma4_jax.kernels.lora import einsum as lora_einsum_lib
from gemma4_jax.kernels.lora import pallas_tpu as lora_pallas
from gemma4_jax.kernels.lora import sharding as lora_sharding
from gemma4_jax.kernels.lora import xla as lora_xla
from gemma4_jax.reference import lora as lora_reference

IMPLEMENTATIONS = (implementations.PALLAS_TPU, implementations.XLA,
                   implementations.REFERENCE)
# The fused LoRA kernel needs no more HBM than XLA per call, but a whole E2B
# step with it needs more (v5e:2x2, 5 layers: +19 MiB at 4 x 1024, +117 MiB
# at 4 x 4096) for a modeled gain of at most ~7%: the XLA version is the
# default on TPU too.
TPU_DEFAULT = implementations.XLA


def lora_matmul(x, w, a, b, *, scale, adapter_ids=None, w_scale=None,
                mesh=None, w_axes=None, implementation=None,
                interpret=False):
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
    mesh: a mesh (e.g. Tunix's `('fsdp','tp')`), or None for the mesh in
      context; the op runs per shard, rows over `fsdp`, only with `w_axes`
      (module docstring). Many adapters are kept whole on every shard.
    w_axes: the mesh axis (or None) of `w`'s two dims, e.g. `("fsdp",
      "tp")`.
    implementation: None, "pallas_tpu", "xla" or "reference" (see the module
      docstring).
    interpret: run the Pallas kernel in interpret mode (CPU).

  Returns:
    `[..., N]` in x's dtype (empty, without running a kernel, when x has no
    rows or w no columns; K = 0 and rank 0 are errors).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
    RuntimeError: a forced implementation cannot run here.
  """
  mesh = _check_args_and_mesh(
      "lora_matmul", x=x, w=w, a=a, b=b, scale=scale, adapter_ids=adapter_ids,
      w_scale=w_scale, mesh=mesh, w_axes=w_axes)
  _check_matmul_args(x, w, a, b, scale=scale, adapter_ids=adapter_ids,
                     w_scale=w_scale)
  _check_sizes("lora_matmul", k=w.shape[0], rank=a.shape[-1])
  name = _implementation("lora_matmul", implementation, x.dtype, interpret)
  lead, (k, n) = x.shape[:-1], w.shape
  if validation.has_empty_dim(lead, (n,)):
    return jnp.zeros((*lead, n), x.dtype)  # no rows or no columns
  out = _maybe_sharded(
      _local_matmul(name, scale, interpret), "mk,kn->mn", x.reshape(-1, k),
      w, a, b, mesh=mesh, w_axes=w_axes,
      w_scale=None if w_scale is None else w_scale.reshape(1, n),
      adapter_ids=None if adapter_ids is None else adapter_ids.reshape(-1))
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
    mesh: as `lora_matmul`: a mesh, or None for the mesh in context.
    w_axes: the mesh axis (or None) of each dim of `w`, as Tunix shards it.
    implementation, interpret: as `lora_matmul`.

  Returns:
    The einsum's output in x's dtype.

  Raises:
    ValueError: an equation the op cannot express (see `lora_einsum_plan`)
      or adapter shapes that do not fit it.
    TypeError: dtypes, as `lora_matmul`.
  """
  mesh = _check_args_and_mesh(
      "lora_einsum", x=x, w=w, lora_a=lora_a, lora_b=lora_b, scale=scale,
      w_scale=w_scale, mesh=mesh, w_axes=w_axes)
  plan = _check_einsum(equation, x, w, lora_a, lora_b, scale=scale,
                       w_scale=w_scale)
  name = _implementation("lora_einsum", implementation, x.dtype, interpret)
  if validation.has_empty_dim(plan.out_shape):
    return jnp.zeros(plan.out_shape, x.dtype)
  return _maybe_sharded(_local_einsum(name, equation, scale, interpret),
                        equation, x, w, lora_a, lora_b, mesh=mesh,
                        w_axes=w_axes, w_scale=w_scale)


def lora_einsum_plan(equation, x_shape, w_shape):
  """How `lora_einsum` maps `equation`, or None if it cannot express it."""
  if not isinstance(equation, str):
    raise TypeError(f"equation must be a str, got {type(equation).__name__}")
  if _einsum_operands(equation)[0] is None:
    return None
  return lora_einsum_lib.plan(equation, tuple(x_shape), tuple(w_shape))


def kernel_takes(dtype) -> bool:
  """Whether the Pallas kernel takes `x` of `dtype` (float32, bfloat16)."""
  return jnp.dtype(dtype) in lora_pallas.KERNEL_DTYPES


def _local_matmul(name, scale, interpret):
  """`local(x [M, K], w, a, b, w_scale, ids)` running implementation `name`
  (on one shard under a mesh); `w_scale` is `[1, N]`, w's rank."""
  run = implementations.select(
      "lora_matmul", name, _matmul_table(scale, interpret),
      interpret=interpret, tpu_default=TPU_DEFAULT)

  def local(x2, w, a, b, w_scale, ids):
    if w_scale is not None:
      w_scale = w_scale.reshape(-1)
    return run(x2, w, a, b, w_scale, ids)
  return local


def _local_einsum(name, equation, scale, interpret):
  """`local(x, w, lora_a, lora_b, w_scale, adapter_ids)` running
  implementation `name` (on one shard under a mesh)."""
  run = implementations.select(
      "lora_einsum", name, _einsum_table(equation, scale, interpret),
      interpret=interpret, tpu_default=TPU_DEFAULT)

  def local(x, w, lora_a, lora_b, w_scale, adapter_ids):
    del adapter_ids  # lora_einsum runs one adapter
    return run(x, w, lora_a, lora_b, w_scale)
  return local


def _matmul_table(scale, interpret):
  """Implementation name -> `fn(x [M, K], w, a, b, w_scale [N], ids [M])`."""
  def reference(x2, w, a, b, w_scale, ids):
    if w_scale is not None:
      w = w.astype(jnp.float32) * w_scale
    return lora_reference.lora_matmul(x2, w, a, b, scale=scale,
                                      adapter_ids=ids)

  def xla(x2, w, a, b, w_scale, ids):
    return lora_xla.lora_matmul(x2, w, a, b, scale=scale, adapter_ids=ids,
                                w_scale=w_scale)

  def pallas(x2, w, a, b, w_scale, ids):
    return lora_pallas.lora_matmul(x2, w, a, b, scale=scale, adapter_ids=ids,
                                   w_scale=w_scale, interpret=interpret)

  return {implementations.REFERENCE: reference, implementations.XLA: xla,
          implementations.PALLAS_TPU: pallas}


def _einsum_table(equation, scale, interpret):
  """Implementation name -> `fn(x, w, lora_a, lora_b, w_scale)`, on the
  local blocks under a mesh (so the plan is made from their shapes)."""
  def reference(x, w, lora_a, lora_b, w_scale):
    if w_scale is not None:
      w = w.astype(jnp.float32) * w_scale
    return lora_reference.lora_einsum(equation, x, w, lora_a, lora_b,
                                      scale=scale)

  def xla(x, w, lora_a, lora_b, w_scale):
    local_plan = lora_einsum_lib.plan(equation, x.shape, w.shape)
    return lora_einsum_lib.run_xla(local_plan, equation, x, w, lora_a,
                                   lora_b, scale=scale, w_scale=w_scale)

  def pallas(x, w, lora_a, lora_b, w_scale):
    local_plan = lora_einsum_lib.plan(equation, x.shape, w.shape)
    return lora_einsum_lib.run_pallas(local_plan, x, w, lora_a, lora_b,
                                      scale=scale, w_scale=w_scale,
                                      interpret=interpret)

  return {implementations.REFERENCE: reference, implementations.XLA: xla,
          implementations.PALLAS_TPU: pallas}


def _maybe_sharded(local, equation, x, w, a, b, *, mesh, w_axes,
                   w_scale=None, adapter_ids=None):
  """`local(x, w, a, b, w_scale, adapter_ids)`, per shard when `mesh`."""
  if mesh is None:
    return local(x, w, a, b, w_scale, adapter_ids)
  return lora_sharding.shard_einsum(local, equation, x, w, a, b, mesh=mesh,
                                    w_axes=w_axes, w_scale=w_scale,
                                    adapter_ids=adapter_ids)


def _implementation(op, implementation, dtype, interpret):
  """`resolve`'s answer for a LoRA op on `dtype`: the kernel takes float32
  and bfloat16 only, so other dtypes run the XLA version by default."""
  name = implementations.resolve(op, implementation, IMPLEMENTATIONS,
                                 interpret=interpret)
  if kernel_takes(dtype):
    return name
  if name == implementations.PALLAS_TPU:
    raise TypeError(f"{op}: the Pallas kernel takes float32 or bfloat16 x, "
                    f"got {dtype}")
  return implementations.XLA if name == implementations.BY_PLATFORM else name


def _check_args_and_mesh(op, *, scale, w_scale, mesh, w_axes,
                         adapter_ids=None, **arrays):
  """Array-likes, a finite scale, the mesh and w's axes on it.

  Returns:
    The mesh to run per shard on, or None: `mesh`, else the mesh in
    context when `w_axes` says how w lies on it.
  """
  for name, value in arrays.items():
    validation.check_array(name, value)
  for name, value in (("adapter_ids", adapter_ids), ("w_scale", w_scale)):
    if value is not None:
      validation.check_array(name, value)
  validation.check_number("scale", scale, what="alpha / rank")
  validation.check_mesh(op, mesh)
  given = mesh is not None
  mesh = mesh if given else mesh_lib.in_context()
  if mesh is None:
    if w_axes is not None:
      raise ValueError(f"{op}: w_axes {w_axes!r} is only used with a mesh; "
                       f"pass mesh= too, or no w_axes")
    return None
  if w_axes is None and not given:
    return None  # w's layout on the mesh in context is unknown: unsharded
  if isinstance(w_axes, str):  # a bare name would be read letter by letter
    raise TypeError(f"{op}: w_axes must be a tuple with one entry per dim of "
                    f"w, got the string {w_axes!r}")
  ndim = arrays["w"].ndim
  if w_axes is None or len(w_axes) > ndim:
    raise ValueError(f"{op}: with a mesh, w_axes must name a mesh axis "
                     f"or None for each of w's {ndim} dims, got {w_axes!r}")
  validation.check_mesh_axes(op, "w_axes", w_axes, mesh)
  return mesh


def _check_matmul_args(x, w, a, b, *, scale, adapter_ids, w_scale):
  """Dtypes and shapes of `lora_matmul`'s arrays (`x [M, K]` flattened)."""
  _check_dtypes(x, w, a, b, scale=scale, w_scale=w_scale)
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
    _check_adapter_ids(adapter_ids, x, a, b)


def _check_dtypes(x, w, a, b, *, scale, w_scale):
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


def _check_adapter_ids(adapter_ids, x, a, b):
  """Many adapters: their count, and ids of x's rows within it.

  Under `jit` the ids are traced and their range cannot be checked; the
  kernels then give a row with an out-of-range id the frozen product only
  (no adapter).
  """
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"a has {a.shape[0]} adapters and b {b.shape[0]}")
  lora_reference.check_adapter_ids(adapter_ids, x)
  if isinstance(adapter_ids, jax.core.Tracer) or adapter_ids.size == 0:
    return
  # numpy, not jnp: under jit a jnp reduction of concrete (closed-over) ids
  # would be traced.
  ids = np.asarray(adapter_ids)
  low, high, num = int(ids.min()), int(ids.max()), a.shape[0]
  if low < 0 or high >= num:
    raise ValueError(f"adapter_ids must lie in [0, {num}) (a has {num} "
                     f"adapters), got values in [{low}, {high}]")


def _check_sizes(op, *, k, rank):
  if k == 0:
    raise ValueError(f"{op}: w has no input features (K = 0); x @ w would "
                     f"be all zeros")
  if rank == 0:
    raise ValueError(f"{op}: the adapter has rank r = 0 (a and b are empty); "
                     f"use a rank >= 1, or no adapter")


def _check_einsum(equation, x, w, lora_a, lora_b, *, scale, w_scale):
  """Checks `lora_einsum`'s equation and arrays; returns its plan."""
  _check_equation(equation, x, w)
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
  # The rest as lora_matmul sees it after the reshapes.
  _check_matmul_args(
      x.reshape(plan.m, plan.k),
      jax.ShapeDtypeStruct((plan.k, plan.n), w.dtype),
      jax.ShapeDtypeStruct((plan.k, rank), lora_a.dtype),
      jax.ShapeDtypeStruct((rank, plan.n), lora_b.dtype), scale=scale,
      adapter_ids=None, w_scale=scale_2d)
  _check_sizes("lora_einsum", k=plan.k, rank=rank)
  return plan


def _einsum_operands(equation):
  """`(x letters, w letters, out letters)` of a two-operand einsum, or a
  message saying why it is not one."""
  operands, arrow, out = equation.replace(" ", "").partition("->")
  parts = operands.split(",")
  letters = "".join(parts) + out
  if not arrow or len(parts) != 2 or "->" in out or not (
      letters.isascii() and letters.isalpha()):
    return None, ("expected two operands of letters and an output, like "
                  "'BTD,NDH->BTNH'")
  lhs, rhs = parts
  for label, axes in (("x's operand", lhs), ("w's operand", rhs),
                      ("the output", out)):
    if len(set(axes)) != len(axes):
      return None, f"{label} {axes!r} repeats a letter"
  stray = sorted(set(out) - set(lhs + rhs))
  if stray:
    return None, f"output letters {stray} are in neither operand"
  kept = sorted(c for c in lhs if c not in rhs and c not in out)
  if kept:
    return None, f"x's letters {kept} are neither contracted nor in the output"
  return (lhs, rhs, out), None


def _check_equation(equation, x, w):
  """Raises for an equation that is malformed or does not fit x and w."""
  if not isinstance(equation, str):
    raise TypeError(f"lora_einsum: equation must be a str, got "
                    f"{type(equation).__name__}")
  parsed, why = _einsum_operands(equation)
  if parsed is None:
    raise ValueError(f"lora_einsum: equation {equation!r}: {why}")
  lhs, rhs, _ = parsed
  for name, axes, value in (("x", lhs, x), ("w", rhs, w)):
    if len(axes) != value.ndim:
      raise ValueError(f"lora_einsum: equation {equation!r} gives {name} "
                       f"{len(axes)} axes ({axes!r}) but {name} has shape "
                       f"{tuple(value.shape)}")
  x_size, w_size = dict(zip(lhs, x.shape)), dict(zip(rhs, w.shape))
  for c in lhs:
    if c in w_size and x_size[c] != w_size[c]:
      raise ValueError(f"lora_einsum: axis {c!r} of {equation!r} is "
                       f"{x_size[c]} in x {tuple(x.shape)} but {w_size[c]} "
                       f"in w {tuple(w.shape)}")
