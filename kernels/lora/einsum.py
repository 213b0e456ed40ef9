"""qwix's LoRA einsums on the 2-D fused op, by reshapes of the operands.

qwix LoRA on `einsum(equation, x, w)` adds `scale * einsum(x, lora_a,
lora_b)`, where `lora_a` holds w's axes shared with x (in w's order) and the
rank, `lora_b` the rank and w's other axes. The op expresses an equation
whose operands split as

- x: `<batch axes><contracted axes>` (the contracted axes last, in w's
  order; no axis shared with w survives into the output);
- w: `<group axes><contracted axes><column axes>`;
- out: `<out-group axes><batch axes><other group axes><column axes>`, the
  out-group axes a prefix of w's group axes;

i.e. `x [M, K]`, `w [G, K, Nw]`, output `[Co, M, N/Co]`, with no transpose
of `w` or of the output. This covers every form qwix produces on Gemma 4:
`BTD,NDH->BTNH` (G = N heads), `BSD,CKDH->CBSKH` (one A shared by K and V,
Co = C), `BSD,KDH->BSKH`, `BTNH,NHD->BTD`, `BTD,DNP->BTNP`, `BTD,DX->BTX`,
`BTD,DP->BTP`, `BTP,PD->BTD`. Others (an axis shared by x and w that is not
contracted, as in the MoE expert einsums `EBD,EDF->EBF`) are not expressed:
`plan` returns None and the caller keeps qwix's path.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels.lora import pallas_tpu
from gemma4_jax.kernels.lora import xla


@dataclasses.dataclass(frozen=True)
class EinsumPlan:
  """How one equation maps onto `x [M,K]`, `w [G,K,Nw]`, out `[Co,M,N/Co]`.

  Attributes:
    batch_shape: x's batch axes (flattened into M).
    contracted_shape: the contracted axes in w's order (K is their product).
    group_shape, column_shape: w's group and column axes (G, Nw).
    out_groups: Co; out_shape: the einsum's output shape.
    grouped: whether the Pallas kernel takes `w` as is. When False (group
      widths with no common 128-multiple tile, e.g. tiny test heads), `w`
      is transposed by `w_perm` to `[K, G*Nw]` and the `[M, <group axes>,
      <column axes>]` result by `out_perm` into the output order.
    w_perm, out_perm: those transposes.
  """
  batch_shape: tuple[int, ...]
  contracted_shape: tuple[int, ...]
  group_shape: tuple[int, ...]
  column_shape: tuple[int, ...]
  out_groups: int
  out_shape: tuple[int, ...]
  grouped: bool
  w_perm: tuple[int, ...]
  out_perm: tuple[int, ...]

  @property
  def k(self) -> int:
    return math.prod(self.contracted_shape)

  @property
  def m(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def groups(self) -> int:
    return math.prod(self.group_shape)

  @property
  def n(self) -> int:
    return self.groups * math.prod(self.column_shape)


def plan(equation: str, x_shape, w_shape, *,
         block_sizes: pallas_tpu.BlockSizes | None = None
         ) -> EinsumPlan | None:
  """Maps `equation` onto the op, or None when it cannot be expressed."""
  block_sizes = block_sizes or pallas_tpu.BlockSizes.get_default()
  operands, arrow, out = equation.replace(" ", "").partition("->")
  lhs, comma, rhs = operands.partition(",")
  if not (arrow and comma and (lhs + rhs + out).isalpha()):
    return None
  if (len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs) or
      len(lhs) != len(x_shape) or len(rhs) != len(w_shape)):
    return None
  contracted = "".join(c for c in rhs if c in lhs)
  if any(c in out for c in contracted) or not contracted:
    return None
  batch = lhs[:len(lhs) - len(contracted)]
  if lhs[len(batch):] != contracted:
    return None
  start = rhs.index(contracted[0])
  if rhs[start:start + len(contracted)] != contracted:
    return None
  group, column = rhs[:start], rhs[start + len(contracted):]
  out_group = out[:out.index(batch[0])] if batch else ""
  if (not group.startswith(out_group) or
      out != out_group + batch + group[len(out_group):] + column):
    return None
  size = dict(zip(lhs, x_shape)) | dict(zip(rhs, w_shape))
  prod = lambda axes: math.prod(size[c] for c in axes)
  groups, n_per_group, out_groups = prod(group), prod(column), prod(out_group)
  grouped = groups == 1 and out_groups == 1
  if not grouped:
    segments = (n_per_group, groups * n_per_group // out_groups)
    grouped = bool(n_per_group % _tpu.NUM_LANES == 0 and
                   pallas_tpu.pick_tile(segments, block_sizes.tn) and
                   pallas_tpu.pick_tile(segments, block_sizes.tk))
  order = [None, *group, *column]
  return EinsumPlan(
      batch_shape=tuple(size[c] for c in batch),
      contracted_shape=tuple(size[c] for c in contracted),
      group_shape=tuple(size[c] for c in group),
      column_shape=tuple(size[c] for c in column), out_groups=out_groups,
      out_shape=tuple(size[c] for c in out), grouped=grouped,
      w_perm=tuple(rhs.index(c) for c in contracted + group + column),
      out_perm=(*(order.index(c) for c in out_group), 0,
                *(order.index(c) for c in group[len(out_group):] + column)))


def to_output(plan_: EinsumPlan, rows_by_columns):
  """`[M, N]` (columns in w's group-then-column order) -> the output."""
  shaped = rows_by_columns.reshape(plan_.m, *plan_.group_shape,
                                   *plan_.column_shape)
  return shaped.transpose(plan_.out_perm).reshape(plan_.out_shape)


def run_pallas(plan_: EinsumPlan, x, w, lora_a, lora_b, *, scale: float,
               w_scale=None,
               block_sizes: pallas_tpu.BlockSizes | None = None,
               interpret: bool = False):
  """The einsum with the fused Pallas kernel (see `plan`).

  `w_scale` (int8 `w`): per-channel scales shaped like `w` with size 1 on
  the contracted axes (qwix's channelwise layout).
  """
  x2, a2, b2 = _flatten(plan_, x, lora_a, lora_b)
  if plan_.grouped:
    w3 = w.reshape(plan_.groups, plan_.k, plan_.n // plan_.groups)
    if w_scale is not None:
      w_scale = w_scale.reshape(plan_.groups, 1, plan_.n // plan_.groups)
    out = pallas_tpu.grouped_lora_matmul(
        x2, w3, a2, b2, scale=scale, rank=a2.shape[1], w_scale=w_scale,
        out_groups=plan_.out_groups, block_sizes=block_sizes,
        interpret=interpret)
    return out.reshape(plan_.out_shape)
  w2 = w.transpose(plan_.w_perm).reshape(plan_.k, plan_.n)
  if w_scale is not None:
    w_scale = w_scale.transpose(plan_.w_perm).reshape(plan_.n)
  return to_output(plan_, pallas_tpu.lora_matmul(
      x2, w2, a2, b2, scale=scale, w_scale=w_scale, block_sizes=block_sizes,
      interpret=interpret))


def run_xla(plan_: EinsumPlan, equation: str, x, w, lora_a, lora_b, *,
            scale: float, w_scale=None):
  """The einsum in XLA: the frozen einsum plus the float32 low-rank term."""
  x2, a2, b2 = _flatten(plan_, x, lora_a, lora_b)
  w = jax.lax.stop_gradient(w).astype(jnp.float32)
  if w_scale is not None:
    w = w * jax.lax.stop_gradient(w_scale).astype(jnp.float32)
  frozen = jnp.einsum(equation, x.astype(jnp.float32), w)
  delta = to_output(plan_, xla.lora_delta(x2, a2, b2, scale=scale))
  return (frozen + delta).astype(x.dtype)


def _flatten(plan_, x, lora_a, lora_b):
  rank = lora_a.shape[-1]
  return (x.reshape(plan_.m, plan_.k), lora_a.reshape(plan_.k, rank),
          lora_b.reshape(rank, plan_.n))
