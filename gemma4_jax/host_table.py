"""A host-resident PLE table: only the gathered rows reach the accelerator.

E2B's table is 4.7 GB of bf16, about half the model, and frozen in LoRA
training; a step needs the rows of its tokens only (73 MB for 4096 tokens).
`HostTable` keeps the table in host RAM, or memory-mapped straight from the
checkpoint's safetensors file (`HostTable.from_safetensors`: pages are read
on demand by the OS, nothing is copied up front).

The gather is a `jax.pure_callback` inside the compiled step, chosen over
the alternatives because:
- it needs no change to Tunix's model call or trainer: the ids are already
  inside `encode_per_layer_input`; an input-pipeline gather would have to
  thread `[B, T, L, P]` rows through `Gemma4.__call__` and the trainer's
  input function;
- the rows depend only on the token ids, which are inputs of the step, so
  XLA may issue the host transfer first and overlap it with the embedding
  and the early layers (the only dependency is the first decoder layer);
- JAX memory kinds (`pinned_host`) would pin the whole 4.7 GB table in page-
  locked memory (no memory map) and need `compute_on('device_host')` for a
  host-side gather, which XLA supports on TPU/GPU only, so it cannot be
  tested on CPU.

`HostTable` is a pytree with one leaf, a zero-size marker array of the table's
dtype, so a model holding it (an `nnx.Param`) passes through `jit` with no
table bytes among the device arguments; the marker carries the error when
someone differentiates with respect to the frozen table.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from gemma4_jax.export import safetensors_io
from gemma4_jax.kernels.ple import sharding as ple_sharding


class _HostData:
  """The host array behind a `HostTable` (hashed by identity, for jit)."""

  def __init__(self, array: np.ndarray):
    self.array = array


@jax.tree_util.register_pytree_node_class
class HostTable:
  """A PLE table `[V, L, P]` or `[V, L*P]` in host memory.

  Attributes:
    shape, dtype, ndim: the table's, like an array's.
    marker: a zero-size device array of the table's dtype (the pytree leaf).
  """

  def __init__(self, array, *, _data: _HostData | None = None, _marker=None):
    if _data is None:
      array = array if isinstance(array, np.ndarray) else np.asarray(array)
      if array.ndim not in (2, 3):
        raise ValueError(f"HostTable: expected a [V, L, P] or [V, L*P] table, "
                         f"got shape {array.shape}")
      _data = _HostData(array)
    self._data = _data
    self.marker = (jnp.zeros((0,), _data.array.dtype) if _marker is None
                   else _marker)

  @classmethod
  def from_safetensors(cls, path: str | os.PathLike,
                       tensor_name: str) -> "HostTable":
    """Memory-maps `tensor_name` of the safetensors file at `path`.

    Raises:
      KeyError: the file has no such tensor.
    """
    info = safetensors_io.SafetensorsFile(path).tensors.get(tensor_name)
    if info is None:
      raise KeyError(f"{os.fspath(path)} has no tensor {tensor_name!r}")
    return cls(np.memmap(info.path, dtype=info.numpy_dtype, mode="r",
                         offset=info.offset, shape=info.shape))

  @property
  def shape(self) -> tuple[int, ...]:
    return self._data.array.shape

  @property
  def dtype(self) -> np.dtype:
    return self._data.array.dtype

  @property
  def ndim(self) -> int:
    return self._data.array.ndim

  @property
  def nbytes(self) -> int:
    return self._data.array.nbytes

  def gather(self, ids: np.ndarray) -> np.ndarray:
    """Host rows for in-range int ids `[N]`: `[N, *shape[1:]]`."""
    return np.take(self._data.array, ids, axis=0)

  def __getitem__(self, index):
    raise TypeError(
        "HostTable is host-resident: index it with "
        "gemma4_jax.ops.ple_lookup (Tunix's stock encode_per_layer_input "
        "cannot read it; apply gemma4_jax.patches with ple='host')")

  def tree_flatten(self):
    return (self.marker,), self._data

  @classmethod
  def tree_unflatten(cls, data, children):
    return cls(None, _data=data, _marker=children[0])

  def __repr__(self) -> str:
    return f"HostTable(shape={self.shape}, dtype={self.dtype})"


def host_lookup(table: HostTable, ids, *, row_shape: tuple[int, ...]):
  """Rows `[N, *row_shape]` of in-range int32 ids `[N]`, gathered on host."""
  return _host_rows(table.marker, ids, table._data, row_shape)  # pylint: disable=protected-access


def sharded_host_lookup(table: HostTable, ids, *, row_shape, mesh, out_spec):
  """`host_lookup` inside `shard_map`: each device's callback gathers only
  its own block of `out_spec` (its tokens, its columns) from host memory, so
  the rows arrive already sharded and no device collects them for others."""
  spec = ple_sharding.padded_spec(out_spec, 1 + len(row_shape))
  dim_axes = ple_sharding.dim_axes(spec)
  sizes = [math.prod(mesh.shape[a] for a in axes) for axes in dim_axes]
  block = (ids.shape[0] // sizes[0],
           *(n // k for n, k in zip(row_shape, sizes[1:])))
  data = table._data  # pylint: disable=protected-access

  def local(marker, ids_block):
    starts = jnp.stack([
        (jax.lax.axis_index(axes) if axes else 0) * n
        for axes, n in zip(dim_axes[1:], block[1:])]).astype(jnp.int32)

    def gather(host_ids, host_starts):
      rows = np.take(data.array, np.asarray(host_ids), axis=0)
      window = tuple(slice(int(s), int(s) + n)
                     for s, n in zip(np.asarray(host_starts), block[1:]))
      return np.ascontiguousarray(rows[(slice(None), *window)])

    out = jax.ShapeDtypeStruct(block, marker.dtype)
    rows = jax.pure_callback(gather, out, ids_block, starts,
                             vmap_method="sequential")
    return _frozen(marker, rows)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(spec[0])),
                       out_specs=P(*spec), check_vma=False)(table.marker, ids)


def _host_rows(marker, ids, data, row_shape):
  out = jax.ShapeDtypeStruct((ids.shape[0], *row_shape), marker.dtype)

  def gather(host_ids):
    return np.take(data.array, np.asarray(host_ids), axis=0)

  return _frozen(marker, jax.pure_callback(gather, out, ids,
                                           vmap_method="sequential"))


@jax.custom_vjp
def _frozen(marker, rows):
  del marker
  return rows


def _frozen_fwd(marker, rows):
  del marker
  return rows, None


def _frozen_bwd(_, d_rows):
  raise TypeError(
      "ple='host': the per-layer embedding table is host-resident and frozen "
      "(LoRA training); it has no gradient. Differentiate with respect to "
      "other parameters (e.g. nnx.LoRAParam), or use ple=True to keep the "
      "table on the device for full fine-tuning.")


_frozen.defvjp(_frozen_fwd, _frozen_bwd)
