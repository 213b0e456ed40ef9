"""Many LoRA adapters run as one stacked adapter (XLA and Pallas alike).

One adapter `a [K, r]`, `b [r, N]` and many adapters `a [n, K, r]`,
`b [n, r, N]` with `adapter_ids [M]` are both run as one stacked adapter
`a_cat [K, n*r]`, `b_cat [n*r, N]`: row m keeps only the columns
`[ids[m]*r, (ids[m]+1)*r)` of `x @ a_cat`, which is exactly
`(x[m] @ a[ids[m]]) @ b[ids[m]]`. This costs `n*r` columns of low-rank work
per row (cheap while `n*r` is a few hundred); rows need no sorting. A row
whose id is outside `[0, n)` keeps no column: it gets no low-rank term.
"""

from __future__ import annotations

import jax.numpy as jnp


def stack_adapters(a, b):
  """`a [n,K,r]`, `b [n,r,N]` -> `a_cat [K, n*r]`, `b_cat [n*r, N]`, r."""
  num, k, rank = a.shape
  a_cat = jnp.transpose(a, (1, 0, 2)).reshape(k, num * rank)
  b_cat = b.reshape(num * rank, b.shape[-1])
  return a_cat, b_cat, rank


def own_adapter_columns(down, adapter_ids, rank: int):
  """`down [M, n*r]` (`x @ a_cat`) with each row's other adapters' columns
  zeroed; `adapter_ids` is `[M, 1]`."""
  column_adapter = jnp.arange(down.shape[1]) // rank
  return jnp.where(column_adapter == adapter_ids, down, 0.0)
