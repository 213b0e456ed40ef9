"""The Pallas TPU attention kernel (interpret mode) against the float32
reference: outputs and dq, dk, dv, every mask form, ragged lengths."""

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import attention_cases
from gemma4_jax import ops
from gemma4_jax.kernels.attention import pallas_tpu
from gemma4_jax.reference import attention as reference

# Small tiles so that small shapes still span several blocks (schedules,
# skipping, ragged last blocks); the defaults are exercised by the lowering
# tests at Gemma 4 shapes.
SMALL_BLOCKS = [pallas_tpu.BlockSizes(block_q=32, block_kv=128),
                pallas_tpu.BlockSizes(block_q=64, block_kv=256)]


def check_against_reference(case, q, k, v, **kwargs):
  out, grads = attention_cases.value_and_grads(
      ops.attention, case, q, k, v, implementation="pallas_tpu",
      interpret=True, **kwargs)
  ref_out, ref_grads = attention_cases.value_and_grads(
      reference.attention, case, *attention_cases.reference_inputs(q, k, v),
      **kwargs)
  attention_cases.assert_matches(out, grads, ref_out, ref_grads,
                                 dtype=q.dtype)
  return out, grads


@given(attention_cases.cases(block_sizes=st.sampled_from(SMALL_BLOCKS)))
def test_matches_reference(case):
  # The kernel gives masked keys weight 0 but zeroes only the rows past S
  # (`test_nan_past_the_keys_does_not_leak`): NaN in masked K/V would leak
  # through p @ v, so NaN padding is the XLA version's case only.
  assume(not case["nan_padding"])
  q, k, v, mask, segment_ids = attention_cases.make_inputs(case)
  # ops.attention takes no block sizes: run the kernel entry directly with
  # small tiles.
  def kernel(q, k, v, **kwargs):
    return pallas_tpu.attention(q, k, v, interpret=True,
                                block_sizes=case["block_sizes"], **kwargs)
  kwargs = dict(mask=mask, segment_ids=segment_ids,
                **attention_cases.options(case))
  out, grads = attention_cases.value_and_grads(kernel, case, q, k, v,
                                               **kwargs)
  ref_out, ref_grads = attention_cases.value_and_grads(
      reference.attention, case, *attention_cases.reference_inputs(q, k, v),
      **kwargs)
  attention_cases.assert_matches(out, grads, ref_out, ref_grads,
                                 dtype=q.dtype)


def test_ops_default_tiles_left_padding_rank3_mask():
  # T=1000 is the field bug's length; the mask is Tunix's: causal=False with
  # causality and left padding inside a [B,T,S] mask.
  case = dict(q_len=200, num_heads=8, num_kv_heads=1, seed=3)
  q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=shape) * 0.3,
                         jnp.float32)
             for i, shape in enumerate([(2, 200, 8, 256), (2, 200, 1, 256),
                                        (2, 200, 1, 256)]))
  causal = np.tril(np.ones((200, 200), bool))
  valid = np.ones((2, 200), bool)
  valid[1, :70] = False  # left padding: rows 0..69 of example 1 see nothing
  mask = jnp.asarray(causal[None] & valid[:, None, :] & valid[:, :, None])
  out, grads = check_against_reference(case, q, k, v, mask=mask, causal=False,
                                       scale=1.0)
  # Fully masked rows: exactly 0, and no gradient reaches their queries.
  assert np.all(np.asarray(out[1, :70]) == 0)
  assert np.all(np.asarray(grads[0][1, :70]) == 0)


def test_fully_masked_everything_gives_zeros():
  case = dict(q_len=7, num_heads=4, num_kv_heads=2, seed=0)
  q = jnp.ones((1, 7, 4, 64), jnp.float32)
  k = v = jnp.ones((1, 7, 2, 64), jnp.float32)
  mask = jnp.zeros((1, 7, 7), bool)
  out, grads = attention_cases.value_and_grads(
      ops.attention, case, q, k, v, mask=mask, implementation="pallas_tpu",
      interpret=True)
  for x in (out, *grads):
    assert np.all(np.asarray(x) == 0)


def test_nan_past_the_keys_does_not_leak():
  # S=130 with 128-key tiles: the second tile reads 126 rows past S. In
  # interpret mode that memory is NaN (checked below), as it may be on TPU;
  # the kernel must zero those rows rather than give them weight 0.
  def read_past_end(x_ref, o_ref):
    o_ref[...] = x_ref[...]
  past = pl.pallas_call(
      read_past_end, grid=(2,), in_specs=[pl.BlockSpec((128,), lambda i: i)],
      out_specs=pl.BlockSpec((128,), lambda i: 0),
      out_shape=jax.ShapeDtypeStruct((128,), jnp.float32),
      interpret=True)(jnp.zeros(130, jnp.float32))
  assert np.all(np.isnan(np.asarray(past[2:])))
  case = dict(q_len=130, num_heads=2, num_kv_heads=1, seed=1)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
             for shape in [(1, 130, 2, 64), (1, 130, 1, 64), (1, 130, 1, 64)])
  check_against_reference(case, q, k, v, causal=False)


def test_tpu_interpret_mode_matches_reference():
  """Under TPU interpret mode (simulated VMEM and DMAs, NaN-filled scratch):
  ragged tiles, a key mask, a window, softcap, GQA; two query blocks of
  128 (lane-major logsumexp blocks need a multiple of 128 on TPU)."""
  case = dict(q_len=200, num_heads=4, num_kv_heads=2, seed=4)
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
             for shape in [(1, 200, 4, 128), (1, 300, 2, 128),
                           (1, 300, 2, 128)])
  key_mask = jnp.asarray(np.arange(300)[None, None] >= 60)
  kwargs = dict(mask=key_mask, sliding_window=100, softcap=20.0)

  def kernel(q, k, v, **kwargs):
    return pallas_tpu.attention(
        q, k, v, block_sizes=pallas_tpu.BlockSizes(block_q=128,
                                                   block_kv=128), **kwargs)
  with pltpu.force_tpu_interpret_mode():
    out, grads = attention_cases.value_and_grads(kernel, case, q, k, v,
                                                 **kwargs)
  ref_out, ref_grads = attention_cases.value_and_grads(
      reference.attention, case, q, k, v, **kwargs)
  attention_cases.assert_matches(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("window", [100, None], ids=["local", "causal"])
def test_splash_attention_parity(window):
  """JAX's splash attention (interpret mode) as an independent oracle, on
  what it supports: MQA, causal and local masks, softcap, segment ids."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  t, n, h = 256, 4, 128
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, t, 1, h)), jnp.float32)
          for _ in range(2))
  ids = jnp.asarray(np.repeat([0, 1], [100, 156])[None], jnp.int32)
  # Splash's LocalMask((left, 0)) lets query i see keys i-left..i: W = left+1.
  head_mask = (splash_mask.CausalMask((t, t)) if window is None else
               splash_mask.LocalMask((t, t), (window - 1, 0), offset=0))
  mask = splash_mask.MultiHeadMask([head_mask] * n)
  kernel = splash.make_splash_mqa_single_device(
      mask, block_sizes=splash.BlockSizes.get_default(), interpret=True,
      attn_logits_soft_cap=30.0)

  def with_splash(q, k, v):
    out = kernel(q[0].swapaxes(0, 1) * h ** -0.5, k[0, :, 0], v[0, :, 0],
                 segment_ids=splash.SegmentIds(q=ids[0], kv=ids[0]))
    return out.swapaxes(0, 1)[None]

  def with_pallas(q, k, v):
    return ops.attention(q, k, v, segment_ids=ids, sliding_window=window,
                         softcap=30.0, implementation="pallas_tpu",
                         interpret=True)
  case = dict(q_len=t, num_heads=n, num_kv_heads=1, seed=2)
  out, grads = attention_cases.value_and_grads(with_pallas, case, q, k, v)
  peer_out, peer_grads = attention_cases.value_and_grads(with_splash, case,
                                                         q, k, v)
  attention_cases.assert_matches(out, grads, peer_out, peer_grads)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(sliding_window=0), ValueError, "sliding_window must be >= 1"),
    (dict(softcap=-1.0), ValueError, "softcap must be a positive"),
    (dict(mask=jnp.ones((7, 7), jnp.int32)), TypeError, "mask must be boolean"),
    (dict(mask=jnp.ones((2, 7, 7), bool)), ValueError, "does not fit"),
    # What only the kernel refuses (the op checks it for the kernel).
    (dict(sliding_window=np.int64(2)), ValueError,
     "sliding_window must be a positive int or None"),
    (dict(softcap=np.float32(20.0)), ValueError,
     "softcap must be a positive number or None"),
    (dict(scale=np.float32(1.0)), TypeError,
     "scale must be a Python number or None, got float32"),
])
def test_bad_arguments(kwargs, error, message):
  q = jnp.zeros((1, 7, 4, 64))
  k = jnp.zeros((1, 7, 2, 64))
  with pytest.raises(error, match=message):
    ops.attention(q, k, k, implementation="pallas_tpu", interpret=True,
                  **kwargs)


@pytest.mark.parametrize("shapes, message", [
    (((1, 7, 4, 64), (1, 7, 3, 64)), r"N=4 must be a multiple of kv heads K=3"),
    (((1, 7, 4, 64), (1, 7, 2, 32)), r"H=64 but k/v head_dim is 32"),
    (((7, 4, 64), (1, 7, 2, 64)), r"q must be 4-D"),
])
def test_bad_shapes(shapes, message):
  q, k = (jnp.zeros(shape) for shape in shapes)
  with pytest.raises(ValueError, match=message):
    ops.attention(q, k, k, implementation="pallas_tpu", interpret=True)


def test_kernel_takes_float32_and_bfloat16_only():
  q = jnp.zeros((1, 7, 4, 64), jnp.float16)
  k = jnp.zeros((1, 7, 2, 64), jnp.float16)
  with pytest.raises(TypeError, match="q must be float32 or bfloat16"):
    ops.attention(q, k, k, implementation="pallas_tpu", interpret=True)
  assert ops.attention(q, k, k, implementation="xla").dtype == q.dtype


def test_block_sizes_must_be_block_sizes():
  q = jnp.zeros((1, 7, 4, 64))
  k = jnp.zeros((1, 7, 2, 64))
  with pytest.raises(TypeError, match="block_sizes must be"):
    pallas_tpu.attention(q, k, k, interpret=True, block_sizes=(32, 128))


def test_block_sizes_validate():
  with pytest.raises(ValueError, match="block_q must be a positive multiple"):
    pallas_tpu.BlockSizes(block_q=48, block_kv=128)
  with pytest.raises(ValueError, match="block_kv must be a positive multiple"):
    pallas_tpu.BlockSizes(block_q=32, block_kv=100)
  assert hash(pallas_tpu.BlockSizes(32, 128)) == hash(
      pallas_tpu.BlockSizes(32, 128))
