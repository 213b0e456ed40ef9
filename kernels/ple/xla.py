"""PLE row gather in plain XLA (CPU and GPU; the local gather of the sharded
lookup when not on TPU)."""

from __future__ import annotations

import jax.numpy as jnp


def gather_rows(table, ids):
  """`table[ids]` for in-range ids `[N]`: `[N, *table.shape[1:]]`.

  Differentiable in `table` by XLA's own gather transpose (a scatter-add).
  """
  return jnp.take(table, ids, axis=0, mode="clip")


def valid_ids(tokens, vocab_size: int):
  """Tunix's rule: ids outside `[0, V)` read row 0. Returns int32 `[N]`."""
  ids = tokens.reshape(-1).astype(jnp.int32)
  return jnp.where((ids >= 0) & (ids < vocab_size), ids, 0)
