"""The device mesh: Tunix's `('fsdp', 'tp')` axes, the mesh in context, and
the mesh `generate`, `perplexity` and the fine-tuning script run on.

Every op finds its mesh here, and `mesh=None` means the same for every op:
the mesh in context (`jax.set_mesh`, or `with mesh:` as Tunix's trainers
use), and no sharding without one. Inside `jax.shard_map` an op sees no
mesh and runs on the local blocks it is given.

Tunix's Gemma 4 shardings name two axes. With one device there is no mesh;
with several, `default_mesh` puts every device on `fsdp`: rows of a batch
are split across devices and each weight is split along its `fsdp`
dimension (Gemma 4 E2B has one KV head, so `tp` > 1 would replicate K/V;
give `shape` to choose otherwise).
"""

from __future__ import annotations

import jax

FSDP = "fsdp"  # data parallel: batch rows, and weights' fsdp dimension
TP = "tp"  # tensor parallel: heads, vocab, weights' tp dimension
AXES = (FSDP, TP)


def in_context():
  """The mesh in effect, or None: `jax.set_mesh` / `jax.sharding.use_mesh`
  first, else a `with mesh:` block (what Tunix's trainers enter)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    return mesh
  return legacy_context()


def legacy_context():
  """The mesh of an enclosing `with mesh:` block, or None: what Tunix's own
  `shard()` reads.

  JAX has deprecated `jax.interpreters.pxla.thread_resources` but gives no
  other way to read a `with mesh:` block; this is the one place that reads
  it.
  """
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  physical = mesh_lib.thread_resources.env.physical_mesh
  return None if physical.empty else physical


def default_mesh(shape: tuple[int, int] | None = None):
  """An Auto-axes `('fsdp', 'tp')` mesh over all devices, or None on one.

  Auto axes, like Tunix's: with jax 0.10's default Explicit axes Tunix
  0.1.7's embedding lookup fails.

  Raises:
    ValueError: `shape` does not multiply to the number of devices.
  """
  devices = jax.devices()
  if shape is None:
    if len(devices) == 1:
      return None
    shape = (len(devices), 1)
  if shape[0] * shape[1] != len(devices):
    raise ValueError(f"mesh shape {shape} needs {shape[0] * shape[1]} "
                     f"devices, there are {len(devices)}")
  return jax.make_mesh(tuple(shape), AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
