"""`ops.softcapped_cross_entropy`, the public op: its checks (bad inputs,
out-of-range targets, block sizes of another implementation), the gradient
with respect to the weights and the choice of implementation. Each
implementation against the reference: `loss_cases` and its subclasses."""

import jax
import jax.numpy as jnp
import loss_cases
import pytest

from gemma4_jax import implementations
from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.kernels.loss import pallas_tpu
from gemma4_jax.reference import loss as loss_reference


def test_weights_gradient_is_the_nll():
  hidden, embedding, targets, weights = loss_cases.problem(
      4, batch=2, seq=3, dim=8, vocab=20)

  def loss(w):
    loss_sum, weight_sum = ops.softcapped_cross_entropy(
        hidden, embedding, targets, w, implementation="xla")
    return loss_sum + 2.0 * weight_sum

  expected = loss_reference.token_nll(hidden, embedding, targets) + 2.0
  testing.assert_close(jax.jit(jax.grad(loss))(weights), expected, grad=True,
                       online_softmax=True, name="d weights")


def test_out_of_range_targets():
  # Under jit: `loss_cases.LossCases.test_out_of_range_targets_under_jit`.
  hidden, embedding, targets, weights = loss_cases.problem(
      5, batch=2, seq=3, dim=8, vocab=20)
  bad = targets.at[1, 2].set(20)
  with pytest.raises(ValueError, match=r"\[0, 20\), got 20 at \(1, 2\)"):
    ops.softcapped_cross_entropy(hidden, embedding, bad, weights)
  with pytest.raises(ValueError, match=r"got -1 at \(0, 0\)"):
    ops.softcapped_cross_entropy(hidden, embedding, targets.at[0, 0].set(-1),
                                 weights)


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
    ops.softcapped_cross_entropy(**loss_cases.small_args(**change),
                                 implementation="xla")


def test_selection():
  assert ops.AVAILABLE["softcapped_cross_entropy"] == (
      "pallas_tpu", "xla", "reference")
  with pytest.raises(RuntimeError, match="softcapped_cross_entropy: "
                     "implementation 'pallas_tpu' can only be lowered for TPU"):
    ops.softcapped_cross_entropy(**loss_cases.small_args(),
                                 implementation="pallas_tpu")
  assert implementations.resolve(
      "softcapped_cross_entropy", None,
      ops.AVAILABLE["softcapped_cross_entropy"]) == (
          implementations.BY_PLATFORM)
  args = loss_cases.problem(6, batch=2, seq=4, dim=8, vocab=50)
  reference = ops.softcapped_cross_entropy(*args, implementation="reference")
  for got, want in zip(reference, loss_cases.reference_sums(*args, 30.0)):
    testing.assert_close(got, want, name="reference sums")
