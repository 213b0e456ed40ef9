"""The Pallas TPU attention kernel (interpret mode) against the float32
reference: outputs and dq, dk, dv, every mask form, ragged lengths."""

import os

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.kernels.attention import pallas_tpu
from gemma4_jax.reference import attention as reference

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
# Small tiles so that small shapes still span several blocks (schedules,
# skipping, ragged last blocks); the defaults are exercised by the lowering
# tests at Gemma 4 shapes.
SMALL_BLOCKS = [pallas_tpu.BlockSizes(block_q=32, block_kv=128),
                pallas_tpu.BlockSizes(block_q=64, block_kv=256)]


@st.composite
def attention_cases(draw):
  """A configuration from the menus users hit, and data from a drawn seed."""
  num_heads, num_kv_heads = draw(st.sampled_from([(8, 1), (8, 2), (4, 4)]))
  # 1000 and 1029 cost a minute each in interpret mode: thorough only.
  q_len = draw(st.sampled_from([1, 7, 100, 200] +
                               ([1000, 1029] if THOROUGH else [])))
  kv_len = q_len + draw(st.sampled_from([0, 0, 5, 60]))
  return dict(
      batch=draw(st.sampled_from([1, 2])), num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=draw(st.sampled_from([64, 128, 256, 512])),
      q_len=q_len, kv_len=kv_len,
      # "key": [B,1,S] as Tunix passes; "heads": [B,N,T,S], one per head.
      mask_rank=draw(st.sampled_from([None, 2, 3, 4, "key", "heads"])),
      padding=draw(st.sampled_from(["none", "left", "right"])),
      segments=draw(st.booleans()),
      causal=draw(st.booleans()),
      sliding_window=draw(st.sampled_from([None, 1, 16, 64])),
      softcap=draw(st.sampled_from([None, 20.0])),
      scale=draw(st.sampled_from([None, 1.0])),
      dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
      block_sizes=draw(st.sampled_from(SMALL_BLOCKS)),
      seed=draw(st.integers(0, 2**16)))


def make_inputs(case):
  rng = np.random.default_rng(case["seed"])
  b, t, s = case["batch"], case["q_len"], case["kv_len"]
  n, k, h = case["num_heads"], case["num_kv_heads"], case["head_dim"]
  size = 0.3 if case["scale"] == 1.0 else 1.0  # O(1) logits either way
  q = rng.normal(size=(b, t, n, h)) * size
  k_ = rng.normal(size=(b, s, k, h)) * size
  v = rng.normal(size=(b, s, k, h))
  valid = np.ones((b, s), bool)
  if case["padding"] != "none" and s > 1:
    pad = int(rng.integers(1, s))
    if case["padding"] == "left":
      valid[-1, :pad] = False
    else:
      valid[-1, s - pad:] = False
  mask = None
  if case["mask_rank"] is not None:
    full = np.broadcast_to(valid[:, None, :], (b, t, s))
    per_head = full[:, None] & (rng.random((b, n, t, s)) > 0.3)
    mask = {2: full[-1], 3: full, 4: full[:, None], "key": valid[:, None],
            "heads": per_head}[case["mask_rank"]]
  segment_ids = None
  if case["segments"]:
    # Packed sequences: increasing ids over key positions, queries are the
    # last T positions (end-aligned).
    kv_ids = np.sort(rng.integers(0, 3, size=(b, s)), axis=1)
    segment_ids = (jnp.asarray(kv_ids[:, s - t:]), jnp.asarray(kv_ids))
  dtype = case["dtype"]
  return (jnp.asarray(q, dtype), jnp.asarray(k_, dtype), jnp.asarray(v, dtype),
          None if mask is None else jnp.asarray(mask), segment_ids)


def value_and_grads(fn, case, q, k, v, **kwargs):
  # dk and dv sum over T * N / K query rows: scaling the cotangent by the
  # inverse square root keeps every gradient O(1), the scale the tolerance
  # table's absolute term is written for (as with a mean-reduced loss).
  fan_in = case["q_len"] * case["num_heads"] // case["num_kv_heads"]
  cotangent = jax.random.normal(jax.random.key(case["seed"]), q.shape,
                                jnp.float32) * fan_in ** -0.5

  def loss(q, k, v):
    out = fn(q, k, v, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                       has_aux=True)(q, k, v)
  return out, grads


def check_against_reference(case, q, k, v, **kwargs):
  out, grads = value_and_grads(
      ops.attention, case, q, k, v, implementation="pallas_tpu",
      interpret=True, **kwargs)
  ref_out, ref_grads = value_and_grads(
      reference.attention, case, *(x.astype(jnp.float32) for x in (q, k, v)),
      **kwargs)
  testing.assert_close(out, ref_out, dtype=q.dtype, online_softmax=True)
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    testing.assert_close(grad, ref_grad, dtype=q.dtype, grad=True,
                         online_softmax=True, name=name)
  return out, grads


@given(attention_cases())
def test_matches_reference(case):
  q, k, v, mask, segment_ids = make_inputs(case)
  # ops.attention takes no block sizes: run the kernel entry directly with
  # small tiles, through the same validation.
  def kernel(q, k, v, **kwargs):
    return pallas_tpu.attention(q, k, v, interpret=True,
                                block_sizes=case["block_sizes"], **kwargs)
  kwargs = dict(mask=mask, segment_ids=segment_ids, causal=case["causal"],
                sliding_window=case["sliding_window"], softcap=case["softcap"],
                scale=case["scale"])
  out, grads = value_and_grads(kernel, case, q, k, v, **kwargs)
  ref_out, ref_grads = value_and_grads(
      reference.attention, case, *(x.astype(jnp.float32) for x in (q, k, v)),
      **kwargs)
  testing.assert_close(out, ref_out, dtype=q.dtype, online_softmax=True)
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    testing.assert_close(grad, ref_grad, dtype=q.dtype, grad=True,
                         online_softmax=True, name=name)


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
  out, grads = value_and_grads(
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
    out, grads = value_and_grads(kernel, case, q, k, v, **kwargs)
  ref_out, ref_grads = value_and_grads(reference.attention, case, q, k, v,
                                       **kwargs)
  testing.assert_close(out, ref_out, online_softmax=True)
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    testing.assert_close(grad, ref_grad, grad=True, online_softmax=True,
                         name=name)


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
  out, grads = value_and_grads(with_pallas, case, q, k, v)
  peer_out, peer_grads = value_and_grads(with_splash, case, q, k, v)
  testing.assert_close(out, peer_out, online_softmax=True)
  for name, grad, peer_grad in zip(("dq", "dk", "dv"), grads, peer_grads):
    testing.assert_close(grad, peer_grad, grad=True, online_softmax=True,
                         name=name)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(sliding_window=0), ValueError, "sliding_window must be a positive"),
    (dict(softcap=-1.0), ValueError, "softcap must be a positive"),
    (dict(mask=jnp.ones((7, 7), jnp.int32)), TypeError, "mask must be boolean"),
    (dict(mask=jnp.ones((2, 7, 7), bool)), ValueError, "does not fit"),
    (dict(block_sizes=(32, 128)), TypeError, "block_sizes must be"),
])
def test_bad_arguments(kwargs, error, message):
  q = jnp.zeros((1, 7, 4, 64))
  k = jnp.zeros((1, 7, 2, 64))
  with pytest.raises(error, match=message):
    pallas_tpu.attention(q, k, k, interpret=True, **kwargs)


@pytest.mark.parametrize("shapes, message", [
    (((1, 7, 4, 64), (1, 7, 3, 64)), r"N=4 must be a multiple of kv heads K=3"),
    (((1, 7, 4, 64), (1, 7, 2, 32)), r"H=64\), got B=1, H=32"),
    (((7, 4, 64), (1, 7, 2, 64)), r"q must be 4-D"),
])
def test_bad_shapes(shapes, message):
  q, k = (jnp.zeros(shape) for shape in shapes)
  with pytest.raises(ValueError, match=message):
    pallas_tpu.attention(q, k, k, interpret=True)


def test_block_sizes_validate():
  with pytest.raises(ValueError, match="block_q must be a positive multiple"):
    pallas_tpu.BlockSizes(block_q=48, block_kv=128)
  with pytest.raises(ValueError, match="block_kv must be a positive multiple"):
    pallas_tpu.BlockSizes(block_q=32, block_kv=100)
  assert hash(pallas_tpu.BlockSizes(32, 128)) == hash(
      pallas_tpu.BlockSizes(32, 128))
