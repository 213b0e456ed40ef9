"""The fused LoRA matmul and qwix's LoRA einsum on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma4_jax import implementations
from gemma4_jax import validation
from gemma4_jax.kernels.lora import common as lora_common
from gemma4_jax.kernels.lora import einsum as lora_einsum_lib
from gemma4_jax.kernels.lora import pallas as lora_pallas
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
    mesh: optional mesh (e.g. Tunix's `('fsdp','tp')`): run per shard in
      `jax.shard_map` (`kernels/lora/sharding.py`), rows over `fsdp`, with
      `w_axes`; many adapters are kept whole on every shard.
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
  _check_lora_args("lora_matmul", x=x, w=w, a=a, b=b, scale=scale,
                   adapter_ids=adapter_ids, w_scale=w_scale, mesh=mesh,
                   w_axes=w_axes)
  lora_common.check_lora_matmul_args(x, w, a, b, scale=scale,
                                     adapter_ids=adapter_ids,
                                     w_scale=w_scale)
  _check_lora_sizes("lora_matmul", k=w.shape[0], rank=a.shape[-1])
  name = _lora_implementation("lora_matmul", implementation, x.dtype,
                              interpret)
  lead, (k, n) = x.shape[:-1], w.shape
  if validation.has_empty_dim(lead, (n,)):
    return jnp.zeros((*lead, n), x.dtype)  # no rows or no columns
  x2 = x.reshape(-1, k)
  ids = None if adapter_ids is None else adapter_ids.reshape(-1)

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

  run = implementations.select(
      "lora_matmul", name, {implementations.REFERENCE: reference,
                            implementations.XLA: xla,
                            implementations.PALLAS_TPU: pallas},
      interpret=interpret, tpu_default=TPU_DEFAULT)

  def local(x2, w, a, b, w_scale, ids):
    if w_scale is not None:  # [1, N] per shard (w's rank for the layout)
      w_scale = w_scale.reshape(-1)
    return run(x2, w, a, b, w_scale, ids)

  if mesh is None:
    out = local(x2, w, a, b, w_scale, ids)
  else:
    _check_w_axes("lora_matmul", w_axes, w.ndim)
    out = lora_sharding.shard_einsum(
        local, "mk,kn->mn", x2, w, a, b, mesh=mesh, w_axes=w_axes,
        w_scale=None if w_scale is None else w_scale.reshape(1, n),
        adapter_ids=ids)
  return out.reshape(*lead, n)


def kernel_takes(dtype) -> bool:
  """Whether the Pallas kernel takes `x` of `dtype` (float32, bfloat16)."""
  return jnp.dtype(dtype) in lora_common.KERNEL_DTYPES


def _lora_implementation(op, implementation, dtype, interpret):
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


def _check_w_axes(op_name, w_axes, ndim):
  if w_axes is None or len(w_axes) > ndim:
    raise ValueError(f"{op_name}: with a mesh, w_axes must name a mesh axis "
                     f"or None for each of w's {ndim} dims, got {w_axes!r}")


def _check_lora_args(op, *, scale, w_scale, mesh, w_axes, adapter_ids=None,
                     **arrays):
  """What `lora_common.check_lora_matmul_args` leaves to the public ops:
  array-likes, a finite scale, the mesh and the axes it must have."""
  for name, value in arrays.items():
    validation.check_array(name, value)
  for name, value in (("adapter_ids", adapter_ids), ("w_scale", w_scale)):
    if value is not None:
      validation.check_array(name, value)
  validation.check_number("scale", scale, what="alpha / rank")
  validation.check_mesh(op, mesh)
  if mesh is None:
    if w_axes is not None:
      raise ValueError(f"{op}: w_axes {w_axes!r} is only used with a mesh; "
                       f"pass mesh= too, or no w_axes")
    return
  if isinstance(w_axes, str):  # a bare name would be read letter by letter
    raise TypeError(f"{op}: w_axes must be a tuple with one entry per dim of "
                    f"w, got the string {w_axes!r}")
  _check_w_axes(op, w_axes, arrays["w"].ndim)
  validation.check_mesh_axes(op, "w_axes", w_axes, mesh)


def _check_lora_sizes(op, *, k, rank):
  if k == 0:
    raise ValueError(f"{op}: w has no input features (K = 0); x @ w would "
                     f"be all zeros")
  if rank == 0:
    raise ValueError(f"{op}: the adapter has rank r = 0 (a and b are empty); "
                     f"use a rank >= 1, or no adapter")


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


def _check_einsum_args(equation, x, w):
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
  _check_lora_args("lora_einsum", x=x, w=w, lora_a=lora_a, lora_b=lora_b,
                   scale=scale, w_scale=w_scale, mesh=mesh, w_axes=w_axes)
  _check_einsum_args(equation, x, w)
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
  _check_lora_sizes("lora_einsum", k=plan.k, rank=rank)
  name = _lora_implementation("lora_einsum", implementation, x.dtype,
                              interpret)
  if validation.has_empty_dim(plan.out_shape):
    return jnp.zeros(plan.out_shape, x.dtype)

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

  run = implementations.select(
      "lora_einsum", name, {implementations.REFERENCE: reference,
                            implementations.XLA: xla,
                            implementations.PALLAS_TPU: pallas},
      interpret=interpret, tpu_default=TPU_DEFAULT)

  def local(x, w, lora_a, lora_b, w_scale, adapter_ids):
    del adapter_ids  # lora_einsum runs one adapter
    return run(x, w, lora_a, lora_b, w_scale)

  if mesh is None:
    return local(x, w, lora_a, lora_b, w_scale, None)
  _check_w_axes("lora_einsum", w_axes, w.ndim)
  return lora_sharding.shard_einsum(local, equation, x, w, lora_a, lora_b,
                                    mesh=mesh, w_axes=w_axes,
                                    w_scale=w_scale)


def lora_einsum_plan(equation, x_shape, w_shape):
  """How `lora_einsum` maps `equation`, or None if it cannot express it."""
  if not isinstance(equation, str):
    raise TypeError(f"equation must be a str, got {type(equation).__name__}")
  if _einsum_operands(equation)[0] is None:
    return None
  return lora_einsum_lib.plan(equation, tuple(x_shape), tuple(w_shape))
