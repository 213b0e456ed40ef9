"""The fast row merge (`export.row_merge`) against the plain numpy +
ml_dtypes expression, bit for bit: bfloat16 conversions on every edge case,
the blocked merge on E2B weight shapes, statistics, and non-finite
results."""

from __future__ import annotations

import os
import shutil
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gemma4_jax.export import adapter as adapter_lib
from gemma4_jax.export import hf_writer
from gemma4_jax.export import merging
from gemma4_jax.export import row_merge
from gemma4_jax.export import safetensors_io
from gemma4_jax.export import verify
from tests.export import conftest

BF16 = np.dtype(ml_dtypes.bfloat16)
_F32_EDGES = np.array([
    0x00000000, 0x80000000,  # +-0
    0x00000001, 0x80000001, 0x00007FFF, 0x00008000, 0x00008001,  # subnormal
    0x00018000, 0x007F8000, 0x007FFFFF, 0x00800000,  # ties, min normal
    0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # ties to even, around
    0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF,  # bf16 max, -> inf
    0x7F800000, 0xFF800000,  # +-inf
    0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0x7FFFFFFF,  # nan payloads
    0xFF800001, 0xFFC00001, 0xFFFFFFFF,
], np.uint32)


def _ml_dtypes_bf16(x_f32: np.ndarray) -> np.ndarray:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # nan casts
    return x_f32.astype(BF16).view(np.uint16)


def test_bf16_to_f32_matches_ml_dtypes_on_every_bf16():
  bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
  got = row_merge.bf16_to_f32(bits.view(BF16))
  want = bits.view(BF16).astype(np.float32)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_f32_to_bf16_matches_ml_dtypes_on_every_rounding_case():
  # Every bf16 value times every kind of low half: exact, just above and
  # below the tie, the tie itself (odd and even), all ones, and random.
  high = np.arange(1 << 16, dtype=np.uint32) << 16
  low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234, 0xC0DE],
                 np.uint32)
  grid = (high[:, None] | low[None, :]).reshape(-1)
  random = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20,
                                             dtype=np.uint32)
  for bits in (_F32_EDGES, grid, random):
    x = bits.view(np.float32)
    got = row_merge.f32_to_bf16(x).view(np.uint16)
    want = _ml_dtypes_bf16(x)
    mismatch = np.flatnonzero(got != want)
    assert mismatch.size == 0, (
        f"{mismatch.size} mismatches, first f32 0x{bits[mismatch[0]]:08x}: "
        f"got 0x{got[mismatch[0]]:04x}, ml_dtypes 0x{want[mismatch[0]]:04x}")


def test_f32_to_bf16_keeps_shape_and_rejects_other_dtypes():
  x = np.random.default_rng(1).standard_normal((3, 5, 7)).astype(np.float32)
  got = row_merge.f32_to_bf16(x[:, ::2])  # non-contiguous input
  assert got.dtype == BF16 and got.shape == (3, 3, 7)
  np.testing.assert_array_equal(got.view(np.uint16),
                                _ml_dtypes_bf16(x[:, ::2]))
  with pytest.raises(TypeError, match="x: expected float32, got float64"):
    row_merge.f32_to_bf16(x.astype(np.float64))
  with pytest.raises(TypeError, match="bits: expected bfloat16 or uint16"):
    row_merge.bf16_to_f32(x)


def _reference_merge(weight, lora_b, lora_a, scale):
  """What the merge computed before it was blocked: one GEMM, numpy and
  ml_dtypes casts."""
  merged = weight.astype(np.float32) + np.float32(scale) * (lora_b @ lora_a)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return merged.astype(weight.dtype)


def _inputs(rows, cols, rank, dtype, seed, weight_scale=1.0):
  rng = np.random.default_rng(seed)
  weight = (weight_scale * rng.standard_normal((rows, cols), np.float32)
            ).astype(dtype)
  lora_a = (0.05 * rng.standard_normal((rank, cols))).astype(np.float32)
  lora_b = (0.05 * rng.standard_normal((rows, rank))).astype(np.float32)
  return weight, lora_b, lora_a


# E2B MLP / attention / per-layer shapes (rows cut to keep the test fast),
# a rank that forces column tiles of the GEMM, and degenerate sizes.
_SHAPES = [(300, 1536, 16), (7, 12288, 16), (40, 2048, 16), (600, 256, 16),
           (3, 12288, 64), (37, 100, 3), (1, 1, 1)]


@given(shape=st.sampled_from(_SHAPES),
       dtype=st.sampled_from([BF16, np.dtype(np.float16),
                              np.dtype(np.float32), np.dtype(np.float64)]),
       scale=st.sampled_from([2.0, 0.5, -1.25, 1e-3]),
       seed=st.integers(0, 2**16))
def test_merge_rows_is_bitwise_the_numpy_expression(shape, dtype, scale,
                                                    seed):
  weight, lora_b, lora_a = _inputs(*shape, dtype, seed)
  out = np.empty_like(weight)
  stats = row_merge.merge_rows(weight, lora_b, lora_a, scale, out)
  want = _reference_merge(weight, lora_b, lora_a, scale)
  assert out.tobytes() == want.tobytes()
  before, after = weight.astype(np.float32), want.astype(np.float32)
  assert stats.count == weight.size
  moments = stats.as_dict()
  for key, x in (("before", before), ("after", after)):
    x = x.astype(np.float64)
    # float32 block sums; the report's std comes from E[x^2] - E[x]^2.
    scale2 = np.mean(x * x)
    np.testing.assert_allclose(moments[key]["mean"], x.mean(),
                               atol=1e-6 * np.sqrt(scale2))
    np.testing.assert_allclose(moments[key]["std"]**2, x.var(),
                               atol=1e-5 * scale2)
  assert moments["max_abs_delta"] == np.abs(after - before).max()


def test_merge_rows_on_a_full_e2b_mlp_weight():
  weight, lora_b, lora_a = _inputs(12288, 1536, 16, BF16, seed=3)
  out = np.empty_like(weight)
  row_merge.merge_rows(weight, lora_b, lora_a, 2.0, out)
  assert out.tobytes() == _reference_merge(weight, lora_b, lora_a,
                                           2.0).tobytes()


@pytest.mark.filterwarnings("error")
def test_merge_rows_raises_on_non_finite_and_overflow():
  weight, lora_b, lora_a = _inputs(20, 64, 4, BF16, seed=4)
  out = np.empty_like(weight)
  bad = weight.copy()
  bad[13, 5] = np.nan
  with pytest.raises(row_merge.NonFiniteError, match="non-finite"):
    row_merge.merge_rows(bad, lora_b, lora_a, 1.0, out)
  big = weight.copy()
  big[2, 3] = ml_dtypes.finfo(BF16).max
  lora_b[2], lora_a[:, 3] = 1.0, 1.0  # delta[2, 3] = rank
  # Finite in float32, past the largest bfloat16 after rounding.
  with pytest.raises(row_merge.NonFiniteError, match="overflows bfloat16"):
    row_merge.merge_rows(big, lora_b, lora_a, 2.5e35, out)


@pytest.mark.filterwarnings("error")
def test_merge_rows_large_finite_values_are_not_an_error():
  # The float32 sum of the block overflows; every value is still finite.
  weight = np.full((2, 8), 3e38, np.float32)
  lora_b, lora_a = np.zeros((2, 1), np.float32), np.zeros((1, 8), np.float32)
  out = np.empty_like(weight)
  row_merge.merge_rows(weight, lora_b, lora_a, 1.0, out)
  assert out.tobytes() == weight.tobytes()


def test_merge_rows_validates_arguments():
  weight, lora_b, lora_a = _inputs(4, 6, 2, BF16, seed=5)
  out = np.empty_like(weight)
  with pytest.raises(TypeError, match="weight: expected one of"):
    row_merge.merge_rows(weight.astype(np.int32), lora_b, lora_a, 1.0, out)
  with pytest.raises(ValueError, match=r"lora_a: expected float32\[r, 6\]"):
    row_merge.merge_rows(weight, lora_b, lora_a[:, :5], 1.0, out)
  with pytest.raises(ValueError, match=r"lora_b: expected float32\[4, 2\]"):
    row_merge.merge_rows(weight, lora_b[:3], lora_a, 1.0, out)
  with pytest.raises(ValueError, match="out: expected C-contiguous"):
    row_merge.merge_rows(weight, lora_b, lora_a, 1.0,
                            np.empty((6, 4), BF16).T)


@pytest.mark.slow
def test_merge_with_a_nan_in_the_base_leaves_no_output(tiny_run, tmp_path):
  base = shutil.copytree(tiny_run.base_dir, tmp_path / "base")
  name = hf_writer.PREFIX + "layers.2.mlp.down_proj.weight"
  info = safetensors_io.load_checkpoint_index(base)[name]
  nan = np.array([np.nan], info.numpy_dtype)
  with open(info.path, "r+b") as f:
    f.seek(info.offset + 5 * info.nbytes // info.shape[0])
    f.write(nan.tobytes())
  out = str(tmp_path / "out")
  with pytest.raises(merging.MergeError,
                     match=f"merged {name} .*non-finite values"):
    merging.merge(str(base), tiny_run.checkpoint_root, out,
                  alpha=conftest.ALPHA, progress=False)
  assert not os.path.exists(out)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".out.")]


def test_single_threaded_blas_sets_and_restores_the_thread_count():
  # pylint: disable-next=protected-access
  functions = row_merge._openblas_thread_functions()
  if functions is None:
    pytest.skip("numpy is not linked against OpenBLAS here")
  get_threads, set_threads = functions
  before = get_threads()
  set_threads(2)
  try:
    with row_merge.single_threaded_blas():
      assert get_threads() == 1
    assert get_threads() == 2
  finally:
    set_threads(before)


@pytest.mark.slow
def test_merge_in_many_pieces_on_two_threads_is_bitwise_exact(
    tiny_run, tmp_path, monkeypatch):
  # Tiny pieces and blocks: every tensor spans several pool tasks that write
  # at their own offsets, each task several cache blocks.
  monkeypatch.setattr(verify, "CHUNK_ELEMENTS", 3000)
  monkeypatch.setattr(row_merge, "BLOCK_ELEMENTS", 500)
  base_dir = hf_writer.write_hf_checkpoint(
      tiny_run.base_model, tmp_path / "base_bf16", dtype=ml_dtypes.bfloat16,
      num_shards=2)
  adapter = adapter_lib.load_adapter(tiny_run.checkpoint_root,
                                     alpha=conftest.ALPHA)
  out = str(tmp_path / "merged")
  merging.merge(str(base_dir), adapter, out, shard_size="200KB",
                progress=False)
  base = safetensors_io.load_checkpoint_index(base_dir)
  merged = safetensors_io.load_checkpoint_index(out)
  deltas = {hf_writer.PREFIX + d.target + ".weight": d
            for d in adapter.deltas}
  assert len(deltas) > 10 and merged.keys() == base.keys()
  for name, info in base.items():
    got = safetensors_io.read_tensor(merged[name])
    w = safetensors_io.read_tensor(info)
    if name not in deltas:
      assert got.tobytes() == w.tobytes(), name
      continue
    d = deltas[name]
    chunks = list(verify.row_chunks(*info.shape))
    want = np.concatenate([_reference_merge(w[c], d.lora_b[c], d.lora_a,
                                            d.scale) for c in chunks])
    assert len(chunks) > 1 or w.size <= 3000
    assert got.tobytes() == want.tobytes(), name
