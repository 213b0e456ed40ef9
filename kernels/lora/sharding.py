"""The LoRA op per shard, inside `jax.shard_map`, under Tunix's mesh.

GSPMD cannot split a `pallas_call`, so under a mesh the op runs on each
shard. The layout follows the weight's sharding (Tunix's `('fsdp','tp')`
rules; qwix gives `lora_a`/`lora_b` the same axes as the weight dims they
stand for):

- a weight dim sharded over the batch axis (`fsdp`) is gathered, as XLA
  does for FSDP; the input's first (batch) axis is split over it instead
  when its size allows;
- a `tp`-sharded output dim stays local: each device computes its columns,
  with its slice of `B`;
- a `tp`-sharded contracted dim splits `x`, `W` and `A` and ends in a
  `psum`: the base product and `x @ A` are both partial sums over the
  shards, and `(sum_i d_i) @ B = sum_i (d_i @ B)`, so summing each shard's
  output is exact (the adapter row mask is per row, hence also linear);
- many adapters (`adapter_ids`): the adapter axis of `A`/`B` is replicated
  and the ids are split like `x`'s rows.

An axis that does not divide its dimension is left replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from gemma4_jax import mesh as mesh_lib


def shard_einsum(local_fn, equation: str, x, w, lora_a, lora_b, *, mesh,
                 w_axes, w_scale=None, adapter_ids=None,
                 batch_axis: str = mesh_lib.FSDP):
  """Runs `local_fn(x, w, lora_a, lora_b, w_scale, adapter_ids)` per shard.

  Args:
    local_fn: the op on local blocks (same equation).
    equation: the two-operand einsum (`"MK,KN->MN"` for a plain matmul);
      x's first axis is its batch axis.
    x, w, lora_a, lora_b: global arrays (qwix's adapter layout).
    mesh: a `jax.sharding.Mesh` or `AbstractMesh`.
    w_axes: the mesh axis (or None) of each of w's dims, e.g. Tunix's
      `('tp', 'fsdp', None)` for a `NDH` query weight.
    w_scale: optional per-channel scales of an int8 `w` (w's rank, size 1
      on the contracted axes), sharded like w's kept axes.
    adapter_ids: optional ids over x's uncontracted axes; `lora_a` and
      `lora_b` then have a leading adapter axis (kept whole on every shard).
    batch_axis: the data-parallel axis (gathered on weights, split on x).

  Returns:
    The einsum's output, sharded like `x`'s batch and w's kept axes.
  """
  operands, _, out = equation.replace(" ", "").partition("->")
  lhs, rhs = operands.split(",")
  w_axes = tuple(w_axes) + (None,) * (len(rhs) - len(tuple(w_axes)))
  size = dict(zip(lhs, x.shape)) | dict(zip(rhs, w.shape))
  axis_of, psum_axes = {}, []
  for letter, axis in zip(rhs, w_axes):
    if (axis is None or axis == batch_axis or axis not in mesh.axis_names or
        size[letter] % mesh.shape[axis] or axis in axis_of.values()):
      continue  # gathered or replicated
    axis_of[letter] = axis
    if letter in lhs:
      psum_axes.append(axis)
  if (batch_axis in mesh.axis_names and lhs[0] not in rhs and
      size[lhs[0]] % mesh.shape[batch_axis] == 0):
    axis_of[lhs[0]] = batch_axis

  def spec(axes):
    return P(*(axis_of.get(letter) for letter in axes))

  a_axes = "".join(c for c in rhs if c in lhs)
  b_axes = "".join(c for c in rhs if c not in lhs)

  def body(x, w, lora_a, lora_b, w_scale, adapter_ids):
    y = local_fn(x, w, lora_a, lora_b, w_scale, adapter_ids)
    return jax.lax.psum(y, tuple(psum_axes)) if psum_axes else y

  scale_spec = None if w_scale is None else P(
      *(None if c in lhs else axis_of.get(c) for c in rhs))
  a_spec, b_spec = P(*spec(a_axes), None), P(None, *spec(b_axes))
  ids_spec = None
  if adapter_ids is not None:
    a_spec, b_spec = P(None, *a_spec), P(None, *b_spec)
    ids_spec = spec("".join(c for c in lhs if c not in rhs))
  return jax.shard_map(
      body, mesh=mesh,
      in_specs=(spec(lhs), spec(rhs), a_spec, b_spec, scale_spec, ids_spec),
      out_specs=spec(out), check_vma=False)(x, w, lora_a, lora_b, w_scale,
                                            adapter_ids)
