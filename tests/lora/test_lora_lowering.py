"""The fused LoRA kernels lower to Mosaic for TPU at Gemma 4 shapes.

Forward and backward (`dx` kernel plus the XLA `dA`/`dB` dots) are exported
for TPU with `jax.ShapeDtypeStruct` arguments (no memory): M = 4096 tokens,
the E2B projections, ranks 16 and 64, bfloat16, the default tiles; plus the
E4B MLP up-projection and the grouped layouts of the attention einsums.
This catches block-shape and lowering errors; it proves neither speed nor
VMEM fit.
"""

import jax
import jax.numpy as jnp
import pytest

from gemma4_jax import testing
from gemma4_jax.kernels.lora import einsum
from gemma4_jax.kernels.lora import pallas

TOKENS = 4096
# (K, N): q (sliding), kv, attention out, MLP up/down, wide MLP up/down
# (double-wide layers), per-layer model projection (35 layers x 256).
E2B_SHAPES = [(1536, 2048), (1536, 512), (2048, 1536), (1536, 6144),
              (6144, 1536), (1536, 12288), (12288, 1536), (1536, 8960)]
E4B_SHAPES = [(2560, 10240)]
BF16 = jnp.bfloat16


def _spec(*shape, dtype=BF16):
  return jax.ShapeDtypeStruct(shape, dtype)


def _forward_and_backward(fn):
  def run(x, *params):
    out, vjp = jax.vjp(fn, x, *params)
    return out, vjp(out)
  return run


def _exported_kernels(exported):
  text = exported.mlir_module()
  return text.count("tpu_custom_call")


@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("k, n", E2B_SHAPES + E4B_SHAPES)
def test_lowers_for_tpu(k, n, rank):
  def fn(x, a, b, w):
    return pallas.lora_matmul(x, w, a, b, scale=2.0)
  w_spec = _spec(k, n)
  exported = testing.lower_for_tpu(
      lambda x, a, b, w: _forward_and_backward(
          lambda x, a, b: fn(x, a, b, w))(x, a, b),
      _spec(TOKENS, k), _spec(k, rank), _spec(rank, n), w_spec)
  assert _exported_kernels(exported) == 2  # fused forward, fused dx


@pytest.mark.parametrize("equation, x_shape, w_shape", [
    ("BTD,NDH->BTNH", (2, 2048, 1536), (8, 1536, 256)),    # sliding q
    ("BTD,NDH->BTNH", (2, 2048, 1536), (8, 1536, 512)),    # global q
    ("BSD,CKDH->CBSKH", (2, 2048, 1536), (2, 1, 1536, 256)),  # kv
    ("BSD,KDH->BSKH", (2, 2048, 1536), (1, 1536, 512)),    # k == v
    ("BTNH,NHD->BTD", (2, 2048, 8, 256), (8, 256, 1536)),  # attention out
    ("BTD,DNP->BTNP", (2, 2048, 1536), (1536, 35, 256)),   # per-layer proj
])
def test_grouped_einsums_lower_for_tpu(equation, x_shape, w_shape):
  plan = einsum.plan(equation, x_shape, w_shape)
  assert plan.grouped  # no transpose of w at real Gemma 4 shapes
  rank = 16
  lhs, rhs = equation.split("->")[0].split(",")
  a_shape = tuple(d for c, d in zip(rhs, w_shape) if c in lhs) + (rank,)
  b_shape = (rank,) + tuple(d for c, d in zip(rhs, w_shape) if c not in lhs)

  def run(x, a, b, w):
    return _forward_and_backward(lambda x, a, b: einsum.run_pallas(
        plan, x, w, a, b, scale=2.0))(x, a, b)
  exported = testing.lower_for_tpu(run, _spec(*x_shape), _spec(*a_shape),
                                   _spec(*b_shape), _spec(*w_shape))
  assert _exported_kernels(exported) == 2


def test_int8_and_multi_adapter_lower_for_tpu():
  k, n, rank, adapters = 1536, 6144, 16, 4
  def run(x, a, b, w, w_scale, ids):
    return _forward_and_backward(lambda x, a, b: pallas.lora_matmul(
        x, w, a, b, scale=2.0, w_scale=w_scale, adapter_ids=ids))(x, a, b)
  exported = testing.lower_for_tpu(
      run, _spec(TOKENS, k), _spec(adapters, k, rank),
      _spec(adapters, rank, n), _spec(k, n, dtype=jnp.int8),
      _spec(n, dtype=jnp.float32), _spec(TOKENS, dtype=jnp.int32))
  assert _exported_kernels(exported) == 2
