"""The patches against Tunix main, and Tunix's own tests with them applied.

Tunix main (a copy at commit c7d8950f in `../shared/tunix-main`) is not on
PyPI; it is imported over the installed google-tunix 0.1.7 by putting it
first on PYTHONPATH, which needs a fresh process. So each test here runs
pytest in a subprocess and passes iff that run passes:

- the model-level patch tests (`PATCH_TEST_RUNS`: every file in
  tests/patches but two, see `test_every_patch_test_file_is_run_on_tunix_main`)
  on Tunix main's code;
- Tunix main's own Gemma 4 model tests and SFT `PeftTrainer` tests, with
  `patches.apply()` in force through the `patched_tunix` plugin (which also
  holds every eager Gemma 4 forward pass to the model-level rule).

In a user's clone `../shared/tunix-main` is absent and these tests skip.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[2]
TUNIX_MAIN = REPO.parent / "shared" / "tunix-main"
PLUGIN_DIR = pathlib.Path(__file__).resolve().parent

if not (TUNIX_MAIN / "tunix" / "models" / "gemma4" / "attention.py").exists():
  pytest.skip(f"{TUNIX_MAIN} is absent (it ships beside the project's "
              "repository, not in a user's clone): the Tunix main runs are "
              "skipped", allow_module_level=True)


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(TUNIX_MAIN), str(PLUGIN_DIR)] +
      ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env


def _pytest(*args, cwd=REPO) -> str:
  """Runs pytest on Tunix main; returns its output, failing with it."""
  run = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       "-W", "ignore::DeprecationWarning", *args],
      cwd=cwd, env=_env(), capture_output=True, text=True, check=False)
  output = run.stdout + run.stderr
  print(output[-6000:])
  assert run.returncode == 0, f"pytest {' '.join(args)} failed:\n" + (
      output[-6000:])
  assert re.search(r"\d+ passed", output), output[-2000:]
  assert not re.search(r"\d+ (failed|error)", output), output[-2000:]
  return output


def _not_any(expressions) -> str:
  """A `-k` expression deselecting tests that match any of `expressions`."""
  return "not (" + " or ".join(f"({e})" for e in expressions) + ")"


def test_tunix_main_is_what_the_subprocess_imports():
  code = ("import tunix, gemma4_jax.patches as p, "
          "tunix.models.gemma4.attention as a; print(tunix.__file__); "
          "print(p.status().targets[0].target)")
  run = subprocess.run([sys.executable, "-c", code], env=_env(),
                       capture_output=True, text=True, check=True)
  path, target = run.stdout.split()
  assert pathlib.Path(path).is_relative_to(TUNIX_MAIN)
  assert target == "tunix.models.gemma4.attention:Attention.block"


# The model-level patch tests, in two runs of about equal length (the
# parallel workers of `make test` take one each).
PATCH_TEST_RUNS = {
    "attention": ("test_patch_attention.py", "test_patch_attention_decode.py",
                  "test_patch_attention_pallas.py"),
    "lora, loss, ple, remat": ("test_patch_lora.py", "test_patch_loss.py",
                               "test_patch_ple.py", "test_patch_remat.py"),
}


# Not rerun on Tunix main: tests whose code path does not depend on Tunix's
# layout, which the in-suite run on google-tunix 0.1.7 covers. qwix's LoRA
# routing and option handling, the v1 trainer's loss curves (the layout
# checks are the same-step gradient tests above them; Tunix main's v2 trainer
# runs), remat policies beyond `full` and `attention` (the policies differ
# only in what JAX saves, not in the model code), a decode variant and the
# stock failure the attention patch fixes.
SAME_ON_BOTH_LAYOUTS = (
    "test_peft_trainer_loss_curve", "test_report_names_what_stays_on_qwix",
    "test_dropout_stays_on_qwix", "test_peft_trainer_runs_patched",
    "test_policy_matches_no_remat and (minimal or offload)",
    "test_decode_rank2_mask_on_an_unpadded_batch",
    "test_unpatched_tunix_breaks_on_rank4_mask_patched_works",
    "test_lora_can_be_applied_while_patched")


def test_every_patch_test_file_is_run_on_tunix_main():
  files = {p.name for p in (REPO / "tests" / "patches").glob("test_*.py")}
  listed = {name for run in PATCH_TEST_RUNS.values() for name in run}
  # Not on Tunix main: the framework tests are about google-tunix 0.1.7's
  # installed modules; test_patch_attention_sharded calls 0.1.7's loss
  # function directly (Tunix main's returns a LossOutput). The attention
  # patch under the mesh runs on Tunix main in test_patch_attention.py.
  # test_patch_tpu_compiler is about `LIBTPU_INIT_ARGS`, the same whatever
  # Tunix's layout.
  assert files - listed == {"test_patch_framework.py",
                            "test_patch_attention_sharded.py",
                            "test_patch_tpu_compiler.py"}
  assert listed <= files


@pytest.mark.parametrize("run", sorted(PATCH_TEST_RUNS))
def test_patch_tests_pass_on_tunix_main(run):
  _pytest("-k", _not_any(SAME_ON_BOTH_LAYOUTS),
          *(str(REPO / "tests" / "patches" / name)
            for name in PATCH_TEST_RUNS[run]))


# Tunix model tests not run: two whose models are too large for the plugin's
# float64 comparison (so they only show that the patched model runs), each
# a larger copy of a test that does run: the 441M-parameter single-image
# vision pass (the vision batch test is compared) and the heterogeneous audio
# pass (the plain audio pass runs). Together about a minute of CPU.
NOT_RUN_MODEL_TESTS = ("test_forward_pass_vision and not batch and not "
                       "bidirectional", "test_forward_pass_audio_heterogeneous")


def test_tunix_gemma4_model_tests_pass_patched():
  output = _pytest("-p", "patched_tunix", "-k", _not_any(NOT_RUN_MODEL_TESTS),
                   str(TUNIX_MAIN / "tests" / "models" / "gemma4" /
                       "model_test.py"))
  assert "gemma4_jax: patched: attention, ple, lora, loss" in output
  compared = int(re.search(r"gemma4_jax: (\d+) eager Gemma 4 outputs",
                           output).group(1))
  # Dense, MoE, the vision batch and bidirectional passes, the LoRA model's
  # eager call, the while-loop test's (audio and 12B: see summary).
  assert compared >= 5


def test_tunix_peft_trainer_tests_pass_patched():
  output = _pytest("-p", "patched_tunix",
                   str(TUNIX_MAIN / "tests" / "sft" / "peft_trainer_test.py"))
  assert "gemma4_jax: patched: attention, ple, lora, loss" in output
