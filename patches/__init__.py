"""Patches Tunix (and later qwix) to run Gemma 4 on gemma4_jax ops.

```python
import gemma4_jax.patches as patches
report = patches.apply()      # patch everything available; prints nicely
with patches.applied(implementation="reference"):
  ...                         # patched here, previous state restored after
patches.revert()              # originals back (the same function objects)
print(patches.status())       # what can be patched here, what is
```

One flag per feature. Only `attention` has a patch so far (Tunix Gemma 4
`Attention.block`, see `tunix_attention`); `ple`, `lora` and `loss` are
accepted and reported as "not available" (nothing is patched for them, and
the default `apply()` does not fail because of them).

`apply()` is idempotent, checks every target before touching any (installed
version against the tested ones, presence and signature of each attribute it
relies on; a changed target raises `TargetChangedError` and patches nothing),
patches under a lock and all-or-nothing: if one target fails, the state from
before the call is put back. The resulting state is exactly what was asked:
calling it again with other options replaces the patches cleanly, and a flag
set to False reverts that feature. An installed version that was never tested
but passes every check is patched with a `UserWarning`. Importing this
package patches nothing. Functions jitted before `apply()` keep the code they
were traced with.
"""

from __future__ import annotations

import contextlib

from gemma4_jax import implementations
from gemma4_jax import ops
from gemma4_jax.patches import _framework
from gemma4_jax.patches import tunix_attention
from gemma4_jax.patches._framework import PatchReport
from gemma4_jax.patches._framework import Status
from gemma4_jax.patches._framework import TargetChangedError
from gemma4_jax.patches._framework import TargetReport
from gemma4_jax.patches._framework import TargetStatus

__all__ = ["apply", "revert", "applied", "status", "PatchReport", "Status",
           "TargetChangedError", "TargetReport", "TargetStatus"]

# feature flag -> function returning its target, or None while gemma4_jax has
# no patch for that feature.
_TARGETS = {
    "attention": tunix_attention.target,
    "ple": None,
    "lora": None,
    "loss": None,
}
_NO_PATCH_YET = "gemma4_jax has no patch for this feature yet"


def apply(*, attention: bool = True, ple: bool = True, lora: bool = True,
          loss: bool = True, implementation: str | None = None,
          interpret: bool = False) -> PatchReport:
  """Patches the enabled features; the patched set becomes exactly these.

  Args:
    attention: route Tunix Gemma 4 attention (prefill and training; decode
      stays Tunix's) through `gemma4_jax.ops.attention`.
    ple, lora, loss: accepted; no patch exists for them yet, so they are
      reported as not available.
    implementation: passed to every op the patches call: None (Pallas on
      TPU, XLA elsewhere, `GEMMA4_JAX_IMPLEMENTATION` overrides), "xla",
      "reference" or "pallas_tpu".
    interpret: run Pallas kernels in interpret mode, so that
      `implementation="pallas_tpu"` runs on CPU (for tests; slow).

  Returns:
    A `PatchReport` (one entry per flag, versions, implementation).

  Raises:
    TypeError: a flag or `interpret` is not a bool, or `implementation` not a
      str or None.
    ValueError: `implementation` is not a known name or the op lacks it.
    RuntimeError: `implementation` names one that cannot run here.
    TargetChangedError: a target changed; nothing was patched.
  """
  flags = {"attention": attention, "ple": ple, "lora": lora, "loss": loss}
  for name, value in {**flags, "interpret": interpret}.items():
    if not isinstance(value, bool):
      raise TypeError(f"{name} must be a bool, got {value!r}")
  resolved = _resolve_implementation(implementation, interpret)
  options = _framework.OpOptions(implementation, interpret)
  with _framework.LOCK:
    plan, reports = [], []
    for feature, enabled in flags.items():
      if not enabled:
        reports.append(TargetReport(feature, None, _framework.SKIPPED,
                                    f"{feature}=False"))
      elif _TARGETS[feature] is None:
        reports.append(TargetReport(feature, None, _framework.NOT_AVAILABLE,
                                    _NO_PATCH_YET))
      else:
        target = _TARGETS[feature]()
        known = _framework.check(target)
        plan.append(target)
        version = _framework.installed_version(target.distribution)
        reports.append(TargetReport(
            feature, target.name, _framework.PATCHED,
            f"{target.distribution} {version}"
            f"{'' if known else ', untested version'}"))
    _framework.install(tuple(plan), options)
  return PatchReport(
      targets=tuple(reports), implementation=implementation,
      resolved_implementation=resolved,
      tunix_version=_framework.installed_version("google-tunix"),
      qwix_version=_framework.installed_version("qwix"), interpret=interpret)


def revert() -> tuple[str, ...]:
  """Restores every original (the very objects); returns the target names.

  Harmless when nothing is patched.
  """
  with _framework.LOCK:
    return _framework.restore_all()


@contextlib.contextmanager
def applied(*, attention: bool = True, ple: bool = True, lora: bool = True,
            loss: bool = True, implementation: str | None = None,
            interpret: bool = False):
  """`apply(...)` for the duration of a `with` block; yields the report.

  On exit, normal or by exception, the patches in place before the block are
  put back (none: everything is reverted).
  """
  with _framework.LOCK:
    before = _framework.active()
  report = apply(attention=attention, ple=ple, lora=lora, loss=loss,
                 implementation=implementation, interpret=interpret)
  try:
    yield report
  finally:
    with _framework.LOCK:
      _framework.reinstate(before)


def status() -> Status:
  """What can be patched here and what is patched now; changes nothing."""
  with _framework.LOCK:
    in_place = {a.target.name: a for a in _framework.active()}
    rows = []
    for feature, make_target in _TARGETS.items():
      if make_target is None:
        rows.append(TargetStatus(feature, None, available=False,
                                 patched=False, version=None,
                                 version_known=False, reason=_NO_PATCH_YET))
        continue
      target, available, known, reason = None, False, False, ""
      try:
        target = make_target()
        known = _framework.check(target, warn=False)
        available = True
        if not known:
          reason = ("untested version: "
                    f"known to work: {target.known_to_work}")
      except TargetChangedError as e:
        reason = str(e)
      rows.append(TargetStatus(
          feature, target.name if target else None, available=available,
          patched=target is not None and target.name in in_place,
          version=(_framework.installed_version(target.distribution)
                   if target else None),
          version_known=known, reason=reason))
    implementation = next(
        (a.options.implementation for a in in_place.values()), None)
  return Status(targets=tuple(rows), implementation=implementation,
                tunix_version=_framework.installed_version("google-tunix"),
                qwix_version=_framework.installed_version("qwix"))


def _resolve_implementation(implementation, interpret: bool) -> str:
  if implementation is not None and not isinstance(implementation, str):
    raise TypeError(f"implementation must be a str or None, got "
                    f"{type(implementation).__name__}")
  # The attention patch is the only op user so far.
  return implementations.resolve("attention", implementation,
                                 ops.AVAILABLE["attention"],
                                 interpret=interpret)
