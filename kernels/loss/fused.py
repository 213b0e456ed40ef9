"""The fused loss's `custom_vjp` and its sharding, for any implementation.

An implementation supplies three per-shard passes (`Passes`): the forward
statistics (online max, sum of exp, target logit over a vocab slice), the
hidden gradient and the embedding gradient. This module runs them inside
`jax.shard_map` over the mesh in context: tokens (the batch) over `fsdp`,
vocab over `tp`. Per-shard partial max/sum-exp and target logits are combined
with `pmax`/`psum` over `tp`; the hidden gradient is a `psum` over `tp`, the
embedding gradient a `psum` over `fsdp`. No device ever holds `[tokens, V]`.

The embedding gradient is computed only when the embedding is being
differentiated (`symbolic_zeros`: in LoRA training it is frozen).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax.custom_derivatives import SymbolicZero
from jax.interpreters import pxla
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "fsdp"
VOCAB_AXIS = "tp"


@dataclasses.dataclass(frozen=True)
class Passes:
  """One implementation's per-shard passes, block sizes bound.

  `forward_stats(h [N,D], e [Vs,D], t [N]) -> (row_max, sum_exp,
  target_logit)`, `backward_hidden(h, e, t, lse, scale, out_dtype=) -> [N, D]`
  (accumulated in float32, returned in `out_dtype`),
  `backward_embedding(h, e, t, lse, scale) -> [Vs, D] f32`; `t` holds
  targets shifted into the slice, each pass also takes `softcap=`.
  """
  forward_stats: Callable
  backward_hidden: Callable
  backward_embedding: Callable


@dataclasses.dataclass(frozen=True)
class _Layout:
  mesh: object  # jax.sharding.Mesh / AbstractMesh, or None: unsharded
  batch_axis: str | None
  vocab_axis: str | None


def loss_sums(hidden, embedding, targets, weights, *, softcap, passes,
              mesh=None):
  """`(sum(weights * nll), sum(weights))` with a fused custom gradient.

  Args:
    hidden: `[B, T, D]`; embedding `[V, D]` of the same dtype.
    targets: `[B, T]` int32; ids outside `[0, V)` give nll 0 and no gradient.
    weights: `[B, T]` float32.
    softcap: c, or None.
    passes: the implementation's `Passes`.
    mesh: a mesh, or None for the one in context (none: unsharded).

  Returns:
    Two float32 scalars.
  """
  layout = _layout(mesh, batch=hidden.shape[0], vocab=embedding.shape[0])

  @jax.custom_vjp
  def sums(hidden, embedding, targets, weights):
    _, nll = _forward(hidden, embedding, targets, softcap=softcap,
                      passes=passes, layout=layout)
    return jnp.sum(weights * nll), jnp.sum(weights)

  def sums_fwd(hidden, embedding, targets, weights):
    lse, nll = _forward(hidden.value, embedding.value, targets.value,
                        softcap=softcap, passes=passes, layout=layout)
    out = (jnp.sum(weights.value * nll), jnp.sum(weights.value))
    # Which gradients are wanted travels as residual structure (static).
    wanted = (() if hidden.perturbed else None,
              () if embedding.perturbed else None)
    return out, (hidden.value, embedding.value, targets.value, weights.value,
                 lse, nll, wanted)

  def sums_bwd(residuals, cotangents):
    hidden, embedding, targets, weights, lse, nll, wanted = residuals
    g_loss, g_weight = (jnp.zeros((), jnp.float32)
                        if isinstance(g, SymbolicZero) else g
                        for g in cotangents)
    valid = (targets >= 0) & (targets < embedding.shape[0])
    scale = jnp.where(valid, g_loss * weights, 0.0)
    d_hidden, d_embedding = _backward(
        hidden, embedding, targets, lse, scale, softcap=softcap,
        passes=passes, layout=layout, want_hidden=wanted[0] is not None,
        want_embedding=wanted[1] is not None)
    return d_hidden, d_embedding, None, g_loss * nll + g_weight

  sums.defvjp(sums_fwd, sums_bwd, symbolic_zeros=True)
  return sums(hidden, embedding, targets, weights)


def _layout(mesh, *, batch, vocab) -> _Layout:
  """Axes to shard over: each only if present, >1 and dividing its dim."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      mesh = pxla.thread_resources.env.physical_mesh
  if mesh.empty:
    return _Layout(None, None, None)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

  def axis(name, dim):
    size = sizes.get(name, 1)
    return name if size > 1 and dim % size == 0 else None

  batch_axis, vocab_axis = axis(BATCH_AXIS, batch), axis(VOCAB_AXIS, vocab)
  if batch_axis is None and vocab_axis is None:
    return _Layout(None, None, None)
  return _Layout(mesh, batch_axis, vocab_axis)


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


def _forward(hidden, embedding, targets, *, softcap, passes, layout):
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


def _backward(hidden, embedding, targets, lse, scale, *, softcap, passes,
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
