"""The XLA attention against the float32 reference: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gemma4_jax import ops
from gemma4_jax import testing


@st.composite
def attention_cases(draw):
  """A configuration from the menus users hit, and data from a drawn seed."""
  batch = draw(st.sampled_from([1, 2]))
  num_kv_heads, group = draw(st.sampled_from([(1, 1), (1, 4), (2, 2), (1, 8)]))
  head_dim = draw(st.sampled_from([64, 128, 256, 512]))
  q_len = draw(st.sampled_from([1, 7, 33, 100]))
  kv_len = q_len + draw(st.sampled_from([0, 0, 5]))
  return dict(
      batch=batch, num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
      head_dim=head_dim, q_len=q_len, kv_len=kv_len,
      # "heads": [B,N,T,S], a different random mask for every query head.
      mask_rank=draw(st.sampled_from([None, 2, 3, 4, "heads"])),
      padding=draw(st.sampled_from(["none", "left", "right"])),
      causal=draw(st.booleans()),
      sliding_window=draw(st.sampled_from([None, 1, 16])),
      softcap=draw(st.sampled_from([None, 50.0])),
      scale=draw(st.sampled_from([None, 1.0])),
      dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
      seed=draw(st.integers(0, 2**16)))


def make_inputs(case):
  rng = np.random.default_rng(case["seed"])
  b, t, s = case["batch"], case["q_len"], case["kv_len"]
  n, k, h = case["num_heads"], case["num_kv_heads"], case["head_dim"]
  q = rng.normal(size=(b, t, n, h)) * (0.3 if case["scale"] == 1.0 else 1.0)
  k_ = rng.normal(size=(b, s, k, h)) * (0.3 if case["scale"] == 1.0 else 1.0)
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
      mask = np.asarray(mask)
  dtype = case["dtype"]
  return (jnp.asarray(q, dtype), jnp.asarray(k_, dtype), jnp.asarray(v, dtype),
          None if mask is None else jnp.asarray(mask))


def run(implementation, case, q, k, v, mask):
  kwargs = dict(mask=mask, causal=case["causal"],
                sliding_window=case["sliding_window"], softcap=case["softcap"],
                scale=case["scale"], implementation=implementation)
  # dk and dv sum over T * N / K query rows: scaling the cotangent by the
  # inverse square root keeps every gradient O(1), the scale the tolerance
  # table's absolute term is written for (as with a mean-reduced loss).
  fan_in = case["q_len"] * case["num_heads"] // case["num_kv_heads"]
  cotangent = jax.random.normal(jax.random.key(case["seed"]), q.shape,
                                jnp.float32) * fan_in ** -0.5

  def loss(q, k, v):
    out = ops.attention(q, k, v, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                       has_aux=True)(q, k, v)
  return out, grads


@given(attention_cases())
def test_xla_matches_reference(case):
  q, k, v, mask = make_inputs(case)
  out, grads = run("xla", case, q, k, v, mask)
  # The reference sees the same (possibly bf16-rounded) inputs in float32.
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref_out, ref_grads = run("reference", case, *f32, mask)
  testing.assert_close(out, ref_out, dtype=case["dtype"])
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    testing.assert_close(g, ref_g, dtype=case["dtype"], grad=True,
                         name=f"d{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemma4_global_layer_shape_t1000_left_padded(dtype):
  """E2B global layer: MQA 8:1, head_dim 512, T=1000, left padding."""
  case = dict(batch=1, num_heads=8, num_kv_heads=1, head_dim=512, q_len=1000,
              kv_len=1000, mask_rank=3, padding="left", causal=True,
              sliding_window=None, softcap=None, scale=1.0, dtype=dtype,
              seed=7)
  q, k, v, mask = make_inputs(case)
  out, grads = run("xla", case, q, k, v, mask)
  ref_out, ref_grads = run("reference", case,
                           *[x.astype(jnp.float32) for x in (q, k, v)], mask)
  testing.assert_close(out, ref_out, dtype=dtype)
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    testing.assert_close(g, ref_g, dtype=dtype, grad=True, name=f"d{name}")
  causal = np.tril(np.ones((1000, 1000), bool))
  empty_rows = ~(np.asarray(mask) & causal).any(-1)  # [B, T]
  assert empty_rows.any()
  assert np.all(np.asarray(out, np.float32)[empty_rows] == 0.0)


def test_two_runs_are_bit_identical():
  case = dict(batch=1, num_heads=4, num_kv_heads=1, head_dim=64, q_len=33,
              kv_len=38, mask_rank=4, padding="right", causal=True,
              sliding_window=16, softcap=50.0, scale=None,
              dtype=jnp.bfloat16, seed=3)
  q, k, v, mask = make_inputs(case)
  first, _ = run("xla", case, q, k, v, mask)
  second, _ = run("xla", case, q, k, v, mask)
  np.testing.assert_array_equal(np.asarray(first, np.float32),
                                np.asarray(second, np.float32))


@pytest.mark.parametrize("num_kv_heads, num_heads", [(1, 8), (2, 4)])
def test_per_head_masks_follow_their_query_head(num_kv_heads, num_heads):
  case = dict(batch=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
              head_dim=64, q_len=7, kv_len=12, mask_rank="heads",
              padding="left", causal=True, sliding_window=None, softcap=None,
              scale=None, dtype=jnp.float32, seed=1)
  q, k, v, mask = make_inputs(case)
  out, grads = run("xla", case, q, k, v, mask)
  ref_out, ref_grads = run("reference", case, q, k, v, mask)
  testing.assert_close(out, ref_out)
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    testing.assert_close(g, ref_g, grad=True, name=f"d{name}")
