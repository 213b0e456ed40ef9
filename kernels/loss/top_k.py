"""Top-k next tokens and their probabilities without the `[T, V]` logits.

Vocab chunks `[T, block_vocab]` of the softcapped logits (the fused loss's
tile math, `tile`) stream through a `lax.scan` that keeps a running top-k
(merged with each chunk by `lax.top_k` over `k + block_vocab` candidates)
and an online float32 logsumexp; probabilities are `exp(top logits -
logsumexp)` at the end. It serves the perplexity command's `--top-k`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels.loss import tile

DEFAULT_BLOCK_VOCAB = 8192


def top_k_next_tokens(hidden, embedding, k, *, softcap=30.0,
                      block_vocab=DEFAULT_BLOCK_VOCAB):
  """The k most likely next tokens at every position.

  Args:
    hidden: final-norm outputs `[T, D]`.
    embedding: the tied embedding `[V, D]`, same dtype.
    k: how many, `1 <= k <= V`.
    softcap: c in `c * tanh(logits / c)`, or None.
    block_vocab: vocab chunk size.

  Returns:
    `(ids [T, k] int32, probs [T, k] float32, log_z [T] float32)`, most
    likely first; probabilities are of the softcapped distribution.

  Raises:
    ValueError: k out of range or mismatched shapes.
  """
  vocab, dim = embedding.shape
  if hidden.ndim != 2 or hidden.shape[1] != dim:
    raise ValueError(f"hidden must be [T, D] with D = {dim} (embedding "
                     f"{embedding.shape}), got {hidden.shape}")
  if not (isinstance(k, int) and 1 <= k <= vocab):
    raise ValueError(f"k must be an int in [1, V = {vocab}], got {k!r}")
  tv = min(block_vocab, vocab)
  e = _tpu.pad_axis(embedding, 0, _tpu.round_up(vocab, tv))
  e = e.reshape(-1, tv, dim)
  tokens = hidden.shape[0]

  def chunk(carry, j):
    top_vals, top_ids, row_max, sum_exp = carry
    logits, _, ids = tile.logits(hidden, e[j], j, block_vocab=tv,
                                 vocab=vocab, softcap=softcap)
    row_max, sum_exp = tile.online_logsumexp(row_max, sum_exp, logits)
    top_vals, where = jax.lax.top_k(
        jnp.concatenate([top_vals, logits], axis=1), k)
    top_ids = jnp.take_along_axis(jnp.concatenate([top_ids, ids], axis=1),
                                  where, axis=1)
    return (top_vals, top_ids, row_max, sum_exp), None

  init = (jnp.full((tokens, k), -jnp.inf, jnp.float32),
          jnp.zeros((tokens, k), jnp.int32),
          jnp.full((tokens, 1), -jnp.inf, jnp.float32),
          jnp.zeros((tokens, 1), jnp.float32))
  (top_vals, top_ids, row_max, sum_exp), _ = jax.lax.scan(
      chunk, init, jnp.arange(e.shape[0]))
  log_z = row_max + jnp.log(sum_exp)  # [T, 1]
  return top_ids, jnp.exp(top_vals - log_z), log_z[:, 0]
