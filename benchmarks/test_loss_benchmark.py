"""The fused softcapped loss against Tunix's default SFT loss: memory, time.

Stock is `peft_trainer._default_loss_fn`'s math on Gemma 4's head: f32
logits `c * tanh(h @ E^T / c)`, a one-hot, a log-softmax; fused is
`ops.softcapped_cross_entropy` (the XLA version: the Pallas kernel compiles
only for TPU, see benchmarks/tpu_loss.py). Both take the final-norm hidden
states, the tied embedding, the shifted targets and mask, and are
differentiated with respect to hidden only (LoRA training: the embedding is
frozen), then, for memory, also with respect to the embedding.

- Memory: compiled temp bytes (`memory_analysis()`) of forward+backward at
  4 x 1024 tokens, V = 262144, D = 1536, bf16 and f32. Lowered and compiled
  only: the stock one would need ~13 GiB to run.
- CPU time: forward+backward at a size that fits comfortably (1 x 512
  tokens, V = 32768, D = 256, f32: 64 MiB of stock logits), both measured in
  the same run.

Not part of CI (benchmarks/ is outside testpaths). Run:
  python -m pytest benchmarks/test_loss_benchmark.py -q --benchmark-enable \\
      -o testpaths=benchmarks -s
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import ops

SOFTCAP = 30.0
E2B = dict(batch=4, seq=1024, dim=1536, vocab=262144)
TIMED = dict(batch=1, seq=512, dim=256, vocab=32768)
GIB = 2**30


def stock_loss(hidden, embedding, targets, mask):
  """Tunix's `_default_loss_fn` after the model body, with Gemma 4's head."""
  logits = jnp.dot(hidden, embedding.T).astype(jnp.float32)
  logits = jnp.tanh(logits / SOFTCAP) * SOFTCAP
  one_hot = jax.nn.one_hot(targets, logits.shape[-1])
  one_hot = one_hot * mask.astype(one_hot.dtype)[..., None]
  norm_factor = 1 / (jnp.sum(mask) + 1e-8)
  return -jnp.sum(jax.nn.log_softmax(logits) * one_hot) * norm_factor


def fused_loss(hidden, embedding, targets, mask):
  loss_sum, weight_sum = ops.softcapped_cross_entropy(
      hidden, embedding, targets, mask, softcap=SOFTCAP, implementation="xla")
  return loss_sum / (weight_sum + 1e-8)


def _args(shape, dtype, concrete=False):
  b, t, d, v = shape["batch"], shape["seq"], shape["dim"], shape["vocab"]
  if not concrete:
    s = jax.ShapeDtypeStruct
    return (s((b, t, d), dtype), s((v, d), dtype), s((b, t), jnp.int32),
            s((b, t), jnp.bool_))
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((b, t, d)), dtype),
          jnp.asarray(rng.standard_normal((v, d)) / np.sqrt(d), dtype),
          jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
          jnp.asarray(rng.random((b, t)) < 0.9))


def _grad_fn(loss, argnums):
  return jax.jit(jax.value_and_grad(loss, argnums=argnums))


def _temp_bytes(loss, args, argnums):
  compiled = _grad_fn(loss, argnums).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("argnums", [0, (0, 1)], ids=["d_hidden", "d_both"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32],
                         ids=["bf16", "f32"])
def test_compiled_temp_memory_e2b(dtype, argnums):
  args = _args(E2B, dtype)
  stock = _temp_bytes(stock_loss, args, argnums)
  fused = _temp_bytes(fused_loss, args, argnums)
  print(f"\n[loss memory] {jnp.dtype(dtype).name} grad wrt "
        f"{'hidden' if argnums == 0 else 'hidden+embedding'}: stock "
        f"{stock / GIB:.2f} GiB, fused {fused / GIB:.3f} GiB, "
        f"{stock / fused:.1f}x less")
  assert fused < stock


@pytest.mark.parametrize("which", ["stock", "fused"])
def test_cpu_time(benchmark, which):
  args = _args(TIMED, jnp.float32, concrete=True)
  fn = _grad_fn(stock_loss if which == "stock" else fused_loss, 0)
  jax.block_until_ready(fn(*args))  # compile outside the timing
  benchmark.extra_info["shape"] = dict(TIMED)
  value, _ = benchmark.pedantic(
      lambda: jax.block_until_ready(fn(*args)), rounds=5, iterations=1,
      warmup_rounds=1)
  print(f"\n[loss time] {which}: loss {float(value):.5f}")
