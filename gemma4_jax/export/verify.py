"""Checks of a merged checkpoint: structure, per-tensor statistics, and a
numeric probe `x @ W_merged.T` against `x @ W.T + scale * (x @ A.T) @ B.T`."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gemma4_jax.export import safetensors_io

# Relative tolerance of the probe per stored dtype: the merged weight is
# rounded once to that dtype (the tolerance table in ARCHITECTURE.md; F16 in
# between).
PROBE_RTOL = {"F32": 1e-5, "F64": 1e-5, "F16": 1e-3, "BF16": 2e-2}
PROBE_BATCH = 4
PROBE_SAMPLES = 3
# Rows per read when streaming a weight: ~8 MiB of float32 per temporary.
# The merge runs one `lora_b @ lora_a` GEMM per chunk; BLAS may sum the rank
# in an order that depends on the GEMM's shape, so changing this can change
# the last bit of merged weights.
CHUNK_ELEMENTS = 2 << 20


class VerificationError(RuntimeError):
  """The merged output is not what the plan says it should be."""


@dataclasses.dataclass
class TensorStats:
  """Running mean/std of a weight before and after the merge (filled in by
  `row_merge`, one block of rows at a time)."""
  count: int = 0
  sum_before: float = 0.0
  sumsq_before: float = 0.0
  sum_after: float = 0.0
  sumsq_after: float = 0.0
  max_abs_delta: float = 0.0

  def add(self, other: TensorStats) -> None:
    """Folds in the statistics of another block of the same tensor."""
    self.count += other.count
    self.sum_before += other.sum_before
    self.sumsq_before += other.sumsq_before
    self.sum_after += other.sum_after
    self.sumsq_after += other.sumsq_after
    self.max_abs_delta = max(self.max_abs_delta, other.max_abs_delta)

  def as_dict(self) -> dict:
    def moments(s, sq):
      mean = s / max(1, self.count)
      return {"mean": mean,
              "std": math.sqrt(max(0.0, sq / max(1, self.count) - mean**2))}
    return {"before": moments(self.sum_before, self.sumsq_before),
            "after": moments(self.sum_after, self.sumsq_after),
            "max_abs_delta": self.max_abs_delta}


def row_chunks(rows: int, cols: int):
  step = max(1, CHUNK_ELEMENTS // max(1, cols))
  for start in range(0, rows, step):
    yield slice(start, min(rows, start + step))


def check_structure(directory: str, expected: dict[str, tuple[str, tuple]]
                    ) -> int:
  """Re-reads every output header; names, dtypes and shapes must equal the
  plan. Returns the number of tensors found."""
  found = safetensors_io.load_checkpoint_index(directory)
  missing = sorted(expected.keys() - found.keys())
  extra = sorted(found.keys() - expected.keys())
  if missing or extra:
    raise VerificationError(
        f"output tensors differ from the plan: missing {missing[:5]}, "
        f"unexpected {extra[:5]}")
  for name, (dtype, shape) in expected.items():
    info = found[name]
    if info.dtype != dtype or tuple(info.shape) != tuple(shape):
      raise VerificationError(
          f"output {name}: {info.dtype}{list(info.shape)}, planned "
          f"{dtype}{list(shape)}")
  return len(found)


def probe(merged: safetensors_io.TensorInfo,
          base: safetensors_io.TensorInfo, delta, *, seed: int = 0) -> dict:
  """Compares the merged weight with base + LoRA on a random batch."""
  rows, cols = merged.shape
  x = np.random.default_rng(seed).standard_normal(
      (PROBE_BATCH, cols)).astype(np.float32)
  xa = x @ delta.lora_a.T  # [batch, r]
  y_merged = np.empty((PROBE_BATCH, rows), np.float64)
  y_ref = np.empty((PROBE_BATCH, rows), np.float64)
  for chunk in row_chunks(rows, cols):
    w_out = safetensors_io.read_tensor(merged, chunk).astype(np.float32)
    w_in = safetensors_io.read_tensor(base, chunk).astype(np.float32)
    y_merged[:, chunk] = x @ w_out.T
    y_ref[:, chunk] = x @ w_in.T + delta.scale * (xa @ delta.lora_b[chunk].T)
  rel = float(np.linalg.norm(y_merged - y_ref) /
              max(np.linalg.norm(y_ref), np.finfo(np.float32).tiny))
  rtol = PROBE_RTOL[merged.dtype]
  result = {"tensor": merged.name, "relative_error": rel, "rtol": rtol,
            "ok": rel <= rtol}
  if not result["ok"]:
    raise VerificationError(
        f"probe: {merged.name}: relative error of x @ W_merged vs "
        f"x @ W + scale*(x@A)@B is {rel:.3g} > {rtol:g}")
  return result


def sample_for_probe(names: list[str]) -> list[str]:
  if len(names) <= PROBE_SAMPLES:
    return list(names)
  picks = np.linspace(0, len(names) - 1, PROBE_SAMPLES).round().astype(int)
  return [names[i] for i in sorted(set(picks.tolist()))]


__all__ = ["TensorStats", "VerificationError", "check_structure", "probe",
           "row_chunks", "sample_for_probe"]
