"""The TPU runner's dry run (benchmarks/run_tpu.py --dry-run), so it cannot
rot: what it does without a TPU runs here, in two parts of under a CPU-minute
each.

- the Pallas kernels (interpret mode) against their references at small
  shapes, and the loss and LoRA ops compiled for an abstract v5e chip at a
  real E2B shape (attention's compiles are the slow ones and are covered by
  tests/attention/test_attention_tpu_compile.py);
- a tiny real Tunix Gemma 4 patched against stock (logits, loss, LoRA
  gradients).

Timing and the E2B step need a TPU: the runner refuses to time without one.
"""

import importlib.util
import json
import pathlib

import pytest

from gemma4_jax import testing

pytestmark = pytest.mark.slow

RUNNER = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / (
    "run_tpu.py")


@pytest.fixture(scope="module")
def run_tpu():
  spec = importlib.util.spec_from_file_location("run_tpu", RUNNER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(run_tpu, tmp_path, *argv):
  out = tmp_path / "tpu.json"
  assert run_tpu.main(["--dry-run", "--out", str(out), *argv]) == 0
  return json.loads(out.read_text())


def test_kernel_checks_and_memory(run_tpu, tmp_path):
  missing = testing.libtpu_missing()
  if missing:
    pytest.skip(missing)
  result = _run(run_tpu, tmp_path, "--parts", "checks", "memory",
                "--memory-ops", "softcapped_cross_entropy", "lora_matmul",
                "--seq-lens", "1024")
  assert result["meta"]["dry_run"] and result["meta"]["device_kind"] == (
      "TPU v5 lite")
  checks = {c["check"]: c for c in result["checks"]}
  assert {"attention forward", "attention dk", "loss d hidden",
          "lora dA"} <= set(checks)
  assert all(c["interpret"] and c["error"] <= c["bound"]
             for c in checks.values())
  memory = {(m["op"], m["implementation"]): m for m in result["memory"]}
  assert set(memory) == {(op, impl) for op in ("softcapped_cross_entropy",
                                               "lora_matmul")
                         for impl in ("stock", "xla", "default")}
  loss = {impl: memory["softcapped_cross_entropy", impl]
          for impl in ("stock", "xla", "default")}
  # Stock builds the [4096, 262144] float32 logits (4 GiB / 2 per pass);
  # the default runs the Pallas kernels, with no more than a few MiB.
  assert loss["stock"]["temp_bytes"] >= 4096 * 262144 * 2
  assert loss["default"]["pallas_kernels"] >= 2
  assert loss["default"]["temp_bytes"] < loss["stock"]["temp_bytes"] / 100
  assert memory["lora_matmul", "default"]["runs"] == "xla everywhere"
  assert "timing" not in result


def test_tiny_gemma4_patched_against_stock(run_tpu, tmp_path):
  result = _run(run_tpu, tmp_path, "--parts", "model", "--model-layers", "2")
  checks = {c["check"]: c for c in result["checks"]}
  assert set(checks) == {"tiny Gemma 4 logits", "tiny Gemma 4 loss",
                         "tiny Gemma 4 LoRA gradients"}
  assert all(0 < c["bound"] and c["error"] <= c["bound"]
             for c in checks.values())
  assert result["memory"] == []


def test_timing_needs_a_tpu(run_tpu, tmp_path):
  with pytest.raises(SystemExit):
    run_tpu.main(["--out", str(tmp_path / "x.json")])
