"""Patches Tunix and qwix to run Gemma 4 on gemma4_jax ops.

```python
import gemma4_jax.patches as patches
report = patches.apply()      # patch everything available; prints nicely
with patches.applied(implementation="reference"):
  ...                         # patched here, previous state restored after
patches.revert()              # originals back (the same function objects)
print(patches.status())       # what can be patched here, what is
```

One flag per feature. `attention` patches Tunix Gemma 4 `Attention.block` (see
`tunix_attention`), `ple` its `Embedder.encode_per_layer_input` (see
`tunix_ple`; `ple="host"` reads a host-resident table), `lora` qwix's LoRA
interceptor (see `qwix_lora`), `loss` Tunix's default SFT loss (see
`tunix_loss`; in Tunix main also its `peft_trainer_v2`'s), `mask` Tunix's
causal padding mask (see `tunix_mask`) and `remat` each decoder layer's remat
policy (see `tunix_remat`; off unless a policy is named). `share_layer_code`
adds XLA:TPU's `--xla_tpu_enable_deduplicated_calls=true` to
`LIBTPU_INIT_ARGS`, without which the step with the Pallas kernels keeps one
copy of code per layer (see `tpu_compiler`; call `apply()` before the first
JAX computation).

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

Each patch module has the same shape. First its target spec, `SPEC`
(`_framework.PatchSpec`), declarative data: the attribute it replaces, the
distribution, and per known layout of that library (google-tunix 0.1.7,
Tunix main) the module holding the attribute, its exact parameters and what
else the replacement relies on there; then `targets()`, the spec as found
here bound to the replacement. Below that, apart from the spec, the
restated library code: the replacement built from the original
(`(original, options, layout) -> replacement`) and its helpers. `apply()`
checks and installs what each module's `targets()` gives (`_framework`).
`tpu_compiler` patches an environment variable, not an attribute: its
`SPEC` is a `_framework.EnvironmentSpec`, requested after the attribute
patches under the same lock.
"""

from __future__ import annotations

import contextlib

from gemma4_jax import implementations
from gemma4_jax import ops
from gemma4_jax.patches import _framework
from gemma4_jax.patches import qwix_lora
from gemma4_jax.patches import tpu_compiler
from gemma4_jax.patches import tunix_attention
from gemma4_jax.patches import tunix_ple
from gemma4_jax.patches import tunix_loss
from gemma4_jax.patches import tunix_mask
from gemma4_jax.patches import tunix_remat
from gemma4_jax.patches._framework import PatchReport
from gemma4_jax.patches._framework import Status
from gemma4_jax.patches._framework import TargetChangedError
from gemma4_jax.patches._framework import TargetReport
from gemma4_jax.patches._framework import TargetStatus

__all__ = ["apply", "revert", "applied", "status", "PatchReport", "Status",
           "TargetChangedError", "TargetReport", "TargetStatus"]

# apply() flag -> the module patching it (its `SPEC` and `targets()`), in
# flag order.
_PATCHES = {module.SPEC.feature: module for module in (
    tunix_attention, tunix_ple, qwix_lora, tunix_loss, tunix_mask,
    tunix_remat)}
# `Target.ops` name -> the `ops.AVAILABLE` entry whose choice it follows
# (None: one XLA fusion on every platform, no choice).
_OP_CHOICE = {"attention": "attention", "ple_lookup": "ple_lookup",
              "combine_per_layer_inputs": None, "lora_einsum": "lora_matmul",
              "softcapped_cross_entropy": "softcapped_cross_entropy"}
PLE_HOST = "host"  # apply(ple="host"): the PLE table stays in host memory
# A feature -> the feature it needs: the compact mask is only read by the
# patched attention.
_NEEDS = {"mask": "attention"}


def apply(*, attention: bool = True, ple: bool | str = True, lora: bool = True,
          loss: bool = True, mask: bool = True, remat: str | None = None,
          implementation: str | None = None, interpret: bool = False,
          share_layer_code: bool = True) -> PatchReport:
  """Patches the enabled features; the patched set becomes exactly these.

  Args:
    attention: route Tunix Gemma 4 attention (prefill and training; decode
      stays Tunix's) through `gemma4_jax.ops.attention`.
    ple: True routes Tunix's `Embedder.encode_per_layer_input` through
      `gemma4_jax.ops.ple_lookup` (sharded under a mesh) and the fused
      combine; "host" does the same with the table in host memory (move it
      there with `tunix_ple.offload_table(model)`); False leaves it stock.
    lora: route qwix LoRA einsum/dot_general (every Gemma 4 projection)
      through `gemma4_jax.ops.lora_einsum`/`lora_matmul` (see `qwix_lora`
      for what stays on qwix's path; the report names it).
    loss: compute PeftTrainer's default loss on Gemma 4 with
      `gemma4_jax.ops.softcapped_cross_entropy` (no logits materialized).
    mask: Tunix's `make_causal_attn_mask` returns a `[B, T]`
      `masks.CausalPaddingMask` instead of the `[B, T, T]` array (see
      `tunix_mask`); needs `attention`, else left stock.
    remat: None leaves remat to the model's `RematConfig`; "full",
      "minimal", "attention" or "offload" rematerializes every decoder layer
      under that policy (see `tunix_remat`).
    implementation: passed to every op the patches call: None (each op's
      TPU default when the model is lowered for TPU, from a CPU host too;
      XLA elsewhere; `GEMMA4_JAX_IMPLEMENTATION` overrides), "xla",
      "reference" or "pallas_tpu".
    interpret: run Pallas kernels in interpret mode, so that
      `implementation="pallas_tpu"` runs on CPU (for tests; slow).
    share_layer_code: add `--xla_tpu_enable_deduplicated_calls=true` to
      `LIBTPU_INIT_ARGS` (unless it names the flag already), so that XLA:TPU
      compiles identical decoder layers once (`tpu_compiler`); takes effect
      only if the TPU backend has not started yet (else a `UserWarning`).
      False puts back the value from before.

  Returns:
    A `PatchReport` (one entry per flag, versions, implementation).

  Raises:
    TypeError: a flag or `interpret` is not a bool, or `implementation` not a
      str or None.
    ValueError: `ple` is not True, False or "host"; `implementation` is not
      a known name or the op lacks it.
    TargetChangedError: a target changed; nothing was patched.
  """
  flags, ple_host = _checked_flags(attention, ple, lora, loss, mask, remat,
                                   interpret, share_layer_code)
  resolved = _resolve_implementation(implementation, interpret,
                                     "attention" if attention or not ple
                                     else "ple_lookup")
  options = _framework.OpOptions(implementation, interpret, ple_host, remat)
  with _framework.LOCK:
    plan, reports = _plan(flags, options)
    _framework.install(plan, options)
    compiler = _share_layer_code(share_layer_code)
  return PatchReport(
      targets=reports, implementation=implementation,
      resolved_implementation=resolved,
      tunix_version=_framework.installed_version("google-tunix"),
      qwix_version=_framework.installed_version("qwix"), interpret=interpret,
      tpu_compiler=compiler)


def _checked_flags(attention, ple, lora, loss, mask, remat, interpret,
                   share_layer_code) -> tuple[dict[str, bool], bool]:
  """`apply()`'s arguments checked, before anything changes: (feature ->
  enabled, in flag order; whether the PLE table is host-resident)."""
  if not (isinstance(ple, bool) or ple == PLE_HOST):
    raise ValueError(f"ple must be True, False or {PLE_HOST!r}, got {ple!r}")
  ple_host = ple == PLE_HOST
  if remat is not None:
    tunix_remat.policy(remat)  # raises naming the policies
  flags = {"attention": attention, "ple": bool(ple), "lora": lora,
           "loss": loss, "mask": mask}
  for name, value in {**flags, "interpret": interpret,
                      "share_layer_code": share_layer_code}.items():
    if not isinstance(value, bool):
      raise TypeError(f"{name} must be a bool, got {value!r}")
  flags["remat"] = remat is not None
  return flags, ple_host


def _plan(flags: dict[str, bool], options: _framework.OpOptions
          ) -> tuple[tuple[_framework.Target, ...], tuple[TargetReport, ...]]:
  """The targets to patch for `flags`, every one checked, and the report of
  each feature (call with the lock held).

  Raises:
    TargetChangedError: a target changed (nothing is patched yet).
  """
  plan, reports = [], []
  for feature, enabled in flags.items():
    needs = _NEEDS.get(feature)
    if not enabled:
      reports.append(TargetReport(
          feature, None, _framework.SKIPPED,
          "remat=None" if feature == "remat" else f"{feature}=False"))
    elif needs and not flags[needs]:
      reports.append(TargetReport(
          feature, None, _framework.SKIPPED,
          f"needs the {needs} patch ({needs}=False)"))
    else:
      for target in _PATCHES[feature].targets():
        known = _framework.check(target)
        plan.append(target)
        reports.append(_patched_report(target, known, options))
  return tuple(plan), tuple(reports)


def _patched_report(target: _framework.Target, known: bool,
                    options: _framework.OpOptions) -> TargetReport:
  version = _framework.installed_version(target.distribution)
  return TargetReport(
      target.feature, target.name, _framework.PATCHED,
      f"{target.distribution} {version}"
      f"{f', {target.known_layout} layout' if target.known_layout else ''}"
      f"{'' if known else ', untested version'}"
      f"{'; ' + target.note if target.note else ''}",
      runs=_runs(target, options), stock=target.stock)


def _share_layer_code(enabled: bool) -> str:
  """The environment patch (`tpu_compiler.SPEC`) requested, or the variable
  put back (call with the lock held); returns the report's line."""
  if enabled:
    return tpu_compiler.request()
  tpu_compiler.restore()
  return f"{tpu_compiler.SPEC.feature}=False"


def revert() -> tuple[str, ...]:
  """Restores every original (the very objects) and `LIBTPU_INIT_ARGS`;
  returns the target names.

  Harmless when nothing is patched.
  """
  with _framework.LOCK:
    tpu_compiler.restore()
    return _framework.restore_all()


@contextlib.contextmanager
def applied(*, attention: bool = True, ple: bool | str = True,
            lora: bool = True, loss: bool = True, mask: bool = True,
            remat: str | None = None, implementation: str | None = None,
            interpret: bool = False, share_layer_code: bool = True):
  """`apply(...)` for the duration of a `with` block; yields the report.

  On exit, normal or by exception, the patches in place before the block are
  put back (none: everything is reverted), and `LIBTPU_INIT_ARGS` as it was.
  """
  with _framework.LOCK:
    before = _framework.active()
    compiler_before = tpu_compiler.snapshot()
  report = apply(attention=attention, ple=ple, lora=lora, loss=loss,
                 mask=mask, remat=remat, implementation=implementation,
                 interpret=interpret, share_layer_code=share_layer_code)
  try:
    yield report
  finally:
    with _framework.LOCK:
      _framework.reinstate(before)
      tpu_compiler.reinstate(compiler_before)


def status() -> Status:
  """What can be patched here and what is patched now; changes nothing."""
  with _framework.LOCK:
    in_place = {a.target.name: a for a in _framework.active()}
    rows = []
    for feature, patch in _PATCHES.items():
      try:
        targets = patch.targets()
      except TargetChangedError as e:  # no known layout of the library
        rows.append(TargetStatus(feature, None, available=False,
                                 patched=False, version=None,
                                 version_known=False, reason=str(e)))
        continue
      rows.extend(_target_status(target, target.name in in_place)
                  for target in targets)
    implementation = next(
        (a.options.implementation for a in in_place.values()), None)
  return Status(targets=tuple(rows), implementation=implementation,
                tunix_version=_framework.installed_version("google-tunix"),
                qwix_version=_framework.installed_version("qwix"))


def _target_status(target: _framework.Target, patched: bool) -> TargetStatus:
  available, known, reason = False, False, ""
  try:
    known = _framework.check(target, warn=False)
    available = True
    if not known:
      reason = f"untested version: known to work: {target.known_to_work}"
  except TargetChangedError as e:
    reason = str(e)
  return TargetStatus(
      target.feature, target.name, available=available, patched=patched,
      version=_framework.installed_version(target.distribution),
      version_known=known, reason=reason)


def _runs(target: _framework.Target,
          options: _framework.OpOptions) -> tuple[str, ...]:
  """The report's "runs" lines: per op the target calls, which
  implementation runs where (`implementations.describe`)."""
  runs = []
  for op in target.ops:
    choice = _OP_CHOICE[op]
    if op == "ple_lookup" and options.ple_host:
      where = "host-resident table, rows gathered on the host"
    elif choice is None:
      where = "xla everywhere (one fusion, no kernel)"
    else:
      name = implementations.resolve(choice, options.implementation,
                                     ops.AVAILABLE[choice],
                                     interpret=options.interpret)
      where = implementations.describe(
          name, tpu_default=ops.TPU_DEFAULT[choice])
      if name == implementations.PALLAS_TPU:
        where += " (interpret mode)" if options.interpret else " (TPU only)"
      elif (name == implementations.BY_PLATFORM and
            ops.TPU_DEFAULT[choice] != implementations.PALLAS_TPU and
            implementations.PALLAS_TPU in ops.AVAILABLE[choice]):
        # Why not the kernel: README's "TPU defaults".
        where += (f"; its Pallas kernel only with implementation="
                  f"{implementations.PALLAS_TPU!r}")
    runs.append(f"ops.{op}: {where}")
  if target.feature == "remat":
    runs.append(f"each decoder layer under jax.checkpoint policy "
                f"{options.remat!r}")
  return tuple(runs)


def _resolve_implementation(implementation, interpret: bool, op: str) -> str:
  if implementation is not None and not isinstance(implementation, str):
    raise TypeError(f"implementation must be a str or None, got "
                    f"{type(implementation).__name__}")
  # What the first patched op runs with (attention's, unless only ple is on).
  return implementations.describe(
      implementations.resolve(op, implementation, ops.AVAILABLE[op],
                              interpret=interpret),
      tpu_default=ops.TPU_DEFAULT[op])
