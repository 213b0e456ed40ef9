"""Choosing an implementation for an op: Pallas on TPU, blockwise XLA elsewhere.

`implementation=None` takes the env var `GEMMA4_JAX_IMPLEMENTATION` if set,
else the first default that can run on the current backend. Naming an
implementation explicitly never falls back: if it cannot run here, it raises.
"""

from __future__ import annotations

import os

import jax

PALLAS_TPU = "pallas_tpu"
XLA = "xla"
REFERENCE = "reference"
KNOWN = (PALLAS_TPU, XLA, REFERENCE)
ENV_VAR = "GEMMA4_JAX_IMPLEMENTATION"


def default_backend() -> str:
  return jax.default_backend()


def resolve(op: str, implementation: str | None, available: tuple[str, ...],
            *, interpret: bool = False) -> str:
  """Returns the implementation `op` runs with, or raises.

  Args:
    op: name of the op, for error messages.
    implementation: the caller's choice, or None for the default.
    available: the implementations `op` has, in order of preference.
    interpret: whether Pallas kernels run in interpret mode (on any backend).

  Raises:
    ValueError: unknown name, or one that `op` does not have.
    RuntimeError: a known implementation that cannot run on this backend.
  """
  explicit = implementation is not None
  if implementation is None:
    implementation = os.environ.get(ENV_VAR) or None
    explicit = implementation is not None
  if implementation is None:
    for candidate in available:
      if can_run(candidate, interpret=interpret):
        return candidate
    raise RuntimeError(f"{op}: none of {available} can run on backend "
                       f"{default_backend()!r}")
  if implementation not in KNOWN:
    raise ValueError(f"{op}: unknown implementation {implementation!r}; "
                     f"expected one of {KNOWN}")
  if implementation not in available:
    raise ValueError(f"{op}: implementation {implementation!r} is not "
                     f"available for this op; it has {available}")
  if explicit and not can_run(implementation, interpret=interpret):
    raise RuntimeError(
        f"{op}: implementation {implementation!r} cannot run on backend "
        f"{default_backend()!r} (pass interpret=True to run a Pallas kernel "
        "on CPU)")
  return implementation


def can_run(implementation: str, *, interpret: bool = False) -> bool:
  if implementation == PALLAS_TPU:
    return interpret or default_backend() == "tpu"
  return implementation in (XLA, REFERENCE)
