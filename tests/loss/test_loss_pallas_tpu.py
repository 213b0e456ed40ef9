"""The Pallas fused loss (interpret mode) against the float32 reference
(`loss_cases`); its block sizes and its kernel count."""

import jax
import loss_cases
import pytest

from gemma4_jax import ops
from gemma4_jax.kernels.loss import pallas_tpu


class TestLossPallasTpu(loss_cases.LossCases):
  IMPLEMENTATION = "pallas_tpu"
  BLOCKS = (pallas_tpu.BlockSizes(16, 128),)


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="block_vocab must be a positive "
                     "multiple of 128"):
    pallas_tpu.BlockSizes(block_vocab=100)


def _count_passes(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


def test_embedding_gradient_only_when_differentiated():
  hidden, embedding, targets, weights = loss_cases.problem(
      3, batch=1, seq=4, dim=8, vocab=40)

  def loss(h, e):
    return ops.softcapped_cross_entropy(h, e, targets, weights,
                                        implementation="pallas_tpu",
                                        interpret=True)[0]

  assert _count_passes(loss, hidden, embedding) == 1
  assert _count_passes(jax.grad(loss), hidden, embedding) == 2
  assert _count_passes(jax.grad(loss, argnums=(0, 1)), hidden, embedding) == 3
  assert _count_passes(jax.grad(loss, argnums=1), hidden, embedding) == 2
