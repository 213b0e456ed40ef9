"""The one case strategy of the attention tests, the inputs it builds, and
the comparison with the float32 reference.

The reference, XLA and Pallas tests all draw from `cases()`; each test
module gives only its implementation's tile sizes and its skips (in the
manner of tokamax's attention `test_base.py`), so the menus cannot drift
apart between implementations again. Small tiles are drawn so that short
sequences still span several blocks (schedules, block skipping, ragged last
blocks, the online softmax across blocks); T, S in {1000, 1029} run under
the `thorough` Hypothesis profile only (seconds per example for XLA, a
minute for the Pallas kernel in interpret mode).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from gemma4_jax import testing

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
LENGTHS = [1, 7, 33, 100, 200] + ([1000, 1029] if THOROUGH else [])


@st.composite
def cases(draw, block_sizes=st.none()):
  """A configuration from the menus users hit, and data from a drawn seed.

  Args:
    draw: Hypothesis' draw (given by `st.composite`).
    block_sizes: a strategy for the implementation's `BlockSizes` (None
      for the reference).
  """
  num_heads, num_kv_heads = draw(st.sampled_from([(8, 1), (8, 2), (4, 4)]))
  q_len = draw(st.sampled_from(LENGTHS))
  # Self-attention mostly; a few more keys (a cache); any other length.
  kv_len = draw(st.sampled_from([q_len, q_len, q_len + 5, q_len + 60,
                                 draw(st.sampled_from(LENGTHS))]))
  # "key": [B,1,S] as Tunix passes; "heads": [B,N,T,S], a different random
  # mask for every query head.
  mask_rank = draw(st.sampled_from([None, 2, 3, 4, "key", "heads"]))
  return dict(
      batch=draw(st.sampled_from([1, 2])), num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=draw(st.sampled_from([64, 128, 256, 512])),
      q_len=q_len, kv_len=kv_len, mask_rank=mask_rank,
      padding=draw(st.sampled_from(["none", "left", "right"])),
      # Padded keys hold NaN in K and V (a mask hides them).
      nan_padding=mask_rank is not None and draw(st.booleans()),
      # "packed": increasing ids over the keys; "split": two segments per
      # row, split at a drawn position.
      segments=draw(st.sampled_from([None, "packed", "split"])),
      causal=draw(st.booleans()),
      sliding_window=draw(st.sampled_from([None, 1, 16, 64])),
      softcap=draw(st.sampled_from([None, 2.0, 20.0, 50.0])),
      scale=draw(st.sampled_from([None, 1.0])),
      dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
      block_sizes=draw(block_sizes),
      seed=draw(st.integers(0, 2**16)))


def make_inputs(case):
  """q, k, v, mask, segment_ids of `case`; with `nan_padding`, padded keys
  hold NaN in K and V."""
  rng = np.random.default_rng(case["seed"])
  b, t, s = case["batch"], case["q_len"], case["kv_len"]
  n, k, h = case["num_heads"], case["num_kv_heads"], case["head_dim"]
  spread = 0.3 if case["scale"] == 1.0 else 1.0  # O(1) logits either way
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
    mask = {2: full[-1], 3: full, 4: full[:, None], "key": valid[:, None],
            "heads": per_head}[case["mask_rank"]]
    if case["mask_rank"] == 2:  # the last row's padding, for every row
      valid = np.broadcast_to(valid[-1:], valid.shape)
  if case.get("nan_padding"):
    # Padding holds garbage: no query may see it, and no output may show it.
    k_[~valid] = np.nan
    v[~valid] = np.nan
  dtype = case["dtype"]
  return (jnp.asarray(q, dtype), jnp.asarray(k_, dtype), jnp.asarray(v, dtype),
          None if mask is None else jnp.asarray(np.asarray(mask)),
          _segment_ids(case.get("segments"), rng, b, t, s))


def _segment_ids(form, rng, b, t, s):
  """A `(q [B,T], kv [B,S])` pair; queries are end-aligned to the keys
  (query i sits at key position i + S - T; before key 0 when S < T)."""
  if form is None:
    return None
  if form == "packed":  # packed sequences: increasing ids over the keys
    kv_ids = np.sort(rng.integers(0, 3, size=(b, s)), axis=1)
    positions = np.clip(np.arange(t) + s - t, 0, s - 1)
    q_ids = kv_ids[:, positions]
  else:  # "split": two segments per row, split at a drawn position
    split = rng.integers(0, s + 1, size=(b, 1))
    kv_ids = (np.arange(s)[None, :] >= split).astype(np.int32)
    q_ids = (np.arange(t)[None, :] + s - t >= split).astype(np.int32)
  return jnp.asarray(q_ids), jnp.asarray(kv_ids)


def options(case):
  """The op's keyword options of `case` (all but the arrays)."""
  return dict(causal=case["causal"], sliding_window=case["sliding_window"],
              softcap=case["softcap"], scale=case["scale"])


def reference_inputs(q, k, v):
  """The same (possibly bf16-rounded) inputs in float32, NaN padding as 0:
  the dense reference multiplies NaN by weight 0, the blockwise versions
  zero it."""
  return [jnp.nan_to_num(x.astype(jnp.float32)) for x in (q, k, v)]


def cotangent(case, shape):
  """The output cotangent of the gradient checks.

  dk and dv sum over T * N / K query rows: scaling the cotangent by the
  inverse square root keeps every gradient O(1), the scale the tolerance
  table's absolute term is written for (as with a mean-reduced loss).
  """
  fan_in = case["q_len"] * case["num_heads"] // case["num_kv_heads"]
  return jax.random.normal(jax.random.key(case["seed"]), shape,
                           jnp.float32) * fan_in ** -0.5


def value_and_grads(fn, case, q, k, v, **kwargs):
  """`fn(q, k, v, **kwargs)` and its `(dq, dk, dv)` under `cotangent`."""
  weights = cotangent(case, q.shape)

  def loss(q, k, v):
    out = fn(q, k, v, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * weights), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                       has_aux=True)(q, k, v)
  return out, grads


def assert_matches(out, grads, want_out, want_grads, *, dtype=None):
  """Output and gradients within the online-softmax tolerances of `dtype`
  (default: the output's)."""
  testing.assert_close(out, want_out, dtype=dtype, online_softmax=True)
  for name, grad, want in zip(("dq", "dk", "dv"), grads, want_grads):
    testing.assert_close(grad, want, dtype=dtype, grad=True,
                         online_softmax=True, name=name)
