"""The loss kernels lower to Mosaic for TPU at Gemma 4 E2B shapes.

4 x 1024 tokens, D = 1536, V = 262144, bf16, as `jax.ShapeDtypeStruct`s (no
memory). This catches block-shape and Mosaic lowering errors; it proves
neither speed nor that the blocks fit VMEM.
"""

import jax
import jax.numpy as jnp
import pytest

from gemma4_jax import testing
from gemma4_jax.kernels.loss import fused
from gemma4_jax.kernels.loss import pallas_tpu

E2B = dict(batch=4, seq=1024, dim=1536, vocab=262144)


def _args(dtype):
  s = jax.ShapeDtypeStruct
  return (s((E2B["batch"], E2B["seq"], E2B["dim"]), dtype),
          s((E2B["vocab"], E2B["dim"]), dtype),
          s((E2B["batch"], E2B["seq"]), jnp.int32),
          s((E2B["batch"], E2B["seq"]), jnp.float32))


def _loss(hidden, embedding, targets, weights):
  passes = pallas_tpu.passes(pallas_tpu.BlockSizes.get_default())
  return fused.loss_sums(hidden, embedding, targets, weights, softcap=30.0,
                         passes=passes)[0]


def _kernels(exported):
  return exported.mlir_module().count("tpu_custom_call")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower_for_tpu(dtype):
  args = _args(dtype)
  assert _kernels(testing.lower_for_tpu(_loss, *args)) == 1
  # LoRA training: the hidden gradient only (forward + one backward kernel).
  hidden_grad = lambda h, e, t, w: jax.grad(_loss)(h, e, t, w)
  assert _kernels(testing.lower_for_tpu(hidden_grad, *args)) == 2
  both = lambda h, e, t, w: jax.grad(_loss, argnums=(0, 1))(h, e, t, w)
  assert _kernels(testing.lower_for_tpu(both, *args)) == 3
