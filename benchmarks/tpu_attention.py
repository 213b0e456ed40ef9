"""Pallas attention against splash attention on a TPU, at Gemma 4 E2B shapes.

Times the forward and forward+backward of the Pallas kernel entry behind
`ops.attention(..., implementation="pallas_tpu")` and of JAX's splash attention (MQA, the same
local or causal mask), and prints achieved TFLOP/s and the fraction of the
v5e bf16 roofline (197 TFLOP/s). FLOPs count only visible (query, key)
pairs: 2 matmuls forward and 5 backward (recomputed logits, dp, dv, dk, dq),
2 * H flops per pair each, times the 8 query heads; both kernels are credited
the same work, so the TFLOP/s ratio is the speed ratio.

On a v5litepod:
  python benchmarks/tpu_attention.py
Anywhere (no TPU): `--dry-run` builds every configuration and exports both
kernels, forward and backward, for TPU without running them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask)

from gemma4_jax import masks
from gemma4_jax import testing
from gemma4_jax.kernels.attention import pallas_tpu

V5E_BF16_TFLOPS = 197.0
NUM_HEADS = 8  # E2B: 8 query heads, 1 kv head
# (name, head_dim, sliding_window): E2B local and global layers.
LAYERS = [("local", 256, 512), ("global", 512, None)]
SPLASH_BLOCK = 512  # splash tiles as MaxText/Tunix configure them


def useful_flops(q_len, head_dim, window, *, backward):
  pairs = int(np.asarray(masks.position_visibility(
      q_len, q_len, causal=True, sliding_window=window)).sum())
  matmuls = 2 + (5 if backward else 0)
  return 2 * matmuls * pairs * head_dim * NUM_HEADS


def pallas_attention(window):
  def attention(q, k, v):
    # The kernel entry (ops.attention only adds argument checks, and its
    # platform check would refuse the --dry-run export on CPU).
    return pallas_tpu.attention(q, k, v, sliding_window=window, scale=1.0)
  return attention


def splash_attention(q_len, window, *, interpret=False):
  if window is None:
    mask = splash_mask.CausalMask((q_len, q_len))
  else:  # sees keys i-(W-1)..i, Tunix's W
    mask = splash_mask.LocalMask((q_len, q_len), (window - 1, 0), offset=0)
  block = min(SPLASH_BLOCK, q_len)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mqa_single_device(
      splash_mask.MultiHeadMask([mask] * NUM_HEADS), block_sizes=sizes,
      interpret=interpret)

  def attention(q, k, v):  # [B,T,N,H], [B,S,1,H] like ops.attention
    out = jax.vmap(kernel)(q.swapaxes(1, 2), k[:, :, 0], v[:, :, 0])
    return out.swapaxes(1, 2)
  return attention


def forward_backward(attention):
  def loss(q, k, v):
    return jnp.sum(attention(q, k, v).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def time_it(fn, args, iters):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-lens", type=int, nargs="+",
                      default=[1024, 4096, 8192])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--dry-run", action="store_true",
                      help="export for TPU instead of running (any machine)")
  args = parser.parse_args(argv)
  if not args.dry_run and jax.default_backend() != "tpu":
    parser.error(f"needs a TPU (backend is {jax.default_backend()!r}); use "
                 "--dry-run elsewhere")
  print(f"{'layer':7} {'T':>5} {'pass':8} {'kernel':7} {'ms':>8} "
        f"{'TFLOP/s':>8} {'roofline':>8} {'vs splash':>9}")
  for q_len in args.seq_lens:
    for layer, head_dim, window in LAYERS:
      shapes = [(args.batch, q_len, NUM_HEADS, head_dim),
                (args.batch, q_len, 1, head_dim),
                (args.batch, q_len, 1, head_dim)]
      kernels = {"pallas": pallas_attention(window),
                 "splash": splash_attention(q_len, window)}
      for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
        flops = useful_flops(q_len, head_dim, window, backward=backward)
        seconds = {}
        for name, attention in kernels.items():
          fn = forward_backward(attention) if backward else attention
          if args.dry_run:
            specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
            testing.lower_for_tpu(fn, *specs)
            print(f"{layer:7} {q_len:>5} {pass_name:8} {name:7} exported")
            continue
          keys = jax.random.split(jax.random.key(q_len), 3)
          inputs = [jax.random.normal(key, s, jnp.bfloat16)
                    for key, s in zip(keys, shapes)]
          seconds[name] = time_it(jax.jit(fn), inputs, args.iters)
        for name, elapsed in seconds.items():
          tflops = flops / elapsed / 1e12
          print(f"{layer:7} {q_len:>5} {pass_name:8} {name:7} "
                f"{elapsed * 1e3:8.3f} {tflops:8.1f} "
                f"{tflops / V5E_BF16_TFLOPS:8.1%} "
                f"{seconds['splash'] / elapsed:8.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
