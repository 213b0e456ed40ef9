"""Gemma 4 Per-Layer Embeddings: the row lookup and the fused per-layer-input
combine.

Implementations of the lookup (`implementation=`):
- "pallas_tpu": the Pallas row gather (`kernels/ple/pallas_tpu.py`);
- "xla": `jnp.take` (`kernels/ple/xla.py`), the default on every platform
  (`TPU_DEFAULT`; `interpret=True` makes it the Pallas kernel);
- "reference": the float32 oracle (`gemma4_jax.reference.ple`), unsharded.
A `HostTable` is read from host memory whatever the implementation.

`mesh=None` is the mesh in context (`gemma4_jax.mesh.in_context()`). The
lookup runs per shard in `jax.shard_map` (`kernels/ple/sharding.py`) only
when it also knows how the table lies on the mesh (`table_spec`); a mesh in
context without `table_spec` runs unsharded.

The arguments are checked once, here; the kernels assume valid input.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from gemma4_jax import host_table
from gemma4_jax import implementations
from gemma4_jax import mesh as mesh_lib
from gemma4_jax import validation
from gemma4_jax.kernels.ple import combine as ple_combine
from gemma4_jax.kernels.ple import pallas_tpu as ple_pallas
from gemma4_jax.kernels.ple import sharding as ple_sharding
from gemma4_jax.kernels.ple import xla as ple_xla
from gemma4_jax.reference import ple as ple_reference

# The local row gathers, `(table, ids [N]) -> rows`; the reference is the
# whole unsharded lookup instead (`ple_reference.ple_lookup`).
_GATHER_ROWS = {
    implementations.PALLAS_TPU: ple_pallas.gather_rows,
    implementations.XLA: ple_xla.gather_rows,
}
IMPLEMENTATIONS = (*_GATHER_ROWS, implementations.REFERENCE)
# The PLE gather ties XLA's gather in HBM but Mosaic only DMAs whole 8-row
# tiles of Gemma 4's tables (L = 35, 42 layers make XLA tile the row axis),
# so it moves 3-4.5x the bytes: the XLA version is the default on TPU too.
TPU_DEFAULT = implementations.XLA


def ple_lookup(per_layer_table, tokens, *, num_layers, per_layer_dim,
               mesh=None, table_spec=None, implementation=None,
               interpret=False):
  """Gemma 4 Per-Layer Embedding rows: `table[tokens]` as `[B, T, L, P]`.

  Ids outside `[0, V)` (negative too) read row 0, as Tunix does.

  Args:
    per_layer_table: `[V, L, P]` (google-tunix 0.1.7) or `[V, L*P]` (Tunix
      main), or a `HostTable` (host-resident; only the rows move to the
      device, `implementation` does not apply; on a mesh, each device
      fetches its own block of rows in the layout the sharded lookup hands
      over, `table_spec` being where the table would live on the mesh).
    tokens: integer ids `[B, T]`.
    num_layers, per_layer_dim: L and P.
    mesh: the mesh the table lives on, or None for the mesh in context;
      with `table_spec`, the lookup runs inside `shard_map` over it without
      gathering the table (see `kernels/ple/sharding.py` for the vocab- and
      feature-parallel modes). A mesh given without `table_spec` is an
      error; a mesh in context without one runs unsharded.
    table_spec: the table's `PartitionSpec` over the mesh (given or in
      context); without any mesh it is an error.
    implementation: None, "pallas_tpu", "xla" or "reference" (the
      unsharded float32 oracle; it ignores the mesh).
    interpret: run the Pallas kernel in interpret mode (CPU).

  Returns:
    `[B, T, L, P]` in the table's dtype (empty when B or T is 0).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  mesh = _check_lookup_args(per_layer_table, tokens, num_layers=num_layers,
                            per_layer_dim=per_layer_dim, mesh=mesh,
                            table_spec=table_spec)
  if isinstance(per_layer_table, host_table.HostTable):
    return _host_lookup(per_layer_table, tokens, num_layers=num_layers,
                        per_layer_dim=per_layer_dim, mesh=mesh,
                        table_spec=table_spec)
  name = implementations.resolve("ple_lookup", implementation, IMPLEMENTATIONS,
                                 interpret=interpret)
  return _device_lookup(name, per_layer_table, tokens, num_layers=num_layers,
                        per_layer_dim=per_layer_dim, mesh=mesh,
                        table_spec=table_spec, interpret=interpret)


def per_layer_inputs(embeddings, tokens, per_layer_table, model_projection,
                     projection_norm_scale, *, num_layers, per_layer_dim,
                     mesh=None, table_spec=None, implementation=None,
                     interpret=False):
  """Tunix's `Embedder.encode_per_layer_input`, the combine fused.

  `(rms_norm(embeddings @ (model_projection * D**-0.5)) * norm_scale
  + sqrt(P) * table[tokens]) * rsqrt(2)`, the norm over P per layer, with
  Tunix's dtype casts; the backward pass keeps one `[B, T, L, P]` residual.

  Args:
    embeddings: the scaled token embeddings `[B, T, D]`, floating.
    tokens: integer ids `[B, T]`; ids outside `[0, V)` read row 0.
    per_layer_table: `[V, L, P]`, `[V, L*P]` or a `HostTable`.
    model_projection: the unscaled `[D, L, P]` or `[D, L*P]` projection.
    projection_norm_scale: the norm's scale `[P]`.
    num_layers, per_layer_dim: L and P.
    mesh, table_spec, implementation, interpret: as in `ple_lookup`.

  Returns:
    `[B, T, L, P]` in the promoted dtype of embeddings and table (Tunix's;
    the reference implementation returns the embeddings' dtype).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  for arg, value in (("embeddings", embeddings),
                     ("model_projection", model_projection),
                     ("projection_norm_scale", projection_norm_scale)):
    validation.check_array(arg, value, what="a floating array")
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise TypeError(f"{arg} must be floating, got {value.dtype}")
  mesh = _check_lookup_args(per_layer_table, tokens, num_layers=num_layers,
                            per_layer_dim=per_layer_dim, mesh=mesh,
                            table_spec=table_spec)
  host = isinstance(per_layer_table, host_table.HostTable)
  name = implementation
  if not host:
    name = implementations.resolve("per_layer_inputs", implementation,
                                   IMPLEMENTATIONS, interpret=interpret)
  if name == implementations.REFERENCE:
    return ple_reference.per_layer_inputs(
        embeddings, tokens, per_layer_table, model_projection,
        projection_norm_scale, num_layers=num_layers,
        per_layer_dim=per_layer_dim)
  ple_reference.check_combine_args(
      embeddings, tokens, model_projection, projection_norm_scale,
      num_layers=num_layers, per_layer_dim=per_layer_dim)
  dims = dict(num_layers=num_layers, per_layer_dim=per_layer_dim, mesh=mesh,
              table_spec=table_spec)
  if host:
    rows = _host_lookup(per_layer_table, tokens, **dims)
  else:
    rows = _device_lookup(name, per_layer_table, tokens, **dims,
                          interpret=interpret)
  return ple_combine.per_layer_inputs(
      embeddings, rows, model_projection, projection_norm_scale,
      num_layers=num_layers, per_layer_dim=per_layer_dim)


def combine_per_layer_inputs(projected, rows, projection_norm_scale):
  """The per-layer-input combine after the projection matmul, fused.

  `(rms_norm(projected) * norm_scale + sqrt(P) * rows) * rsqrt(2)`, the norm
  over P in float32 (Tunix's casts); the backward pass keeps `projected` as
  its only residual. For callers whose projection is its own module (a qwix
  LoRA'd Einsum); `per_layer_inputs` is the whole computation. One XLA
  elementwise fusion on every platform (it has no implementation choice).

  Args:
    projected: `embeddings @ (model_projection * D**-0.5)` as `[B, T, L, P]`,
      floating (the compute dtype).
    rows: `ple_lookup(...)`, `[B, T, L, P]`.
    projection_norm_scale: `[P]`.

  Returns:
    `[B, T, L, P]` in `result_type(projected, rows)`.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  for arg, value in (("projected", projected), ("rows", rows),
                     ("projection_norm_scale", projection_norm_scale)):
    validation.check_array(arg, value, what="a floating array")
  if getattr(projected, "ndim", None) != 4:
    raise ValueError(f"projected must be [B, T, L, P], got shape "
                     f"{getattr(projected, 'shape', type(projected))}")
  for name, value in (("projected", projected), ("rows", rows)):
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating, got {value.dtype}")
  if getattr(rows, "shape", None) != projected.shape:
    raise ValueError(f"rows must have projected's shape {projected.shape}, "
                     f"got {getattr(rows, 'shape', None)}")
  if getattr(projection_norm_scale, "shape", None) != projected.shape[-1:]:
    raise ValueError(f"projection_norm_scale must be [P] = "
                     f"{projected.shape[-1:]}, got shape "
                     f"{getattr(projection_norm_scale, 'shape', None)}")
  return ple_combine.normalize_and_add(projected, rows, projection_norm_scale)


def _device_lookup(name, per_layer_table, tokens, *, num_layers,
                   per_layer_dim, mesh, table_spec, interpret):
  """The lookup of a device table by the resolved implementation `name`."""
  if validation.has_empty_dim(tokens.shape):  # the Pallas gather tiles rows
    return jnp.zeros((*tokens.shape, num_layers, per_layer_dim),
                     per_layer_table.dtype)
  if name == implementations.REFERENCE:
    return ple_reference.ple_lookup(per_layer_table, tokens,
                                    num_layers=num_layers,
                                    per_layer_dim=per_layer_dim)
  # Only the Pallas kernel has an interpret mode.
  table = {impl: (functools.partial(fn, interpret=interpret)
                  if impl == implementations.PALLAS_TPU else fn)
           for impl, fn in _GATHER_ROWS.items()}
  gather_rows = implementations.select(
      "ple_lookup", name, table, interpret=interpret, tpu_default=TPU_DEFAULT)
  if mesh is not None:
    return ple_sharding.sharded_lookup(
        per_layer_table, tokens, num_layers=num_layers,
        per_layer_dim=per_layer_dim, mesh=mesh, table_spec=table_spec,
        gather_rows=gather_rows)
  rows = gather_rows(per_layer_table,
                     ple_xla.valid_ids(tokens, per_layer_table.shape[0]))
  return rows.reshape(*tokens.shape, num_layers, per_layer_dim)


def _host_lookup(per_layer_table, tokens, *, num_layers, per_layer_dim,
                 mesh, table_spec):
  """The rows of a `HostTable`; on a mesh, in the layout of the sharded
  device lookup's rows."""
  row_shape = per_layer_table.shape[1:]
  ids = ple_xla.valid_ids(tokens, per_layer_table.shape[0])
  out_spec = None if mesh is None else ple_sharding.activation_spec(
      table_spec, len(row_shape) + 1, mesh, ids.shape[0])
  if out_spec is not None:
    rows = host_table.sharded_host_lookup(per_layer_table, ids,
                                          row_shape=row_shape, mesh=mesh,
                                          out_spec=out_spec)
  else:
    rows = host_table.host_lookup(per_layer_table, ids, row_shape=row_shape)
  return rows.reshape(*tokens.shape, num_layers, per_layer_dim)


def _check_lookup_args(per_layer_table, tokens, *, num_layers, per_layer_dim,
                       mesh, table_spec):
  """The lookup's arguments.

  Returns:
    The mesh to look up on, or None: `mesh`, else the mesh in context when
    `table_spec` says how the table lies on it.
  """
  for name, value in (("num_layers", num_layers),
                      ("per_layer_dim", per_layer_dim)):
    validation.check_int(name, value, minimum=1)
  validation.check_array("per_layer_table", per_layer_table)
  validation.check_array("tokens", tokens, what="an integer array")
  ple_reference.check_table(per_layer_table, num_layers=num_layers,
                            per_layer_dim=per_layer_dim)
  shape = per_layer_table.shape
  if shape[0] == 0:
    # Out-of-range ids read row 0, which an empty table does not have.
    raise ValueError(f"per_layer_table has no rows (V = 0, shape "
                     f"{tuple(shape)}); it needs at least one")
  ple_reference.check_tokens(tokens)
  if mesh is None and table_spec is not None:
    mesh = mesh_lib.in_context()
  if (mesh is None) != (table_spec is None):
    raise ValueError(f"pass mesh and table_spec together, got mesh={mesh!r} "
                     f"and table_spec={table_spec!r}")
  validation.check_mesh("ple_lookup", mesh)
  if mesh is not None:
    _check_table_spec(table_spec, len(shape), mesh)
  return mesh


def _check_table_spec(table_spec, ndim, mesh):
  spec = tuple(table_spec)
  if len(spec) > ndim:
    raise ValueError(f"table_spec {spec} has more entries than the table's "
                     f"rank {ndim}")
  spec = ple_sharding.padded_spec(spec, ndim)
  missing = [a for axes in ple_sharding.dim_axes(spec) for a in axes
             if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"table_spec {spec} names mesh axes {missing} that the "
                     f"mesh does not have (mesh axes: {mesh.axis_names})")
