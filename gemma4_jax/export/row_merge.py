"""The row merge: `W + scale * (B @ A)` on blocks of weight rows, in numpy
on the CPU (host code of the export tool; no Pallas kernel).

The result is bit for bit what the plain numpy expression gives,
`(w.astype(float32) + float32(scale) * (lora_b @ lora_a)).astype(dtype)`
with ml_dtypes' round-to-nearest-even for bfloat16, statistics included, in
~2.6 ns per element instead of ~21 (E2B MLP weights, one core):

- bfloat16 <-> float32 are integer bit operations (ml_dtypes' `astype` runs
  an element-at-a-time loop);
- `lora_b @ lora_a` is that very GEMM call (BLAS sums the rank in an order
  that depends on the call's shape, so it is never split), but every other
  pass goes in blocks of `BLOCK_ELEMENTS` that stay in the L2 cache, and the
  statistics come out of the same blocks;
- `single_threaded_blas()`: above a small size OpenBLAS wakes its own
  threads, which on a shared 2-core machine wait a scheduler slice for each
  other (16 ms for a 2M-element GEMM that takes 3 ms on one thread) and
  then spin, burning a core. Callers parallelize across row blocks instead;
  numpy releases the GIL in every call made here.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import threading

import ml_dtypes
import numpy as np

from gemma4_jax.export import verify

# Elements per inner block: with its five buffers (16 bytes per element) it
# fits the 1 MiB L2 of one core.
BLOCK_ELEMENTS = 1 << 16
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# Floating dtypes a merge writes back; the merge itself is float32.
MERGE_DTYPES = (BFLOAT16, np.dtype(np.float16), np.dtype(np.float32),
                np.dtype(np.float64))
_SIGN = np.uint32(0x80000000)
_QUIET_NAN = np.uint32(0x7FC00000)
_HIGH_HALF = np.uint32(0xFFFF0000)


class NonFiniteError(ValueError):
  """A merged value is inf or nan, or overflows the stored dtype."""


def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None
                ) -> np.ndarray:
  """bfloat16 (or its uint16 bit patterns) to float32, exactly."""
  bits = np.asarray(bits)
  if bits.dtype not in (BFLOAT16, np.dtype(np.uint16)):
    raise TypeError(f"bits: expected bfloat16 or uint16, got {bits.dtype}")
  if out is None:
    out = np.empty(bits.shape, np.float32)
  elif out.dtype != np.float32 or out.shape != bits.shape:
    raise ValueError(f"out: expected float32{list(bits.shape)}, got "
                     f"{out.dtype}{list(out.shape)}")
  wide = out.view(np.uint32)
  np.copyto(wide, bits.view(np.uint16))
  np.left_shift(wide, 16, out=wide)
  return out


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
  """float32 to bfloat16, rounding to nearest even like ml_dtypes.

  Subnormals are kept, values past the largest bfloat16 round to inf, and a
  nan becomes the quiet nan of its sign.
  """
  x = np.asarray(x)
  if x.dtype != np.float32:
    raise TypeError(f"x: expected float32, got {x.dtype}")
  x = np.ascontiguousarray(x)
  rounded = np.empty(x.shape, np.uint32)
  _round_to_bf16(x.view(np.uint32), rounded)
  out = np.empty(x.shape, np.uint16)
  np.right_shift(rounded, 16, out=out)
  return out.view(BFLOAT16)


def _round_to_bf16(bits: np.ndarray, out: np.ndarray) -> None:
  """float32 bits -> the bits of their bfloat16 rounding, as float32 (the
  low 16 bits zero); `out` must not alias `bits`."""
  np.right_shift(bits, 16, out=out)
  np.bitwise_and(out, 1, out=out)
  np.add(out, 0x7FFF, out=out)
  np.add(out, bits, out=out)
  np.bitwise_and(out, _HIGH_HALF, out=out)
  # A nan's mantissa may carry into the exponent or sign above.
  values = bits.view(np.float32)
  if values.size and np.isnan(values.max()):
    nan = np.isnan(values)
    out[nan] = (bits[nan] & _SIGN) | _QUIET_NAN


def merge_rows(weight: np.ndarray, lora_b: np.ndarray, lora_a: np.ndarray,
               scale: float, out: np.ndarray) -> verify.TensorStats:
  """Writes `weight + scale * (lora_b @ lora_a)` in `weight`'s dtype to `out`.

  Args:
    weight: [rows, cols] stored weights (bfloat16, float16/32/64).
    lora_b: [rows, r] float32 (the rows of the full `lora_b` for this block).
    lora_a: [r, cols] float32.
    scale: LoRA scale, applied in float32 to the product.
    out: [rows, cols] C-contiguous array of `weight`'s dtype.

  Returns:
    The statistics of the block before and after the merge.

  Raises:
    NonFiniteError: a merged value is not finite, before or after the cast
      back.
  """
  if not isinstance(weight, np.ndarray) or weight.ndim != 2:
    raise ValueError(f"weight: expected a 2-D array, got shape "
                     f"{np.shape(weight)}")
  _check_args(weight.dtype, lora_b, lora_a, *weight.shape)
  if (not isinstance(out, np.ndarray) or out.dtype != weight.dtype or
      out.shape != weight.shape or not out.flags.c_contiguous):
    raise ValueError(f"out: expected C-contiguous {weight.dtype}"
                     f"{list(weight.shape)}, got {getattr(out, 'dtype', '?')}"
                     f"{list(np.shape(out))}")

  def read_rows(start, block):
    np.copyto(block, weight[start:start + block.shape[0]])

  def write_rows(start, block):
    np.copyto(out[start:start + block.shape[0]], block)

  return merge_streamed(lora_b, lora_a, scale, weight.dtype, read_rows,
                        write_rows)


def merge_streamed(lora_b: np.ndarray, lora_a: np.ndarray, scale: float,
                   dtype, read_rows, write_rows) -> verify.TensorStats:
  """`merge_rows` on rows that come and go in cache-sized blocks.

  Args:
    lora_b: [rows, r] float32.
    lora_a: [r, cols] float32.
    scale: LoRA scale, applied in float32 to the product.
    dtype: the stored dtype of the weight (bfloat16, float16/32/64).
    read_rows: `read_rows(start, block)` fills `block`, a C-contiguous
      [n, cols] array of `dtype`, with the weight's rows `start:start + n`.
    write_rows: `write_rows(start, block)` stores merged rows
      `start:start + n`; `block` is reused once it returns.

  Returns:
    The statistics of the rows before and after the merge.

  Raises:
    NonFiniteError: a merged value is not finite, before or after the cast
      back.
  """
  dtype = np.dtype(dtype)
  rows, cols = _check_args(dtype, lora_b, lora_a)
  step = max(1, BLOCK_ELEMENTS // max(1, cols))
  delta, scratch = _buffers(rows, cols, min(rows, step), dtype)
  merged_rows = np.matmul(lora_b, lora_a, out=delta)  # -> W + scale * delta
  stats = verify.TensorStats()
  with np.errstate(over="ignore", invalid="ignore"):  # checked below
    for start in range(0, rows, step):
      n = min(rows, start + step) - start
      weight, out = scratch.weight[:n], scratch.out[:n]
      read_rows(start, weight)
      _merge_block(weight, merged_rows[start:start + n], np.float32(scale),
                   out, scratch, stats)
      write_rows(start, out)
  return stats


def _merge_block(weight, merged, scale, out, scratch, stats) -> None:
  size = merged.size
  before = scratch.before[:size]
  after = scratch.after[:size]
  ones = scratch.ones[:size]
  merged = merged.reshape(-1)
  _widen(weight.reshape(-1), before)
  np.multiply(merged, scale, out=merged)
  np.add(merged, before, out=merged)
  _narrow(merged, out.reshape(-1), after)
  sum_after = float(np.dot(after, ones))
  if not math.isfinite(sum_after):
    _raise_non_finite(merged, after, out.dtype)
  stats.count += size
  stats.sum_before += float(np.dot(before, ones))
  stats.sumsq_before += float(np.dot(before, before))
  stats.sum_after += sum_after
  stats.sumsq_after += float(np.dot(after, after))
  np.subtract(after, before, out=merged)
  stats.max_abs_delta = max(stats.max_abs_delta, float(merged.max()),
                            -float(merged.min()))


@contextlib.contextmanager
def single_threaded_blas():
  """Runs numpy's OpenBLAS on the calling thread only, then restores its
  thread count. A no-op where OpenBLAS cannot be found (other BLAS, no
  /proc). The setting is process-wide: use it around a whole merge."""
  found = _openblas_thread_functions()
  if found is None:
    yield
    return
  get_threads, set_threads = found
  previous = get_threads()
  set_threads(1)
  try:
    yield
  finally:
    set_threads(previous)


def _openblas_thread_functions():
  try:
    with open("/proc/self/maps") as f:
      paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
  except OSError:
    return None
  for path in sorted(p for p in paths if ".so" in p):
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    # numpy wheels ship scipy-openblas with prefixed, ILP64-suffixed names.
    for prefix in ("scipy_openblas_", "openblas_"):
      for suffix in ("64_", "_64", ""):
        try:
          get_threads = getattr(lib, f"{prefix}get_num_threads{suffix}")
          set_threads = getattr(lib, f"{prefix}set_num_threads{suffix}")
        except AttributeError:
          continue
        get_threads.restype, get_threads.argtypes = ctypes.c_int, []
        set_threads.restype, set_threads.argtypes = None, [ctypes.c_int]
        return get_threads, set_threads
  return None


class _Scratch:
  """Buffers of one inner block of `rows` x `cols`."""

  def __init__(self, rows: int, cols: int, dtype: np.dtype):
    self.key = (rows, cols, dtype)
    self.weight = np.empty((rows, cols), dtype)
    self.out = np.empty((rows, cols), dtype)
    self.before = np.empty(rows * cols, np.float32)
    self.after = np.empty(rows * cols, np.float32)
    self.ones = np.ones(rows * cols, np.float32)


# Per thread and kept between calls: a fresh multi-MiB array costs a page
# fault and a zeroed page per 4 KiB, about as much as the merge itself.
_LOCAL = threading.local()
# Largest delta kept (a `verify.row_chunks` piece is 2M elements).
_KEEP_DELTA_ELEMENTS = 1 << 22


def _buffers(rows: int, cols: int, block_rows: int, dtype: np.dtype
             ) -> tuple[np.ndarray, _Scratch]:
  """A [rows, cols] float32 array for the delta, and the block buffers."""
  delta = getattr(_LOCAL, "delta", None)
  if delta is None or delta.size < rows * cols:
    _LOCAL.delta = None  # free the old one first
    delta = np.empty(rows * cols, np.float32)
    if delta.size <= _KEEP_DELTA_ELEMENTS:
      _LOCAL.delta = delta
  scratch = getattr(_LOCAL, "scratch", None)
  if scratch is None or scratch.key != (block_rows, cols, dtype):
    scratch = _LOCAL.scratch = _Scratch(block_rows, cols, dtype)
  return delta[:rows * cols].reshape(rows, cols), scratch


def _check_args(dtype, lora_b, lora_a, rows=None, cols=None
                ) -> tuple[int, int]:
  """Validates the merge operands; `rows`/`cols` are the weight's, if known."""
  if dtype not in MERGE_DTYPES:
    raise TypeError(f"weight: expected one of "
                    f"{[str(d) for d in MERGE_DTYPES]}, got {dtype}")
  for name, x in (("lora_a", lora_a), ("lora_b", lora_b)):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
      raise TypeError(f"{name}: expected a 2-D float32 array, got "
                      f"{getattr(x, 'dtype', type(x))}{list(np.shape(x))}")
  rank = lora_a.shape[0]
  if cols is not None and lora_a.shape[1] != cols:
    raise ValueError(f"lora_a: expected float32[r, {cols}], got "
                     f"float32{list(lora_a.shape)}")
  if lora_b.shape[1] != rank or rows is not None and lora_b.shape[0] != rows:
    expected = "rows" if rows is None else rows
    raise ValueError(f"lora_b: expected float32[{expected}, {rank}], got "
                     f"float32{list(lora_b.shape)}")
  return lora_b.shape[0], lora_a.shape[1]


def _widen(stored: np.ndarray, out: np.ndarray) -> None:
  if stored.dtype == BFLOAT16:
    bf16_to_f32(stored, out)
  else:
    np.copyto(out, stored, casting="unsafe")


def _narrow(merged: np.ndarray, out: np.ndarray, after: np.ndarray) -> None:
  """Casts `merged` to `out`'s dtype and puts the stored values, as float32,
  in `after`."""
  if out.dtype == BFLOAT16:
    rounded = after.view(np.uint32)
    _round_to_bf16(merged.view(np.uint32), rounded)
    np.right_shift(rounded, 16, out=out.view(np.uint16))
  else:
    np.copyto(out, merged, casting="unsafe")
    np.copyto(after, out, casting="unsafe")


def _raise_non_finite(merged: np.ndarray, after: np.ndarray, dtype) -> None:
  if not np.isfinite(merged).all():
    raise NonFiniteError("has non-finite values; the adapter or base weight "
                         "is corrupt")
  if not np.isfinite(after).all():
    raise NonFiniteError(f"overflows {dtype}")
  # Otherwise only the float32 sum overflowed; every value is finite.


__all__ = ["BLOCK_ELEMENTS", "MERGE_DTYPES", "NonFiniteError", "bf16_to_f32",
           "f32_to_bf16", "merge_rows", "merge_streamed",
           "single_threaded_blas"]
