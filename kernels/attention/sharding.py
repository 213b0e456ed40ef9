"""Attention per shard under Tunix's `('fsdp', 'tp')` mesh, in `shard_map`.

GSPMD cannot split a `pallas_call`, and left to itself it may gather a
blockwise loop's operands; so under a mesh every implementation runs inside
`jax.shard_map` on its own shard, laid out as Tunix lays out attention
activations (`act_btnh = ('fsdp', None, 'tp', None)`):

- the batch is split over `fsdp`; masks and segment ids follow it (a mask
  with a batch axis of 1 is replicated);
- query heads are split over `tp`, with K/V heads alongside when `tp` divides
  them. When K/V have fewer heads than a shard has query-head groups (E2B: 1
  KV head for 8 query heads), K/V are replicated over `tp` and each shard
  takes the one KV head its query heads read. A `[B, N, T, S]` mask follows
  the query heads;
- the sequence is not split (Tunix does not split it for attention).

No collective is needed in the forward: each shard computes whole rows of
its own heads. An axis that does not divide its dimension (batch 3 over
fsdp=2; 6 query heads over tp=4) is replicated instead: `shard_map` needs
equal shards, and padding the batch or the heads would cost more than
computing that axis redundantly on this small set of devices. The gradient
of a replicated K/V is summed over `tp` by `shard_map`'s transpose.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from gemma4_jax import masks
from gemma4_jax import mesh as mesh_lib


def attention(implementation: Callable, q, k, v, *, mask=None,
              segment_ids=None, mesh=None, batch_axis: str = mesh_lib.FSDP,
              head_axis: str = mesh_lib.TP):
  """`implementation(q, k, v, mask=, segment_ids=)` run per shard.

  Args:
    implementation: an attention function with every option but the mask
      and segment ids bound (arguments already validated).
    q, k, v, mask, segment_ids: as `gemma4_jax.ops.attention`.
    mesh: the mesh to shard over; `mesh_lib.in_context()` when None.
      Without one, or when neither axis splits anything, `implementation`
      runs as is.
    batch_axis, head_axis: mesh axes for the batch and the query heads.

  Returns:
    `[B, T, N, H]`, sharded like `q` is in Tunix (`P(batch, None, heads,
    None)` over the axes that split).
  """
  mesh = mesh_lib.in_context() if mesh is None else mesh
  batch, q_len, num_heads, _ = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  batch_spec = _axis_if_divides(mesh, batch_axis, batch)
  head_spec, kv_head_spec, kv_head_of_shard = _head_split(
      mesh, _axis_if_divides(mesh, head_axis, num_heads), num_heads,
      num_heads // num_kv_heads)
  if batch_spec is None and head_spec is None:
    return implementation(q, k, v, mask=mask, segment_ids=segment_ids)

  args, specs = [q, k, v], [P(batch_spec, None, head_spec, None),
                            P(batch_spec, None, kv_head_spec, None),
                            P(batch_spec, None, kv_head_spec, None)]
  if mask is not None:
    mask = masks.canonical_mask(mask, batch=batch, num_heads=num_heads,
                                q_len=q_len, kv_len=kv_len)
    args.append(mask)
    specs.append(P(batch_spec if mask.shape[0] == batch else None,
                   head_spec if mask.shape[1] == num_heads else None))
  if segment_ids is not None:
    segment_ids = masks.canonical_segment_ids(
        segment_ids, batch=batch, q_len=q_len, kv_len=kv_len)
    args.append(segment_ids)
    specs.append((P(batch_spec), P(batch_spec)))

  def per_shard(q, k, v, *rest):
    rest = list(rest)
    local_mask = rest.pop(0) if mask is not None else None
    local_ids = rest.pop(0) if segment_ids is not None else None
    if kv_head_of_shard is not None:
      kv_head = kv_head_of_shard()
      k = jax.lax.dynamic_slice_in_dim(k, kv_head, 1, axis=2)
      v = jax.lax.dynamic_slice_in_dim(v, kv_head, 1, axis=2)
    return implementation(q, k, v, mask=local_mask, segment_ids=local_ids)

  # check_vma=False: a `pallas_call`'s out_shape carries no varying-axes
  # type, which the check demands inside shard_map (the LoRA, PLE and loss
  # wrappers do the same). The replicated K/V's gradient is still summed
  # over the head axis by shard_map's transpose
  # (tests/attention/test_attention_sharding.py).
  return jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs),
                       out_specs=P(batch_spec, None, head_spec, None),
                       check_vma=False)(*args)


def _head_split(mesh, head_spec: str | None, num_heads: int, group: int):
  """How the heads split: `(query head axis, K/V head axis, kv_head_of_shard)`.

  K/V heads split with the query heads, or are replicated with one picked
  per shard (`kv_head_of_shard()` gives its index inside `shard_map`, else
  it is None), or, heads not split, kept whole. A shard whose query heads
  would straddle two KV heads unevenly does not split the heads at all.
  """
  if head_spec is None:
    return None, None, None
  heads_per_shard = num_heads // mesh.shape[head_spec]
  if heads_per_shard % group == 0:
    return head_spec, head_spec, None
  if group % heads_per_shard == 0:
    return head_spec, None, (
        lambda: jax.lax.axis_index(head_spec) * heads_per_shard // group)
  return None, None, None


def _axis_if_divides(mesh, axis: str, size: int) -> str | None:
  """`axis` if the mesh has it as a free (not manual) axis of more than one
  device that divides `size`; else None (replicate)."""
  if mesh is None or axis not in mesh.axis_names:
    return None
  axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[axis]
  if axis_type == jax.sharding.AxisType.Manual:  # already inside shard_map
    return None
  count = mesh.shape[axis]
  return axis if count > 1 and size % count == 0 else None
