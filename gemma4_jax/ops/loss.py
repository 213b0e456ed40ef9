"""The fused softcapped cross-entropy over tied-embedding logits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import implementations
from gemma4_jax import mesh as mesh_lib
from gemma4_jax import validation
from gemma4_jax.kernels.loss import pallas_tpu as loss_pallas
from gemma4_jax.kernels.loss import vjp as loss_vjp
from gemma4_jax.kernels.loss import xla as loss_xla
from gemma4_jax.reference import loss as loss_reference


def softcapped_cross_entropy(hidden, embedding, targets, weights, *,
                             softcap=30.0, implementation=None,
                             interpret=False, block_sizes=None, mesh=None):
  """Weighted cross-entropy of softcapped tied-embedding logits, fused.

  The logits `c * tanh(hidden @ embedding.T / c)` are never materialized:
  the Pallas and XLA versions stream `[tokens, vocab]` tiles with an online
  float32 logsumexp, and the gradient `dz = (softmax - onehot) * (1 -
  tanh^2)` is recomputed per tile (`d hidden = dz @ E`, `d embedding = dz^T
  @ hidden`, the latter only when the embedding is differentiated). Under a
  mesh (`mesh`, or the one in context), tokens are split over `fsdp` and the
  vocab over `tp` inside `jax.shard_map`.

  Tunix's SFT loss is `loss_sum / (weight_sum + 1e-8)`.

  Args:
    hidden: final-norm outputs `[B, T, D]`, floating.
    embedding: the tied embedding `[V, D]`, same dtype as hidden.
    targets: integer ids `[B, T]` in `[0, V)`. Concrete targets outside that
      range raise `ValueError`; under `jit` they cannot be checked and, as in
      Tunix's one-hot loss, give nll 0 and no gradient.
    weights: `[B, T]`, boolean (a loss mask) or real.
    softcap: c in `c * tanh(logits / c)` (Gemma 4: 30), or None.
    implementation: None, "pallas_tpu", "xla" or "reference" (see
      `gemma4_jax.ops`); "reference" materializes the logits.
    interpret: run the Pallas kernel in interpret mode (CPU).
    block_sizes: the implementation's `BlockSizes`, or None for defaults.
    mesh: a `('fsdp', 'tp')` mesh, or None for the mesh in context (none:
      unsharded). A mesh with neither axis is an error.

  Returns:
    `(sum(weights * nll), sum(weights))`, float32 scalars; `(0, 0)` when
    there are no tokens (B or T is 0).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_loss_args(hidden, embedding, targets, weights, softcap, mesh)
  name = implementations.resolve("softcapped_cross_entropy", implementation,
                                 IMPLEMENTATIONS, interpret=interpret)
  if validation.has_empty_dim(hidden.shape[:2]):
    # No tokens: both sums are 0 (the kernels tile the token axis).
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  targets = targets.astype(jnp.int32)
  weights = weights.astype(jnp.float32)
  _check_block_sizes(name, block_sizes)
  static = dict(softcap=softcap, interpret=interpret,
                block_sizes=block_sizes, mesh=mesh)
  run = implementations.select(
      "softcapped_cross_entropy", name,
      {impl: functools.partial(fn, **static)
       for impl, fn in _IMPLEMENTATIONS.items()},
      interpret=interpret, tpu_default=TPU_DEFAULT)
  return run(hidden, embedding, targets, weights)


def _reference(hidden, embedding, targets, weights, *, softcap, **unused):
  del unused  # the reference has no blocks, mesh or interpret mode
  nll = loss_reference.token_nll(hidden, embedding, targets, softcap=softcap)
  return jnp.sum(weights * nll), jnp.sum(weights)


def _streamed(kernels):
  """The XLA or Pallas passes (`kernels`) in the shared `custom_vjp`."""

  def run(hidden, embedding, targets, weights, *, softcap, interpret,
          block_sizes, mesh):
    # Under BY_PLATFORM, given block sizes go to the implementation they
    # belong to; the other one takes its defaults.
    sizes = (block_sizes if isinstance(block_sizes, kernels.BlockSizes)
             else kernels.BlockSizes.get_default())
    return loss_vjp.loss_sums(
        hidden, embedding, targets, weights, softcap=softcap,
        passes=kernels.passes(sizes, interpret=interpret), mesh=mesh)
  return run


# Implementation name -> `(hidden, embedding, targets, weights, **static)`.
_IMPLEMENTATIONS = {implementations.PALLAS_TPU: _streamed(loss_pallas),
                    implementations.XLA: _streamed(loss_xla),
                    implementations.REFERENCE: _reference}
IMPLEMENTATIONS = tuple(_IMPLEMENTATIONS)
# Pallas on TPU: it needs no more HBM than the XLA version compiled for v5e
# (README's "TPU defaults").
TPU_DEFAULT = implementations.PALLAS_TPU
# Implementation name -> the `BlockSizes` class it takes.
_BLOCK_SIZES = {implementations.PALLAS_TPU: loss_pallas.BlockSizes,
                implementations.XLA: loss_xla.BlockSizes}


def _check_block_sizes(name, block_sizes):
  if (block_sizes is not None and name != implementations.BY_PLATFORM and
      not isinstance(block_sizes, _BLOCK_SIZES.get(name, ()))):
    want = _BLOCK_SIZES.get(name)
    raise TypeError(f"block_sizes must be a "
                    f"{want.__module__ if want else 'no'}.BlockSizes for "
                    f"implementation {name!r}, got {block_sizes!r}")


def _check_loss_args(hidden, embedding, targets, weights, softcap, mesh):
  for name, x in (("hidden", hidden), ("embedding", embedding),
                  ("targets", targets), ("weights", weights)):
    validation.check_array(name, x)
  validation.check_floating("hidden", hidden, ndim=3, form="[B, T, D]")
  validation.check_floating("embedding", embedding, ndim=2, form="[V, D]")
  if hidden.dtype != embedding.dtype:
    raise TypeError(f"hidden and embedding must share a dtype, got "
                    f"{hidden.dtype} and {embedding.dtype}")
  if hidden.shape[-1] != embedding.shape[1]:
    raise ValueError(f"hidden [B, T, D] and embedding [V, D] need the same D, "
                     f"got hidden {hidden.shape} and embedding "
                     f"{embedding.shape}")
  for name, x in (("targets", targets), ("weights", weights)):
    if getattr(x, "shape", None) != hidden.shape[:2]:
      raise ValueError(f"{name} must have shape [B, T] = {hidden.shape[:2]}, "
                       f"got {getattr(x, 'shape', type(x).__name__)}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f"targets must be integer ids, got {targets.dtype}")
  if not (jnp.issubdtype(weights.dtype, jnp.floating) or
          weights.dtype == jnp.bool_):
    raise TypeError(f"weights must be boolean or floating, got "
                    f"{weights.dtype}")
  validation.check_number("softcap", softcap, positive=True, allow_none=True)
  vocab, embed_dim = embedding.shape
  if vocab == 0 or embed_dim == 0:
    raise ValueError(f"embedding must have V >= 1 rows and D >= 1 columns, "
                     f"got shape {embedding.shape}")
  validation.check_mesh("softcapped_cross_entropy", mesh)
  wanted = mesh_lib.AXES
  if mesh is not None and not set(wanted) & set(mesh.axis_names):
    # It would run unsharded without a word.
    raise ValueError(f"softcapped_cross_entropy: mesh has axes "
                     f"{tuple(mesh.axis_names)}, none of {wanted} (tokens "
                     f"are split over {wanted[0]!r}, the vocab over "
                     f"{wanted[1]!r})")
  if not isinstance(targets, jax.core.Tracer) and targets.size:
    vocab = embedding.shape[0]
    ids = np.asarray(targets)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
      bad = low if low < 0 else high
      position = tuple(int(i) for i in np.argwhere(ids == bad)[0])
      raise ValueError(f"targets must be in [0, V) = [0, {vocab}), got "
                       f"{bad} at {position}")
