"""CPU: the XLA LoRA matmul vs qwix's own LoRA path on the E2B MLP shapes.

A real `nnx.Linear(K, N)` with real qwix LoRA (rank 16), forward + backward
(gradients of x and the LoRA params, W frozen), jitted, float32 (XLA:CPU has
no fast bfloat16 dots), M = 512 tokens to keep runs short. Stock = qwix's
path (base matmul, x @ A, @ B, add); patched = `patches.apply(lora=True,
implementation="xla")`. Both are timed in the same run (median of rounds
after a warm-up); the ratio is what to read. Compiled temp memory from
`memory_analysis()` is printed as well.

Run:
  python -m pytest benchmarks/test_lora_cpu.py -q -s --benchmark-enable \
      -o testpaths=benchmarks
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import pytest
import qwix
from flax import nnx

import gemma4_jax.patches as patches
from lora_shapes import MLP_SHAPES, SHAPES

TOKENS, RANK, ROUNDS = 512, 16, 7


def _step(model):
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(lora, x):
    return jnp.sum(nnx.merge(graphdef, lora, rest)(x) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), lora


def _median_seconds(fn, *args):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(ROUNDS):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@pytest.mark.parametrize("shape", MLP_SHAPES)
def test_xla_lora_vs_qwix(benchmark, shape):
  k, n = SHAPES[shape]
  x = jax.random.normal(jax.random.key(0), (TOKENS, k), jnp.float32)
  base = nnx.Linear(k, n, use_bias=False, rngs=nnx.Rngs(0))
  provider = qwix.LoraProvider(module_path=".*", rank=RANK, alpha=2.0 * RANK)
  model = qwix.apply_lora_to_model(base, provider, x, rngs=nnx.Rngs(1))

  stock_step, lora = _step(model)
  stock = _median_seconds(stock_step, lora, x)
  stock_temp = stock_step.lower(lora, x).compile().memory_analysis()
  with patches.applied(attention=False, implementation="xla"):
    patched_step, _ = _step(model)
    patched = _median_seconds(patched_step, lora, x)
    patched_temp = patched_step.lower(lora, x).compile().memory_analysis()
    benchmark.pedantic(lambda: jax.block_until_ready(patched_step(lora, x)),
                       rounds=ROUNDS, iterations=1)
  print(f"\n{shape} M={TOKENS} K={k} N={n} r={RANK} f32 fwd+bwd: qwix "
        f"{stock * 1e3:.1f} ms, gemma4_jax xla {patched * 1e3:.1f} ms, "
        f"ratio {patched / stock:.2f}; temp bytes qwix "
        f"{stock_temp.temp_size_in_bytes / 1e6:.1f} MB, ours "
        f"{patched_temp.temp_size_in_bytes / 1e6:.1f} MB")
