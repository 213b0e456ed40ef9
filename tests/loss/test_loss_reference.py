"""The loss reference against Tunix's default SFT loss on a tiny Gemma 4."""

import jax
import jax.numpy as jnp
import loss_cases
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, strategies as st
from tunix.sft import peft_trainer

from gemma4_jax import testing, tiny_models
from gemma4_jax.reference import loss as loss_reference


@pytest.fixture(scope="module")
def model():
  return tiny_models.build_model(tiny_models.tiny_config(), seed=4)


def _final_hidden(model, inputs):
  """The model's logits and the final-norm output they are decoded from."""
  forward = nnx.capture(model, nnx.Intermediate,
                        method_outputs=nnx.Intermediate)
  (logits, _), intermediates = forward(
      inputs["input_tokens"], inputs["positions"], None,
      inputs["attention_mask"])
  (hidden,) = intermediates["final_norm"]["__call__"].get_value()
  return hidden, logits


@pytest.mark.slow
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_matches_tunix_default_loss(model, padding):
  batch = tiny_models.synthetic_batches(
      1, batch_size=4, seq_len=12, vocab_size=model.config.num_embed,
      padding=padding, seed=5)[0]
  inputs = tiny_models.model_inputs(batch)
  tunix_loss = peft_trainer._default_loss_fn  # pylint: disable=protected-access
  expected = tunix_loss(model, **inputs)
  hidden, logits = _final_hidden(model, inputs)
  embedding = model.embedder.input_embedding[...]
  tokens, mask = jnp.asarray(batch.input_tokens), jnp.asarray(batch.input_mask)
  assert padding == "none" or not bool(jnp.all(mask))

  out = loss_reference.softcapped_cross_entropy(
      hidden[:, :-1], embedding, tokens[:, 1:], mask[:, 1:], softcap=30.0)
  testing.assert_close(out, expected, name="loss")
  nll = loss_reference.token_nll(hidden, embedding, tokens)
  tunix_nll = -jnp.take_along_axis(jax.nn.log_softmax(logits),
                                   tokens[..., None], axis=-1)[..., 0]
  testing.assert_close(nll, tunix_nll, name="per-token nll")


def _dense_loss_and_grads(hidden, embedding, targets, weights, softcap):
  """float64 loss and its hand-derived gradients w.r.t. hidden, embedding."""
  h, e = np.float64(hidden), np.float64(embedding)
  w = np.float64(weights)
  z = h @ e.T
  logits, dlogits_dz = z, np.ones_like(z)
  if softcap is not None:
    logits = softcap * np.tanh(z / softcap)
    dlogits_dz = 1.0 - np.tanh(z / softcap) ** 2
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  one_hot = np.eye(e.shape[0])[targets]
  nll = -(one_hot * log_probs).sum(-1)
  norm = w.sum() + 1e-8
  dz = (w / norm)[..., None] * (np.exp(log_probs) - one_hot) * dlogits_dz
  de = dz.reshape(-1, e.shape[0]).T @ h.reshape(-1, e.shape[1])
  return (w * nll).sum() / norm, dz @ e, de


def f32(array):
  return jnp.asarray(array, jnp.float32)


def _problem(seed, shape=(2, 5), dim=16, vocab=37):
  rng = np.random.default_rng(seed)
  hidden = 2.0 * rng.standard_normal((*shape, dim))
  embedding = rng.standard_normal((vocab, dim))
  targets = rng.integers(0, vocab, shape)
  weights = rng.choice([0.0, 0.5, 1.0], shape)
  return hidden, embedding, targets, weights


@pytest.mark.parametrize("softcap", [30.0, 5.0, None])
def test_gradients_match_dense_float64(softcap):
  hidden, embedding, targets, weights = _problem(seed=7)
  expected_loss, expected_dh, expected_de = _dense_loss_and_grads(
      hidden, embedding, targets, weights, softcap)

  def loss_fn(h, e):
    return loss_reference.softcapped_cross_entropy(
        h, e, jnp.asarray(targets, jnp.int32), f32(weights), softcap=softcap)

  value, (dh, de) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
      f32(hidden), f32(embedding))
  testing.assert_close(value, expected_loss, name="loss")
  testing.assert_close(dh, expected_dh, grad=True, name="d hidden")
  testing.assert_close(de, expected_de, grad=True, name="d embedding")


def test_bfloat16_inputs_within_bfloat16_tolerance():
  hidden, embedding, targets, weights = _problem(seed=8)
  targets, weights = jnp.asarray(targets, jnp.int32), f32(weights)

  def loss_fn(h, e):
    return loss_reference.softcapped_cross_entropy(h, e, targets, weights)

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1))
  value32, grads32 = grad_fn(f32(hidden), f32(embedding))
  value16, grads16 = grad_fn(jnp.asarray(hidden, jnp.bfloat16),
                             jnp.asarray(embedding, jnp.bfloat16))
  assert value16.dtype == jnp.float32
  assert grads16[0].dtype == jnp.bfloat16
  testing.assert_close(value16, value32, dtype=jnp.bfloat16, name="loss")
  for name, g16, g32 in zip(("d hidden", "d embedding"), grads16, grads32):
    testing.assert_close(g16, g32, dtype=jnp.bfloat16, grad=True, name=name)


@given(shape=st.sampled_from([(1,), (3,), (2, 7)]),
       dim=st.sampled_from([8, 32]), vocab=st.sampled_from([5, 64]),
       softcap=st.sampled_from([None, 30.0, 2.0]), boolean=st.booleans(),
       seed=st.integers(0, 2**16))
def test_matches_float64_over_shapes(shape, dim, vocab, softcap, boolean,
                                     seed):
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((*shape, dim))
  embedding = rng.standard_normal((vocab, dim))
  # -1 and vocab are outside [0, V): zero nll, as Tunix's all-zero one-hot.
  targets = rng.integers(-1, vocab + 1, shape)
  weights = (rng.random(shape) < 0.7 if boolean else rng.random(shape))

  logits = hidden @ embedding.T
  if softcap is not None:
    logits = softcap * np.tanh(logits / softcap)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
  log_z += logits.max(-1)
  valid = (targets >= 0) & (targets < vocab)
  picked = np.take_along_axis(logits, np.where(valid, targets, 0)[..., None],
                              -1)[..., 0]
  nll = np.where(valid, log_z - picked, 0.0)
  expected = (weights * nll).sum() / (weights.sum() + 1e-8)

  args = (f32(hidden), f32(embedding), jnp.asarray(targets, jnp.int32))
  testing.assert_close(loss_reference.token_nll(*args, softcap=softcap), nll,
                       name="nll")
  testing.assert_close(
      loss_reference.softcapped_cross_entropy(*args, jnp.asarray(weights),
                                              softcap=softcap),
      expected, name="loss")


def test_all_zero_weights_give_zero():
  hidden, embedding, targets, _ = _problem(seed=9)
  out = loss_reference.softcapped_cross_entropy(
      f32(hidden), f32(embedding), jnp.asarray(targets, jnp.int32),
      jnp.zeros(targets.shape, bool))
  assert float(out) == 0.0


@pytest.mark.parametrize("change, error, match", [
    (dict(targets=jnp.zeros((2, 5))), TypeError, "targets must be an integer"),
    (dict(targets=jnp.zeros((2, 4), jnp.int32)), ValueError,
     r"targets must have shape hidden.shape\[:-1\]"),
    (dict(embedding=jnp.ones((11, 9))), ValueError, "same D"),
    (dict(embedding=jnp.ones((11, 8, 1))), ValueError, r"embedding \[V, D\]"),
    (dict(hidden=jnp.ones((2, 5, 8), jnp.int32)), TypeError, "hidden"),
    (dict(weights=jnp.ones((5, 2))), ValueError, "weights must have shape"),
    (dict(softcap=-30.0), ValueError, "softcap"),
])
def test_bad_inputs_raise(change, error, match):
  softcap = change.pop("softcap", 30.0)
  with pytest.raises(error, match=match):
    loss_reference.softcapped_cross_entropy(
        **loss_cases.small_args(**change), softcap=softcap)
