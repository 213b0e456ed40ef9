"""The XLA:TPU option the patched step needs: identical layers share code.

XLA:TPU can compile a computation that repeats (a decoder layer) once and
call it from every place it occurs: `--xla_tpu_enable_deduplicated_calls`.
Left to itself it turns this on only for programs with a lot of code.
Measured on the 35-layer E2B LoRA step (v5e:2x2, 4 x 1024, libtpu
0.0.42.1; benchmarks/RESULTS.md): the stock step and the step patched with
the XLA versions are over that line and keep 168 and 145 MiB of code per
chip; the step patched with the Pallas kernels has less code before sharing
(759 MiB), stays under it and keeps all of it: 0.6 GiB of HBM per chip that
the kernels do not need. With the option on, the kernels' step shares too
(139 MiB) and needs the least HBM of the three (8.04 GiB per chip, against
8.13 with the XLA versions and 10.07 stock).

The option is read once, when libtpu starts (the first TPU computation, or the
first abstract TPU topology), from `LIBTPU_INIT_ARGS`; `jax.jit(...,
compiler_options=compiler_options())` gives it to one program compiled for TPU
instead. `apply()` adds it to `LIBTPU_INIT_ARGS` unless the flag is there
already (the user's value wins); when the TPU backend has already started, it
can only warn. Setting it on a machine without libtpu does nothing.
"""

from __future__ import annotations

import os
import warnings

import jax

from gemma4_jax.patches import _framework

# Not an attribute but an environment variable: `apply()` calls `request()`
# or `restore()` after the attribute patches, under the same lock.
SPEC = _framework.EnvironmentSpec(
    feature="share_layer_code", variable="LIBTPU_INIT_ARGS",
    flag="xla_tpu_enable_deduplicated_calls", value="true",
    effect="identical layers compiled once")
FLAG = SPEC.flag
ENV = SPEC.variable
_ARG = SPEC.argument
_ADDED = f"{ENV} += {_ARG} ({SPEC.effect})"
# Empty while `request()` has not changed `LIBTPU_INIT_ARGS`; else holds its
# value from before (None: it was unset).
_before: list[str | None] = []


def user_set() -> bool:
  """The user's `LIBTPU_INIT_ARGS` names the flag (either value)."""
  return _flag_in(os.environ.get(ENV, "")) and not _before


def compiler_options() -> dict:
  """Per-program options giving what `apply()` gives the process: the flag,
  unless the user's `LIBTPU_INIT_ARGS` decides it. Only for a program
  compiled for TPU: other backends refuse an option they do not know."""
  return {} if user_set() else {FLAG: True}


def request() -> str:
  """Adds the flag to `LIBTPU_INIT_ARGS` (call with the patch lock held);
  returns the report's line on what was done."""
  current = os.environ.get(ENV)
  if _before:  # added by an earlier apply()
    return _ADDED
  if _flag_in(current or ""):
    return f"{ENV} names {FLAG} already; left as the user set it"
  if _tpu_backend_started():
    message = (f"the TPU backend started before apply(): {_ARG} cannot take "
               f"effect in this process; call apply() before the first JAX "
               f"computation or start with {ENV}='{_ARG}'. Without it the "
               "kernels' step keeps one copy of code per layer (see "
               "gemma4_jax.patches.tpu_compiler).")
    warnings.warn(message, UserWarning, stacklevel=3)
    return "not set: " + message
  _before.append(current)
  os.environ[ENV] = f"{current} {_ARG}".strip() if current else _ARG
  return _ADDED


def restore() -> None:
  """Puts `LIBTPU_INIT_ARGS` back as it was before `request()` (call with
  the patch lock held). A libtpu already started keeps what it read."""
  if not _before:
    return
  before = _before.pop()
  if before is None:
    os.environ.pop(ENV, None)
  else:
    os.environ[ENV] = before


def snapshot() -> tuple:
  """The state `reinstate` puts back (`applied()`'s exit)."""
  return os.environ.get(ENV), tuple(_before)


def reinstate(state: tuple) -> None:
  env, before = state
  if env is None:
    os.environ.pop(ENV, None)
  else:
    os.environ[ENV] = env
  _before[:] = before


def _flag_in(args: str) -> bool:
  return any(arg.lstrip("-").split("=")[0] == FLAG for arg in args.split())


def _tpu_backend_started() -> bool:
  # JAX has no public test for "backends initialized" that does not
  # initialize them; `jax.extend.backend.backends()` would start libtpu.
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if not xla_bridge.backends_are_initialized():
      return False
  except (ImportError, AttributeError):
    return False
  return "tpu" in jax.extend.backend.backends()
