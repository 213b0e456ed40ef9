"""The math of one `[tokens, vocab]` logit tile, written once.

The XLA passes, the Pallas kernel bodies and the streaming top-k all work
one tile at a time in float32: a block of hidden rows against a block of
embedding rows, the softcapped logits with vocab padding masked to -inf, an
online logsumexp across vocab tiles, and the logit gradient recomputed per
tile. Everything here runs unchanged inside `lax.scan` bodies and Pallas
kernel bodies. Per-token values (targets, statistics, `lse`, `scale`) are
`[tokens, 1]` columns, which broadcast against a tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma4_jax.kernels import _tpu


def precision(dtype):
  """float32 inputs keep float32 products (as the reference); bf16 needs no
  extra passes."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


def matmul_nt(a, b):
  """`a [M, K] @ b [N, K].T` accumulated in float32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             precision=precision(a.dtype),
                             preferred_element_type=jnp.float32)


def matmul(a, b):
  """`a [M, K] @ b [K, N]` accumulated in float32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             precision=precision(a.dtype),
                             preferred_element_type=jnp.float32)


def matmul_t(a, b):
  """`a [K, M].T @ b [K, N]` accumulated in float32."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             precision=precision(a.dtype),
                             preferred_element_type=jnp.float32)


def pad_to_blocks(hidden, embedding, targets, block_tokens, block_vocab):
  """Pads tokens and vocab to whole blocks: `(hidden, embedding, targets)`.

  Padded token rows are zeros with target -1 (no column); padded vocab rows
  are zeros, masked to -inf by `logits`. The embedding is only copied when
  the vocab is not a multiple of the block (Gemma 4's 262144 is).
  """
  tokens = _tpu.round_up(hidden.shape[0], block_tokens)
  targets = jnp.pad(targets, (0, tokens - targets.shape[0]),
                    constant_values=-1)
  return (_tpu.pad_axis(hidden, 0, tokens),
          _tpu.pad_axis(embedding, 0,
                        _tpu.round_up(embedding.shape[0], block_vocab)),
          targets)


def logits(hidden, embedding, j, *, block_vocab, vocab, softcap):
  """The softcapped logits of vocab block `j`: `(logits, tanh, column ids)`.

  Args:
    hidden: `[tn, D]` rows.
    embedding: `[tv, D]`, rows `j * block_vocab ...` of the embedding.
    j: the vocab block's index.
    block_vocab: tv.
    vocab: the unpadded vocab; padding columns get -inf.
    softcap: c, or None (then `tanh` is None).

  Returns:
    float32 `logits [tn, tv]`, `tanh [tn, tv]` (or None) and int32 `ids
    [tn, tv]` of each column.
  """
  z = matmul_nt(hidden, embedding)
  ids = j * block_vocab + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
  tanh = None
  if softcap is not None:
    tanh = jnp.tanh(z / softcap)
    z = softcap * tanh
  return jnp.where(ids < vocab, z, -jnp.inf), tanh, ids


def online_logsumexp(row_max, sum_exp, logits_tile):
  """One vocab tile's update of the running `(row_max, sum_exp)` `[tn, 1]`;
  `sum_exp` is relative to `row_max`."""
  new_max = jnp.maximum(row_max,
                        jnp.max(logits_tile, axis=1, keepdims=True))
  sum_exp = (sum_exp * jnp.exp(row_max - new_max) +
             jnp.sum(jnp.exp(logits_tile - new_max), axis=1, keepdims=True))
  return new_max, sum_exp


def target_logit(logits_tile, ids, targets):
  """The logit of each row's target `[tn, 1]` in this tile, 0 if elsewhere."""
  return jnp.sum(jnp.where(ids == targets, logits_tile, 0.0), axis=1,
                 keepdims=True)


def logit_grad(hidden, embedding, j, targets, lse, scale, *, block_vocab,
               vocab, softcap):
  """d loss / d z for vocab block `j`: `scale * (softmax - onehot) * (1 -
  tanh^2)`, float32 `[tn, tv]`.

  The logits are recomputed (see `logits` for the first three arguments);
  `targets`, `lse` (the full logsumexp) and `scale` (loss cotangent times
  weight) are `[tn, 1]` columns. Columns at -inf logits (vocab padding)
  get 0.
  """
  logits_tile, tanh, ids = logits(hidden, embedding, j,
                                  block_vocab=block_vocab, vocab=vocab,
                                  softcap=softcap)
  dlogits = jnp.exp(logits_tile - lse) - (ids == targets).astype(jnp.float32)
  if softcap is not None:
    dlogits = dlogits * (1.0 - tanh * tanh)
  return scale * dlogits
