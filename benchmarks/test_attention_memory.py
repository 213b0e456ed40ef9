"""Blockwise XLA attention against Tunix's own attention math: compiled
temp memory of forward + backward, and CPU step time.

The stock path is Tunix 0.1.7's non-flash `Attention.block` attention,
restated op for op (`stock_attention`): einsum scores in the input dtype,
the sliding band multiplied into the mask on local layers, `where(mask,
logits, K_MASK)`, float32 softmax cast back, einsum with V. Both get the
same inputs: bf16 q `[1,T,8,H]`, k/v `[1,T,1,H]` (E2B MQA) and Tunix's
causal padding mask `[1,T,T]`. E2B layer shapes: local H=256 with W=512,
global H=512.

Memory is `jax.jit(f).lower(...).compile().memory_analysis()` of
`grad(sum(attention(q, k, v) * cotangent))` w.r.t. q, k, v (deterministic,
no execution), in bf16 and in float32: XLA:CPU has no bf16 matmul, so it
converts bf16 operands to float32 and hoists the conversion of the whole q
and d_out out of the blockwise loops (two float32 copies each, about
4 * T*N*H*4 bytes), which a TPU would not do; the float32 run has no such
conversion. Time is the same function run on this CPU, B=1, a few
rounds: a ratio measured in one run, not a TPU figure.

Not part of CI (benchmarks/ is outside testpaths). Run:
  python -m pytest benchmarks/test_attention_memory.py -q --benchmark-enable \
      -o testpaths=benchmarks -s
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import ops

K_MASK = -2.3819763e38  # Tunix's gemma4 K_MASK
LAYERS = {"local": dict(head_dim=256, window=512),
          "global": dict(head_dim=512, window=None)}
NUM_HEADS = 8


def stock_attention(q, k, v, attn_mask, window):
  """Tunix 0.1.7 `Attention.block`, non-flash prefill path, MQA (K=1)."""
  logits = jnp.einsum("BTNH,BSNH->BTNS", q, k)
  if window is not None:
    all_ones = jnp.ones_like(attn_mask)
    sliding_mask = jnp.triu(all_ones, -1 * window + 1) * jnp.tril(
        all_ones, window - 1)
    attn_mask = sliding_mask * attn_mask
  attn = jnp.where(jnp.expand_dims(attn_mask, -2), logits, K_MASK)
  attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(k.dtype)
  return jnp.einsum("BTNS,BSNH->BTNH", attn, v)


def blockwise_attention(q, k, v, attn_mask, window):
  return ops.attention(q, k, v, mask=attn_mask, causal=True,
                       sliding_window=window, scale=1.0,
                       implementation="xla")


def _grad_fn(attention, window):
  def loss(q, k, v, mask, cotangent):
    out = attention(q, k, v, mask, window)
    return jnp.sum(out.astype(jnp.float32) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _shapes(seq_len, head_dim, dtype):
  return (jax.ShapeDtypeStruct((1, seq_len, NUM_HEADS, head_dim), dtype),
          jax.ShapeDtypeStruct((1, seq_len, 1, head_dim), dtype),
          jax.ShapeDtypeStruct((1, seq_len, 1, head_dim), dtype),
          jax.ShapeDtypeStruct((1, seq_len, seq_len), jnp.bool_),
          jax.ShapeDtypeStruct((1, seq_len, NUM_HEADS, head_dim),
                               jnp.float32))


def _temp_bytes(attention, window, shapes):
  compiled = _grad_fn(attention, window).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_temp_memory_forward_backward(benchmark, layer, dtype):
  head_dim, window = LAYERS[layer]["head_dim"], LAYERS[layer]["window"]
  rows = []
  for seq_len in (1024, 4096, 8192):
    shapes = _shapes(seq_len, head_dim, jnp.dtype(dtype))
    stock = _temp_bytes(stock_attention, window, shapes)
    blockwise = _temp_bytes(blockwise_attention, window, shapes)
    rows.append((seq_len, stock, blockwise))
    print(f"\n{layer} {dtype} H={head_dim} W={window} T={seq_len}: temp stock "
          f"{stock / 2**20:.1f} MiB, blockwise {blockwise / 2**20:.1f} MiB "
          f"({100 * blockwise / stock:.2f}%)")
  benchmark.extra_info.update(
      {f"T{t}": {"stock_mib": s / 2**20, "blockwise_mib": b / 2**20,
                 "ratio": b / s} for t, s, b in rows})
  growth = [b / rows[0][2] for _, _, b in rows]
  print(f"{layer} {dtype}: blockwise temp growth from T=1024: "
        + ", ".join(f"x{g:.2f}" for g in growth) + " (T grows x1, x4, x8)")
  benchmark.pedantic(lambda: None, rounds=1)  # memory only: nothing timed


def _inputs(seq_len, head_dim, seed=0):
  rng = np.random.default_rng(seed)
  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape) * 0.3, jnp.bfloat16)
  valid = np.ones((1, seq_len), bool)
  valid[:, : seq_len // 10] = False  # 10% left padding
  mask = jnp.asarray(np.tril(np.ones((seq_len, seq_len), bool))[None]
                     & valid[:, None, :])
  return (normal(1, seq_len, NUM_HEADS, head_dim),
          normal(1, seq_len, 1, head_dim), normal(1, seq_len, 1, head_dim),
          mask, jnp.asarray(rng.normal(size=(1, seq_len, NUM_HEADS,
                                             head_dim)), jnp.float32))


@pytest.mark.parametrize("implementation", ["stock", "blockwise"])
@pytest.mark.parametrize("seq_len", [2048, 8192])
@pytest.mark.parametrize("layer", ["local", "global"])
def test_step_time_forward_backward(benchmark, layer, seq_len,
                                    implementation):
  head_dim, window = LAYERS[layer]["head_dim"], LAYERS[layer]["window"]
  attention = {"stock": stock_attention,
               "blockwise": blockwise_attention}[implementation]
  grad = _grad_fn(attention, window)
  args = _inputs(seq_len, head_dim)
  jax.block_until_ready(grad(*args))  # compile and warm up
  benchmark.group = f"{layer} T={seq_len}"
  benchmark.pedantic(lambda: jax.block_until_ready(grad(*args)), rounds=2,
                     iterations=1)
