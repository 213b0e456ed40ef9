"""Gemma 4 attention in plain XLA, blockwise: online softmax, flash-style VJP.

The same math as the float32 reference without ever holding `[B,N,T,S]`
scores: a loop over query blocks, and inside it a loop over only the key
blocks the block can see, keeps a running max, sum and float32 accumulator
(online softmax). The backward pass recomputes each score block from the
saved output and logsumexp, as flash attention does, so forward + backward
temporaries are O(T * block), not O(T * S). Runs anywhere XLA runs; it is the
default implementation off TPU.

- MQA/GQA: the query heads that share a KV head are stacked against it; K/V
  are never repeated per head.
- Key blocks outside the causal / sliding-window band are never visited, and
  neither are blocks the boolean mask leaves empty for every example and head
  (so Tunix's causal-inside-the-mask skips the upper triangle too).
- Any T and S: lengths are padded internally to a whole number of blocks, with
  blocks sized to keep that padding below one row per block.
- A query row with no visible key gives 0 and zero gradients. Inside a block,
  key/value rows no query of the block sees, and query rows that see no key of
  the block, are zeroed before the matmuls, so NaN in padded K/V (or padded
  queries) cannot leak into any output or gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from gemma4_jax import masks
from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels import attention as attention_names

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Upper bounds on the query and key block lengths.

  A length L is split into `cdiv(L, block)` equal blocks, so L=1029 with
  block 512 runs 3 blocks of 343 rows (2 padded rows), not 2 of 512 plus 1.
  Score temporaries are `[B, N, block_q, block_kv]` float32 per step.
  """
  block_q: int = DEFAULT_BLOCK_Q
  block_kv: int = DEFAULT_BLOCK_KV

  def __post_init__(self):
    _tpu.check_block_sizes(self, block_q=1, block_kv=1)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: a custom_vjp nondiff arg)."""
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  causal: bool
  sliding_window: int | None
  softcap: float | None
  scale: float


def attention(q, k, v, *, mask=None, segment_ids=None, causal=True,
              sliding_window=None, softcap=None, scale=None,
              block_sizes: BlockSizes | None = None):
  """See `gemma4_jax.ops.attention`; arguments are assumed validated.

  Args:
    q, k, v, mask, segment_ids, causal, sliding_window, softcap, scale: as
      `gemma4_jax.ops.attention`.
    block_sizes: query/key block bounds; `BlockSizes()` when None.

  Returns:
    `[B, T, N, H]` in q's dtype.
  """
  block_sizes = BlockSizes() if block_sizes is None else block_sizes
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  block_q, num_q_blocks = _split(q_len, block_sizes.block_q)
  block_kv, num_kv_blocks = _split(kv_len, block_sizes.block_kv)
  config = _Config(
      q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
      causal=bool(causal), sliding_window=sliding_window,
      softcap=None if softcap is None else float(softcap),
      scale=float(head_dim ** -0.5 if scale is None else scale))
  q_padded = num_q_blocks * block_q
  kv_padded = num_kv_blocks * block_kv

  q = _tpu.pad_axis(q.reshape(batch, q_len, num_kv_heads, group, head_dim),
                    1, q_padded)
  k, v = _tpu.pad_axis(k, 1, kv_padded), _tpu.pad_axis(v, 1, kv_padded)
  if mask is not None:
    mask = masks.canonical_mask(mask, batch=batch, num_heads=num_heads,
                                q_len=q_len, kv_len=kv_len)
    if mask.shape[1] == num_heads:  # per-head: split heads into KV groups
      mask = mask.reshape(mask.shape[0], num_kv_heads, group,
                          *mask.shape[2:])
    else:
      mask = mask[:, :, None]
    mask = _tpu.pad_axis(mask, 4, kv_padded)  # [B|1, K|1, G|1, T|1, S]
    if mask.shape[3] != 1:
      mask = _tpu.pad_axis(mask, 3, q_padded)
  q_ids = kv_ids = None
  if segment_ids is not None:
    q_ids, kv_ids = masks.canonical_segment_ids(
        segment_ids, batch=batch, q_len=q_len, kv_len=kv_len)
    q_ids = _tpu.pad_axis(q_ids, 1, q_padded)
    kv_ids = _tpu.pad_axis(kv_ids, 1, kv_padded)
  first, end = _kv_block_ranges(config, mask, num_q_blocks, num_kv_blocks)
  out = _attention(config, q, k, v, mask, q_ids, kv_ids, first, end)
  return out[:, :q_len].reshape(batch, q_len, num_heads, head_dim)


def _split(length: int, block: int) -> tuple[int, int]:
  """(block length, number of blocks) covering `length` with least padding."""
  count = -(-length // block)
  return -(-length // count), count


def _kv_block_ranges(config: _Config, mask, num_q_blocks: int,
                     num_kv_blocks: int):
  """For each query block, the key blocks `[first, end)` it may see.

  The causal and sliding-window bounds are static; a boolean mask narrows
  them to its first and last non-empty block (over every example and head).
  Blocks in between that happen to be empty are visited and cost only time.
  """
  bq, bkv = config.block_q, config.block_kv
  offset = config.kv_len - config.q_len
  first = np.zeros(num_q_blocks, np.int32)
  end = np.full(num_q_blocks, num_kv_blocks, np.int32)
  for i in range(num_q_blocks):
    lowest = i * bq + offset  # positions of the block's first and last query
    highest = min((i + 1) * bq, config.q_len) - 1 + offset
    if config.causal:
      end[i] = np.clip(highest // bkv + 1, 0, num_kv_blocks)
    if config.sliding_window is not None:
      first[i] = np.clip((lowest - config.sliding_window + 1) // bkv, 0,
                         num_kv_blocks)
  first, end = jnp.asarray(first), jnp.asarray(end)
  if mask is not None:
    rows = mask.shape[3] // (bq if mask.shape[3] != 1 else 1)
    seen = jnp.any(mask, axis=(0, 1, 2)).reshape(
        rows, mask.shape[3] // rows, num_kv_blocks, bkv).any(axis=(1, 3))
    seen = jnp.broadcast_to(seen, (num_q_blocks, num_kv_blocks))
    any_seen = seen.any(axis=1)
    mask_first = jnp.argmax(seen, axis=1).astype(jnp.int32)
    mask_end = (num_kv_blocks - jnp.argmax(seen[:, ::-1], axis=1)).astype(
        jnp.int32)
    first = jnp.where(any_seen, jnp.maximum(first, mask_first), 0)
    end = jnp.where(any_seen, jnp.minimum(end, mask_end), 0)
  return first, jnp.maximum(first, end)


def _visible(config: _Config, mask, q_ids, kv_ids, i, j):
  """Booleans `[B|1, K|1, G|1, block_q, block_kv]` for block (i, j)."""
  bq, bkv = config.block_q, config.block_kv
  q_pos = (i * bq + jnp.arange(bq) + config.kv_len - config.q_len)[:, None]
  kv_pos = (j * bkv + jnp.arange(bkv))[None, :]
  visible = kv_pos < config.kv_len  # internal padding of the keys
  if config.causal:
    visible &= kv_pos <= q_pos
  if config.sliding_window is not None:
    visible &= kv_pos > q_pos - config.sliding_window
  visible = visible[None, None, None]
  if mask is not None:
    rows = 1 if mask.shape[3] == 1 else bq
    # One index dtype: under x64 the loop counters may be int64 and int32.
    starts = [jnp.int32(0)] * 3 + [jnp.asarray(0 if rows == 1 else i * bq,
                                               jnp.int32),
                                   jnp.asarray(j * bkv, jnp.int32)]
    visible &= jax.lax.dynamic_slice(mask, starts,
                                     mask.shape[:3] + (rows, bkv))
  if q_ids is not None:
    q_block = jax.lax.dynamic_slice_in_dim(q_ids, i * bq, bq, axis=1)
    kv_block = jax.lax.dynamic_slice_in_dim(kv_ids, j * bkv, bkv, axis=1)
    visible &= (q_block[:, :, None] == kv_block[:, None, :])[:, None, None]
  return visible


def _load_block(config: _Config, q_block, k, v, visible, j):
  """This block's K/V, and `q_block`, with rows nothing here sees zeroed.

  Zeroed rather than given weight 0: padding may hold NaN, and 0 * NaN = NaN.
  """
  bkv = config.block_kv
  k_block = jax.lax.dynamic_slice_in_dim(k, j * bkv, bkv, axis=1)
  v_block = jax.lax.dynamic_slice_in_dim(v, j * bkv, bkv, axis=1)
  key_seen = jnp.any(visible, axis=(2, 3))  # [B|1, K|1, block_kv]
  key_seen = jnp.swapaxes(key_seen, 1, 2)[..., None]
  k_block = jnp.where(key_seen, k_block, 0)
  v_block = jnp.where(key_seen, v_block, 0)
  query_seen = jnp.moveaxis(jnp.any(visible, axis=4), 3, 1)[..., None]
  return jnp.where(query_seen, q_block, 0), k_block, v_block


def _varying_like(*arrays):
  """Casts a loop's initial carry to vary over the manual mesh axes its
  operands vary over (inside `shard_map`), as the loop's results will."""
  axes = set()
  for x in arrays:
    if x is not None:
      axes |= set(jax.typeof(x).manual_axis_type.varying)
  if not axes:
    return lambda init: init
  axes = tuple(sorted(axes))
  return lambda init: jax.tree.map(
      lambda x: jax.lax.pcast(x, axes, to="varying"), init)


def _logits(config: _Config, q_block, k_block):
  """Scaled, softcapped float32 scores `[B, K, G, block_q, block_kv]`, and
  tanh of the softcap (for its gradient)."""
  logits = jnp.einsum("bqkgh,bskh->bkgqs", q_block, k_block,
                      preferred_element_type=jnp.float32) * config.scale
  if config.softcap is None:
    return logits, None
  capped = jnp.tanh(logits / config.softcap)
  return config.softcap * capped, capped


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, mask, q_ids, kv_ids, first, end):
  return _forward(config, q, k, v, mask, q_ids, kv_ids, first, end)[0]


def _forward(config, q, k, v, mask, q_ids, kv_ids, first, end):
  """Output `[B, Tp, K, G, H]` (q's dtype) and logsumexp `[B, K, G, Tp]`."""
  batch, q_padded, num_kv_heads, group, head_dim = q.shape
  bq = config.block_q
  row_shape = (batch, num_kv_heads, group, bq)
  varying = _varying_like(q, k, v, mask, q_ids, kv_ids)

  def q_step(i, carry):
    out, lse = carry
    q_block = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)

    def kv_step(j, state):
      row_max, total, acc = state
      visible = _visible(config, mask, q_ids, kv_ids, i, j)
      q_blk, k_blk, v_blk = _load_block(config, q_block, k, v, visible, j)
      logits = jnp.where(visible, _logits(config, q_blk, k_blk)[0], -jnp.inf)
      new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
      # Rows with nothing visible yet keep max -inf; shift them by 0.
      shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
      weights = jnp.exp(logits - shift[..., None])  # invisible: exp(-inf) = 0
      rescale = jnp.exp(row_max - shift)
      total = rescale * total + jnp.sum(weights, axis=-1)
      acc = rescale[..., None] * acc + jnp.einsum(
          "bkgqs,bskh->bkgqh", weights.astype(v.dtype), v_blk,
          preferred_element_type=jnp.float32)
      return new_max, total, acc

    row_max, total, acc = jax.lax.fori_loop(
        first[i], end[i], kv_step,
        varying((jnp.full(row_shape, -jnp.inf, jnp.float32),
                 jnp.zeros(row_shape, jnp.float32),
                 jnp.zeros(row_shape + (head_dim,), jnp.float32))))
    seen = total > 0
    out_block = acc / jnp.where(seen, total, 1.0)[..., None]
    lse_block = jnp.where(seen, row_max + jnp.log(jnp.where(seen, total, 1.0)),
                          0.0)
    out = jax.lax.dynamic_update_slice_in_dim(
        out, jnp.moveaxis(out_block, 3, 1).astype(out.dtype), i * bq, axis=1)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_block, i * bq, axis=3)
    return out, lse

  out, lse = jax.lax.fori_loop(
      0, q_padded // bq, q_step,
      varying((jnp.zeros(q.shape, q.dtype),
               jnp.zeros((batch, num_kv_heads, group, q_padded),
                         jnp.float32))))
  return out, lse


def _attention_fwd(config, q, k, v, mask, q_ids, kv_ids, first, end):
  out, lse = _forward(config, q, k, v, mask, q_ids, kv_ids, first, end)
  out = checkpoint_name(out, attention_names.OUTPUT)
  lse = checkpoint_name(lse, attention_names.LOGSUMEXP)
  return out, (q, k, v, mask, q_ids, kv_ids, first, end, out, lse)


def _attention_bwd(config, residuals, d_out):
  """Flash backward: per block, probabilities from the saved logsumexp."""
  q, k, v, mask, q_ids, kv_ids, first, end, out, lse = residuals
  bq, bkv = config.block_q, config.block_kv
  varying = _varying_like(q, k, v, mask, q_ids, kv_ids, d_out)

  def q_step(i, carry):
    dq, dk, dv = carry
    q_block = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
    do_block = jax.lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=1)
    lse_block = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
    # [B, K, G, block_q]: the row sums of d_out * out, i.e. sum_j p_ij dp_ij;
    # per block, so no full-length float32 copy of out or d_out is made.
    delta_block = jnp.moveaxis(jnp.sum(
        do_block.astype(jnp.float32) * jax.lax.dynamic_slice_in_dim(
            out, i * bq, bq, axis=1).astype(jnp.float32), axis=-1), 1, 3)

    def kv_step(j, state):
      dq_block, dk, dv = state
      visible = _visible(config, mask, q_ids, kv_ids, i, j)
      q_blk, k_blk, v_blk = _load_block(config, q_block, k, v, visible, j)
      logits, capped = _logits(config, q_blk, k_blk)
      probs = jnp.where(visible, jnp.exp(logits - lse_block[..., None]), 0.0)
      dv_blk = jnp.einsum("bkgqs,bqkgh->bskh", probs.astype(d_out.dtype),
                          do_block, preferred_element_type=jnp.float32)
      d_probs = jnp.einsum("bqkgh,bskh->bkgqs", do_block, v_blk,
                           preferred_element_type=jnp.float32)
      d_logits = probs * (d_probs - delta_block[..., None])
      if capped is not None:
        d_logits = d_logits * (1.0 - capped * capped)  # exact d tanh
      d_logits = d_logits * config.scale
      dq_block = dq_block + jnp.einsum(
          "bkgqs,bskh->bqkgh", d_logits.astype(k.dtype), k_blk,
          preferred_element_type=jnp.float32)
      dk_blk = jnp.einsum("bkgqs,bqkgh->bskh", d_logits.astype(q.dtype),
                          q_blk, preferred_element_type=jnp.float32)
      dk = _add_block(dk, dk_blk, j * bkv)
      dv = _add_block(dv, dv_blk, j * bkv)
      return dq_block, dk, dv

    dq_block, dk, dv = jax.lax.fori_loop(
        first[i], end[i], kv_step,
        (varying(jnp.zeros(q_block.shape, jnp.float32)), dk, dv))
    dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_block.astype(dq.dtype),
                                             i * bq, axis=1)
    return dq, dk, dv

  # dq is final per query block, so it is kept in q's dtype; dk and dv
  # accumulate over query blocks in float32.
  dq, dk, dv = jax.lax.fori_loop(
      0, q.shape[1] // bq, q_step,
      varying((jnp.zeros(q.shape, q.dtype),
               jnp.zeros(k.shape, jnp.float32),
               jnp.zeros(v.shape, jnp.float32))))
  return (dq, dk.astype(k.dtype), dv.astype(v.dtype),
          None, None, None, None, None)


def _add_block(total, block, start):
  current = jax.lax.dynamic_slice_in_dim(total, start, block.shape[1], axis=1)
  return jax.lax.dynamic_update_slice_in_dim(total, current + block, start,
                                             axis=1)


_attention.defvjp(_attention_fwd, _attention_bwd)
