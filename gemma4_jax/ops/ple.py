"""Gemma 4 Per-Layer Embeddings: the row lookup and the fused per-layer-input combine."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from gemma4_jax import host_table
from gemma4_jax import implementations
from gemma4_jax import validation
from gemma4_jax.kernels.ple import combine as ple_combine
from gemma4_jax.kernels.ple import pallas_tpu as ple_pallas
from gemma4_jax.kernels.ple import sharded as ple_sharded
from gemma4_jax.kernels.ple import xla as ple_xla
from gemma4_jax.reference import ple as ple_reference

IMPLEMENTATIONS = (implementations.PALLAS_TPU, implementations.XLA,
                   implementations.REFERENCE)
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
      device, `implementation` does not apply; with `mesh`, each device
      fetches its own block of rows in the layout the sharded lookup hands
      over, `table_spec` being where the table would live on the mesh).
    tokens: integer ids `[B, T]`.
    num_layers, per_layer_dim: L and P.
    mesh: with `table_spec`, look up inside `shard_map` over this mesh
      without gathering the table (see `kernels/ple/sharded.py` for the
      vocab- and feature-parallel modes).
    table_spec: the table's `PartitionSpec` over `mesh`.
    implementation: None, "pallas_tpu", "xla" or "reference" (the
      unsharded float32 oracle; it ignores `mesh`).
    interpret: run the Pallas kernel in interpret mode (CPU).

  Returns:
    `[B, T, L, P]` in the table's dtype (empty when B or T is 0).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_ple_args(per_layer_table, tokens, num_layers=num_layers,
                  per_layer_dim=per_layer_dim, mesh=mesh,
                  table_spec=table_spec)
  row_shape = per_layer_table.shape[1:]
  if isinstance(per_layer_table, host_table.HostTable):
    ids = ple_xla.valid_ids(tokens, per_layer_table.shape[0])
    out_spec = None if mesh is None else ple_sharded.activation_spec(
        table_spec, len(row_shape) + 1, mesh, ids.shape[0])
    if out_spec is not None:
      rows = host_table.sharded_host_lookup(per_layer_table, ids,
                                          row_shape=row_shape, mesh=mesh,
                                          out_spec=out_spec)
    else:
      rows = host_table.host_lookup(per_layer_table, ids, row_shape=row_shape)
    return rows.reshape(*tokens.shape, num_layers, per_layer_dim)
  name = implementations.resolve("ple_lookup", implementation, IMPLEMENTATIONS,
                                 interpret=interpret)
  if validation.has_empty_dim(tokens.shape):  # the Pallas gather tiles rows
    return jnp.zeros((*tokens.shape, num_layers, per_layer_dim),
                     per_layer_table.dtype)
  if name == implementations.REFERENCE:
    return ple_reference.ple_lookup(per_layer_table, tokens,
                                    num_layers=num_layers,
                                    per_layer_dim=per_layer_dim)
  gather_rows = implementations.select(
      "ple_lookup", name,
      {implementations.PALLAS_TPU: functools.partial(
          ple_pallas.gather_rows, interpret=interpret),
       implementations.XLA: ple_xla.gather_rows},
      interpret=interpret, tpu_default=TPU_DEFAULT)
  if mesh is not None:
    return ple_sharded.sharded_lookup(
        per_layer_table, tokens, num_layers=num_layers,
        per_layer_dim=per_layer_dim, mesh=mesh, table_spec=table_spec,
        gather_rows=gather_rows)
  rows = gather_rows(per_layer_table,
                     ple_xla.valid_ids(tokens, per_layer_table.shape[0]))
  return rows.reshape(*tokens.shape, num_layers, per_layer_dim)


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
  _check_ple_args(per_layer_table, tokens, num_layers=num_layers,
                  per_layer_dim=per_layer_dim, mesh=mesh,
                  table_spec=table_spec)
  name = implementation
  if not isinstance(per_layer_table, host_table.HostTable):
    name = implementations.resolve(
        "per_layer_inputs", implementation, IMPLEMENTATIONS, interpret=interpret)
  if name == implementations.REFERENCE:
    return ple_reference.per_layer_inputs(
        embeddings, tokens, per_layer_table, model_projection,
        projection_norm_scale, num_layers=num_layers,
        per_layer_dim=per_layer_dim)
  ple_reference.check_combine_args(
      embeddings, tokens, model_projection, projection_norm_scale,
      num_layers=num_layers, per_layer_dim=per_layer_dim)
  rows = ple_lookup(per_layer_table, tokens, num_layers=num_layers,
                    per_layer_dim=per_layer_dim, mesh=mesh,
                    table_spec=table_spec, implementation=implementation,
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


def _check_ple_args(per_layer_table, tokens, *, num_layers, per_layer_dim,
                    mesh, table_spec):
  for name, value in (("num_layers", num_layers),
                      ("per_layer_dim", per_layer_dim)):
    validation.check_int(name, value, minimum=1)
  validation.check_array("per_layer_table", per_layer_table)
  validation.check_array("tokens", tokens, what="an integer array")
  shape = getattr(per_layer_table, "shape", None)
  if shape is None or len(shape) not in (2, 3):
    raise ValueError(f"per_layer_table must be [V, L, P] or [V, L*P], got "
                     f"shape {shape}")
  want = ((num_layers, per_layer_dim) if len(shape) == 3
          else (num_layers * per_layer_dim,))
  if tuple(shape[1:]) != want:
    raise ValueError(f"per_layer_table of shape {tuple(shape)} does not match "
                     f"num_layers={num_layers}, per_layer_dim={per_layer_dim}: "
                     f"expected [V, *{want}]")
  if shape[0] == 0:
    # Out-of-range ids read row 0, which an empty table does not have.
    raise ValueError(f"per_layer_table has no rows (V = 0, shape "
                     f"{tuple(shape)}); it needs at least one")
  dtype = getattr(tokens, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"tokens must be an integer array, got dtype {dtype}")
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
  if (mesh is None) != (table_spec is None):
    raise ValueError(f"pass mesh and table_spec together, got mesh={mesh!r} "
                     f"and table_spec={table_spec!r}")
  validation.check_mesh("ple_lookup", mesh)
  if mesh is not None:
    ple_sharded.table_axes(table_spec, len(shape), mesh)
