"""Float32 reference loss: tied-embedding logits, final softcap, weighted CE.

This is Tunix's default SFT loss (`peft_trainer._default_loss_fn`) on Gemma 4
with the model's last step folded in: `logits = c * tanh(hidden @
embedding.T / c)` (c = 30), then `sum(weights * nll) / (sum(weights) + 1e-8)`.
Tunix shifts before it reduces (`hidden[:, :-1]`, `targets = tokens[:, 1:]`,
`weights = input_mask[:, 1:]`); here the three arrive already aligned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
NORMALIZER_EPS = 1e-8  # Tunix's: an all-zero weight batch gives loss 0


def token_nll(hidden, embedding, targets, *, softcap=30.0):
  """Per-token negative log-likelihood of `targets` under softcapped logits.

  Args:
    hidden: final-norm outputs `[..., D]`.
    embedding: the tied input embedding `[V, D]`.
    targets: integer ids, `hidden.shape[:-1]`. As in Tunix (whose one-hot of
      an id outside `[0, V)` is all zero), such a target gives nll 0.
    softcap: c in `c * tanh(logits / c)`; None for raw logits.

  Returns:
    float32 nll, `hidden.shape[:-1]`.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check(hidden, embedding, targets, softcap)
  logits = jnp.einsum("...d,vd->...v", hidden.astype(jnp.float32),
                      embedding.astype(jnp.float32), precision=HIGHEST)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  one_hot = jax.nn.one_hot(targets, embedding.shape[0], dtype=jnp.float32)
  return -jnp.sum(one_hot * log_probs, axis=-1)


def softcapped_cross_entropy(hidden, embedding, targets, weights, *,
                             softcap=30.0):
  """`sum(weights * nll) / (sum(weights) + 1e-8)`, Tunix's SFT loss.

  Args:
    hidden: final-norm outputs `[..., D]`.
    embedding: the tied input embedding `[V, D]`.
    targets: integer ids, `hidden.shape[:-1]` (see `token_nll`).
    weights: `hidden.shape[:-1]`, boolean (Tunix's mask) or real.
    softcap: c in `c * tanh(logits / c)`; None for raw logits.

  Returns:
    The float32 scalar loss.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  nll = token_nll(hidden, embedding, targets, softcap=softcap)
  if getattr(weights, "shape", None) != nll.shape:
    raise ValueError(f"weights must have shape hidden.shape[:-1] = "
                     f"{nll.shape}, got {getattr(weights, 'shape', None)}")
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * nll) / (jnp.sum(weights) + NORMALIZER_EPS)


def _check(hidden, embedding, targets, softcap):
  # Only the checks tests/loss/test_loss_reference.py asserts on the
  # reference itself; the op (`gemma4_jax.ops.loss`) checks everything.
  dtype = getattr(hidden, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"hidden must be a floating array, got dtype {dtype}")
  if hidden.ndim < 1 or embedding.ndim != 2 or (
      hidden.shape[-1] != embedding.shape[1]):
    raise ValueError(f"hidden must be [..., D] and embedding [V, D] with the "
                     f"same D, got hidden {hidden.shape} and embedding "
                     f"{embedding.shape}")
  dtype = getattr(targets, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"targets must be an integer array, got dtype {dtype}")
  if targets.shape != hidden.shape[:-1]:
    raise ValueError(f"targets must have shape hidden.shape[:-1] = "
                     f"{hidden.shape[:-1]}, got {targets.shape}")
  if softcap is not None and not (isinstance(softcap, (int, float))
                                  and softcap > 0):
    raise ValueError(f"softcap must be a positive number or None, got "
                     f"{softcap!r}")
