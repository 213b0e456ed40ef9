"""Tiles the Pallas attention kernel visits, against the ideal and dense.

The schedule is the one the kernel runs with (`pallas_tpu.block_schedules`,
scalar-prefetched into the pallas_calls). "Ideal" counts the tiles, at the
same tiling, that hold at least one visible (query, key) pair, computed by
brute force from the dense `[B, N, T, S]` visibility; "dense" is every tile
(what a kernel without skipping computes). The timed part is the pre-pass
(mask summary and compaction) on CPU: it is the only extra work dynamic
masks add. Pair fill = visible pairs / pairs in visited tiles.

Not part of CI (benchmarks/ is outside testpaths). Run:
  python -m pytest benchmarks/test_attention_blocks.py -q --benchmark-enable \
      -o testpaths=benchmarks -s
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import masks
from gemma4_jax.kernels.attention import block_mask
from gemma4_jax.kernels.attention import pallas_tpu

T = 8192
E2B_Q, E2B_KV = (1, T, 8, 256), (1, T, 1, 256)


def _ideal_tiles(visible, block_q, block_kv):
  """Tiles with any visible pair, and visible pairs, of `[B, T, S]`."""
  b, t, s = visible.shape
  nq, nk = -(-t // block_q), -(-s // block_kv)
  padded = np.zeros((b, nq * block_q, nk * block_kv), bool)
  padded[:, :t, :s] = visible
  tiles = padded.reshape(b, nq, block_q, nk, block_kv).any(axis=(2, 4))
  return int(tiles.sum()), int(visible.sum())


def _report(benchmark, name, schedules, visible, batch):
  block_q, block_kv, fwd, dkv = schedules
  counts = {key: int(value) for key, value in
            block_mask.tiles_by_kind(fwd).items()}
  visited = counts["partial"] + counts["full"]
  # A schedule shared by all batches/heads counts once per batch here.
  visited *= batch // fwd.batch
  ideal, pairs = _ideal_tiles(visible, block_q, block_kv)
  dense = batch * fwd.rows * -(-visible.shape[-1] // block_kv)
  dkv_counts = block_mask.tiles_by_kind(dkv)
  dkv_visited = int(dkv_counts["partial"] + dkv_counts["full"]) * (
      batch // dkv.batch)
  info = dict(block_q=block_q, block_kv=block_kv, visited=visited,
              ideal=ideal, dense=dense, full=counts["full"] * batch // fwd.batch,
              visited_over_ideal=visited / ideal,
              visited_over_dense=visited / dense,
              pair_fill=pairs / (visited * block_q * block_kv),
              grid_steps=counts["steps"] * batch // fwd.batch,
              dkv_visited=dkv_visited)
  benchmark.extra_info.update(info)
  print(f"\n{name}: " + ", ".join(
      f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
      for k, v in info.items()))
  assert visited >= ideal and dkv_visited == visited
  return info


def test_sliding_window_t8192(benchmark):
  schedules = benchmark(lambda: pallas_tpu.block_schedules(
      E2B_Q, E2B_KV, sliding_window=512))
  visible = np.asarray(masks.position_visibility(
      T, T, causal=True, sliding_window=512))[None]
  info = _report(benchmark, "E2B local, W=512, T=8192", schedules, visible, 1)
  assert info["visited"] == info["ideal"]


@pytest.mark.parametrize("tunix_style", [True, False],
                         ids=["mask_causal", "causal_flag"])
def test_causal_with_30_percent_left_padding(benchmark, tunix_style):
  # Two examples, each with its first 30% of positions padding (as Tunix RL
  # left-pads prompts). Tunix's patch passes causal=False and causality
  # inside the mask; the other form passes causal=True and a key mask.
  batch, pad = 2, int(0.3 * T)
  valid = np.ones((batch, T), bool)
  valid[:, :pad] = False
  causal = np.tril(np.ones((T, T), bool))
  if tunix_style:
    mask = jnp.asarray(causal[None] & valid[:, None, :] & valid[:, :, None])
  else:
    mask = jnp.asarray(valid[:, None, :])  # [B, 1, S]: broadcast over T
  canonical = masks.canonical_mask(mask, batch=batch, num_heads=8, q_len=T,
                                   kv_len=T)
  q_shape, kv_shape = (batch, *E2B_Q[1:]), (batch, *E2B_KV[1:])

  def schedules(m):
    return pallas_tpu.block_schedules(q_shape, kv_shape, mask=m,
                                      causal=not tunix_style)

  plan = jax.jit(lambda m: tuple(s.entries for s in schedules(m)[2:]))
  fwd_entries, dkv_entries = benchmark(
      lambda: jax.block_until_ready(plan(canonical)))
  block_q, block_kv, fwd, dkv = schedules(canonical)
  np.testing.assert_array_equal(fwd.entries, fwd_entries)
  np.testing.assert_array_equal(dkv.entries, dkv_entries)
  visible = np.asarray(causal[None] & valid[:, None, :])
  if tunix_style:
    visible = visible & valid[:, :, None]
  name = ("causal in mask (causal=False), 30% left padding" if tunix_style
          else "causal=True + key mask, 30% left padding")
  _report(benchmark, name, (block_q, block_kv, fwd, dkv), visible, batch)
