"""The fused loss's passes inside `jax.shard_map`: tokens over `fsdp`, vocab
over `tp`.

`forward` and `backward` run an implementation's per-shard passes
(`vjp.Passes`) on each device's block: tokens (the batch) over
`mesh.FSDP`, the vocab over `mesh.TP`. Per-shard partial max/sum-exp and
target logits are combined with `pmax`/`psum` over `tp`; the hidden
gradient is a `psum` over `tp`, the embedding gradient a `psum` over
`fsdp`. No device ever holds `[tokens, V]`. Without a mesh (or with axes
that do not divide the dims) the same functions run unsharded.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemma4_jax import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the passes run: the mesh and the axes tokens and vocab split
  over (None: not split)."""
  mesh: object  # jax.sharding.Mesh / AbstractMesh, or None: unsharded
  batch_axis: str | None
  vocab_axis: str | None


_UNSHARDED = Layout(None, None, None)


def find_layout(mesh, *, batch, vocab) -> Layout:
  """Axes to shard over: each only if present, >1 and dividing its dim.

  `mesh=None` means the mesh in context (`mesh.in_context()`).
  """
  if mesh is None:
    mesh = mesh_lib.in_context()
  if mesh is None or mesh.empty:
    return _UNSHARDED
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

  def axis(name, dim):
    size = sizes.get(name, 1)
    return name if size > 1 and dim % size == 0 else None

  batch_axis, vocab_axis = axis(mesh_lib.FSDP, batch), axis(mesh_lib.TP, vocab)
  if batch_axis is None and vocab_axis is None:
    return _UNSHARDED
  return Layout(mesh, batch_axis, vocab_axis)


def forward(hidden, embedding, targets, *, softcap, passes, layout):
  """Per-token float32 `(lse, nll)`, `[B, T]` each."""
  vocab = embedding.shape[0]
  batch_axis, vocab_axis = layout.batch_axis, layout.vocab_axis

  def shard(hidden, embedding, targets):
    b, t, d = hidden.shape
    row_max, sum_exp, picked = passes.forward_stats(
        hidden.reshape(b * t, d), embedding,
        _local_targets(targets, embedding.shape[0], layout, vocab),
        softcap=softcap)
    if vocab_axis is not None:
      full_max = jax.lax.pmax(row_max, vocab_axis)
      sum_exp = jax.lax.psum(sum_exp * jnp.exp(row_max - full_max),
                             vocab_axis)
      picked = jax.lax.psum(picked, vocab_axis)
      row_max = full_max
    lse = (row_max + jnp.log(sum_exp)).reshape(b, t)
    valid = (targets >= 0) & (targets < vocab)
    return lse, jnp.where(valid, lse - picked.reshape(b, t), 0.0)

  tokens = P(batch_axis, None)
  return _sharded(shard, layout,
                  (P(batch_axis, None, None), P(vocab_axis, None), tokens),
                  (tokens, tokens))(hidden, embedding, targets)


def backward(hidden, embedding, targets, lse, scale, *, softcap, passes,
             layout, want_hidden, want_embedding):
  """`(d hidden or None, d embedding or None)` in the inputs' dtypes."""
  vocab = embedding.shape[0]
  batch_axis, vocab_axis = layout.batch_axis, layout.vocab_axis

  def shard(hidden, embedding, targets, lse, scale):
    b, t, d = hidden.shape
    args = (hidden.reshape(b * t, d), embedding,
            _local_targets(targets, embedding.shape[0], layout, vocab),
            lse.reshape(-1), scale.reshape(-1))
    out = []
    if want_hidden:
      # Summed over vocab shards in float32; unsharded, the pass writes the
      # hidden's dtype itself, so no float32 [N, D] reaches HBM (192 MiB at
      # 32k tokens of E2B, compiled for v5e).
      d_hidden = passes.backward_hidden(
          *args, softcap=softcap,
          out_dtype=jnp.float32 if vocab_axis is not None else hidden.dtype)
      if vocab_axis is not None:
        d_hidden = jax.lax.psum(d_hidden, vocab_axis)
      out.append(d_hidden.reshape(b, t, d).astype(hidden.dtype))
    if want_embedding:
      d_embedding = passes.backward_embedding(*args, softcap=softcap)
      if batch_axis is not None:
        d_embedding = jax.lax.psum(d_embedding, batch_axis)
      out.append(d_embedding.astype(embedding.dtype))
    return tuple(out)

  if not (want_hidden or want_embedding):
    return None, None
  tokens = P(batch_axis, None)
  out_specs = ((P(batch_axis, None, None),) if want_hidden else ()) + (
      (P(vocab_axis, None),) if want_embedding else ())
  out = list(_sharded(
      shard, layout,
      (P(batch_axis, None, None), P(vocab_axis, None), tokens, tokens,
       tokens), out_specs)(hidden, embedding, targets, lse, scale))
  d_hidden = out.pop(0) if want_hidden else None
  d_embedding = out.pop(0) if want_embedding else None
  return d_hidden, d_embedding


def _sharded(fn, layout, in_specs, out_specs):
  if layout.mesh is None:
    return fn
  return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs,
                       out_specs=out_specs, check_vma=False)


def _local_targets(targets, vocab_slice, layout, vocab):
  """Targets shifted into this device's vocab slice (-1: invalid id)."""
  start = 0
  if layout.vocab_axis is not None:
    start = jax.lax.axis_index(layout.vocab_axis) * vocab_slice
  valid = (targets >= 0) & (targets < vocab)
  return jnp.where(valid, targets - start, -1).reshape(-1)
