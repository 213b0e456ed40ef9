"""The blockwise XLA attention against the float32 reference: outputs and
dq/dk/dv, over the configurations users hit (`attention_cases`), with NaN
in padded keys and values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import attention_cases
from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.kernels.attention import xla as attention_xla

# Small blocks too, so that short sequences run many query and key blocks.
BLOCK_SIZES = st.builds(attention_xla.BlockSizes, st.sampled_from([8, 32, 512]),
                        st.sampled_from([8, 16, 512]))


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
  """Jitted value and gradients (every option static); the XLA version runs
  with the case's block sizes."""
  block_sizes = case.get("block_sizes") if implementation == "xla" else None
  return _value_and_grads(
      q, k, v, mask, segment_ids, attention_cases.cotangent(case, q.shape),
      implementation=implementation, block_sizes=block_sizes,
      **attention_cases.options(case))


def check_against_reference(case, q, k, v, mask, segment_ids=None):
  out, grads = run("xla", case, q, k, v, mask, segment_ids)
  ref_out, ref_grads = run("reference", case,
                           *attention_cases.reference_inputs(q, k, v), mask,
                           segment_ids)
  # The gradients of NaN padding must come out finite (0).
  attention_cases.assert_matches(out, grads, ref_out, ref_grads,
                                 dtype=case["dtype"])
  return out, grads


@given(attention_cases.cases(block_sizes=BLOCK_SIZES))
def test_xla_matches_reference(case):
  check_against_reference(case, *attention_cases.make_inputs(case))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemma4_global_layer_shape_t1000_left_padded(dtype):
  """E2B global layer: MQA 8:1, head_dim 512, T=1000, left padding, with the
  default blocks (two query blocks of 500)."""
  case = dict(batch=1, num_heads=8, num_kv_heads=1, head_dim=512, q_len=1000,
              kv_len=1000, mask_rank=3, padding="left", causal=True,
              nan_padding=True, sliding_window=None, softcap=None, scale=1.0,
              dtype=dtype, seed=7)
  q, k, v, mask, _ = attention_cases.make_inputs(case)
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
              nan_padding=True, sliding_window=None, softcap=30.0, scale=1.0,
              dtype=jnp.float32, seed=5,
              block_sizes=attention_xla.BlockSizes(8, 8))
  q, k, v, _, _ = attention_cases.make_inputs(case)
  valid = np.ones((2, 20), bool)
  valid[1, :11] = False  # more than one whole key block of padding
  mask = jnp.asarray(valid[:, None, :] & valid[:, :, None])
  bad = jnp.asarray(~valid)[:, :, None, None]
  q, k, v = (jnp.where(bad, jnp.nan, x) for x in (q, k, v))
  out, grads = run("xla", case, q, k, v, mask)
  ref_out, ref_grads = run("reference", case,
                           *attention_cases.reference_inputs(q, k, v),
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
              nan_padding=True, sliding_window=16, softcap=50.0, scale=None,
              dtype=jnp.bfloat16, seed=3,
              block_sizes=attention_xla.BlockSizes(16, 8))
  q, k, v, mask, _ = attention_cases.make_inputs(case)
  first, first_grads = run("xla", case, q, k, v, mask)
  second, second_grads = run("xla", case, q + 0, k, v, mask)
  for a, b in zip((first, *first_grads), (second, *second_grads)):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


@pytest.mark.parametrize("num_kv_heads, num_heads", [(1, 8), (2, 4)])
def test_per_head_masks_follow_their_query_head(num_kv_heads, num_heads):
  case = dict(batch=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
              head_dim=64, q_len=7, kv_len=12, mask_rank="heads",
              padding="left", nan_padding=True, causal=True,
              sliding_window=None, softcap=None, scale=None,
              dtype=jnp.float32, seed=1,
              block_sizes=attention_xla.BlockSizes(4, 4))
  check_against_reference(case, *attention_cases.make_inputs(case))


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
