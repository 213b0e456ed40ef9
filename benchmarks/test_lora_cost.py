"""Modeled HBM bytes and FLOPs per layer: fused LoRA matmul vs qwix's path.

For every E2B projection (M = 4096 tokens, bf16, ranks 16 and 64), the
fused kernel's own `pl.CostEstimate` (forward; its tiles re-read x once per
output column block and W once per row block) against qwix's three
unfused matmuls plus the add, each reading its operands and writing its
output once (a lower bound for them):
  base  x @ W        reads x, W, writes y
  down  x @ A        reads x, A, writes [M, r]
  up    (.) @ B      reads [M, r], B, writes delta [M, N]
  add   y + s*delta  reads y, delta, writes the output
(XLA may fuse the scale/add into the `up` matmul's output; the table also
gives that case.) Nothing is timed: these are counts.

Run:
  python -m pytest benchmarks/test_lora_cost.py -q -s -o testpaths=benchmarks
"""

from __future__ import annotations

import jax.numpy as jnp

from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels.lora import pallas_tpu
from lora_shapes import RANKS, SHAPES, TOKENS

BF16 = 2


def tiles(m, n):
  blocks = pallas_tpu.BlockSizes.get_default()
  return min(m, blocks.tm), pallas_tpu.pick_tile((n,), blocks.tn)


def base_bytes(m, k, n) -> int:
  """The frozen matmul alone with the kernel's tiles (x re-read per column
  block, W per row block), as any tiled matmul reads them."""
  tm, tn = tiles(m, n)
  return (m * k * -(-n // tn) + k * n * -(-m // tm) + m * n) * BF16


def unfused_bytes(m, k, n, r, *, fused_add: bool) -> int:
  down = (m * k + k * r + m * r) * BF16
  up = (m * r + r * n + m * n) * BF16
  add = 3 * m * n * BF16
  return base_bytes(m, k, n) + down + up + (m * n * BF16 if fused_add
                                            else add)


def fused_cost(m, k, n, r):
  tm, tn = tiles(m, n)
  return pallas_tpu.cost_estimate(
      m=m, kc=k, no=n, r_pad=_tpu.round_up(r, _tpu.NUM_LANES), tm=tm,
      tn=tn, x_dtype=jnp.bfloat16, w_dtype=jnp.bfloat16,
      lora_dtype=jnp.bfloat16, save_down=False)


def test_modeled_bytes_and_flops():
  print(f"\nM={TOKENS}, bf16, default tiles; HBM MB (1e6) per forward. "
        "base = the frozen matmul alone; qwix = base + x@A + (.)@B + add "
        "[add fused]; FLOPs in GFLOP (fused: rank padded to 128 lanes)")
  print(f"{'shape':<22}{'K':>6}{'N':>6}{'r':>4} | {'base':>7} {'fused':>7} "
        f"{'qwix':>7} {'[fused add]':>11} {'fused/qwix':>10} "
        f"{'fused/base':>10} | {'GF base':>7} {'fused':>7} {'qwix':>7}")
  for name, (k, n) in SHAPES.items():
    for r in RANKS:
      cost = fused_cost(TOKENS, k, n, r)
      base = base_bytes(TOKENS, k, n)
      unfused = unfused_bytes(TOKENS, k, n, r, fused_add=False)
      unfused_fused_add = unfused_bytes(TOKENS, k, n, r, fused_add=True)
      flops_unfused = 2 * TOKENS * (k * n + k * r + r * n)
      print(f"{name:<22}{k:>6}{n:>6}{r:>4} | {base / 1e6:>7.1f} "
            f"{cost.bytes_accessed / 1e6:>7.1f} {unfused / 1e6:>7.1f} "
            f"{unfused_fused_add / 1e6:>11.1f} "
            f"{cost.bytes_accessed / unfused:>10.2f} "
            f"{cost.bytes_accessed / base:>10.3f} | "
            f"{2 * TOKENS * k * n / 1e9:>7.2f} {cost.flops / 1e9:>7.2f} "
            f"{flops_unfused / 1e9:>7.2f}")
      assert base < cost.bytes_accessed < unfused_fused_add
