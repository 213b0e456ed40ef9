"""Safetensors headers, positioned reads and OS-kernel copies.

Nothing here loads a whole checkpoint: a `SafetensorsFile` holds only the
parsed header, tensors are read with `os.pread` at their header offsets, and
unchanged tensors move from file to file with `os.copy_file_range` (falling
back to `os.sendfile`), so their bytes never become Python objects.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import struct
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np

from gemma4_jax import validation

# safetensors dtype tag -> numpy dtype.
DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
# The format caps the header at 100 MB; a larger length field means garbage.
MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"
# Copies and writes go in pieces of this size so progress and interrupts are
# seen during a multi-GB tensor.
COPY_CHUNK_BYTES = 64 << 20


class CorruptFileError(ValueError):
  """A safetensors file or index that is truncated or malformed."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of a safetensors file: where its bytes are and what they are."""
  name: str
  dtype: str
  shape: tuple[int, ...]
  path: str
  offset: int  # absolute byte offset of the data in `path`
  nbytes: int

  @property
  def numpy_dtype(self) -> np.dtype:
    return DTYPES[self.dtype]


class SafetensorsFile:
  """The validated header of one safetensors file."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise CorruptFileError(
            f"{self.path}: {size} bytes, too short for a safetensors file")
      (header_len,) = struct.unpack("<Q", prefix)
      if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise CorruptFileError(
            f"{self.path}: header length field says {header_len} bytes but "
            f"the file has {size} bytes (truncated or not safetensors)")
      raw = f.read(header_len)
    try:
      header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CorruptFileError(f"{self.path}: header is not valid JSON: {e}")
    if not isinstance(header, dict):
      raise CorruptFileError(f"{self.path}: header is not a JSON object")
    self.metadata = header.pop("__metadata__", None) or {}
    self.data_start = 8 + header_len
    self.tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
      dtype, shape, (begin, end) = _header_entry(self.path, name, entry)
      if dtype not in DTYPES:
        raise CorruptFileError(
            f"{self.path}: tensor {name!r} has unknown dtype {dtype!r}")
      expected = math.prod(shape) * DTYPES[dtype].itemsize
      if end - begin != expected or begin < 0:
        raise CorruptFileError(
            f"{self.path}: tensor {name!r} {dtype}{list(shape)} needs "
            f"{expected} bytes, header gives offsets [{begin}, {end})")
      spans.append((begin, end, name))
      self.tensors[name] = TensorInfo(name, dtype, shape, self.path,
                                      self.data_start + begin, expected)
    data_len = max((end for _, end, _ in spans), default=0)
    if self.data_start + data_len != size:
      raise CorruptFileError(
          f"{self.path}: header describes {self.data_start + data_len} bytes "
          f"but the file has {size} (truncated or corrupt)")
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
      if begin < end:
        raise CorruptFileError(
            f"{self.path}: tensors {a!r} and {b!r} overlap")


def _header_entry(path: str, name: str, entry) -> tuple:
  """`(dtype, shape, (begin, end))` of one header entry, checked strictly:
  `int()` would turn a dimension of 2.7 into 2 or "3" into 3, and a
  negative dimension would be copied into an output header."""
  def bad(why):
    return CorruptFileError(f"{path}: header entry {name!r}: {why}")
  if not isinstance(entry, dict):
    raise bad(f"expected an object, got {type(entry).__name__}")
  missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
  if missing:
    raise bad(f"missing field(s) {missing}")
  dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
  if not isinstance(dtype, str):
    raise bad(f"field 'dtype' must be a string, got {dtype!r}")
  natural = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
  if not isinstance(shape, list) or not all(natural(d) for d in shape):
    raise bad(f"field 'shape' must be a list of non-negative integers, got "
              f"{shape!r}")
  if (not isinstance(offsets, list) or len(offsets) != 2 or
      not all(natural(o) for o in offsets)):
    raise bad(f"field 'data_offsets' must be [begin, end], two non-negative "
              f"integers, got {offsets!r}")
  return dtype, tuple(shape), tuple(offsets)


def read_tensor(info: TensorInfo, rows: slice | None = None) -> np.ndarray:
  """Reads a tensor (or a range of its leading-axis rows) with `os.pread`."""
  shape = info.shape
  start, stop = 0, (shape[0] if shape else 1)
  if rows is not None:
    start, stop, _ = rows.indices(shape[0])
  out = np.empty(((stop - start,) + shape[1:]) if shape else (),
                 info.numpy_dtype)
  fd = os.open(info.path, os.O_RDONLY)
  try:
    read_rows_into(fd, info, start, out)
  finally:
    os.close(fd)
  return out


def read_rows_into(fd: int, info: TensorInfo, start: int,
                   out: np.ndarray) -> None:
  """Fills `out` (C-contiguous, the tensor's dtype) with the tensor's rows
  from `start` on, read from `fd`, an open descriptor of `info.path`."""
  rows = info.shape[0] if info.shape else 1
  if out.dtype != info.numpy_dtype or not out.flags.c_contiguous:
    raise ValueError(f"out: expected a C-contiguous {info.numpy_dtype} "
                     f"array, got {out.dtype}")
  row_bytes = info.nbytes // max(1, rows)
  if out.nbytes % max(1, row_bytes) or not 0 <= start <= rows or \
      start + out.nbytes // max(1, row_bytes) > rows:
    raise ValueError(f"out: {out.nbytes} bytes from row {start} do not fit "
                     f"{info.name!r} {info.dtype}{list(info.shape)}")
  view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
  offset = info.offset + start * row_bytes
  while done < out.nbytes:
    n = os.preadv(fd, [view[done:]], offset + done)
    if n == 0:
      raise CorruptFileError(
          f"{info.path}: unexpected end of file reading {info.name!r}")
    done += n


def load_checkpoint_index(directory: str | os.PathLike) -> dict[str, TensorInfo]:
  """All tensors of a Hugging Face safetensors directory, by name.

  Uses `model.safetensors.index.json` when present (and checks that every file
  holds exactly the tensors the index assigns to it), else the single
  `*.safetensors` file.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise ValueError(f"base: {directory!r} is not a directory")
  index_path = os.path.join(directory, INDEX_NAME)
  if os.path.exists(index_path):
    index = validation.load_json(index_path, lambda e: CorruptFileError(
        f"{index_path}: not valid JSON: {e}"))
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"),
                                                     dict):
      raise CorruptFileError(
          f"{index_path}: not a safetensors index: expected an object with a "
          f"'weight_map' object, got "
          f"{type(index.get('weight_map') if isinstance(index, dict) else index).__name__}")
    weight_map = index["weight_map"]
    by_file: dict[str, set[str]] = {}
    for name, file in weight_map.items():
      # A file name with a separator could point outside the checkpoint.
      if not isinstance(file, str) or not file or os.sep in file or \
          file in (".", ".."):
        raise CorruptFileError(
            f"{index_path}: weight_map[{name!r}] must be a file name in "
            f"{directory}, got {file!r}")
      by_file.setdefault(file, set()).add(name)
    tensors: dict[str, TensorInfo] = {}
    for file, names in sorted(by_file.items()):
      path = os.path.join(directory, file)
      if not os.path.exists(path):
        raise CorruptFileError(f"{index_path} lists {file!r}, which is missing")
      st = SafetensorsFile(path)
      missing = sorted(names - st.tensors.keys())
      if missing:
        raise CorruptFileError(
            f"{path}: missing tensor(s) the index assigns to it: "
            f"{', '.join(missing[:5])}")
      extra = sorted(st.tensors.keys() - names)
      if extra:
        raise CorruptFileError(
            f"{path}: holds tensor(s) the index does not list: "
            f"{', '.join(extra[:5])}")
      tensors.update(st.tensors)
    return tensors
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if len(files) != 1:
    raise ValueError(
        f"base: {directory!r} has {len(files)} .safetensors files and no "
        f"{INDEX_NAME}; expected one file or an index")
  return dict(SafetensorsFile(os.path.join(directory, files[0])).tensors)


def encode_header(entries: Sequence[tuple[str, str, tuple[int, ...]]],
                  metadata: dict[str, str] | None = None) -> bytes:
  """The 8-byte length and the JSON header (space-padded to 8 bytes) for
  tensors laid out back to back in `entries` order."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = metadata
  offset = 0
  for name, dtype, shape in entries:
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    header[name] = {"dtype": dtype, "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw


def plan_shards(sizes: Sequence[int], shard_size: int) -> list[list[int]]:
  """Greedy split of tensor indices (in order) into shards of at most
  `shard_size` bytes; a tensor larger than that gets a shard of its own."""
  if shard_size <= 0:
    raise ValueError(f"shard_size: expected > 0 bytes, got {shard_size}")
  shards: list[list[int]] = [[]]
  used = 0
  for i, size in enumerate(sizes):
    if shards[-1] and used + size > shard_size:
      shards.append([])
      used = 0
    shards[-1].append(i)
    used += size
  return [s for s in shards if s] or [[]]


def shard_file_names(count: int) -> list[str]:
  return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_all(fd: int, data) -> None:
  """Writes all of `data` at the current position of `fd`."""
  view = memoryview(data).cast("B")
  while view:
    n = os.write(fd, view[:COPY_CHUNK_BYTES])
    view = view[n:]


def pwrite_all(fd: int, data, offset: int) -> None:
  """Writes all of `data` at byte `offset` of `fd`; the file position does
  not move, so threads may write disjoint ranges of one file."""
  view = memoryview(data).cast("B")
  while view:
    n = os.pwrite(fd, view[:COPY_CHUNK_BYTES], offset)
    view, offset = view[n:], offset + n


def copy_range(src_fd: int, src_offset: int, dst_fd: int, count: int, *,
               on_progress=None) -> None:
  """Copies `count` bytes at `src_offset` to the current position of `dst_fd`
  inside the OS kernel (copy_file_range, else sendfile); `on_progress(n)` is
  called after each piece."""
  done = 0
  use_sendfile = not hasattr(os, "copy_file_range")
  while done < count:
    step = min(COPY_CHUNK_BYTES, count - done)
    if not use_sendfile:
      try:
        n = os.copy_file_range(src_fd, dst_fd, step, src_offset + done)
      except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP,
                           errno.EINVAL):
          raise
        use_sendfile = True
        continue
    else:
      n = os.sendfile(dst_fd, src_fd, src_offset + done, step)
    if n == 0:
      raise CorruptFileError("unexpected end of file while copying")
    done += n
    if on_progress is not None:
      on_progress(n)


def write_index(directory: str, weight_map: dict[str, str],
                total_size: int) -> None:
  path = os.path.join(directory, INDEX_NAME)
  with open(path, "w") as f:
    json.dump({"metadata": {"total_size": total_size},
               "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    f.flush()
    os.fsync(f.fileno())


def parse_size(text: str | int) -> int:
  """'5GB' -> 5_000_000_000; also KB/MB/GB/TB, KiB/MiB/GiB and plain bytes."""
  if isinstance(text, bool) or not isinstance(text, (int, str)):
    raise TypeError(f"shard_size (--shard-size): expected a size like '5GB' "
                    f"or a number of bytes, got {text!r}")
  if isinstance(text, int):
    if text <= 0:
      raise ValueError(f"shard_size (--shard-size): expected > 0 bytes, got "
                       f"{text}")
    return text
  units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
  s = str(text).strip().upper()
  digits = s.rstrip("KMGTIB")
  unit = s[len(digits):]
  try:
    value = float(digits)
  except ValueError:
    value = -1.0
  # nan and inf parse as floats; neither is a size.
  if unit not in units or not (math.isfinite(value) and value > 0) or \
      value * units[unit] < 1:
    raise ValueError(f"shard_size (--shard-size): expected a size of at "
                     f"least one byte like '5GB' or '500MiB', got {text!r}")
  return int(value * units[unit])


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes small in-memory tensors (tests, synthetic checkpoints)."""
  tensors = list(tensors)
  inverse = {v: k for k, v in DTYPES.items()}
  entries = []
  for name, array in tensors:
    if array.dtype not in inverse:
      raise TypeError(f"tensors[{name!r}]: unsupported dtype {array.dtype}")
    entries.append((name, inverse[array.dtype], tuple(array.shape)))
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    write_all(fd, encode_header(entries, metadata))
    for _, array in tensors:
      write_all(fd, np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    os.fsync(fd)
  finally:
    os.close(fd)


def dtype_name(dtype) -> str:
  inverse = {v: k for k, v in DTYPES.items()}
  dtype = np.dtype(dtype)
  if dtype not in inverse:
    raise TypeError(f"dtype: {dtype} has no safetensors tag")
  return inverse[dtype]


__all__ = [
    "CorruptFileError", "DTYPES", "FLOAT_DTYPES", "INDEX_NAME", "TensorInfo",
    "SafetensorsFile", "copy_range", "dtype_name", "encode_header",
    "load_checkpoint_index", "parse_size", "plan_shards", "pwrite_all",
    "read_rows_into", "read_tensor", "shard_file_names", "write_all",
    "write_index", "write_safetensors",
]
