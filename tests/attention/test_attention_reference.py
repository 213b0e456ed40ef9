"""The float32 reference attention: by hand, against float64 over the shared
cases, against Tunix, edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import attention_cases
from gemma4_jax import testing
from gemma4_jax import tiny_models
from gemma4_jax.reference import attention as reference
from tunix.models.gemma4 import model as gemma4_lib
from tunix.sft import utils as sft_utils


def test_one_query_by_hand():
  q = np.array([[[[1.0, 0.0]]]])                            # [1,1,1,2]
  k = np.array([[[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 0.0]]]])  # [1,3,1,2]
  v = np.array([[[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]]])
  mask = np.array([[True, True, False]])                    # [T=1, S=3]
  logits = np.array([1.0, 0.0]) * 0.5  # scale 0.5; the third key is masked
  p = np.exp(logits) / np.exp(logits).sum()
  want = p[0] * v[0, 0, 0] + p[1] * v[0, 1, 0]
  got = reference.attention(jnp.asarray(q, jnp.float32),
                            jnp.asarray(k, jnp.float32),
                            jnp.asarray(v, jnp.float32), mask=jnp.asarray(mask),
                            causal=False, scale=0.5)
  np.testing.assert_allclose(got[0, 0, 0], want, rtol=1e-6)


def test_softcap_window_and_end_alignment_by_hand():
  # T=2 queries at positions 2 and 3 of S=4 keys, window 2, softcap 1.
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=s).astype(np.float32)
             for s in [(1, 2, 1, 3), (1, 4, 1, 3), (1, 4, 1, 3)])
  got = reference.attention(*map(jnp.asarray, (q, k, v)), causal=True,
                            sliding_window=2, softcap=1.0, scale=1.0)
  for i, keys in enumerate([(1, 2), (2, 3)]):
    logits = np.tanh(np.array([q[0, i, 0] @ k[0, j, 0] for j in keys]))
    p = np.exp(logits) / np.exp(logits).sum()
    want = sum(pj * v[0, j, 0] for pj, j in zip(p, keys))
    np.testing.assert_allclose(got[0, i, 0], want, rtol=1e-5)


def test_fully_masked_rows_are_zero_with_zero_gradients():
  key = jax.random.key(0)
  q, k, v = (jax.random.normal(kk, (2, 5, 4, 8)) for kk in jax.random.split(key, 3))
  mask = jnp.ones((2, 5, 5), bool).at[1, :3].set(False)  # left padding row 1

  def loss(q, k, v):
    out = reference.attention(q, k, v, mask=mask)
    return jnp.sum(out ** 2), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                       has_aux=True)(q, k, v)
  assert np.all(np.asarray(out[1, :3]) == 0.0)
  assert np.all(np.asarray(grads[0][1, :3]) == 0.0)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


def test_grouped_heads_equal_repeated_kv():
  key = jax.random.key(1)
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (2, 6, 8, 16))
  k = jax.random.normal(kk, (2, 6, 2, 16))
  v = jax.random.normal(kv, (2, 6, 2, 16))
  grouped = reference.attention(q, k, v)
  # Query head n reads kv head n // 4: build the MHA equivalent by hand.
  index = np.arange(8) // 4
  mha = reference.attention(q, k[:, :, index], v[:, :, index])
  np.testing.assert_array_equal(grouped, mha)


def _float64_attention(case, q, k, v, mask, segment_ids):
  """The reference's math in float64 numpy, with its own visibility rules
  (not `masks`), written from the docstring of `ops.attention`."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  s = k.shape[1]
  k, v = (np.repeat(x, n // k.shape[2], axis=2) for x in (k, v))
  query = np.arange(t)[:, None] + s - t  # end-aligned positions
  key = np.arange(s)[None, :]
  visible = np.ones((b, n, t, s), bool)
  if case["causal"]:
    visible &= key <= query
  if case["sliding_window"] is not None:
    visible &= key > query - case["sliding_window"]
  if mask is not None:
    mask = np.asarray(mask)
    visible &= mask if mask.ndim == 4 else (
        mask[:, None] if mask.ndim == 3 else mask)
  if segment_ids is not None:
    q_ids, kv_ids = (np.asarray(x) for x in segment_ids)
    visible &= q_ids[:, None, :, None] == kv_ids[:, None, None, :]
  scale = h ** -0.5 if case["scale"] is None else case["scale"]
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if case["softcap"] is not None:
    logits = case["softcap"] * np.tanh(logits / case["softcap"])
  logits = np.where(visible, logits, -np.inf)
  row_max = logits.max(axis=-1, keepdims=True)
  weights = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))
  total = weights.sum(axis=-1, keepdims=True)
  probs = weights / np.where(total > 0, total, 1.0)  # no visible key: 0
  return np.einsum("bnts,bsnh->btnh", probs, v)


@given(attention_cases.cases())
def test_matches_float64_over_the_shared_cases(case):
  q, k, v, mask, segment_ids = attention_cases.make_inputs(case)
  q, k, v = attention_cases.reference_inputs(q, k, v)
  got = reference.attention(q, k, v, mask=mask, segment_ids=segment_ids,
                            **attention_cases.options(case))
  testing.assert_close(got, _float64_attention(case, q, k, v, mask,
                                               segment_ids),
                       dtype=jnp.float32)


@pytest.fixture(scope="module")
def tiny_model():
  return tiny_models.build_model(tiny_models.tiny_config())


@pytest.mark.slow
@pytest.mark.parametrize("layer_index", [0, 2])  # local (window 8), global
def test_agrees_with_tunix_attention(tiny_model, layer_index):
  attn = tiny_model.layers[layer_index].attn
  batch, seq_len = 2, 20
  x = jax.random.normal(jax.random.key(2), (batch, seq_len, 64))
  input_mask = np.ones((batch, seq_len), bool)
  input_mask[1, :5] = False  # left padding
  input_mask[0, 15:] = False  # right padding
  positions = sft_utils.build_positions_from_mask(jnp.asarray(input_mask))
  attn_mask = sft_utils.make_causal_attn_mask(jnp.asarray(input_mask))
  _, tunix_out, (k, v) = attn.block(x, positions, None, attn_mask)

  q = attn._query_norm(attn.q_einsum(x))  # pylint: disable=protected-access
  q = gemma4_lib.apply_rope(q, positions,
                            base_frequency=attn.rope_base_frequency,
                            scale_factor=attn.rope_scale_factor,
                            rope_proportion=attn.rope_proportion)
  window = (tiny_model.config.sliding_window_size
            if attn.attn_type == gemma4_lib.AttentionType.LOCAL_SLIDING
            else None)
  encoded = reference.attention(q, k, v, mask=attn_mask, causal=True,
                                sliding_window=window, scale=1.0)
  ours = attn.attn_vec_einsum(encoded)
  # Tunix gives a mean of values on rows with no visible key; compare the rest.
  has_key = np.asarray(attn_mask).any(-1)
  assert not has_key.all()
  testing.assert_close(np.asarray(ours)[has_key],
                       np.asarray(tunix_out)[has_key], dtype=jnp.float32)
