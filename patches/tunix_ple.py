"""Tunix Gemma 4 per-layer inputs through `gemma4_jax.ops`.

Replaces `Embedder.encode_per_layer_input`. The projection stays Tunix's
Einsum module (so qwix LoRA on `per_layer_model_projection` still applies);
the row lookup is `ops.ple_lookup` (the Pallas row gather on TPU) and the
norm + rows + scale is `ops.combine_per_layer_inputs`, one fused op whose
backward pass keeps only the projection.

Under a mesh (`jax.set_mesh`, or Tunix's `with mesh:`) that has the axes of
Tunix's `shd_config.per_layer_input_embedding`, the lookup runs inside
`shard_map` with the table where Tunix put it, never gathering it
(`ops.ple_lookup` given the mesh and `table_spec`).

`apply(ple="host")` reads the table from host memory instead: move it there
first with `offload_table(model)` (or `offload_table(model,
HostTable.from_safetensors(...))` to memory-map it from the checkpoint); then
only the gathered rows reach the device. The stock method cannot read a
host-resident table, and the device path refuses one (and vice versa), so a
model never runs in a mode other than the one asked for.

Both Tunix layouts: google-tunix 0.1.7 (`tunix.models.gemma4.model`, table
`[V, L, P]`) and Tunix main (`tunix.models.gemma4.layers`, table
`[V, L*P]`). Models without PLE (`per_layer_input_dim` 0 or None: 31B,
26B-A4B, 12B) never call this method, so for them the patch is a no-op.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx

from gemma4_jax import mesh as mesh_lib
from gemma4_jax import ops
from gemma4_jax.host_table import HostTable
from gemma4_jax.patches import _framework

_INSTANCE_ATTRIBUTES = ("config", "vocab_size", "per_layer_model_projection",
                        "per_layer_projection_norm",
                        "per_layer_input_embedding")
_CONFIG_FIELDS = ("num_layers", "per_layer_input_dim", "shd_config")


def _requirements(config_module: str) -> tuple[_framework.Requirement, ...]:
  """What the replacement relies on besides the method itself: in the module
  holding `Embedder` (None) and in the config module."""
  return (
      _framework.Requirement(None, "Embedder.__init__",
                             names=_INSTANCE_ATTRIBUTES),
      *(_framework.Requirement(config_module, f"ModelConfig.{field}")
        for field in _CONFIG_FIELDS),
      _framework.Requirement(config_module,
                             "ShardingConfig.per_layer_input_embedding"),
  )


SPEC = _framework.PatchSpec(
    feature="ple", distribution="google-tunix",
    attribute="Embedder.encode_per_layer_input",
    layouts=(
        # Tunix main: layers.py, a [V, L*P] table (see tunix_attention on
        # why the layout, not the version string, identifies it).
        _framework.Layout(
            name="Tunix main c7d8950f", module="tunix.models.gemma4.layers",
            parameters=("self", "x", "t"),
            requirements=_requirements("tunix.models.gemma4.config"),
            known_by_layout=True, found_by="Embedder"),
        # google-tunix 0.1.7: model.py, a [V, L, P] table.
        _framework.Layout(
            name="google-tunix 0.1.7", module="tunix.models.gemma4.model",
            parameters=("self", "x", "t"),
            requirements=_requirements("tunix.models.gemma4.model"),
            known_versions=("0.1.7",), found_by="Embedder"),
    ),
    ops=("ple_lookup", "combine_per_layer_inputs"),
    stock=("the projection (Tunix's Einsum, so qwix LoRA on it applies); "
           "no-op on models without PLE (per_layer_input_dim 0/None: 31B, "
           "26B-A4B, 12B)"))


def targets() -> tuple[_framework.Target, ...]:
  """`SPEC` in the installed Tunix, replaced by the restated method below."""
  return SPEC.targets(_make_encode_per_layer_input)


def detect_layout() -> _framework.Layout:
  """The Tunix layout found here (the benchmarks build models from its
  module)."""
  return SPEC.detect_layout()


# Tunix's per-layer inputs, restated around `gemma4_jax.ops`; the host table.


def offload_table(model, table: HostTable | None = None) -> HostTable:
  """Moves the model's PLE table to host memory (for `apply(ple="host")`).

  Args:
    model: a Tunix `Gemma4` (or its `Embedder`) with PLE.
    table: the host table to use, e.g. `HostTable.from_safetensors(...)` to
      memory-map it from the checkpoint; default: a host copy of the model's
      table. Its shape and dtype must match the model's table.

  Returns:
    The `HostTable` now held by the embedder (as an `nnx.Param` whose only
    device leaf is a zero-size marker); the device copy is released.

  Raises:
    ValueError: the model has no PLE table, or `table` does not match it.
  """
  if table is not None and not isinstance(table, HostTable):
    raise TypeError(f"offload_table: table must be a HostTable (e.g. "
                    f"HostTable.from_safetensors(...)) or None, got "
                    f"{type(table).__name__}")
  embedder = getattr(model, "embedder", model)
  param = getattr(embedder, "per_layer_input_embedding", None)
  if param is None:
    raise ValueError("offload_table: the model has no per-layer embedding "
                     "table (per_layer_input_dim is 0 or None)")
  current = param.value
  if isinstance(current, HostTable) and table is None:
    return current
  if table is None:
    table = HostTable(np.asarray(jax.device_get(current)))
  if (tuple(table.shape) != tuple(current.shape) or
      np.dtype(table.dtype) != np.dtype(current.dtype)):
    raise ValueError(f"offload_table: table {table.shape} {table.dtype} does "
                     f"not match the model's {tuple(current.shape)} "
                     f"{current.dtype}")
  embedder.per_layer_input_embedding = nnx.Param(table)
  return table


def _make_encode_per_layer_input(original: Callable,
                                 options: _framework.OpOptions,
                                 layout: _framework.Layout) -> Callable:
  del layout  # both layouts' methods read the same attributes
  host = options.ple_host

  def encode_per_layer_input(self, x, t):
    config = self.config
    table = self.per_layer_input_embedding.value
    if isinstance(table, HostTable) != host:
      raise ValueError(
          "encode_per_layer_input: gemma4_jax.patches was applied with "
          f"ple={'host' if host else True!r} but the per-layer table is "
          f"{'on the device' if host else 'host-resident'}; "
          + ("call gemma4_jax.patches.tunix_ple.offload_table(model) first"
             if host else "apply(ple='host') to read a host-resident table"))
    num_layers, per_layer_dim = config.num_layers, config.per_layer_input_dim
    mesh, spec = _mesh_and_spec(config.shd_config.per_layer_input_embedding)
    # The rows depend on the ids only: issued first, a host fetch can overlap
    # the projection.
    rows = ops.ple_lookup(table, t, num_layers=num_layers,
                          per_layer_dim=per_layer_dim, mesh=mesh,
                          table_spec=spec,
                          **({} if host else options.op_kwargs))
    projected = self.per_layer_model_projection(x)
    projected = projected.reshape(*projected.shape[:2], num_layers,
                                  per_layer_dim)
    return ops.combine_per_layer_inputs(
        projected, rows, self.per_layer_projection_norm.scale.value)

  return _framework.wraps(
      original, encode_per_layer_input,
      note="Tunix Gemma 4 per-layer inputs, patched by gemma4_jax.patches: "
      "the row lookup runs gemma4_jax.ops.ple_lookup "
      f"({'host-resident table' if host else 'on the device'}) and the "
      "combine gemma4_jax.ops.combine_per_layer_inputs.")


def _mesh_and_spec(table_spec):
  """The mesh in context and Tunix's table spec, or (None, None) when no mesh
  with the spec's axes is set (then the lookup is a local one)."""
  mesh = mesh_lib.in_context()
  if mesh is None or table_spec is None:
    return None, None
  axes = [a for s in table_spec if s is not None
          for a in ((s,) if isinstance(s, str) else s)]
  if not axes or any(a not in mesh.axis_names for a in axes):
    return None, None
  return mesh, tuple(table_spec)
