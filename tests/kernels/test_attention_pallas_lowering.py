"""The Pallas attention kernels lower to Mosaic at real Gemma 4 shapes.

Forward and backward (`jax.grad`), bf16, exported for TPU on this CPU
machine. This catches block-shape and lowering errors; it proves neither
speed nor that the tiles fit VMEM on a v5e.
"""

import jax
import jax.numpy as jnp
import pytest

from gemma4_jax import testing
from gemma4_jax.kernels.attention import pallas_tpu

# (name, T, N, K, head_dim, sliding_window); scale 1.0 as Gemma 4 uses.
CONFIGS = [
    *[(f"e2b_local_T{t}", t, 8, 1, 256, 512) for t in (1000, 1024, 4096, 8192)],
    *[(f"e2b_global_T{t}", t, 8, 1, 512, None)
      for t in (1000, 1024, 4096, 8192)],
    ("e4b_local", 4096, 8, 2, 256, 512),
    ("e4b_global", 4096, 8, 2, 512, None),
    ("31b_local", 4096, 32, 16, 256, 1024),
    ("31b_global", 4096, 32, 4, 512, None),
]


def _kernel_names(exported):
  text = exported.mlir_module()
  return {name for name in ("gemma4_flash_attention_fwd",
                            "gemma4_flash_attention_dq",
                            "gemma4_flash_attention_dkv")
          if f'kernel_name = "{name}"' in text}


def _loss(attention):
  return lambda q, k, v, *rest: jnp.sum(
      attention(q, k, v, *rest).astype(jnp.float32))


@pytest.mark.parametrize("name, q_len, num_heads, num_kv_heads, head_dim, "
                         "window", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_static_masks_lower_forward_and_backward(name, q_len, num_heads,
                                                 num_kv_heads, head_dim,
                                                 window):
  del name
  q = jax.ShapeDtypeStruct((1, q_len, num_heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, q_len, num_kv_heads, head_dim), jnp.bfloat16)

  def attention(q, k, v):
    return pallas_tpu.attention(q, k, v, sliding_window=window, scale=1.0)
  forward = testing.lower_for_tpu(attention, q, kv, kv)
  assert _kernel_names(forward) == {"gemma4_flash_attention_fwd"}
  backward = testing.lower_for_tpu(
      jax.grad(_loss(attention), argnums=(0, 1, 2)), q, kv, kv)
  assert _kernel_names(backward) == {"gemma4_flash_attention_fwd",
                                     "gemma4_flash_attention_dq",
                                     "gemma4_flash_attention_dkv"}


@pytest.mark.parametrize("q_len, head_dim, window", [
    (1000, 256, 512), (8192, 256, 512), (1000, 512, None)])
def test_dynamic_mask_lowers_as_the_tunix_patch_calls_it(q_len, head_dim,
                                                         window):
  # Tunix's patch: causal=False, causality and padding in a [B,T,S] mask.
  q = jax.ShapeDtypeStruct((2, q_len, 8, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, q_len, 1, head_dim), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((2, q_len, q_len), jnp.bool_)

  def attention(q, k, v, mask):
    return pallas_tpu.attention(q, k, v, mask=mask, causal=False,
                                sliding_window=window, softcap=50.0,
                                scale=1.0)
  backward = testing.lower_for_tpu(
      jax.grad(_loss(attention), argnums=(0, 1, 2)), q, kv, kv, mask)
  assert len(_kernel_names(backward)) == 3


def test_key_mask_lowers():
  # A [B,1,S] key mask (Tunix's padding form) is read as (1, block_kv) tiles.
  q = jax.ShapeDtypeStruct((2, 4096, 8, 256), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 4096, 1, 256), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((2, 1, 4096), jnp.bool_)

  def attention(q, k, v, mask):
    return pallas_tpu.attention(q, k, v, mask=mask, sliding_window=512,
                                scale=1.0)
  backward = testing.lower_for_tpu(
      jax.grad(_loss(attention), argnums=(0, 1, 2)), q, kv, kv, mask)
  assert len(_kernel_names(backward)) == 3


def test_decode_lowers():
  # One query against an 8192-entry cache with a [B,1,S] validity mask.
  q = jax.ShapeDtypeStruct((2, 1, 8, 256), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 8192, 1, 256), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((2, 1, 8192), jnp.bool_)

  def attention(q, k, v, mask):
    return pallas_tpu.attention(q, k, v, mask=mask, sliding_window=512,
                                scale=1.0)
  exported = testing.lower_for_tpu(attention, q, kv, kv, mask)
  assert _kernel_names(exported) == {"gemma4_flash_attention_fwd"}


def test_segment_ids_lower():
  q = jax.ShapeDtypeStruct((1, 4096, 8, 256), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 4096, 1, 256), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32)

  def attention(q, k, v, ids):
    return pallas_tpu.attention(q, k, v, segment_ids=ids, scale=1.0)
  backward = testing.lower_for_tpu(
      jax.grad(_loss(attention), argnums=(0, 1, 2)), q, kv, kv, ids)
  assert len(_kernel_names(backward)) == 3


def test_tpu_benchmark_script_exports(capsys):
  # benchmarks/tpu_attention.py runs on a v5litepod; here its shape set-up
  # and both kernels (ours and splash) must at least export for TPU.
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = (pathlib.Path(__file__).parents[2] / "benchmarks" /
          "tpu_attention.py")
  spec = importlib.util.spec_from_file_location("tpu_attention", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.main(["--dry-run", "--seq-lens", "1024"]) == 0
  assert capsys.readouterr().out.count("exported") == 8


def test_float32_lowers():
  # float32 matmuls ask Mosaic for full precision.
  q = jax.ShapeDtypeStruct((1, 1000, 8, 256), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, 1000, 1, 256), jnp.float32)

  def attention(q, k, v):
    return pallas_tpu.attention(q, k, v, sliding_window=512, softcap=30.0)
  backward = testing.lower_for_tpu(
      jax.grad(_loss(attention), argnums=(0, 1, 2)), q, kv, kv)
  assert len(_kernel_names(backward)) == 3
