"""The fused loss's `custom_vjp`, shared by the XLA and Pallas versions.

Neither version is a kernel by itself: each supplies three per-shard passes
(`Passes`, tiles streamed past a resident block): the forward statistics
(online max, sum of exp, target logit over a vocab slice), the hidden
gradient and the embedding gradient. `loss_sums` wraps them in one
`jax.custom_vjp` whose forward keeps only per-token `(lse, nll)` and whose
backward recomputes the logit tiles, so no `[tokens, V]` array is ever
saved; `sharding` runs each pass inside `jax.shard_map` over the mesh.

The embedding gradient is computed only when the embedding is being
differentiated (`symbolic_zeros`: in LoRA training it is frozen).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp

from gemma4_jax.kernels.loss import sharding


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
  layout = sharding.find_layout(mesh, batch=hidden.shape[0],
                                vocab=embedding.shape[0])

  @jax.custom_vjp
  def sums(hidden, embedding, targets, weights):
    _, nll = sharding.forward(hidden, embedding, targets, softcap=softcap,
                              passes=passes, layout=layout)
    return jnp.sum(weights * nll), jnp.sum(weights)

  def sums_fwd(hidden, embedding, targets, weights):
    lse, nll = sharding.forward(hidden.value, embedding.value, targets.value,
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
    d_hidden, d_embedding = sharding.backward(
        hidden, embedding, targets, lse, scale, softcap=softcap,
        passes=passes, layout=layout, want_hidden=wanted[0] is not None,
        want_embedding=wanted[1] is not None)
    return d_hidden, d_embedding, None, g_loss * nll + g_weight

  sums.defvjp(sums_fwd, sums_bwd, symbolic_zeros=True)
  return sums(hidden, embedding, targets, weights)
