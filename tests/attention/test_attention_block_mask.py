"""Block schedules against brute force: every tile with a visible pair is
visited, none without one is (masks and static rules are exact per tile),
and FULL is claimed only where every pair is visible."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st

from gemma4_jax import masks
from gemma4_jax.kernels.attention import block_mask
from gemma4_jax.kernels.attention import pallas_tpu


def scheduled_kinds(schedule, cols):
  """Dense `[Bs, Ks, rows, cols]` kinds from a compacted schedule."""
  block, kind, mask_block = (np.asarray(x) for x in block_mask.unpack(
      jnp.asarray(schedule.entries)))
  shape = (schedule.batch, schedule.heads, schedule.rows, schedule.steps)
  block, kind, mask_block = (x.reshape(shape) for x in (block, kind,
                                                        mask_block))
  dense = np.zeros(shape[:3] + (cols,), np.int32)
  for index in np.ndindex(*shape):
    if kind[index]:
      assert dense[index[:3] + (block[index],)] == 0, "tile listed twice"
      dense[index[:3] + (block[index],)] = kind[index]
      if kind[index] == block_mask.PARTIAL:  # its mask tile is resident
        assert mask_block[index] == block[index]
  return dense


def brute_force_kinds(visible, block_q, block_kv, group):
  """`[B, K, nq, nk]` kinds of a dense `[B, N, T, S]` visibility."""
  b, n, t, s = visible.shape
  nq, nk = -(-t // block_q), -(-s // block_kv)
  padded = np.zeros((b, n, nq * block_q, nk * block_kv), bool)
  padded[:, :, :t, :s] = visible
  # Rows past T are dropped padding: they count as visible for "all".
  fill = np.zeros_like(padded)
  fill[:, :, t:, :s] = True
  blocks = (b, n // group, group, nq, block_q, nk, block_kv)
  any_ = padded.reshape(blocks).any(axis=(2, 4, 6))
  all_ = (padded | fill).reshape(blocks).all(axis=(2, 4, 6))
  return np.where(any_, np.where(all_, block_mask.FULL, block_mask.PARTIAL),
                  block_mask.EMPTY)


@given(st.sampled_from([1, 40, 100, 300]), st.sampled_from([0, 37]),
       st.sampled_from([None, "causal", "key", "heads"]), st.booleans(),
       st.sampled_from([None, 1, 50, 200]), st.booleans(),
       st.integers(0, 2**16))
def test_schedules_visit_exactly_the_nonempty_tiles(
    q_len, extra, mask_kind, causal, window, segments, seed):
  rng = np.random.default_rng(seed)
  batch, num_heads, num_kv_heads = 2, 4, 2
  kv_len = q_len + extra
  mask = None
  if mask_kind == "causal":  # Tunix style: causality inside the mask
    mask = np.tril(np.ones((q_len, kv_len), bool), kv_len - q_len)[None]
    mask = mask & (rng.random((batch, 1, kv_len)) > 0.5)
  elif mask_kind == "key":
    mask = np.arange(kv_len)[None, None, :] >= rng.integers(
        0, kv_len, (batch, 1, 1))  # left padding
    mask = np.broadcast_to(mask, (batch, q_len, kv_len))
  elif mask_kind == "heads":
    mask = rng.random((batch, num_heads, q_len, kv_len)) > 0.995
  segment_ids = None
  if segments:
    kv_ids = np.sort(rng.integers(0, 3, (batch, kv_len)), axis=1)
    segment_ids = (jnp.asarray(kv_ids[:, kv_len - q_len:]),
                   jnp.asarray(kv_ids))
  canonical = None if mask is None else masks.canonical_mask(
      jnp.asarray(mask), batch=batch, num_heads=num_heads, q_len=q_len,
      kv_len=kv_len)
  sizes = pallas_tpu.BlockSizes(block_q=32, block_kv=128)
  block_q, block_kv, fwd, dkv = pallas_tpu.block_schedules(
      (batch, q_len, num_heads, 64), (batch, kv_len, num_kv_heads, 64),
      mask=canonical, segment_ids=segment_ids, causal=causal,
      sliding_window=window, block_sizes=sizes)
  visible = np.broadcast_to(np.asarray(masks.visibility(
      batch=batch, num_heads=num_heads, q_len=q_len, kv_len=kv_len,
      mask=None if mask is None else jnp.asarray(mask),
      segment_ids=segment_ids, causal=causal, sliding_window=window)),
      (batch, num_heads, q_len, kv_len))
  truth = brute_force_kinds(visible, block_q, block_kv,
                            num_heads // num_kv_heads)
  got = np.broadcast_to(scheduled_kinds(fwd, truth.shape[-1]), truth.shape)
  got_t = np.broadcast_to(
      scheduled_kinds(dkv, truth.shape[-2]).swapaxes(-1, -2), truth.shape)
  np.testing.assert_array_equal(got, got_t)
  visited = got != block_mask.EMPTY
  nonempty = truth != block_mask.EMPTY
  assert np.all(visited | ~nonempty), "a tile with visible pairs is skipped"
  assert np.all((got != block_mask.FULL) | (truth == block_mask.FULL)), (
      "a tile with masked pairs is marked FULL")
  if not segments:  # segment ranges are conservative; the rest is exact
    np.testing.assert_array_equal(visited, nonempty)
    np.testing.assert_array_equal(got == block_mask.FULL,
                                  truth == block_mask.FULL)


def test_sliding_window_visits_two_of_sixteen():
  # E2B local layers: at T=8192, W=512, 512-key tiles, a query tile sees 2
  # of 16.
  _, _, fwd, _ = pallas_tpu.block_schedules(
      (1, 8192, 8, 256), (1, 8192, 1, 256), sliding_window=512,
      block_sizes=pallas_tpu.BlockSizes(block_q=512, block_kv=512))
  assert (fwd.rows, fwd.steps) == (16, 2)
  counts = block_mask.tiles_by_kind(fwd)
  assert int(counts["partial"] + counts["full"]) == 31  # first tile: 1
