"""Test-wide set-up: a simulated 4-device CPU mesh, Hypothesis profiles and
the work units of `make test`'s parallel workers."""

import os

# Must happen before JAX initializes its backend (DESIGN.md, sharding tests).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, settings  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow,
                                      HealthCheck.data_too_large])
# `ci` is what `make test` runs (8 examples a property keeps the suite's
# interpret-mode kernel tests to a few CPU-minutes).
settings.register_profile("ci", max_examples=8, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=40, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Work units for `make test`'s two pytest-xdist workers (`--dist loadscope`,
# with the scopes below): a test file is one unit, so its module-scoped
# models are built once; tests/export is one, for its session-scoped tiny
# training run, and so is tests/bad_input, for its session-scoped files; each
# Tunix main run (a subprocess of minutes) is a unit of its own. (xdist's
# `loadgroup` cannot do this under pytest 9: the group it appends to a
# test's node id is lost, and every test becomes a unit of its own.)
_TUNIX_MAIN = "tests/tunix_main/"
_ONE_UNIT = ("tests/export/", "tests/bad_input/")
# Handed out first: the Tunix main runs, then the longest TPU compiles (a
# shortened E2B training step, attention at E2B/E4B/31B shapes).
_LONG_FIRST = (_TUNIX_MAIN, "tests/test_fit.py",
               "tests/attention/test_attention_tpu_compile.py")


def _work_unit(nodeid: str) -> str:
  path = nodeid.split("::")[0]
  if path.startswith(_TUNIX_MAIN):
    return nodeid
  return next((d for d in _ONE_UNIT if path.startswith(d)), path)


def pytest_collection_modifyitems(config, items):
  """Hands out the longest work units first.

  The Tunix main runs and the longest TPU compiles go first so that the
  short tests fill in around them instead of one of them ending the run
  alone on one worker (`--no-loadscope-reorder` keeps this order).
  """
  del config
  def rank(item):
    return next((i for i, prefix in enumerate(_LONG_FIRST)
                 if item.nodeid.startswith(prefix)), len(_LONG_FIRST))
  items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadscope` with this suite's work units as its scopes."""
  if config.getvalue("dist") != "loadscope":
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class WorkUnits(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return _work_unit(nodeid)

  return WorkUnits(config, log)


# XLA:CPU's backend (LLVM) optimizations cost more than they save on the
# small programs of the model-level tests (marked `slow`: real Tunix models,
# compared with stock under the same compiler, bounded by a float64 run): a
# third of their CPU time. Kernel and reference tests, whose tolerances are
# tight, compile as users do. Set before any fixture of the test is built;
# subprocesses (the CLI and Tunix main runs) inherit the variable. Programs
# compiled for TPU to read their memory always keep full optimization
# (`testing.compile_optimized`).
def pytest_runtest_setup(item):
  fast = item.get_closest_marker("slow") is not None
  jax.config.update("jax_disable_most_optimizations", fast)
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1" if fast else "0"
