"""The XLA fused loss against the float32 reference (`loss_cases`)."""

import loss_cases
import pytest

from gemma4_jax.kernels.loss import xla


class TestLossXla(loss_cases.LossCases):
  IMPLEMENTATION = "xla"
  BLOCKS = (xla.BlockSizes(3, 16), xla.BlockSizes(8, 64))


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="block_tokens must be a positive"):
    xla.BlockSizes(block_tokens=0)
