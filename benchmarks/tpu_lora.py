"""TPU v5e timing of the fused LoRA matmul (run on a v5litepod host).

For each E2B projection (M = 4096 tokens, bf16) and rank 16/64, times

  base    the frozen matmul alone, `x @ W` (XLA);
  qwix    qwix's LoRA path: `x @ W + s * einsum(x, A, B)` as qwix writes it;
  fused   the Pallas kernel (`ops.lora_matmul`, implementation="pallas_tpu");

forward, and forward + backward (gradients of x, A, B; W frozen), and
prints the LoRA overhead over the base matmul (`fused/base - 1`, target
<= 10% at rank 16) and over qwix, plus achieved TFLOP/s against v5e's
197 TFLOP/s bf16 roofline. It has not been run: no TPU was available when
it was written. `--dry-run` only lowers every configuration for TPU (works
on any machine) and prints the shapes and the kernel's cost estimates.

Usage:
  python benchmarks/tpu_lora.py [--dry-run] [--ranks 16 64] [--iters 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_shapes import RANKS, SHAPES, TOKENS  # pylint: disable=g-import-not-at-top,wrong-import-position

from gemma4_jax.kernels.lora import pallas_tpu as lora_pallas  # pylint: disable=g-import-not-at-top,wrong-import-position
from gemma4_jax import testing  # pylint: disable=g-import-not-at-top,wrong-import-position

V5E_BF16_FLOPS = 197e12
SCALE = 2.0


def base(x, w, a, b):
  del a, b
  return x @ w


def qwix_path(x, w, a, b):
  # qwix: res = einsum(x, w); res + einsum("mk,kr,rn->mn", x, a, b) * scale.
  return x @ w + jnp.einsum("mk,kr,rn->mn", x, a, b) * SCALE


def fused(x, w, a, b):
  # The kernel entry of ops.lora_matmul(implementation="pallas_tpu"), called
  # directly so that --dry-run can lower it off TPU.
  return lora_pallas.lora_matmul(x, w, a, b, scale=SCALE)


def forward_backward(fn):
  def run(x, w, a, b):
    out, vjp = jax.vjp(lambda x, a, b: fn(x, w, a, b), x, a, b)
    return vjp(out)
  return run


def _args(k, n, r, abstract):
  shapes = ((TOKENS, k), (k, n), (k, r), (r, n))
  if abstract:
    return [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  keys = jax.random.split(jax.random.key(0), 4)
  return [(jax.random.normal(key, s, jnp.float32) * s[0] ** -0.5).astype(
      jnp.bfloat16) for key, s in zip(keys, shapes)]


def _seconds(fn, args, iters):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  for _ in range(iters):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="only lower every configuration for TPU")
  parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
  parser.add_argument("--iters", type=int, default=50)
  args = parser.parse_args(argv)
  if not args.dry_run and jax.default_backend() != "tpu":
    parser.error(f"needs a TPU (backend is {jax.default_backend()!r}); use "
                 "--dry-run elsewhere")
  for name, (k, n) in SHAPES.items():
    for r in args.ranks:
      if args.dry_run:
        abstract = _args(k, n, r, abstract=True)
        for label, fn in (("forward", fused),
                          ("forward+backward", forward_backward(fused))):
          exported = testing.lower_for_tpu(
              fn, *abstract)
          kernels = exported.mlir_module().count("tpu_custom_call")
          print(f"{name:<22} K={k:<6} N={n:<6} r={r:<3} {label:<17} lowers "
                f"for TPU ({kernels} Pallas kernel(s))")
        continue
      concrete = _args(k, n, r, abstract=False)
      flops = 2 * TOKENS * k * n
      row = [f"{name:<22} K={k:<6} N={n:<6} r={r:<3}"]
      for label, wrap, factor in (("fwd", lambda f: f, 1),
                                  ("fwd+bwd", forward_backward, 2)):
        t = {key: _seconds(wrap(fn), concrete, args.iters)
             for key, fn in (("base", base), ("qwix", qwix_path),
                             ("fused", fused))}
        row.append(
            f"{label}: base {t['base'] * 1e6:.0f} us, qwix "
            f"{t['qwix'] * 1e6:.0f} us ({t['qwix'] / t['base'] - 1:+.1%}), "
            f"fused {t['fused'] * 1e6:.0f} us "
            f"({t['fused'] / t['base'] - 1:+.1%} over base, "
            f"{t['fused'] / t['qwix']:.2f}x qwix, "
            f"{factor * flops / t['base'] / V5E_BF16_FLOPS:.0%} of roofline "
            "for base)")
      print(" | ".join(row))


if __name__ == "__main__":
  main()
