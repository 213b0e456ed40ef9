"""`ops.ple_lookup` / `ops.per_layer_inputs` with the Pallas row gather (in
interpret mode) against the float32 reference (the cases of `ple_cases`),
and the kernel's `BlockSizes`."""

import pytest

import ple_cases
from gemma4_jax.kernels.ple import pallas_tpu


class TestPallasInterpret(ple_cases.ImplementationTests):
  KWARGS = dict(implementation="pallas_tpu", interpret=True)


def test_block_sizes_validate():
  with pytest.raises(ValueError, match="block_tokens"):
    pallas_tpu.BlockSizes(block_tokens=24)
  with pytest.raises(ValueError, match="in_flight"):
    pallas_tpu.BlockSizes(in_flight=0)
