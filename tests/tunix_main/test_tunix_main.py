"""The patches against Tunix main, and Tunix's own tests with them applied.

Tunix main (a copy at commit c7d8950f in `../shared/tunix-main`) is not on
PyPI; it is imported over the installed google-tunix 0.1.7 by putting it
first on PYTHONPATH, which needs a fresh process. So each test here runs
pytest in a subprocess and passes iff that run passes:

- the model-level patch tests (`tests/patches/test_patch_*.py` but the
  framework tests, which are about 0.1.7's installed modules) on Tunix
  main's code;
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


def test_tunix_main_is_what_the_subprocess_imports():
  code = ("import tunix, gemma4_jax.patches as p, "
          "tunix.models.gemma4.attention as a; print(tunix.__file__); "
          "print(p.status().targets[0].target)")
  run = subprocess.run([sys.executable, "-c", code], env=_env(),
                       capture_output=True, text=True, check=True)
  path, target = run.stdout.split()
  assert pathlib.Path(path).is_relative_to(TUNIX_MAIN)
  assert target == "tunix.models.gemma4.attention:Attention.block"


def test_patch_tests_pass_on_tunix_main():
  tests = sorted(str(p.relative_to(REPO)) for p in
                 (REPO / "tests" / "patches").glob("test_patch_*.py")
                 if p.name != "test_patch_framework.py")
  assert tests
  _pytest(*tests)


def test_tunix_gemma4_model_tests_pass_patched():
  output = _pytest("-p", "patched_tunix",
                   str(TUNIX_MAIN / "tests" / "models" / "gemma4" /
                       "model_test.py"))
  assert "gemma4_jax: patched: attention, ple, lora, loss" in output
  compared = int(re.search(r"gemma4_jax: (\d+) eager Gemma 4 outputs",
                           output).group(1))
  # Dense, MoE, the vision batch and bidirectional passes, the LoRA model's
  # eager call, the while-loop test's (audio, vision and 12B: see summary).
  assert compared >= 5


def test_tunix_peft_trainer_tests_pass_patched():
  output = _pytest("-p", "patched_tunix",
                   str(TUNIX_MAIN / "tests" / "sft" / "peft_trainer_test.py"))
  assert "gemma4_jax: patched: attention, ple, lora, loss" in output
