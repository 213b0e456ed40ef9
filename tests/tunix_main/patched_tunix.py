"""A pytest plugin: Tunix's own tests, run with `gemma4_jax.patches` applied.

`tests/tunix_main/test_tunix_main.py` runs Tunix main's test files in a
subprocess with `-p patched_tunix`. The plugin applies every available patch
before the first test and reverts them after the last. It also wraps the
top-level `Gemma4.__call__`: every eager call (Tunix's forward-pass tests)
is run again stock in float32 and in float64, and the patched logits are held
to `testing.assert_model_close`, so Tunix's tests check values, not only
shapes. Tunix main computes RMSNorm, RoPE and the final logits in float32
whatever the config's dtype, so its float64 run is float64 everywhere else:
still far more exact than float32, which is all the bound needs (the last
cast to float32 is covered by the bound's floor). Calls under a trace (jitted training steps) are left alone, and so
are models with a part that cannot run in float64 (Tunix's audio encoder
rejects float64 inputs) or too large for a float64 copy on a 24 GB machine
(the 12B test's 1G-entry embedding); the summary names them. Tunix's
float16 tests skip where XLA:CPU cannot compile float16 at all (no F16C, as
under `--xla_cpu_max_isa=SSE4_2`; `testing.float16_compiles`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import gemma4_jax.patches as patches
from gemma4_jax import testing

_COMPARED: list[tuple[str, float, float]] = []  # (test, error, bound)
_NOT_COMPARED: list[tuple[str, str]] = []  # (test, why)
# A float64 copy of more float parameters than this (2 GiB) is not made.
MAX_FLOAT64_PARAMETERS = 2**28
_ORIGINAL_CALL = None
_depth = 0


def pytest_configure(config):
  global _ORIGINAL_CALL
  report = patches.apply()
  if not report.patched:
    raise RuntimeError(f"gemma4_jax.patches patched nothing:\n{report}")
  config.gemma4_jax_report = report
  from tunix.models.gemma4 import model as gemma4_lib  # pylint: disable=g-import-not-at-top
  _ORIGINAL_CALL = gemma4_lib.Gemma4.__call__
  gemma4_lib.Gemma4.__call__ = _checked_call


def pytest_collection_modifyitems(config, items):
  """Skips Tunix's float16 tests where XLA:CPU cannot compile float16."""
  del config
  if testing.float16_compiles():
    return
  for item in items:
    if "float16" in item.name and "bfloat16" not in item.name:
      item.add_marker(pytest.mark.skip(reason=testing.FLOAT16_UNSUPPORTED))


def pytest_unconfigure(config):
  del config
  from tunix.models.gemma4 import model as gemma4_lib  # pylint: disable=g-import-not-at-top
  if _ORIGINAL_CALL is not None:
    gemma4_lib.Gemma4.__call__ = _ORIGINAL_CALL
  patches.revert()


def pytest_report_header(config):
  return str(config.gemma4_jax_report)


def pytest_terminal_summary(terminalreporter):
  worst = max(_COMPARED, key=lambda c: c[1] / c[2], default=None)
  terminalreporter.write_line(
      f"gemma4_jax: {len(_COMPARED)} eager Gemma 4 outputs compared patched "
      "vs stock (float32 against float64)"
      + (f"; closest to its bound: {worst[0]}: error {worst[1]:.3g}, bound "
         f"{worst[2]:.3g}" if worst else ""))
  terminalreporter.write_line(
      "gemma4_jax: patched: " + ", ".join(
          t.feature for t in terminalreporter.config.gemma4_jax_report.targets
          if t.state == "patched"))
  for test, why in _NOT_COMPARED:
    terminalreporter.write_line(f"gemma4_jax: not compared: {test}: {why}")


def _checked_call(self, *args, **kwargs):
  global _depth
  out = _ORIGINAL_CALL(self, *args, **kwargs)
  if _depth or _traced((args, kwargs, out)):
    return out
  _depth += 1
  try:
    _compare(self, args, kwargs, out[0])
  finally:
    _depth -= 1
  return out


def _traced(tree) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, jax.core.Tracer)))


def _compare(model, args, kwargs, logits):
  test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
  size = sum(x.size for x in jax.tree.leaves(nnx.state(model))
             if jnp.issubdtype(x.dtype, jnp.floating))
  if size > MAX_FLOAT64_PARAMETERS:
    _NOT_COMPARED.append((test, f"{size:,} parameters, too many for a "
                          "float64 copy here"))
    return
  with _stock():
    stock = _ORIGINAL_CALL(model, *args, **kwargs)[0]
    with jax.enable_x64(True), _float64(model) as model64:
      try:
        stock64 = _ORIGINAL_CALL(model64, *_to64(args), **_to64(kwargs))[0]
      except (ValueError, TypeError) as e:
        _NOT_COMPARED.append((test, f"no float64 run: {e}"))
        return
      stock64 = jax.device_get(stock64)
  error, bound = testing.assert_model_close(logits, stock, stock64,
                                            name=f"{test}: logits")
  _COMPARED.append((test, error, bound))


@contextlib.contextmanager
def _stock():
  """Tunix as installed for the duration; the patches are back after.

  `apply()` checks the code of `Gemma4.__call__` (the loss patch relies on
  it), so it is re-applied with Tunix's own `__call__` in place.
  """
  from tunix.models.gemma4 import model as gemma4_lib  # pylint: disable=g-import-not-at-top
  patches.revert()
  try:
    yield
  finally:
    gemma4_lib.Gemma4.__call__ = _ORIGINAL_CALL
    try:
      patches.apply()
    finally:
      gemma4_lib.Gemma4.__call__ = _checked_call


@contextlib.contextmanager
def _float64(model):
  """A float64 clone of `model`: weights cast, every config's dtypes set to
  float64 for the duration (config objects may be shared with `model`)."""
  graphdef, state = nnx.split(model)
  clone = nnx.merge(graphdef, jax.tree.map(_to64_leaf, state))
  configs = {id(m.config): m.config for _, m in nnx.iter_graph(clone)
             if dataclasses.is_dataclass(getattr(m, "config", None))
             and hasattr(m.config, "dtype")}
  saved = {key: (c.dtype, getattr(c, "param_dtype", None))
           for key, c in configs.items()}
  try:
    for c in configs.values():
      c.dtype = jnp.float64
      if hasattr(c, "param_dtype"):
        c.param_dtype = jnp.float64
    yield clone
  finally:
    for key, c in configs.items():
      c.dtype, param_dtype = saved[key]
      if hasattr(c, "param_dtype"):
        c.param_dtype = param_dtype


def _to64_leaf(x):
  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.asarray(x, jnp.float64)
  return x


def _to64(tree):
  return jax.tree.map(_to64_leaf, tree)
