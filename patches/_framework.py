"""Patch machinery: target specs, checks, install/restore under a lock,
reports.

A patch declares its targets in a `PatchSpec`: the attribute it replaces
(`Owner.attribute`), the distribution that ships it, and the `Layout`s of
that library it was tested on, each naming the module that holds the
attribute, the attribute's exact parameters and the other `Requirement`s the
replacement relies on there. `PatchSpec.targets` finds the layout installed
here and gives one `Target` per module to patch; `check` verifies a target
against what is installed without changing anything; `install` makes the
set of active patches exactly a given plan, all-or-nothing. A patch of an
environment variable rather than an attribute declares an
`EnvironmentSpec`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from importlib import metadata
import importlib.util
import inspect
import threading
from typing import Callable
import warnings

PATCHED = "patched"
SKIPPED = "skipped"

LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class OpOptions:
  """How the patched code calls `gemma4_jax.ops`: what `apply()` was given.

  Attributes:
    implementation: None (the platform default), "pallas_tpu", "xla" or
      "reference".
    interpret: run Pallas kernels in interpret mode (CPU tests of a patched
      model with `implementation="pallas_tpu"`).
  """
  implementation: str | None = None
  interpret: bool = False
  ple_host: bool = False  # apply(ple="host"): the PLE table is host-resident
  remat: str | None = None  # apply(remat=...): the decoder layers' policy

  @property
  def op_kwargs(self) -> dict:
    """Keyword arguments for any `gemma4_jax.ops` call."""
    return {"implementation": self.implementation,
            "interpret": self.interpret}


class TargetChangedError(RuntimeError):
  """The installed library no longer has what a patch relies on."""


@dataclasses.dataclass(frozen=True)
class Requirement:
  """Something a replacement relies on in the target library.

  Attributes:
    module: the module to look in; None in a `Layout`'s requirements: the
      module being patched.
    attribute: dotted path inside `module` ("Attention.block"); a dataclass
      field counts as present.
    parameters: if set, the exact parameter names of its signature.
    names: if set, names its code must use (`co_names`): how attributes that
      `__init__` stores on `self` are checked without building an instance.
    takes: parameter names its signature must include (others may follow).
    unless: when this other requirement holds, this one is not needed (a
      path the replacement takes only on one layout of the same module).
  """
  module: str | None
  attribute: str
  parameters: tuple[str, ...] | None = None
  names: tuple[str, ...] = ()
  takes: tuple[str, ...] = ()
  unless: Requirement | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
  """One layout of the target library that a patch was tested on.

  Attributes:
    name: how messages name it ("google-tunix 0.1.7", "Tunix main
      c7d8950f").
    module: the module holding the replaced attribute.
    parameters: the exact parameter names of the replaced attribute here
      (None: not checked).
    requirements: what else the replacement relies on here; one whose
      `module` is None is looked up in the module being patched.
    known_versions: versions of the distribution tested with this layout.
    known_by_layout: found here, this layout counts as tested whatever the
      installed version string says (Tunix main is imported over
      google-tunix 0.1.7's metadata; see `Target.known_layout`).
    found_by: an attribute of `module` that tells this layout apart from the
      next ones; None: the layout is taken as it is, and its requirements
      report what is missing.
    copies: modules holding their own copy of the attribute, patched too
      where they exist (Tunix main's `peft_trainer_v2` loss).
    where: the "Known to work" text after `name` (default: `module`).
  """
  name: str
  module: str
  parameters: tuple[str, ...] | None = None
  requirements: tuple[Requirement, ...] = ()
  known_versions: tuple[str, ...] = ()
  known_by_layout: bool = False
  found_by: str | None = None
  copies: tuple[str, ...] = ()
  where: str | None = None


@dataclasses.dataclass(frozen=True)
class PatchSpec:
  """One patch's declarative target spec: what it replaces, and where.

  Attributes:
    feature: the `apply()` flag that enables it ("attention").
    distribution: the PyPI distribution shipping the target.
    attribute: "Owner.name" or "name", replaced in the layout's module.
    layouts: the layouts the patch was tested on, tried in order: the first
      one found here is patched.
    ops: the `gemma4_jax.ops` functions the replacement calls.
    note: appended to the report's reason when patched ("" for none).
    stock: what the replacement leaves on the library's own path, and why.
  """
  feature: str
  distribution: str
  attribute: str
  layouts: tuple[Layout, ...]
  ops: tuple[str, ...] = ()
  note: str = ""
  stock: str = ""

  @property
  def known_to_work(self) -> str:
    """For messages: every layout's name and module."""
    return "; ".join(f"{layout.name} ({layout.where or layout.module})"
                     for layout in self.layouts)

  def detect_layout(self) -> Layout:
    """The first of `layouts` found here.

    Raises:
      TargetChangedError: the library is not installed or none of the
        modules has what tells its layout apart.
    """
    for layout in self.layouts:
      if layout.found_by is None or _has(layout.module, layout.found_by):
        return layout
    owner = " or ".join(dict.fromkeys(layout.found_by
                                      for layout in self.layouts))
    raise TargetChangedError(
        f"gemma4_jax.patches cannot patch {self.feature}: none of "
        f"{', '.join(layout.module for layout in self.layouts)} has {owner} "
        f"({self.distribution} {installed_version(self.distribution)}). "
        f"Known to work: {self.known_to_work}. Nothing was patched.")

  def targets(self, make_replacement: Callable) -> tuple[Target, ...]:
    """The targets in the layout found here: its module, then each of its
    `copies` that exists.

    Args:
      make_replacement: `(original, options: OpOptions, layout: Layout) ->
        replacement`, the patch's restated code.
    """
    layout = self.detect_layout()
    modules = (layout.module,) + tuple(
        module for module in layout.copies if module_exists(module))

    def bound(original, options):
      return make_replacement(original, options, layout)

    return tuple(Target(
        feature=self.feature, module=module, attribute=self.attribute,
        distribution=self.distribution, known_versions=layout.known_versions,
        known_to_work=self.known_to_work,
        requirements=tuple(_in_module(module, requirement) for requirement in (
            Requirement(None, self.attribute, parameters=layout.parameters),
            *layout.requirements)),
        make_replacement=bound,
        known_layout=layout.name if layout.known_by_layout else None,
        note=self.note, ops=self.ops, stock=self.stock) for module in modules)


@dataclasses.dataclass(frozen=True)
class EnvironmentSpec:
  """A patch of a process environment variable rather than an attribute.

  Attributes:
    feature: the `apply()` flag that enables it.
    variable: the environment variable ("LIBTPU_INIT_ARGS").
    flag: the flag added to it, unless the variable names it already.
    value: the flag's value.
    effect: what the flag does, for the report.
  """
  feature: str
  variable: str
  flag: str
  value: str
  effect: str

  @property
  def argument(self) -> str:
    return f"--{self.flag}={self.value}"


@dataclasses.dataclass(frozen=True)
class Target:
  """One attribute to replace, as found in the installed library
  (`PatchSpec.targets`).

  Attributes:
    feature: the `apply()` flag that enables it ("attention").
    module: the module holding the owner ("tunix.models.gemma4.model").
    attribute: "Owner.name" or "name" inside `module`.
    distribution: the PyPI distribution shipping `module`.
    known_versions: versions of `distribution` tested with this target.
    known_layout: set when the layout found, not the version string, is what
      was tested (Tunix main's code imported over google-tunix 0.1.7's
      metadata): its name, and the target counts as known.
    known_to_work: for error messages, every version/layout the feature
      supports ("google-tunix 0.1.7 (tunix.models.gemma4.model)").
    requirements: what `make_replacement` relies on.
    make_replacement: `(original, options: OpOptions) -> replacement`.
    note: appended to the report's reason when patched ("" for none).
    ops: the `gemma4_jax.ops` functions the replacement calls (the report
      says which implementation of each runs where).
    stock: what the replacement leaves on the library's own path, and why.
  """
  feature: str
  module: str
  attribute: str
  distribution: str
  known_versions: tuple[str, ...]
  known_to_work: str
  requirements: tuple[Requirement, ...]
  make_replacement: Callable[[Callable, OpOptions], Callable]
  known_layout: str | None = None
  note: str = ""
  ops: tuple[str, ...] = ()
  stock: str = ""

  @property
  def name(self) -> str:
    return f"{self.module}:{self.attribute}"


@dataclasses.dataclass(frozen=True)
class TargetReport:
  """What `apply()` did with one target of a feature.

  `state` is "patched" or "skipped" (its flag was False, or the patch it
  needs is off); `target` is None when skipped.
  A feature with several targets (the loss: Tunix's `PeftTrainer` and, where
  it exists, its `peft_trainer_v2`) has one report per target.

  Attributes:
    runs: when patched, what runs instead, one line each ("ops.attention:
      pallas_tpu on TPU, xla elsewhere").
    stock: what stays on the library's own path, and why.
  """
  feature: str
  target: str | None
  state: str
  reason: str
  runs: tuple[str, ...] = ()
  stock: str = ""


@dataclasses.dataclass(frozen=True)
class PatchReport:
  """The result of `apply()`.

  Attributes:
    targets: one entry per target, features in flag order (a feature that
      is off: one entry with no target).
    implementation: the `implementation` passed to `apply()`.
    resolved_implementation: what `gemma4_jax.ops.attention` runs with for
      that choice, e.g. "pallas_tpu on TPU, xla elsewhere" for None.
    tunix_version, qwix_version: installed versions (None if not installed).
    tpu_compiler: what `share_layer_code` did to `LIBTPU_INIT_ARGS`
      (`tpu_compiler.request`).
  """
  targets: tuple[TargetReport, ...]
  implementation: str | None
  resolved_implementation: str
  tunix_version: str | None
  qwix_version: str | None
  interpret: bool = False
  tpu_compiler: str = ""

  @property
  def patched(self) -> tuple[str, ...]:
    """Names (`module:attribute`) of the patched targets."""
    return tuple(t.target for t in self.targets if t.state == PATCHED)

  def __str__(self) -> str:
    lines = [f"gemma4_jax.patches (google-tunix {self.tunix_version}, qwix "
             f"{self.qwix_version}, implementation {self.implementation!r} "
             f"-> {self.resolved_implementation!r}"
             f"{', interpret mode' if self.interpret else ''}):"]
    for t in self.targets:
      lines.append(f"  {t.feature:<10} {t.state:<14} {t.target or '-'}"
                   f"{'  (' + t.reason + ')' if t.reason else ''}")
      lines.extend(f"  {'':<10} runs  {run}" for run in t.runs)
      if t.stock:
        lines.append(f"  {'':<10} stock {t.stock}")
    if self.tpu_compiler:
      lines.append(f"  {'xla:tpu':<10} {self.tpu_compiler}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class TargetStatus:
  """Whether one feature can be patched here and whether it is.

  Attributes:
    feature: the `apply()` flag.
    target: `module:attribute`, or None when no known layout of the library
      was found.
    available: `apply()` would patch it here (its checks pass).
    patched: it is patched now.
    version: installed version of the target's distribution.
    version_known: that version is one the patch was tested with.
    reason: why it is not available, or a note on the version.
  """
  feature: str
  target: str | None
  available: bool
  patched: bool
  version: str | None
  version_known: bool
  reason: str


@dataclasses.dataclass(frozen=True)
class Status:
  """The result of `status()`: per feature, plus what is active.

  `implementation` is the one passed to the `apply()` now in effect (None
  when nothing is patched or the default was asked for).
  """
  targets: tuple[TargetStatus, ...]
  implementation: str | None
  tunix_version: str | None
  qwix_version: str | None

  def __str__(self) -> str:
    lines = [f"gemma4_jax.patches: google-tunix {self.tunix_version}, qwix "
             f"{self.qwix_version}"]
    for t in self.targets:
      state = ("patched" if t.patched else
               "can patch" if t.available else "cannot patch")
      version = "" if t.version_known or not t.available else (
          " [untested version]")
      lines.append(f"  {t.feature:<10} {state:<12} {t.target or '-'}"
                   f"{version}{'  (' + t.reason + ')' if t.reason else ''}")
    return "\n".join(lines)


def _in_module(module: str, requirement: Requirement) -> Requirement:
  """`requirement` with `module` wherever it names none."""
  unless = requirement.unless and _in_module(module, requirement.unless)
  return dataclasses.replace(requirement, module=requirement.module or module,
                             unless=unless)


def _has(module: str, attribute: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None and hasattr(
        importlib.import_module(module), attribute)
  except ImportError:  # a parent package is missing
    return False


def module_exists(module: str) -> bool:
  """`module` can be found here (without importing it)."""
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:  # a parent package is missing (google-tunix 0.1.7)
    return False


def holds(requirement: Requirement) -> bool:
  """Whether `requirement` holds here."""
  return _problem(requirement) is None


def installed_version(distribution: str) -> str | None:
  try:
    return metadata.version(distribution)
  except metadata.PackageNotFoundError:
    return None


def check(target: Target, *, warn: bool = True) -> bool:
  """Checks `target` against the installed library; changes nothing.

  Returns:
    Whether the installed version is one of `target.known_versions`. An
    unknown version whose requirements all hold is patched, with a
    `UserWarning` when `warn`.

  Raises:
    TargetChangedError: naming every missing or changed attribute and the
      versions known to work.
  """
  problems = [p for p in map(_problem, target.requirements) if p]
  version = installed_version(target.distribution)
  if problems:
    raise TargetChangedError(
        f"gemma4_jax.patches cannot patch {target.feature} ({target.name}) "
        f"on {target.distribution} {version}: " + "; ".join(problems) +
        f". Known to work: {target.known_to_work}. Nothing was patched.")
  known = target.known_layout is not None or version in target.known_versions
  if not known and warn:
    warnings.warn(
        f"gemma4_jax.patches: {target.distribution} {version} is not among "
        f"the versions {target.feature} was tested with ("
        f"{target.known_to_work}); its attributes and signatures match, so "
        f"{target.name} is patched anyway", UserWarning, stacklevel=3)
  return known


def _problem(requirement: Requirement) -> str | None:
  """Describes what is wrong with `requirement` here, or None."""
  if requirement.unless is not None and holds(requirement.unless):
    return None
  try:
    obj = importlib.import_module(requirement.module)
  except ImportError as e:
    return f"module {requirement.module} cannot be imported ({e})"
  parts = requirement.attribute.split(".")
  for depth, part in enumerate(parts):
    if hasattr(obj, part):
      obj = getattr(obj, part)
      continue
    last = depth == len(parts) - 1
    if (last and dataclasses.is_dataclass(obj) and
        part in {f.name for f in dataclasses.fields(obj)}):
      return None
    return (f"{requirement.module}.{'.'.join(parts[:depth + 1])} is missing")
  where = f"{requirement.module}.{requirement.attribute}"
  if requirement.parameters is not None or requirement.takes:
    try:
      parameters = tuple(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
      return f"{where} has no inspectable signature"
    if requirement.parameters not in (None, parameters):
      return (f"{where} takes ({', '.join(parameters)}), expected "
              f"({', '.join(requirement.parameters)})")
    missing = [p for p in requirement.takes if p not in parameters]
    if missing:
      return f"{where} takes no {', '.join(missing)}"
  if requirement.names:
    used = set(getattr(getattr(obj, "__code__", None), "co_names", ()))
    missing = [n for n in requirement.names if n not in used]
    if missing:
      return f"{where} no longer uses {', '.join(missing)}"
  return None


@dataclasses.dataclass(frozen=True)
class _Active:
  target: Target
  owner: object
  name: str
  original: object
  had_own: bool  # the owner defined the attribute itself (not inherited)
  replacement: Callable
  options: OpOptions


# target name -> the patch in place. Guarded by LOCK.
_ACTIVE: dict[str, _Active] = {}


def active() -> tuple[_Active, ...]:
  """The patches in place (call with LOCK held)."""
  return tuple(a for a in _ACTIVE.values() if _in_place(a))


def _in_place(entry: _Active) -> bool:
  return vars(entry.owner).get(entry.name) is entry.replacement


def _locate(target: Target) -> tuple[object, str]:
  owner = importlib.import_module(target.module)
  *path, name = target.attribute.split(".")
  for part in path:
    owner = getattr(owner, part)
  return owner, name


def install(targets: tuple[Target, ...], options: OpOptions) -> None:
  """Makes the active patches exactly `targets` (call with LOCK held).

  Already in place with the same options: nothing changes. Otherwise
  every active patch is restored and each target patched in turn; if any step
  fails, the state from before the call is put back and the error re-raised.
  """
  current = active()
  if ({a.target.name for a in current} == {t.name for t in targets} and
      all(a.options == options for a in current) and
      len(current) == len(_ACTIVE)):
    return
  try:
    restore_all()
    for target in targets:
      owner, name = _locate(target)
      had_own = name in vars(owner)
      original = vars(owner)[name] if had_own else getattr(owner, name)
      replacement = target.make_replacement(original, options)
      setattr(owner, name, replacement)
      _ACTIVE[target.name] = _Active(target, owner, name, original, had_own,
                                     replacement, options)
  except BaseException:
    reinstate(current)
    raise


def reinstate(entries: tuple[_Active, ...]) -> None:
  """Puts back exactly `entries` from `active()` (call with LOCK held)."""
  restore_all()
  for entry in entries:
    setattr(entry.owner, entry.name, entry.replacement)
    _ACTIVE[entry.target.name] = entry


def restore_all() -> tuple[str, ...]:
  """Puts every original back (call with LOCK held); returns target names.

  An attribute someone else replaced after us is left to them.
  """
  restored = []
  for key, entry in reversed(tuple(_ACTIVE.items())):
    if _in_place(entry):
      if entry.had_own:
        setattr(entry.owner, entry.name, entry.original)
      else:
        delattr(entry.owner, entry.name)
      restored.append(key)
    del _ACTIVE[key]
  return tuple(restored)


def wraps(original: Callable, replacement: Callable, *, note: str) -> Callable:
  """Gives `replacement` the name and `__wrapped__` of `original`."""
  functools.update_wrapper(replacement, original)
  replacement.__doc__ = (f"{note}\n\nReplaces {original.__module__}."
                         f"{original.__qualname__}.")
  return replacement
