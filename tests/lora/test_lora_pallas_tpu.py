"""The fused Pallas LoRA matmul (interpret mode) against the float32
reference (`lora_cases`), and its tiling and cost model.

Small tiles (128) make small shapes span several blocks, so the
multi-block, padding and partial-row paths all run.
"""

import jax.numpy as jnp
import lora_cases
import numpy as np
import pytest

from gemma4_jax.kernels.lora import pallas_tpu

SMALL_TILES = pallas_tpu.BlockSizes(tm=128, tk=128, tn=128)


def _pallas(*args, **kwargs):
  return pallas_tpu.lora_matmul(*args, **kwargs, block_sizes=SMALL_TILES,
                                interpret=True)


class TestLoraPallasTpu(lora_cases.LoraMatmulCases):
  lora_matmul = staticmethod(_pallas)


def test_two_runs_are_bit_identical():
  x, w, a, b, ids, _ = lora_cases.inputs(130, 200, 200, 16, 3, jnp.bfloat16,
                                         2)
  scale = lora_cases.SCALE
  first = _pallas(x, w, a, b, scale=scale, adapter_ids=ids)
  np.testing.assert_array_equal(
      first, _pallas(x, w, a, b, scale=scale, adapter_ids=ids))


def test_tiles():
  assert pallas_tpu.pick_tile((1536,), 512) == 512
  assert pallas_tpu.pick_tile((8960,), 1024) == 896
  assert pallas_tpu.pick_tile((256, 2048), 1024) == 256  # q heads: H, N*H
  assert pallas_tpu.pick_tile((100,), 512) == 100      # whole axis
  assert pallas_tpu.pick_tile((32, 128), 512) is None  # no 128-lane tile
  assert pallas_tpu.pick_tile((700,), 512) is None     # padded by the wrapper
  with pytest.raises(ValueError, match="multiple of 128"):
    pallas_tpu.BlockSizes(tm=100)


def test_cost_estimate_counts_the_low_rank_work_once_per_row_block():
  cost = pallas_tpu.cost_estimate(
      m=4096, kc=1536, no=6144, r_pad=128, tm=512, tn=1024,
      x_dtype=jnp.bfloat16, w_dtype=jnp.bfloat16, lora_dtype=jnp.bfloat16,
      save_down=False)
  assert cost.flops == 2 * 4096 * (1536 * 6144 + 1536 * 128 + 128 * 6144)
  assert cost.bytes_accessed == (4096 * 1536 * 2 * 6 + 1536 * 6144 * 2 * 8
                                 + (1536 + 6144) * 128 * 2 * 8
                                 + 4096 * 6144 * 2)
