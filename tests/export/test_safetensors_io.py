"""Header parsing, positioned reads, shard plans and OS-kernel copies against
the reference `safetensors` library."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, strategies as st

from gemma4_jax.export import safetensors_io

_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int32]


def _tensors(seed, count, dtype):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    shape = tuple(int(d) for d in rng.integers(1, 9, size=rng.integers(1, 4)))
    out.append((f"t{i}.weight", rng.standard_normal(shape).astype(dtype)))
  return out


@given(seed=st.integers(0, 2**16), count=st.integers(1, 6),
       dtype=st.sampled_from(_DTYPES))
def test_written_file_reads_back_with_safetensors(tmp_path_factory, seed,
                                                  count, dtype):
  path = str(tmp_path_factory.mktemp("st") / "x.safetensors")
  tensors = _tensors(seed, count, dtype)
  safetensors_io.write_safetensors(path, tensors, {"format": "pt"})
  parsed = safetensors_io.SafetensorsFile(path)
  assert parsed.metadata == {"format": "pt"}
  for name, array in tensors:
    got = safetensors_io.read_tensor(parsed.tensors[name])
    assert got.dtype == array.dtype and got.shape == array.shape
    assert got.tobytes() == array.tobytes()
    rows = slice(array.shape[0] // 2, array.shape[0])
    assert safetensors_io.read_tensor(parsed.tensors[name], rows).tobytes() \
        == array[rows].tobytes()
  if dtype != ml_dtypes.bfloat16:  # safetensors.numpy has no bfloat16
    reference = safetensors.numpy.load_file(path)
    for name, array in tensors:
      np.testing.assert_array_equal(reference[name], array)


def test_copy_range_copies_the_exact_span(tmp_path):
  src = tmp_path / "src"
  data = np.random.default_rng(0).integers(0, 256, 3 << 20, np.uint8)
  src.write_bytes(data.tobytes())
  dst = tmp_path / "dst"
  seen = []
  with open(src, "rb") as fs, open(dst, "wb") as fd:
    fd.write(b"head")
    fd.flush()
    safetensors_io.copy_range(fs.fileno(), 12345, fd.fileno(), 2 << 20,
                              on_progress=seen.append)
  assert dst.read_bytes() == b"head" + data[12345:12345 + (2 << 20)].tobytes()
  assert sum(seen) == 2 << 20


@given(sizes=st.lists(st.integers(1, 100), min_size=1, max_size=30),
       shard_size=st.integers(1, 250))
def test_plan_shards_keeps_order_and_limit(sizes, shard_size):
  shards = safetensors_io.plan_shards(sizes, shard_size)
  assert [i for s in shards for i in s] == list(range(len(sizes)))
  for shard in shards:
    total = sum(sizes[i] for i in shard)
    assert total <= shard_size or len(shard) == 1


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1024", 1024),
    ("0.5GB", 5 * 10**8)])
def test_parse_size(text, expected):
  assert safetensors_io.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "GB"])
def test_parse_size_rejects(text):
  with pytest.raises(ValueError, match="shard_size"):
    safetensors_io.parse_size(text)


def test_header_length_beyond_file_is_corrupt(tmp_path):
  path = tmp_path / "bad.safetensors"
  path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
  with pytest.raises(safetensors_io.CorruptFileError, match="header length"):
    safetensors_io.SafetensorsFile(path)


def test_overlapping_tensors_are_corrupt(tmp_path):
  header = (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            b'"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}')
  path = tmp_path / "bad.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
  with pytest.raises(safetensors_io.CorruptFileError, match="overlap"):
    safetensors_io.SafetensorsFile(path)


def test_directory_without_weights(tmp_path):
  with pytest.raises(ValueError, match="0 .safetensors files"):
    safetensors_io.load_checkpoint_index(tmp_path)
  assert not os.listdir(tmp_path)
