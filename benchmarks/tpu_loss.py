"""The fused loss on a TPU (v5litepod): time, memory, roofline vs stock.

Forward+backward (gradient with respect to the hidden states, as in LoRA
training) of Tunix's default SFT loss math on Gemma 4's head (stock) and of
`ops.softcapped_cross_entropy` with the Pallas kernels (fused), at E2B's
shapes by default: 4 x 1024 tokens, D = 1536, V = 262144, bf16.

On a TPU: compiled memory of both, the losses (they must agree), the median
step time over `--steps`, achieved TFLOP/s and the fraction of v5e's 197
TFLOP/s bf16 peak. The fused version runs three matmuls of 2 N V D flops
(forward logits; backward logits again and `dz @ E`), stock two; both
fractions count the flops each one executes. A stock run that does not fit
in HBM is reported as such.

`--dry-run` (any machine): lowers both for TPU with `jax.export` at the
given shapes (no memory, no execution) and prints what would run.

  python benchmarks/tpu_loss.py [--dry-run] [--steps 20] [--batch 4] ...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import testing
from gemma4_jax.kernels.loss import vjp as loss_vjp
from gemma4_jax.kernels.loss import pallas_tpu

SOFTCAP = 30.0
V5E_PEAK_FLOPS = 197e12
GIB = 2**30


def stock_loss(hidden, embedding, targets, mask):
  """Tunix's `_default_loss_fn` after the model body, with Gemma 4's head."""
  logits = jnp.dot(hidden, embedding.T).astype(jnp.float32)
  logits = jnp.tanh(logits / SOFTCAP) * SOFTCAP
  one_hot = jax.nn.one_hot(targets, logits.shape[-1])
  one_hot = one_hot * mask.astype(one_hot.dtype)[..., None]
  return (-jnp.sum(jax.nn.log_softmax(logits) * one_hot) /
          (jnp.sum(mask) + 1e-8))


def fused_loss(hidden, embedding, targets, mask, *, block_sizes):
  loss_sum, weight_sum = loss_vjp.loss_sums(
      hidden, embedding, targets, mask.astype(jnp.float32), softcap=SOFTCAP,
      passes=pallas_tpu.passes(block_sizes))
  return loss_sum / (weight_sum + 1e-8)


def _shapes(args):
  dtype = jnp.dtype(args.dtype)
  s = jax.ShapeDtypeStruct
  return (s((args.batch, args.seq, args.dim), dtype),
          s((args.vocab, args.dim), dtype),
          s((args.batch, args.seq), jnp.int32),
          s((args.batch, args.seq), jnp.bool_))


def _concrete(args):
  rng = np.random.default_rng(0)
  dtype = jnp.dtype(args.dtype)
  return (jnp.asarray(rng.standard_normal((args.batch, args.seq, args.dim)),
                      dtype),
          jnp.asarray(rng.standard_normal((args.vocab, args.dim)) /
                      np.sqrt(args.dim), dtype),
          jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)),
                      jnp.int32),
          jnp.asarray(rng.random((args.batch, args.seq)) < 0.9))


def _functions(args):
  blocks = pallas_tpu.BlockSizes(args.block_tokens, args.block_vocab)
  fused = lambda *a: fused_loss(*a, block_sizes=blocks)
  return {"stock": jax.jit(jax.value_and_grad(stock_loss)),
          "fused": jax.jit(jax.value_and_grad(fused))}


def _time(fn, inputs, steps):
  jax.block_until_ready(fn(*inputs))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="lower for TPU only (runs anywhere)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--dim", type=int, default=1536)
  parser.add_argument("--vocab", type=int, default=262144)
  parser.add_argument("--dtype", default="bfloat16",
                      choices=["bfloat16", "float32"])
  parser.add_argument("--block-tokens", type=int,
                      default=pallas_tpu.BlockSizes.block_tokens)
  parser.add_argument("--block-vocab", type=int,
                      default=pallas_tpu.BlockSizes.block_vocab)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)
  functions = _functions(args)
  tokens = args.batch * args.seq
  matmul_flops = 2 * tokens * args.vocab * args.dim
  print(f"tokens {tokens}, D {args.dim}, V {args.vocab}, {args.dtype}, "
        f"blocks {args.block_tokens} x {args.block_vocab}")

  if args.dry_run:
    for name, fn in functions.items():
      exported = testing.lower_for_tpu(fn, *_shapes(args))
      kernels = exported.mlir_module().count("tpu_custom_call")
      print(f"{name}: lowered for TPU ({kernels} Pallas kernels)")
    return 0

  if jax.default_backend() != "tpu":
    print("not on a TPU: use --dry-run", file=sys.stderr)
    return 2
  inputs = _concrete(args)
  results = {}
  for name, fn in functions.items():
    compiled = fn.lower(*inputs).compile()
    memory = compiled.memory_analysis()
    try:
      (loss, _), seconds = fn(*inputs), _time(fn, inputs, args.steps)
    except jax.errors.JaxRuntimeError as e:  # stock may not fit in HBM
      print(f"{name}: temp {memory.temp_size_in_bytes / GIB:.2f} GiB, "
            f"did not run: {str(e).splitlines()[0]}")
      continue
    flops = matmul_flops * (3 if name == "fused" else 2)
    results[name] = (float(loss), seconds)
    print(f"{name}: temp {memory.temp_size_in_bytes / GIB:.3f} GiB, loss "
          f"{float(loss):.5f}, {seconds * 1e3:.2f} ms, "
          f"{flops / seconds / 1e12:.1f} TFLOP/s "
          f"({flops / seconds / V5E_PEAK_FLOPS:.0%} of v5e peak)")
  if len(results) == 2:
    (stock_loss_value, stock_s), (fused_loss_value, fused_s) = (
        results["stock"], results["fused"])
    print(f"fused / stock time: {fused_s / stock_s:.2f}; |loss diff| "
          f"{abs(fused_loss_value - stock_loss_value):.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
