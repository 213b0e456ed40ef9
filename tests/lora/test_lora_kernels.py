"""Fused LoRA matmul (Pallas in interpret mode, and XLA) vs the float32 reference.

Outputs and the gradients dx, dA, dB; any M/K/N (including non-multiples of
128 and dimensions larger than a tile), ranks 8-128, float32 and bfloat16,
one or several adapters. Small tiles (128) make small shapes span several
blocks, so the multi-block, padding and partial-row paths all run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gemma4_jax import testing
from gemma4_jax.kernels.lora import kernel
from gemma4_jax.kernels.lora import pallas
from gemma4_jax.kernels.lora import xla
from gemma4_jax.reference import lora as reference

SMALL_TILES = pallas.BlockSizes(tm=128, tk=128, tn=128)
SCALE = 0.75


def _args(m, k, n, rank, adapters, dtype, seed):
  """Inputs scaled so the output, its parts and dA, dB are O(1)."""
  rng = np.random.default_rng(seed)
  def draw(shape, std):
    return jnp.asarray(rng.standard_normal(shape) * std, jnp.float32).astype(
        dtype)
  lead = () if adapters is None else (adapters,)
  x = draw((m, k), 1.0)
  w = draw((k, n), k ** -0.5)
  a = draw((*lead, k, rank), k ** -0.5)
  b = draw((*lead, rank, n), rank ** -0.5)
  ids = None if adapters is None else jnp.asarray(
      rng.integers(0, adapters, m), jnp.int32)
  # dA and dB sum over the m rows: a 1/sqrt(m) cotangent keeps them O(1),
  # so the absolute tolerance is not compared with float32 noise of O(10).
  cotangent = jnp.asarray(rng.standard_normal((m, n)) * m ** -0.5,
                          jnp.float32)
  return x, w, a, b, ids, cotangent


def _value_and_grads(fn, x, w, a, b, ids, cotangent):
  def loss(x, a, b):
    out = fn(x, w, a, b, scale=SCALE, adapter_ids=ids)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, a, b)
  return out, grads


def _pallas(*args, **kwargs):
  return pallas.lora_matmul(*args, **kwargs, block_sizes=SMALL_TILES,
                            interpret=True)


IMPLEMENTATIONS = {"pallas": _pallas, "xla": xla.lora_matmul}


@given(m=st.sampled_from([1, 5, 130, 300]),
       k=st.sampled_from([8, 100, 256, 200, 384]),
       n=st.sampled_from([24, 128, 200, 384]),
       rank=st.sampled_from([8, 16, 64, 128]),
       adapters=st.sampled_from([None, 1, 3]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 2**16))
def test_matches_reference(m, k, n, rank, adapters, dtype, seed):
  x, w, a, b, ids, cotangent = _args(m, k, n, rank, adapters, dtype, seed)
  ref_out, ref_grads = _value_and_grads(reference.lora_matmul, x, w, a, b,
                                        ids, cotangent)
  for implementation, fn in IMPLEMENTATIONS.items():
    out, grads = _value_and_grads(fn, x, w, a, b, ids, cotangent)
    assert out.dtype == dtype and out.shape == (m, n), implementation
    testing.assert_close(out, ref_out, name=f"{implementation} out")
    for name, got, want in zip(("dx", "da", "db"), grads, ref_grads):
      assert got.dtype == want.dtype and got.shape == want.shape, name
      testing.assert_close(got, want, grad=True,
                           name=f"{implementation} {name}")


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_int8_weight_dequantized_per_channel(implementation):
  x, w, a, b, _, cotangent = _args(130, 256, 200, 16, None, jnp.float32, 3)
  w_scale = jnp.max(jnp.abs(w), axis=0) / 127
  w_int8 = jnp.round(w / w_scale).astype(jnp.int8)
  fn = IMPLEMENTATIONS[implementation]
  quantized = lambda x, w, a, b, **kw: fn(x, w_int8, a, b, w_scale=w_scale,
                                          **kw)
  dequantized = lambda x, w, a, b, **kw: reference.lora_matmul(
      x, w_int8.astype(jnp.float32) * w_scale, a, b, **kw)
  out, grads = _value_and_grads(quantized, x, w, a, b, None, cotangent)
  ref_out, ref_grads = _value_and_grads(dequantized, x, w, a, b, None,
                                        cotangent)
  testing.assert_close(out, ref_out, name="out")
  for name, got, want in zip(("dx", "da", "db"), grads, ref_grads):
    testing.assert_close(got, want, grad=True, name=name)


def test_w_is_frozen():
  x, w, a, b, _, _ = _args(5, 8, 24, 8, None, jnp.float32, 0)
  for fn in IMPLEMENTATIONS.values():
    d_w = jax.grad(lambda w: jnp.sum(fn(x, w, a, b, scale=SCALE)))(w)
    np.testing.assert_array_equal(d_w, np.zeros_like(w))


def test_out_of_range_adapter_under_jit_gets_the_base_product():
  x, w, a, b, _, _ = _args(6, 8, 24, 8, 2, jnp.float32, 1)
  ids = jnp.array([0, 1, 2, -1, 1, 0], jnp.int32)
  for fn in IMPLEMENTATIONS.values():
    out = jax.jit(lambda ids: fn(x, w, a, b, scale=SCALE, adapter_ids=ids))(
        ids)
    base = reference.lora_matmul(x, w, a[0], 0 * b[0], scale=SCALE)
    testing.assert_close(out[2:4], base[2:4], name="no adapter")
    testing.assert_close(out[:2], reference.lora_matmul(
        x, w, a, b, scale=SCALE, adapter_ids=jnp.clip(ids, 0, 1))[:2])


def test_two_runs_are_bit_identical():
  x, w, a, b, ids, _ = _args(130, 200, 200, 16, 3, jnp.bfloat16, 2)
  first = _pallas(x, w, a, b, scale=SCALE, adapter_ids=ids)
  np.testing.assert_array_equal(
      first, _pallas(x, w, a, b, scale=SCALE, adapter_ids=ids))


def test_tiles():
  assert kernel.pick_tile((1536,), 512) == 512
  assert kernel.pick_tile((8960,), 1024) == 896
  assert kernel.pick_tile((256, 2048), 1024) == 256  # q heads: H and N*H
  assert kernel.pick_tile((100,), 512) == 100      # whole axis
  assert kernel.pick_tile((32, 128), 512) is None  # no 128-lane tile
  assert kernel.pick_tile((700,), 512) is None     # padded by the wrapper
  with pytest.raises(ValueError, match="multiple of 128"):
    pallas.BlockSizes(tm=100)


def test_cost_estimate_counts_the_low_rank_work_once_per_row_block():
  cost = kernel.cost_estimate(m=4096, kc=1536, no=6144, r_pad=128, tm=512,
                              tn=1024, x_dtype=jnp.bfloat16,
                              w_dtype=jnp.bfloat16, lora_dtype=jnp.bfloat16,
                              save_down=False)
  assert cost.flops == 2 * 4096 * (1536 * 6144 + 1536 * 128 + 128 * 6144)
  assert cost.bytes_accessed == (4096 * 1536 * 2 * 6 + 1536 * 6144 * 2 * 8
                                 + (1536 + 6144) * 128 * 2 * 8
                                 + 4096 * 6144 * 2)
