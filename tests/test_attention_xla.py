"""The blockwise XLA attention against the float32 reference: outputs and
dq/dk/dv, over the configurations users hit.

Small block sizes are drawn too, so that short sequences still run many
query and key blocks (block skipping, uneven last blocks, the online
softmax across blocks). T, S in {1000, 1029} run under the `thorough`
Hypothesis profile only (each example takes seconds on CPU).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.kernels.attention import xla as attention_xla

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
LENGTHS = [1, 7, 33, 100] + ([1000, 1029] if THOROUGH else [])


@st.composite
def attention_cases(draw):
  """A configuration from the menus users hit, and data from a drawn seed."""
  num_heads, num_kv_heads = draw(st.sampled_from([(8, 1), (8, 2), (4, 4)]))
  q_len = draw(st.sampled_from(LENGTHS))
  kv_len = draw(st.sampled_from([q_len, q_len, q_len + 5,
                                 draw(st.sampled_from(LENGTHS))]))
  return dict(
      batch=draw(st.sampled_from([1, 2])), num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=draw(st.sampled_from([64, 128, 256, 512])),
      q_len=q_len, kv_len=kv_len,
      # "heads": [B,N,T,S], a different random mask for every query head.
      mask_rank=draw(st.sampled_from([None, 2, 3, 4, "heads"])),
      padding=draw(st.sampled_from(["none", "left", "right"])),
      segments=draw(st.booleans()),
      causal=draw(st.booleans()),
      sliding_window=draw(st.sampled_from([None, 1, 16])),
      softcap=draw(st.sampled_from([None, 50.0, 2.0])),
      scale=draw(st.sampled_from([None, 1.0])),
      dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
      block_sizes=attention_xla.BlockSizes(
          draw(st.sampled_from([8, 32, 512])),
          draw(st.sampled_from([8, 16, 512]))),
      seed=draw(st.integers(0, 2**16)))


def make_inputs(case):
  """q, k, v, mask, segment_ids; padded keys hold NaN in K and V."""
  rng = np.random.default_rng(case["seed"])
  b, t, s = case["batch"], case["q_len"], case["kv_len"]
  n, k, h = case["num_heads"], case["num_kv_heads"], case["head_dim"]
  spread = 0.3 if case["scale"] == 1.0 else 1.0
  q = rng.normal(size=(b, t, n, h)) * spread
  k_ = rng.normal(size=(b, s, k, h)) * spread
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
    mask = {2: full[-1], 3: full, 4: full[:, None],
            "heads": per_head}[case["mask_rank"]]
    if case["mask_rank"] == 2:
      valid = np.broadcast_to(valid[-1:], valid.shape)
    # Padding holds garbage: no query may see it, and no output may show it.
    k_[~valid] = np.nan
    v[~valid] = np.nan
  segment_ids = None
  if case.get("segments"):
    # Two segments per row, split at a drawn position; queries end-aligned.
    split = rng.integers(0, s + 1, size=(b, 1))
    kv_ids = (np.arange(s)[None, :] >= split).astype(np.int32)
    q_ids = (np.arange(t)[None, :] + s - t >= split).astype(np.int32)
    segment_ids = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
  dtype = case["dtype"]
  return (jnp.asarray(q, dtype), jnp.asarray(k_, dtype), jnp.asarray(v, dtype),
          None if mask is None else jnp.asarray(np.asarray(mask)),
          segment_ids)


@functools.partial(jax.jit, static_argnames=("implementation", "causal",
                                             "sliding_window", "softcap",
                                             "scale", "block_sizes"))
def _value_and_grads(q, k, v, mask, segment_ids, cotangent, *, implementation,
                     causal, sliding_window, softcap, scale, block_sizes):
  kwargs = dict(mask=mask, segment_ids=segment_ids, causal=causal,
                sliding_window=sliding_window, softcap=softcap, scale=scale)

  def loss(q, k, v):
    if block_sizes is None:
      out = ops.attention(q, k, v, implementation=implementation, **kwargs)
    else:
      out = attention_xla.attention(q, k, v, block_sizes=block_sizes,
                                    **kwargs)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                       has_aux=True)(q, k, v)
  return out, grads


def run(implementation, case, q, k, v, mask, segment_ids=None):
  # dk and dv sum over T * N / K query rows: scaling the cotangent by the
  # inverse square root keeps every gradient O(1), the scale the tolerance
  # table's absolute term is written for (as with a mean-reduced loss).
  fan_in = case["q_len"] * case["num_heads"] // case["num_kv_heads"]
  cotangent = jax.random.normal(jax.random.key(case["seed"]), q.shape,
                                jnp.float32) * fan_in ** -0.5
  block_sizes = case.get("block_sizes") if implementation == "xla" else None
  return _value_and_grads(
      q, k, v, mask, segment_ids, cotangent, implementation=implementation,
      causal=case["causal"], sliding_window=case["sliding_window"],
      softcap=case["softcap"], scale=case["scale"], block_sizes=block_sizes)


def reference_inputs(q, k, v):
  """The same (possibly bf16-rounded) inputs in float32, NaN padding as 0:
  the dense reference multiplies NaN by weight 0, the blockwise version
  zeroes it."""
  return [jnp.nan_to_num(x.astype(jnp.float32)) for x in (q, k, v)]


def check_against_reference(case, q, k, v, mask, segment_ids=None):
  out, grads = run("xla", case, q, k, v, mask, segment_ids)
  ref_out, ref_grads = run("reference", case, *reference_inputs(q, k, v),
                           mask, segment_ids)
  dtype = case["dtype"]
  testing.assert_close(out, ref_out, dtype=dtype, online_softmax=True)
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    # The gradients of NaN padding must come out finite (0).
    testing.assert_close(g, ref_g, dtype=dtype, grad=True,
                         online_softmax=True, name=f"d{name}")
  return out, grads


@given(attention_cases())
def test_xla_matches_reference(case):
  check_against_reference(case, *make_inputs(case))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemma4_global_layer_shape_t1000_left_padded(dtype):
  """E2B global layer: MQA 8:1, head_dim 512, T=1000, left padding, with the
  default blocks (two query blocks of 500)."""
  case = dict(batch=1, num_heads=8, num_kv_heads=1, head_dim=512, q_len=1000,
              kv_len=1000, mask_rank=3, padding="left", causal=True,
              sliding_window=None, softcap=None, scale=1.0, dtype=dtype,
              seed=7)
  q, k, v, mask, _ = make_inputs(case)
  out, grads = check_against_reference(case, q, k, v, mask)
  causal = np.tril(np.ones((1000, 1000), bool))
  empty_rows = ~(np.asarray(mask) & causal).any(-1)  # [B, T]
  assert empty_rows.any()
  assert np.all(np.asarray(out, np.float32)[empty_rows] == 0.0)
  assert np.all(np.asarray(grads[0], np.float32)[empty_rows] == 0.0)


def test_fully_masked_rows_and_nan_padding_give_zero_not_nan():
  """Left padding with NaN in the padded keys, values and queries."""
  case = dict(batch=2, num_heads=4, num_kv_heads=1, head_dim=64, q_len=20,
              kv_len=20, mask_rank=3, padding="none", causal=True,
              sliding_window=None, softcap=30.0, scale=1.0,
              dtype=jnp.float32, seed=5,
              block_sizes=attention_xla.BlockSizes(8, 8))
  q, k, v, _, _ = make_inputs(case)
  valid = np.ones((2, 20), bool)
  valid[1, :11] = False  # more than one whole key block of padding
  mask = jnp.asarray(valid[:, None, :] & valid[:, :, None])
  bad = jnp.asarray(~valid)[:, :, None, None]
  q, k, v = (jnp.where(bad, jnp.nan, x) for x in (q, k, v))
  out, grads = run("xla", case, q, k, v, mask)
  ref_out, ref_grads = run("reference", case, *reference_inputs(q, k, v),
                           mask)
  testing.assert_close(out, ref_out, online_softmax=True)
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    testing.assert_close(g, ref_g, grad=True, online_softmax=True,
                         name=f"d{name}")
    assert np.all(np.asarray(g)[~valid] == 0.0), f"d{name} of padding"
  assert np.all(np.asarray(out)[~valid] == 0.0)


def test_two_runs_are_bit_identical():
  case = dict(batch=1, num_heads=4, num_kv_heads=1, head_dim=64, q_len=33,
              kv_len=38, mask_rank=4, padding="right", causal=True,
              sliding_window=16, softcap=50.0, scale=None,
              dtype=jnp.bfloat16, seed=3,
              block_sizes=attention_xla.BlockSizes(16, 8))
  q, k, v, mask, _ = make_inputs(case)
  first, first_grads = run("xla", case, q, k, v, mask)
  second, second_grads = run("xla", case, q + 0, k, v, mask)
  for a, b in zip((first, *first_grads), (second, *second_grads)):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


@pytest.mark.parametrize("num_kv_heads, num_heads", [(1, 8), (2, 4)])
def test_per_head_masks_follow_their_query_head(num_kv_heads, num_heads):
  case = dict(batch=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
              head_dim=64, q_len=7, kv_len=12, mask_rank="heads",
              padding="left", causal=True, sliding_window=None, softcap=None,
              scale=None, dtype=jnp.float32, seed=1,
              block_sizes=attention_xla.BlockSizes(4, 4))
  check_against_reference(case, *make_inputs(case))


def _visited_blocks(q_len, kv_len, *, mask=None, **kwargs):
  """Key blocks visited, summed over query blocks (blocks of 512)."""
  config = attention_xla._Config(  # pylint: disable=protected-access
      q_len=q_len, kv_len=kv_len, block_q=512, block_kv=512, softcap=None,
      scale=1.0, **kwargs)
  first, end = attention_xla._kv_block_ranges(  # pylint: disable=protected-access
      config, mask, -(-q_len // 512), -(-kv_len // 512))
  return int(jnp.sum(end - first))


def test_block_skipping_visits_only_the_band():
  # E2B local layer at T=8192, W=512: each query block sees 2 of 16.
  assert _visited_blocks(8192, 8192, causal=True, sliding_window=512) == 31
  assert _visited_blocks(8192, 8192, causal=True,
                         sliding_window=None) == 16 * 17 // 2
  # Decode: one query against 4096 keys and a window of 512 sees 1 block.
  assert _visited_blocks(1, 4096, causal=True, sliding_window=512) == 1
  # Tunix's causal mask inside the boolean mask (causal=False) skips the
  # upper triangle too; left padding of whole blocks is skipped as well.
  tril = np.tril(np.ones((2048, 2048), bool))
  tril[:, :1024] = False  # 50% left padding, in [B, 1, T, S] form
  mask = jnp.asarray(tril)[None, None, None]
  assert _visited_blocks(2048, 2048, mask=mask, causal=False,
                         sliding_window=None) == 3
