"""Reference greedy generation: the whole forward pass again at every step.

No KV cache, no left padding, no ring buffer: each prompt and its tokens so
far are run through the model from the start, and the largest logit's token
is appended. `gemma4_jax.generate` must produce these tokens.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def full_logits_fn(model):
  """`tokens [B, T] -> logits [B, T, V]` (numpy), causal, no cache. Rows may
  be right-padded: under a causal mask, what follows a position cannot
  change its logits."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits(state, tokens):
    length = tokens.shape[1]
    out, _ = nnx.merge(graphdef, state)(
        tokens, jnp.arange(length)[None], None,
        jnp.tril(jnp.ones((1, length, length), bool)))
    return out
  return lambda tokens: np.asarray(logits(state, jnp.asarray(tokens)))


def greedy(model, prompts: Sequence[Sequence[int]], steps: int):
  """`steps` greedy tokens per prompt.

  Returns:
    `(tokens, margins, sequences)`: per prompt, the generated tokens, each
    step's gap between the two largest logits (how far the choice is from
    a tie), and prompt + tokens.
  """
  forward = full_logits_fn(model)
  length = max(map(len, prompts)) + steps
  sequences = [list(map(int, p)) for p in prompts]
  margins = [[] for _ in prompts]
  for _ in range(steps):
    rows = np.zeros((len(prompts), length), np.int32)
    for r, seq in enumerate(sequences):
      rows[r, :len(seq)] = seq
    logits = forward(rows)
    for r, seq in enumerate(sequences):
      last = logits[r, len(seq) - 1]
      top2 = np.sort(last)[-2:]
      margins[r].append(float(top2[1] - top2[0]))
      seq.append(int(np.argmax(last)))
  tokens = [seq[len(p):] for p, seq in zip(prompts, sequences)]
  return tokens, margins, sequences
