"""PLE lookup inside `jax.shard_map`, leaving the table where it is.

The table's own sharding decides the collective, per dimension:

- axes on the vocab dimension -> vocab-parallel: each device owns a range of
  rows, gathers the ids that fall in it (zeros elsewhere) and the partial
  results are summed over those axes. Exactly one device contributes each
  row, so the sum in the table's dtype is exact: it moves half the bytes of
  XLA's float32 all-reduce, and becomes a reduce-scatter over the tokens
  when they divide evenly.
- axes on the feature dimension(s) -> feature-parallel: each device gathers
  its column slice of every row; no reduction, the rows stay
  feature-sharded.

Tunix shards the table on both (`('tp', None, 'fsdp')` for `[V, L, P]` in
google-tunix 0.1.7, `('tp', 'fsdp')` for `[V, L*P]` in Tunix main), so both
modes run at once: vocab-parallel over `tp`, feature-parallel over `fsdp`.
The alternative, resharding the table to one mode, would move the table
itself (gigabytes) every step; the ids (kilobytes) are replicated instead.
When the two axes have the same size (Tunix's meshes), the rows then swap
axes once (`_transpose_plan`) so they leave in the layout of Tunix's
projection (tokens over fsdp, features over tp) and the combine needs no
resharding: at E2B on a 2x2 mesh the step's collectives are 0.49x stock's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemma4_jax.kernels.ple import xla as ple_xla


def padded_spec(table_spec, ndim: int) -> tuple:
  """`table_spec` as a tuple with one entry per table dimension."""
  spec = tuple(table_spec)
  return spec + (None,) * (ndim - len(spec))


def dim_axes(spec) -> list[tuple[str, ...]]:
  """The mesh axes of each entry of a partition spec (`()` for None)."""
  return [() if s is None else (s,) if isinstance(s, str) else tuple(s)
          for s in spec]


def table_axes(table_spec, ndim: int) -> tuple[tuple[str, ...],
                                               tuple[str, ...]]:
  """(vocab axes, feature axes) of a table partition spec."""
  per_dim = dim_axes(padded_spec(table_spec, ndim))
  return per_dim[0], tuple(a for axes in per_dim[1:] for a in axes)


def sharded_lookup(per_layer_table, tokens, *, num_layers: int,
                   per_layer_dim: int, mesh, table_spec,
                   gather_rows: Callable):
  """`[B, T, L, P]` rows of `tokens` from a table sharded as `table_spec`.

  Args:
    per_layer_table: `[V, L, P]` or `[V, L*P]`.
    tokens: integer `[B, T]`; ids outside `[0, V)` read row 0.
    num_layers, per_layer_dim: L and P.
    mesh: the `jax.sharding.Mesh` the table lives on.
    table_spec: the table's `PartitionSpec` (or tuple) over `mesh`, checked
      by the op (`gemma4_jax.ops.ple`).
    gather_rows: the local gather, `(table_block, ids [N]) -> rows`.

  Returns:
    `[B, T, L, P]` in the table's dtype.
  """
  vocab_size = per_layer_table.shape[0]
  vocab_axes, _ = table_axes(table_spec, per_layer_table.ndim)
  spec = padded_spec(table_spec, per_layer_table.ndim)
  ids = ple_xla.valid_ids(tokens, vocab_size)
  shards = math.prod(mesh.shape[a] for a in vocab_axes)
  scatter = bool(vocab_axes) and ids.shape[0] % shards == 0
  transpose = _transpose_plan(spec, vocab_axes, mesh) if scatter else None

  def local(table_block, ids):
    rows_here = table_block.shape[0]
    local_ids = ids
    if vocab_axes:
      local_ids = ids - jax.lax.axis_index(vocab_axes) * rows_here
    mine = (local_ids >= 0) & (local_ids < rows_here)
    rows = gather_rows(table_block, jnp.where(mine, local_ids, 0))
    if not vocab_axes:
      return rows
    rows = jnp.where(mine.reshape(-1, *(1,) * (rows.ndim - 1)), rows,
                     jnp.zeros((), rows.dtype))
    if not scatter:
      return jax.lax.psum(rows, vocab_axes)
    rows = jax.lax.psum_scatter(rows, vocab_axes, scatter_dimension=0,
                                tiled=True)
    if transpose is not None:
      rows = jax.lax.ppermute(rows, transpose.axes, transpose.permutation)
    return rows

  if transpose is not None:
    out_spec = transpose.out_spec
  else:
    out_spec = P((vocab_axes or None) if scatter else None, *spec[1:])
  rows = jax.shard_map(
      local, mesh=mesh, in_specs=(P(*spec), P()), out_specs=out_spec,
      check_vma=False,
  )(per_layer_table, ids)
  return rows.reshape(*tokens.shape, num_layers, per_layer_dim)


@dataclasses.dataclass(frozen=True)
class _Transpose:
  axes: tuple[str, str]
  permutation: tuple[tuple[int, int], ...]
  out_spec: P


def activation_spec(table_spec, ndim: int, mesh, num_tokens: int):
  """The rows' `PartitionSpec` the sharded lookup hands over on a square
  mesh (tokens over the table's feature axis, features over its vocab axis:
  Tunix's projection layout), or None when it keeps the table's layout."""
  vocab_axes, _ = table_axes(table_spec, ndim)
  plan = _transpose_plan(padded_spec(table_spec, ndim), vocab_axes, mesh)
  if plan is None or num_tokens % mesh.shape[vocab_axes[0]]:
    return None
  return plan.out_spec


def _transpose_plan(spec, vocab_axes, mesh) -> _Transpose | None:
  """Swaps the two axes' roles in the output when the table is split over
  one vocab axis and one feature axis of the same size (Tunix's default).

  After the reduce-scatter, device (f, t) of the ('fsdp', 'tp') mesh holds
  token block t and feature block f; Tunix's activations are batch-sharded
  over fsdp and feature-sharded over tp, which is the transpose. One
  ppermute (f, t) -> (t, f) of the rows (bf16, 1/4 of them per device) hands
  the combine its rows in the projection's own layout, where XLA would
  otherwise reshard both the rows and the projection in float32.
  """
  feature_dims = [i for i, s in enumerate(spec) if i and s is not None]
  if len(vocab_axes) != 1 or len(feature_dims) != 1:
    return None
  feature = spec[feature_dims[0]]
  feature = feature if isinstance(feature, str) else (
      feature[0] if len(feature) == 1 else None)
  (vocab,) = vocab_axes
  if feature is None or mesh.shape[feature] != mesh.shape[vocab]:
    return None
  n = mesh.shape[vocab]
  axes = (feature, vocab)  # linear index = f * n + t over these two axes
  permutation = tuple((f * n + t, t * n + f) for f in range(n)
                      for t in range(n))
  out = [None] * len(spec)
  out[0], out[feature_dims[0]] = feature, vocab
  return _Transpose(axes, permutation, P(*out))
