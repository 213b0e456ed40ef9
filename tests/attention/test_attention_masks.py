"""Mask normalization: every accepted form means the same thing; the rest raise."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gemma4_jax import masks


def _loop_visibility(q_len, kv_len, causal, window):
  out = np.zeros((q_len, kv_len), bool)
  for i in range(q_len):
    pos = i + kv_len - q_len
    for j in range(kv_len):
      ok = True
      if causal:
        ok &= j <= pos
      if window is not None:
        ok &= j > pos - window
      out[i, j] = ok
  return out


@given(q_len=st.integers(1, 9), extra=st.integers(0, 5),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 6)))
def test_position_visibility_matches_a_loop(q_len, extra, causal, window):
  kv_len = q_len + extra
  got = masks.position_visibility(q_len, kv_len, causal=causal,
                                  sliding_window=window)
  np.testing.assert_array_equal(got, _loop_visibility(q_len, kv_len, causal,
                                                      window))


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3),
       heads=st.sampled_from([1, 2, 4]), q_len=st.integers(1, 6),
       kv_len=st.integers(1, 6))
def test_every_rank_means_the_same(seed, batch, heads, q_len, kv_len):
  rng = np.random.default_rng(seed)
  base = rng.random((batch, q_len, kv_len)) > 0.3
  dims = dict(batch=batch, num_heads=heads, q_len=q_len, kv_len=kv_len)
  want = np.broadcast_to(base[:, None], (batch, heads, q_len, kv_len))
  forms = [base, base[:, None], np.repeat(base[:, None], heads, axis=1)]
  for form in forms:
    got = masks.canonical_mask(jnp.asarray(form), **dims)
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)
  got2 = masks.canonical_mask(jnp.asarray(base[0]), **dims)
  np.testing.assert_array_equal(
      np.broadcast_to(got2, want.shape),
      np.broadcast_to(base[0], want.shape))
  # A key mask [B, 1, S] (Tunix's decode and dummy inputs) broadcasts over T.
  keys = base[:, :1]
  got3 = masks.canonical_mask(jnp.asarray(keys), **dims)
  np.testing.assert_array_equal(
      np.broadcast_to(got3, want.shape),
      np.broadcast_to(keys[:, None], want.shape))


@pytest.mark.parametrize("shape, message", [
    ((3,), "rank 2, 3 or 4"),
    ((2, 2, 1, 3, 5, 1), "rank 2, 3 or 4"),
    ((3, 6), r"expected \(3, 5\)"),
    ((2, 5, 3), r"expected \(2, 3, 5\)"),
    ((3, 3, 5), r"expected \(2, 3, 5\)"),
    ((2, 3, 3, 5), r"expected \(2, 4, 3, 5\)"),
    ((2, 4, 5, 3), r"expected \(2, 4, 3, 5\)"),
])
def test_bad_mask_shapes_name_both_shapes(shape, message):
  with pytest.raises(ValueError, match=message) as info:
    masks.canonical_mask(jnp.ones(shape, bool), batch=2, num_heads=4,
                         q_len=3, kv_len=5)
  assert str(shape) in str(info.value)


def test_non_boolean_mask_is_a_type_error():
  with pytest.raises(TypeError, match="boolean"):
    masks.canonical_mask(jnp.ones((3, 5), jnp.int32), batch=2, num_heads=4,
                         q_len=3, kv_len=5)


def test_segment_ids_forms_and_errors():
  ids = jnp.array([[0, 0, 1, 1]])
  q_ids, kv_ids = masks.canonical_segment_ids(ids, batch=1, q_len=4, kv_len=4)
  np.testing.assert_array_equal(q_ids, kv_ids)
  visible = masks.visibility(batch=1, num_heads=1, q_len=4, kv_len=4,
                             segment_ids=ids, causal=True)
  np.testing.assert_array_equal(visible[0, 0], np.array(
      [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool))
  with pytest.raises(ValueError, match="T == S"):
    masks.canonical_segment_ids(ids, batch=1, q_len=2, kv_len=4)
  with pytest.raises(ValueError, match=r"\(1, 2\)"):
    masks.canonical_segment_ids((ids, ids), batch=1, q_len=2, kv_len=4)
  with pytest.raises(TypeError, match="integer"):
    masks.canonical_segment_ids(ids.astype(jnp.float32), batch=1, q_len=4,
                                kv_len=4)
  with pytest.raises(ValueError, match="pair"):
    masks.canonical_segment_ids((ids, ids, ids), batch=1, q_len=4, kv_len=4)
