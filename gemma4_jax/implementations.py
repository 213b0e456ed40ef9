"""Choosing an implementation for an op: Pallas for TPU, blockwise XLA elsewhere.

The choice follows the platform the computation is *lowered for*, not the
backend of the Python process: a training step compiled ahead of time for
abstract TPU chips from a CPU host, or exported with
`jax.export(..., platforms=["tpu"])`, gets the TPU kernels. `select` builds
the callable an op runs:

- `implementation=None` (and no `GEMMA4_JAX_IMPLEMENTATION`): the op's TPU
  default when lowered for TPU, its XLA version otherwise, through
  `jax.lax.platform_dependent`, which keeps only the lowered platform's
  branch. With `interpret=True` the Pallas kernel runs everywhere.
- A named implementation never falls back. A forced `"pallas_tpu"` lowers for
  TPU; lowered for any other platform without `interpret=True`, it raises
  a `RuntimeError` saying so (at lowering time: eagerly, at the call).
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import jax
from jax.extend import core as jax_core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

PALLAS_TPU = "pallas_tpu"
XLA = "xla"
REFERENCE = "reference"
KNOWN = (PALLAS_TPU, XLA, REFERENCE)
# Not a user-facing name: `resolve`'s answer when the platform lowered for
# decides.
BY_PLATFORM = "by_platform"
ENV_VAR = "GEMMA4_JAX_IMPLEMENTATION"


def resolve(op: str, implementation: str | None, available: tuple[str, ...],
            *, interpret: bool = False) -> str:
  """The implementation `op` runs with: a name from `available`, or
  `BY_PLATFORM` (its TPU default for TPU, XLA elsewhere; see `select`).

  Args:
    op: name of the op, for error messages.
    implementation: the caller's choice, or None for the default (the env
      var `GEMMA4_JAX_IMPLEMENTATION` if set).
    available: the implementations `op` has.
    interpret: Pallas kernels run in interpret mode (on any backend): the
      default is then the Pallas kernel, if `op` has one.

  Raises:
    TypeError: `interpret` is not a bool or `implementation` not a str.
    ValueError: an unknown name (naming where it came from), or one that
      `op` does not have.
  """
  if not isinstance(interpret, bool):
    raise TypeError(f"{op}: interpret must be True or False, got "
                    f"{interpret!r}")
  if implementation is not None and not isinstance(implementation, str):
    raise TypeError(f"{op}: implementation must be a str or None, got "
                    f"{implementation!r}")
  source = "implementation"
  if implementation is None and os.environ.get(ENV_VAR):
    implementation, source = os.environ[ENV_VAR], f"${ENV_VAR}"
  if implementation is None:
    if interpret and PALLAS_TPU in available:
      return PALLAS_TPU
    return BY_PLATFORM
  if implementation not in KNOWN:
    raise ValueError(f"{op}: unknown {source} {implementation!r}; expected "
                     f"one of {KNOWN}")
  if implementation not in available:
    raise ValueError(f"{op}: {source} {implementation!r} is not available "
                     f"for this op; it has {available}")
  return implementation


def select(op: str, name: str, table: Mapping[str, Callable], *,
           interpret: bool = False, tpu_default: str = PALLAS_TPU
           ) -> Callable:
  """The callable `op` runs for the resolved `name`.

  Args:
    op: name of the op, for error messages.
    name: `resolve(...)`'s answer.
    table: implementation name -> callable taking arrays (or pytrees of
      arrays and None) only: everything static is bound beforehand, since
      `jax.lax.platform_dependent` passes its operands as traced values.
    interpret: the Pallas callable runs in interpret mode.
    tpu_default: what `BY_PLATFORM` runs when lowered for TPU (`XLA` for an
      op whose kernel does not beat its XLA version there).
  """
  if name == BY_PLATFORM:
    return _by_platform(table[tpu_default], table[XLA])
  if name == PALLAS_TPU and not interpret:
    return _by_platform(table[PALLAS_TPU],
                        _fails_off_tpu(op, table[PALLAS_TPU]))
  return table[name]


def _by_platform(on_tpu: Callable, elsewhere: Callable) -> Callable:
  if on_tpu is elsewhere:
    return on_tpu

  def run(*args, **kwargs):
    return jax.lax.platform_dependent(
        args, kwargs, tpu=lambda a, k: on_tpu(*a, **k),
        default=lambda a, k: elsewhere(*a, **k))
  return run


def describe(name: str, *, tpu_default: str = PALLAS_TPU) -> str:
  """`name` for people: what `BY_PLATFORM` runs where."""
  if name == BY_PLATFORM:
    return (f"{XLA} everywhere" if tpu_default == XLA else
            f"{tpu_default} on TPU, {XLA} elsewhere")
  return name


# A forced Pallas kernel lowered for CPU or GPU would otherwise end in Pallas'
# own "Only interpret mode is supported" from deep in the lowering, which
# names neither the op nor the fix. The branch `platform_dependent` keeps for
# those platforms passes the kernel's inputs through this identity primitive,
# whose evaluation and lowering raise the op's own message. It is linear (its
# derivative and transpose are itself), so a gradient through the kernel
# raises too instead of being pruned to zeros.
_refuse_p = jax_core.Primitive("gemma4_jax_pallas_off_tpu")
_refuse_p.multiple_results = True


def _refuse(args, message):
  live = [i for i, x in enumerate(args) if type(x) is not ad.Zero]
  outs = list(args)
  for i, y in zip(live, _refuse_p.bind(*(args[i] for i in live),
                                       message=message)):
    outs[i] = y
  return outs


@_refuse_p.def_abstract_eval
def _refuse_abstract_eval(*avals, message):
  del message
  return avals


@_refuse_p.def_impl
def _refuse_eager(*args, message):
  del args
  raise RuntimeError(message)


def _refuse_lowering(ctx, *args, message):
  del ctx, args
  raise RuntimeError(message)


def _refuse_jvp(primals, tangents, *, message):
  return (_refuse_p.bind(*primals, message=message),
          _refuse(list(tangents), message))


def _refuse_transpose(cotangents, *args, message):
  del args
  return _refuse(list(cotangents), message)


def _refuse_batching(args, dims, *, message):
  return _refuse_p.bind(*args, message=message), dims


mlir.register_lowering(_refuse_p, _refuse_lowering)
ad.primitive_jvps[_refuse_p] = _refuse_jvp
ad.primitive_transposes[_refuse_p] = _refuse_transpose
batching.primitive_batchers[_refuse_p] = _refuse_batching


def _fails_off_tpu(op: str, kernel: Callable) -> Callable:
  # Forced by the environment, the message must say where it came from.
  source = (f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) == PALLAS_TPU
            else "")
  message = (f"{op}: implementation {PALLAS_TPU!r}{source} can only be "
             f"lowered for TPU (this is lowering for another platform, "
             f"backend {jax.default_backend()!r}); pass interpret=True to run "
             "the Pallas kernel on CPU, or implementation=None for the XLA "
             "version here")

  def run(*args, **kwargs):
    leaves, tree = jax.tree.flatten((args, kwargs))
    args, kwargs = jax.tree.unflatten(tree, _refuse(leaves, message))
    return kernel(*args, **kwargs)
  return run
