"""`ops.softcapped_cross_entropy` (XLA and Pallas-interpret) vs the reference.

Values and gradients with respect to hidden and, when it is differentiated,
the embedding; shapes that are not multiples of the blocks, saturating
softcaps, all-zero weights, bf16/f32, bad inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gemma4_jax import implementations
from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.kernels.loss import pallas_tpu
from gemma4_jax.kernels.loss import xla
from gemma4_jax.reference import loss as loss_reference

# Small blocks so that a few tokens and a few hundred ids span many tiles.
BLOCKS = {
    "xla": (xla.BlockSizes(3, 16), xla.BlockSizes(8, 64)),
    "pallas_tpu": (pallas_tpu.BlockSizes(16, 128),),
}


def _problem(seed, *, batch, seq, dim, vocab, dtype=jnp.float32, scale=2.0,
             boolean=False):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(scale * rng.standard_normal((batch, seq, dim)), dtype)
  embedding = jnp.asarray(rng.standard_normal((vocab, dim)), dtype)
  targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
  weights = rng.random((batch, seq))
  weights = jnp.asarray(weights < 0.7 if boolean else weights)
  return hidden, embedding, targets, weights


def _reference_sums(hidden, embedding, targets, weights, softcap):
  nll = loss_reference.token_nll(hidden, embedding, targets, softcap=softcap)
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * nll), jnp.sum(weights)


def _check_against_reference(args, *, softcap, implementation, block_sizes,
                             wrt):
  hidden, embedding, targets, weights = args

  def fused(h, e):
    return ops.softcapped_cross_entropy(
        h, e, targets, weights, softcap=softcap,
        implementation=implementation, interpret=True,
        block_sizes=block_sizes)

  def reference(h, e):
    return _reference_sums(h, e, targets, weights, softcap)

  (value, weight_sum), grads = jax.jit(jax.value_and_grad(
      fused, argnums=wrt, has_aux=True))(hidden, embedding)
  (expected, expected_weight_sum), expected_grads = jax.jit(
      jax.value_and_grad(reference, argnums=wrt, has_aux=True))(
          hidden, embedding)
  dtype = hidden.dtype
  testing.assert_close(value, expected, dtype=dtype, online_softmax=True,
                       name="loss sum")
  testing.assert_close(weight_sum, expected_weight_sum, name="weight sum")
  for argnum, grad, expected_grad in zip(wrt, grads, expected_grads):
    assert grad.dtype == dtype
    testing.assert_close(grad, expected_grad, dtype=dtype, grad=True,
                         online_softmax=True,
                         name=("d hidden", "d embedding")[argnum])


@given(implementation=st.sampled_from(["xla", "pallas_tpu"]),
       block=st.integers(0, 1),
       batch=st.sampled_from([1, 2, 3]), seq=st.sampled_from([1, 5, 17]),
       dim=st.sampled_from([8, 32]), vocab=st.sampled_from([5, 130, 300]),
       softcap=st.sampled_from([None, 30.0, 2.0]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       boolean=st.booleans(), embedding_grad=st.booleans(),
       seed=st.integers(0, 2**16))
def test_matches_reference(implementation, block, batch, seq, dim, vocab,
                           softcap, dtype, boolean, embedding_grad, seed):
  blocks = BLOCKS[implementation]
  args = _problem(seed, batch=batch, seq=seq, dim=dim, vocab=vocab,
                  dtype=dtype, boolean=boolean)
  _check_against_reference(
      args, softcap=softcap, implementation=implementation,
      block_sizes=blocks[block % len(blocks)],
      wrt=(0, 1) if embedding_grad else (0,))


@pytest.mark.parametrize("implementation", ["xla", "pallas_tpu"])
def test_saturating_softcap(implementation):
  # |logits| ~ 1000 >> c = 30: tanh saturates, softmax is nearly one-hot.
  args = _problem(1, batch=2, seq=9, dim=32, vocab=300, scale=200.0)
  _check_against_reference(args, softcap=30.0, implementation=implementation,
                           block_sizes=BLOCKS[implementation][0], wrt=(0, 1))


@pytest.mark.parametrize("implementation", ["xla", "pallas_tpu"])
def test_all_zero_weights_give_zero_loss_and_gradients(implementation):
  hidden, embedding, targets, _ = _problem(2, batch=2, seq=5, dim=8,
                                           vocab=130)
  weights = jnp.zeros(targets.shape, bool)

  def loss(h, e):
    loss_sum, weight_sum = ops.softcapped_cross_entropy(
        h, e, targets, weights, implementation=implementation,
        interpret=True, block_sizes=BLOCKS[implementation][0])
    return loss_sum / (weight_sum + loss_reference.NORMALIZER_EPS)

  value, (d_hidden, d_embedding) = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1)))(hidden, embedding)
  assert float(value) == 0.0
  for grad in (d_hidden, d_embedding):
    assert np.all(np.asarray(grad) == 0.0)


def _count_passes(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


def test_embedding_gradient_only_when_differentiated():
  hidden, embedding, targets, weights = _problem(3, batch=1, seq=4, dim=8,
                                                 vocab=40)

  def loss(h, e):
    return ops.softcapped_cross_entropy(h, e, targets, weights,
                                        implementation="pallas_tpu",
                                        interpret=True)[0]

  assert _count_passes(loss, hidden, embedding) == 1
  assert _count_passes(jax.grad(loss), hidden, embedding) == 2
  assert _count_passes(jax.grad(loss, argnums=(0, 1)), hidden, embedding) == 3
  assert _count_passes(jax.grad(loss, argnums=1), hidden, embedding) == 2


def test_weights_gradient_is_the_nll():
  hidden, embedding, targets, weights = _problem(4, batch=2, seq=3, dim=8,
                                                 vocab=20)

  def loss(w):
    loss_sum, weight_sum = ops.softcapped_cross_entropy(
        hidden, embedding, targets, w, implementation="xla")
    return loss_sum + 2.0 * weight_sum

  expected = loss_reference.token_nll(hidden, embedding, targets) + 2.0
  testing.assert_close(jax.jit(jax.grad(loss))(weights), expected, grad=True,
                       online_softmax=True, name="d weights")


def test_out_of_range_targets():
  hidden, embedding, targets, weights = _problem(5, batch=2, seq=3, dim=8,
                                                 vocab=20)
  bad = targets.at[1, 2].set(20)
  with pytest.raises(ValueError, match=r"\[0, 20\), got 20 at \(1, 2\)"):
    ops.softcapped_cross_entropy(hidden, embedding, bad, weights)
  with pytest.raises(ValueError, match=r"got -1 at \(0, 0\)"):
    ops.softcapped_cross_entropy(hidden, embedding, targets.at[0, 0].set(-1),
                                 weights)
  # Under jit nothing can be checked: like Tunix's one-hot, nll 0, no grad.
  for implementation in ("xla", "pallas_tpu"):
    fn = jax.jit(jax.value_and_grad(
        lambda h, t: ops.softcapped_cross_entropy(
            h, embedding, t, weights, implementation=implementation,
            interpret=True)[0]))
    value, grad = fn(hidden, bad)
    expected, expected_grad = jax.jit(jax.value_and_grad(
        lambda h: _reference_sums(h, embedding, bad, weights, 30.0)[0]))(
            hidden)
    testing.assert_close(value, expected, online_softmax=True, name="loss")
    testing.assert_close(grad, expected_grad, grad=True, online_softmax=True,
                         name="d hidden")
    assert np.all(np.asarray(grad[1, 2]) == 0.0)


def _args(**change):
  args = dict(hidden=jnp.ones((2, 5, 8)), embedding=jnp.ones((11, 8)),
              targets=jnp.zeros((2, 5), jnp.int32),
              weights=jnp.ones((2, 5), bool))
  return {**args, **change}


@pytest.mark.parametrize("change, error, match", [
    (dict(hidden=jnp.ones((10, 8))), ValueError, r"hidden must be \[B, T, D\]"),
    (dict(embedding=jnp.ones((11, 8, 1))), ValueError,
     r"embedding must be \[V, D\]"),
    (dict(embedding=jnp.ones((11, 9))), ValueError, "need the same D"),
    (dict(embedding=jnp.ones((11, 8), jnp.bfloat16)), TypeError,
     "share a dtype"),
    (dict(hidden=jnp.ones((2, 5, 8), jnp.int32)), TypeError,
     "hidden must be floating"),
    (dict(targets=jnp.zeros((2, 4), jnp.int32)), ValueError,
     r"targets must have shape \[B, T\] = \(2, 5\), got \(2, 4\)"),
    (dict(targets=jnp.zeros((2, 5))), TypeError, "targets must be integer"),
    (dict(weights=jnp.ones((5, 2))), ValueError, "weights must have shape"),
    (dict(weights=jnp.ones((2, 5), jnp.int32)), TypeError,
     "weights must be boolean or floating"),
    (dict(softcap=-1.0), ValueError, "softcap must be a positive"),
    (dict(block_sizes=pallas_tpu.BlockSizes()), TypeError,
     "block_sizes must be a"),
])
def test_bad_inputs_raise(change, error, match):
  with pytest.raises(error, match=match):
    ops.softcapped_cross_entropy(**_args(**change), implementation="xla")


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="block_vocab must be a positive "
                     "multiple of 128"):
    pallas_tpu.BlockSizes(block_vocab=100)
  with pytest.raises(ValueError, match="block_tokens must be a positive"):
    xla.BlockSizes(block_tokens=0)


def test_selection():
  assert ops.AVAILABLE["softcapped_cross_entropy"] == (
      "pallas_tpu", "xla", "reference")
  with pytest.raises(RuntimeError, match="softcapped_cross_entropy: "
                     "implementation 'pallas_tpu' can only be lowered for TPU"):
    ops.softcapped_cross_entropy(**_args(), implementation="pallas_tpu")
  assert implementations.resolve(
      "softcapped_cross_entropy", None,
      ops.AVAILABLE["softcapped_cross_entropy"]) == (
          implementations.BY_PLATFORM)
  args = _problem(6, batch=2, seq=4, dim=8, vocab=50)
  reference = ops.softcapped_cross_entropy(*args, implementation="reference")
  for got, want in zip(reference, _reference_sums(*args, 30.0)):
    testing.assert_close(got, want, name="reference sums")
