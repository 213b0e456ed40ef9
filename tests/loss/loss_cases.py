"""The fused loss's cases, shared by every implementation's tests.

One Hypothesis strategy (`CASES`) and input builder (`problem`), and the
tests every implementation of `ops.softcapped_cross_entropy` passes against
the float32 reference (`LossCases`): values and gradients with respect to
hidden and, when it is differentiated, the embedding; shapes that are not
multiples of the blocks, saturating softcaps, all-zero weights, out-of-range
targets under `jit`, bf16/f32. Each implementation's test module subclasses
`LossCases`, naming the implementation and its small block sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st

from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.reference import loss as loss_reference

CASES = st.fixed_dictionaries(dict(
    block=st.integers(0, 1),
    batch=st.sampled_from([1, 2, 3]), seq=st.sampled_from([1, 5, 17]),
    dim=st.sampled_from([8, 32]), vocab=st.sampled_from([5, 130, 300]),
    softcap=st.sampled_from([None, 30.0, 2.0]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    boolean=st.booleans(), embedding_grad=st.booleans(),
    seed=st.integers(0, 2**16)))


def problem(seed, *, batch, seq, dim, vocab, dtype=jnp.float32, scale=2.0,
            boolean=False):
  """`hidden, embedding, targets, weights` (weights boolean or in [0, 1))."""
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(scale * rng.standard_normal((batch, seq, dim)), dtype)
  embedding = jnp.asarray(rng.standard_normal((vocab, dim)), dtype)
  targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
  weights = rng.random((batch, seq))
  weights = jnp.asarray(weights < 0.7 if boolean else weights)
  return hidden, embedding, targets, weights


def small_args(**change):
  """Keyword arguments of a tiny valid call, with `change` applied (for the
  tests of bad inputs)."""
  args = dict(hidden=jnp.ones((2, 5, 8)), embedding=jnp.ones((11, 8)),
              targets=jnp.zeros((2, 5), jnp.int32),
              weights=jnp.ones((2, 5), bool))
  return {**args, **change}


def reference_sums(hidden, embedding, targets, weights, softcap):
  """`(sum(weights * nll), sum(weights))` of the float32 reference."""
  nll = loss_reference.token_nll(hidden, embedding, targets, softcap=softcap)
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * nll), jnp.sum(weights)


class LossCases:
  """The tests every implementation passes; a subclass sets these."""
  IMPLEMENTATION: str  # the op's `implementation=`
  # Small blocks so that a few tokens and a few hundred ids span many tiles.
  BLOCKS: tuple  # one or more of the implementation's `BlockSizes`

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # Hypothesis refuses one test run from several classes (its executors):
    # each subclass gets its own.
    def test_matches_reference(self, case):
      self.check_case(case)
    cls.test_matches_reference = given(case=CASES)(test_matches_reference)

  def loss(self, *args, **kwargs):
    return ops.softcapped_cross_entropy(
        *args, **kwargs, implementation=self.IMPLEMENTATION, interpret=True)

  def check_against_reference(self, args, *, softcap, block_sizes, wrt):
    hidden, embedding, targets, weights = args

    def fused(h, e):
      return self.loss(h, e, targets, weights, softcap=softcap,
                       block_sizes=block_sizes)

    def reference(h, e):
      return reference_sums(h, e, targets, weights, softcap)

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

  def check_case(self, case):
    """One `CASES` example against the reference."""
    args = problem(case["seed"], batch=case["batch"], seq=case["seq"],
                   dim=case["dim"], vocab=case["vocab"], dtype=case["dtype"],
                   boolean=case["boolean"])
    self.check_against_reference(
        args, softcap=case["softcap"],
        block_sizes=self.BLOCKS[case["block"] % len(self.BLOCKS)],
        wrt=(0, 1) if case["embedding_grad"] else (0,))

  def test_saturating_softcap(self):
    # |logits| ~ 1000 >> c = 30: tanh saturates, softmax is nearly one-hot.
    args = problem(1, batch=2, seq=9, dim=32, vocab=300, scale=200.0)
    self.check_against_reference(args, softcap=30.0,
                                 block_sizes=self.BLOCKS[0], wrt=(0, 1))

  def test_all_zero_weights_give_zero_loss_and_gradients(self):
    hidden, embedding, targets, _ = problem(2, batch=2, seq=5, dim=8,
                                            vocab=130)
    weights = jnp.zeros(targets.shape, bool)

    def loss(h, e):
      loss_sum, weight_sum = self.loss(h, e, targets, weights,
                                       block_sizes=self.BLOCKS[0])
      return loss_sum / (weight_sum + loss_reference.NORMALIZER_EPS)

    value, (d_hidden, d_embedding) = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1)))(hidden, embedding)
    assert float(value) == 0.0
    for grad in (d_hidden, d_embedding):
      assert np.all(np.asarray(grad) == 0.0)

  def test_out_of_range_targets_under_jit(self):
    # Under jit nothing can be checked: like Tunix's one-hot, nll 0, no grad.
    hidden, embedding, targets, weights = problem(5, batch=2, seq=3, dim=8,
                                                  vocab=20)
    bad = targets.at[1, 2].set(20)
    fn = jax.jit(jax.value_and_grad(
        lambda h, t: self.loss(h, embedding, t, weights)[0]))
    value, grad = fn(hidden, bad)
    expected, expected_grad = jax.jit(jax.value_and_grad(
        lambda h: reference_sums(h, embedding, bad, weights, 30.0)[0]))(
            hidden)
    testing.assert_close(value, expected, online_softmax=True, name="loss")
    testing.assert_close(grad, expected_grad, grad=True, online_softmax=True,
                         name="d hidden")
    assert np.all(np.asarray(grad[1, 2]) == 0.0)
