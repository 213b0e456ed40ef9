"""Block schedules for the Pallas attention kernels: which tiles to visit.

Every (query block, key block) pair is one of EMPTY (nothing visible: neither
fetched nor computed), PARTIAL (some pairs masked: the kernel builds the mask)
or FULL (everything visible: no mask work, the mask block is not fetched).

Static rules (causal, sliding window, the ragged last key block) are
summarized in numpy at trace time, from block corners alone. Dynamic rules
(boolean masks, segment ids) go through a cheap pre-pass over the mask that
reduces it per block; the result is combined with the static summary, so a
mask carrying causality itself (Tunix passes `causal=False` with a causal
mask) still skips the blocks above the diagonal.

A summary `[Bs, Ks, rows, cols]` is compacted per row into the list of its
non-empty columns, padded by repeating the last entry so the pipeline sees
an unchanged block index (no DMA) on the idle steps. Each list entry packs
three fields into one int32 for scalar memory:
`mask_block << 16 | block << 2 | kind`, where `mask_block` is the column
whose mask tile is resident (that of the last PARTIAL entry so far), so FULL
and idle steps never trigger a mask fetch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2
_KIND_BITS = 2
_BLOCK_BITS = 14
MAX_BLOCKS = 1 << _BLOCK_BITS  # per axis, so a block index fits its field


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Compacted visiting lists for one kernel orientation.

  Attributes:
    entries: int32 `[Bs * Ks * rows * steps]`, packed as described above.
    batch, heads: Bs and Ks, 1 when the schedule is shared by all batches or
      kv heads.
    rows, steps: grid rows (q blocks, or kv blocks for dk/dv) and the number
      of list entries per row (the grid's innermost extent).
  """
  entries: jax.Array
  batch: int
  heads: int
  rows: int
  steps: int


def static_kinds(*, q_len: int, kv_len: int, block_q: int, block_kv: int,
                 causal: bool, sliding_window: int | None) -> np.ndarray:
  """`[nq, nk]` kinds from positions and bounds alone (exact per block).

  Query i sits at position i + S - T. Rows of a query block past T are
  padding whose output is dropped, so they do not make a block PARTIAL.
  """
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  q_first = np.arange(nq)[:, None] * block_q + kv_len - q_len
  q_last = np.minimum(np.arange(nq)[:, None] * block_q + block_q,
                      q_len) - 1 + kv_len - q_len
  k_first = np.arange(nk)[None, :] * block_kv
  k_last = np.minimum(k_first + block_kv, kv_len) - 1
  any_visible = np.ones((nq, nk), bool)
  all_visible = np.ones((nq, nk), bool)
  if causal:
    any_visible &= k_first <= q_last
    all_visible &= k_last <= q_first
  if sliding_window is not None:
    any_visible &= k_last > q_first - sliding_window
    all_visible &= k_first > q_last - sliding_window
  # The ragged last key block reads rows past S: they must be masked.
  all_visible &= k_first + block_kv <= kv_len
  return np.where(any_visible, np.where(all_visible, FULL, PARTIAL),
                  EMPTY).astype(np.int32)


def mask_kinds(mask, *, q_len: int, block_q: int, block_kv: int,
               num_kv_heads: int) -> jax.Array:
  """`[Bm, Km, nq, nk]` kinds of a canonical `[Bm, Nm, Tm, S]` mask.

  Heads sharing a kv head are summarized together (the kernel processes
  them in one tile); Km is K for a per-head mask and 1 otherwise.
  """
  bm, nm, tm, kv_len = mask.shape
  km = num_kv_heads if nm > 1 else 1
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  # A key mask ([.., 1, S]) is summarized once per key block, not per row.
  rows, row_block, row_blocks = (
      (1, 1, 1) if tm == 1 else (nq * block_q, block_q, nq))
  mask = mask.reshape(bm, km, nm // km, tm, kv_len)
  pad = ((0, 0), (0, 0), (0, 0), (0, rows - tm), (0, nk * block_kv - kv_len))
  blocks = (bm, km, nm // km, row_blocks, row_block, nk, block_kv)
  # Padding rows and columns never make a block PARTIAL or non-EMPTY by
  # themselves (the static summary marks a ragged last key block PARTIAL).
  any_visible = jnp.pad(mask, pad, constant_values=False).reshape(
      blocks).any(axis=(2, 4, 6))
  all_visible = jnp.pad(mask, pad, constant_values=True).reshape(
      blocks).all(axis=(2, 4, 6))
  kinds = jnp.where(any_visible, jnp.where(all_visible, FULL, PARTIAL), EMPTY)
  return jnp.broadcast_to(kinds, (bm, km, nq, nk)).astype(jnp.int32)


def segment_kinds(q_ids, kv_ids, *, block_q: int, block_kv: int) -> jax.Array:
  """`[B, 1, nq, nk]` kinds from segment ids: id ranges per block.

  Conservative: blocks whose id ranges overlap are PARTIAL unless both hold
  a single, equal id (FULL); disjoint ranges are EMPTY.
  """
  def ranges(ids, block):
    length = ids.shape[1]
    n = -(-length // block)
    ids = jnp.pad(ids, ((0, 0), (0, n * block - length)), mode="edge")
    ids = ids.reshape(ids.shape[0], n, block)
    return ids.min(axis=-1), ids.max(axis=-1)
  q_lo, q_hi = ranges(q_ids, block_q)
  k_lo, k_hi = ranges(kv_ids, block_kv)
  q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]
  k_lo, k_hi = k_lo[:, None, :], k_hi[:, None, :]
  overlap = (q_lo <= k_hi) & (k_lo <= q_hi)
  single = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
  kinds = jnp.where(overlap, jnp.where(single, FULL, PARTIAL), EMPTY)
  return kinds[:, None].astype(jnp.int32)


def combine(*kinds):
  """Kind of the intersection: EMPTY if any is, FULL if all are."""
  result = kinds[0]
  for other in kinds[1:]:
    result = jnp.minimum(result, other)  # EMPTY < PARTIAL < FULL
  return result


def compact(kinds, steps: int) -> Schedule:
  """Per row, the list of non-empty columns (first `steps` of them).

  Args:
    kinds: int `[Bs, Ks, rows, cols]` (numpy for a static schedule, so the
      result is a constant).
    steps: static list length, at least the largest non-empty count.
  """
  xp = np if isinstance(kinds, np.ndarray) else jnp
  batch, heads, rows, cols = kinds.shape
  if cols > MAX_BLOCKS:
    raise ValueError(f"at most {MAX_BLOCKS} blocks per axis, got {cols}")
  nonempty = kinds != EMPTY
  # A stable sort of "is empty" puts the non-empty columns first, in order.
  order = xp.argsort(~nonempty, axis=-1, stable=True)[..., :steps]
  count = nonempty.sum(axis=-1, keepdims=True)
  step = xp.arange(steps)
  last = xp.maximum(count - 1, 0)
  block = xp.take_along_axis(order, xp.minimum(step, last), axis=-1)
  kind = xp.where(step < count, xp.take_along_axis(kinds, block, axis=-1),
                  EMPTY)
  partial = kind == PARTIAL
  # The mask tile resident at a step: the last PARTIAL one so far, else the
  # first PARTIAL one of the row (fetched ahead, harmless).
  seen = xp.where(partial, step, -1)
  seen = (np.maximum.accumulate(seen, axis=-1) if xp is np
          else jax.lax.cummax(seen, axis=seen.ndim - 1))
  first = xp.argmax(partial, axis=-1, keepdims=True)
  mask_step = xp.where(seen >= 0, seen, first)
  mask_block = xp.take_along_axis(block, mask_step, axis=-1)
  entries = (mask_block << (_BLOCK_BITS + _KIND_BITS)) | (
      block << _KIND_BITS) | kind
  return Schedule(entries=xp.asarray(entries, xp.int32).reshape(-1),
                  batch=batch, heads=heads, rows=rows, steps=steps)


def max_count(kinds: np.ndarray, axis: int) -> int:
  """Largest number of non-empty blocks along `axis`, at least 1."""
  return max(1, int((kinds != EMPTY).sum(axis=axis).max()))


def entry_index(schedule: Schedule, b, h, row, step):
  """Flat index of an entry; `b`, `h` collapse to 0 on shared schedules."""
  b = b if schedule.batch > 1 else 0
  h = h if schedule.heads > 1 else 0
  return ((b * schedule.heads + h) * schedule.rows + row) * schedule.steps + step


def unpack(entry):
  """(block, kind, mask_block) of a packed entry."""
  kind = entry & ((1 << _KIND_BITS) - 1)
  block = (entry >> _KIND_BITS) & ((1 << _BLOCK_BITS) - 1)
  mask_block = entry >> (_BLOCK_BITS + _KIND_BITS)
  return block, kind, mask_block


def tiles_by_kind(schedule: Schedule) -> dict[str, jax.Array]:
  """How many scheduled tiles are PARTIAL and FULL, and the grid steps."""
  _, kind, _ = unpack(jnp.asarray(schedule.entries))
  return {"partial": jnp.sum(kind == PARTIAL), "full": jnp.sum(kind == FULL),
          "steps": schedule.entries.size}
