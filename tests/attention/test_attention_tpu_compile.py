"""`ops.attention` and its Pallas kernels compiled and lowered for TPU on
this CPU host.

Compiled for abstract TPU chips, through XLA:TPU and Mosaic (needs libtpu):
with `implementation=None` and the program lowered for TPU, the op must pick
its Pallas kernels (forward, dq, dk/dv), Mosaic must accept them (tiling,
VMEM), and the per-chip HBM temporaries of forward + backward must stay at
most those of the stock formulation (Tunix's: full `[B, N, T, S]` logits and
probabilities) and of our XLA version compiled the same way, the latter with
a stated slack (see `_kernel_layout_slack`). Shapes are Gemma 4's as the
Tunix patch calls the op: bf16, scale 1.0, causal with a `[B, 1, 1, S]` key
mask (the `mask` patch's compact causal mask); `test_dense_mask_*` passes
the `[B, T, S]` mask the patch builds without it.

Exported with `jax.export` (the tests from `LOWERING_CONFIGS` on; no
libtpu needed): the kernels lower to Mosaic at real Gemma 4 shapes, forward
and backward, bf16. This catches block-shape and lowering errors; it proves
neither speed nor that the tiles fit VMEM on a v5e.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.kernels.attention import pallas_tpu
from gemma4_jax.patches import tpu_compiler

needs_libtpu = pytest.mark.skipif(testing.libtpu_missing() is not None,
                                  reason=str(testing.libtpu_missing()))

MiB = 2**20

# (name, on the v5e:2x2 mesh, batch per fsdp shard, T, N, K, head_dim,
# sliding_window). Each case compiles three programs (about 10-30 s on 2
# cores), so the mesh takes the E2B cases and one chip the rest.
COMPILE_CONFIGS = [
    ("e2b_local_T1000", False, 1, 1000, 8, 1, 256, 512),
    ("e2b_global_T4096", False, 1, 4096, 8, 1, 512, None),
    ("e4b_global_T2048", False, 1, 2048, 8, 2, 512, None),
    ("31b_local_T2048", False, 1, 2048, 32, 16, 256, 1024),
    ("e2b_local_T4096_mesh", True, 1, 4096, 8, 1, 256, 512),
    ("e2b_global_T1000_mesh", True, 1, 1000, 8, 1, 512, None),
]


def _step(implementation, window, *, dense=False):
  """Forward + backward of the attention the Tunix patch runs: causal with
  a key mask, or (`dense`) Tunix's `[B, T, S]` causal padding mask."""
  def loss(q, k, v, valid):
    if dense:
      t = q.shape[1]
      mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    else:
      mask = valid[:, None, None, :]
    out = ops.attention(q, k, v, mask=mask, causal=not dense,
                        sliding_window=window, scale=1.0,
                        implementation=implementation)
    return jnp.sum(out.astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def _stock_step(window):
  """Tunix 0.1.7's attention: the whole logits tensor, softmax, masked."""
  attention = testing.stock_attention(window)
  def loss(q, k, v, valid):
    return jnp.sum(attention(q, k, v, valid).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def _inputs(batch, q_len, num_heads, num_kv_heads, head_dim, mesh):
  spec = P("fsdp") if mesh is not None else None
  q = testing.tpu_struct((batch, q_len, num_heads, head_dim), jnp.bfloat16,
                         spec, mesh=mesh)
  kv = testing.tpu_struct((batch, q_len, num_kv_heads, head_dim),
                          jnp.bfloat16, spec, mesh=mesh)
  valid = testing.tpu_struct((batch, q_len), jnp.bool_, spec, mesh=mesh)
  return q, kv, kv, valid


def _kernel_layout_slack(batch, q_len, num_heads, head_dim, mesh):
  """Bytes the kernels' layouts may add over the XLA version, per chip.

  The kernels read q (and d_out) as `[B, K, G, T, H]`, which XLA copies from
  Tunix's `[B, T, N, H]`, where the XLA version works on `[B, T, N, H]`
  directly: one copy of q, plus the lane-major float32 per-row statistics
  (logsumexp, `rowsum(dO * O)`), whose G axis is padded to 8 sublanes.
  """
  shards = 1 if mesh is None else mesh.shape["fsdp"] * mesh.shape["tp"]
  rows = batch * q_len * num_heads
  return (rows * head_dim * 2 + 2 * 8 * rows * 4) // shards


@needs_libtpu
@pytest.mark.parametrize("name, on_mesh, batch, q_len, num_heads, "
                         "num_kv_heads, head_dim, window", COMPILE_CONFIGS,
                         ids=[c[0] for c in COMPILE_CONFIGS])
def test_default_compiles_with_kernels_and_no_more_hbm(
    name, on_mesh, batch, q_len, num_heads, num_kv_heads, head_dim, window):
  del name
  mesh = testing.tpu_mesh() if on_mesh else None
  if on_mesh:
    batch *= mesh.shape["fsdp"]
  args = _inputs(batch, q_len, num_heads, num_kv_heads, head_dim, mesh)
  pallas = testing.compile_for_tpu(_step(None, window), *args, mesh=mesh)
  assert testing.mosaic_kernels(pallas) == 3  # fwd, dq, dk/dv
  xla = testing.compile_for_tpu(_step("xla", window), *args, mesh=mesh)
  assert testing.mosaic_kernels(xla) == 0
  stock = testing.compile_for_tpu(_stock_step(window), *args, mesh=mesh)
  used = testing.temp_bytes(pallas)
  assert used <= testing.temp_bytes(stock), (used / MiB,
                                             testing.temp_bytes(stock) / MiB)
  slack = _kernel_layout_slack(batch, q_len, num_heads, head_dim, mesh)
  assert used <= testing.temp_bytes(xla) + slack, (
      used / MiB, testing.temp_bytes(xla) / MiB, slack / MiB)


@needs_libtpu
def test_dense_mask_compiles_with_kernels_and_no_more_hbm():
  # Without the mask patch (or for masks it does not recognize) the Tunix
  # patch passes a [B, T, S] mask; the kernels read it as int8 tiles, a
  # copy the size of the boolean mask that XLA reads in place.
  batch, q_len, num_heads, head_dim, window = 1, 4096, 8, 256, 512
  args = _inputs(batch, q_len, num_heads, 1, head_dim, None)
  pallas = testing.compile_for_tpu(_step(None, window, dense=True), *args)
  assert testing.mosaic_kernels(pallas) == 3
  xla = testing.compile_for_tpu(_step("xla", window, dense=True), *args)
  used = testing.temp_bytes(pallas)
  slack = (_kernel_layout_slack(batch, q_len, num_heads, head_dim, None)
           + batch * q_len * q_len)
  assert used <= testing.temp_bytes(xla) + slack, (
      used / MiB, testing.temp_bytes(xla) / MiB, slack / MiB)


@needs_libtpu
def test_decode_and_v6e_compile():
  # One query against an 8192-entry cache (the patched sampler's decode
  # step), on a v6e chip.
  v6e = testing.tpu_devices("v6e:2x2")[0]
  sharding = jax.sharding.SingleDeviceSharding(v6e)
  q = jax.ShapeDtypeStruct((2, 1, 8, 256), jnp.bfloat16, sharding=sharding)
  kv = jax.ShapeDtypeStruct((2, 8192, 1, 256), jnp.bfloat16,
                            sharding=sharding)
  mask = jax.ShapeDtypeStruct((2, 1, 8192), jnp.bool_, sharding=sharding)
  compiled = testing.compile_for_tpu(
      lambda q, k, v, m: ops.attention(q, k, v, mask=m, sliding_window=512,
                                       scale=1.0), q, kv, kv, mask)
  assert testing.mosaic_kernels(compiled) == 1


@needs_libtpu
def test_identical_layers_share_the_kernels_code():
  # Four E2B sliding layers (projections around the op), forward and
  # backward, with the deduplicated calls `patches.apply()` turns on: the
  # kernels' layers are compiled once, as the XLA versions' are. (Without
  # the option XLA:TPU keeps four copies here: 23.5 against 8.0 MB.)
  model_dim, num_heads, head_dim = 1536, 8, 256

  def loss(weights, x, valid):
    b, t, _ = x.shape
    for w_q, w_kv, w_out in weights:
      q = (x @ w_q).reshape(b, t, num_heads, head_dim)
      k, v = jnp.split((x @ w_kv).reshape(b, t, 2, head_dim), 2, axis=2)
      out = ops.attention(q, k, v, mask=valid[:, None, None, :],
                          causal=True, sliding_window=512, scale=1.0)
      x = x + out.reshape(b, t, num_heads * head_dim) @ w_out
    return jnp.sum(x.astype(jnp.float32))

  def code_bytes(num_layers):
    def weight(*shape):
      return testing.tpu_struct(shape, jnp.bfloat16)
    weights = [(weight(model_dim, num_heads * head_dim),
                weight(model_dim, 2 * head_dim),
                weight(num_heads * head_dim, model_dim))
               for _ in range(num_layers)]
    lowered = jax.jit(jax.grad(loss)).lower(
        weights, weight(1, 1024, model_dim),
        testing.tpu_struct((1, 1024), jnp.bool_))
    compiled = testing.compile_optimized(
        lowered, {tpu_compiler.FLAG: True})
    assert testing.mosaic_kernels(compiled) >= 3
    return compiled.memory_analysis().generated_code_size_in_bytes

  one, four = code_bytes(1), code_bytes(4)
  assert four < 2 * one, (one / MiB, four / MiB)


# (name, T, N, K, head_dim, sliding_window); scale 1.0 as Gemma 4 uses.
LOWERING_CONFIGS = [
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
                         "window", LOWERING_CONFIGS,
                         ids=[c[0] for c in LOWERING_CONFIGS])
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


def _with_key_mask(q_len, kv_len):
  """bf16 E2B local-layer q, k/v and a `[B,1,S]` key mask (Tunix's padding
  form), and the kernels' entry with the layer's window."""
  def attention(q, k, v, mask):
    return pallas_tpu.attention(q, k, v, mask=mask, sliding_window=512,
                                scale=1.0)
  return attention, (jax.ShapeDtypeStruct((2, q_len, 8, 256), jnp.bfloat16),
                     jax.ShapeDtypeStruct((2, kv_len, 1, 256), jnp.bfloat16),
                     jax.ShapeDtypeStruct((2, 1, kv_len), jnp.bool_))


def test_key_mask_lowers():
  # A [B,1,S] key mask (Tunix's padding form) is read as (1, block_kv) tiles.
  attention, (q, kv, mask) = _with_key_mask(4096, 4096)
  backward = testing.lower_for_tpu(
      jax.grad(_loss(attention), argnums=(0, 1, 2)), q, kv, kv, mask)
  assert len(_kernel_names(backward)) == 3


def test_decode_lowers():
  # One query against an 8192-entry cache with a [B,1,S] validity mask.
  attention, (q, kv, mask) = _with_key_mask(1, 8192)
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
