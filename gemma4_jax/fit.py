"""`gemma4-jax fit`: does a Gemma 4 LoRA fine-tune fit on a TPU topology?

Compiles the real training step for abstract TPU chips (libtpu runs XLA:TPU
and Mosaic on this machine; nothing is allocated) and reads per-chip HBM from
XLA's buffer assignment, stock Tunix against `gemma4_jax.patches`:

- the model is a Tunix `Gemma4` built abstractly (`nnx.eval_shape`) from a
  preset of `fit_model`, in bfloat16, with qwix LoRA on q_einsum,
  kv_einsum, attn_vec_einsum, gate_proj, up_proj and down_proj (alpha =
  2 * rank) and an `nnx.Optimizer(model, optax.adamw, wrt=nnx.LoRAParam)`,
  as `PeftTrainer` builds them;
- the step is `PeftTrainer._train_step`'s: Tunix's default SFT loss on the
  usual model inputs (positions and causal mask from the input mask),
  `value_and_grad` with respect to the LoRA params, the global gradient norm
  and the optimizer update, jitted with the LoRA params and optimizer state
  donated, on a `('fsdp', 'tp')` mesh with Tunix's default shardings and the
  batch sharded over 'fsdp';
- Tunix's `shard()` drops its activation constraints when `jax.devices()[0]`
  is a CPU; while `fit` traces, `tunix.models.gemma4.model.shard` is the same
  function without that test, so activations are constrained as on a TPU;
- the patched step is compiled with `xla_tpu_enable_deduplicated_calls`,
  which `patches.apply()` adds to `LIBTPU_INIT_ARGS` (identical layers
  compiled once; `patches.tpu_compiler`), the stock step with XLA's
  defaults, as each runs in a user's process.

A step that exceeds HBM fails XLA:TPU's compile with RESOURCE_EXHAUSTED,
and is reported as not fitting with the size XLA names: "Used x of 15.75G
hbm" is the whole program; "HLO temporaries (x) exceeds available HBM" is
its temporaries alone, to which `fit` adds the arguments (a lower bound: the
code is unknown). A program that compiles fits by XLA's own check (its
limit is below the chip's HBM: 15.75 GiB of a v5e's 16). Its
`memory_analysis()` sum can exceed that limit by up to 1.6 GiB (stock
E2B at 1 x 8192 with remat: 17.02 GiB), so the check XLA applies is on a
smaller figure than the one reported.

JAX's persistent compilation cache writes executables compiled for abstract
chips but cannot read them back ("PjRtCompiler must be constructed with a
Client to call DeserializeLoadedExecutable", jax 0.10.2 / libtpu 0.0.42), so
`fit` caches its own results instead: keyed by a hash of the lowered program,
the topology and the jax and libtpu versions, under `~/.cache/gemma4-jax/fit`
(`$GEMMA4_JAX_CACHE/fit`). Any change to the model, the patches or the kernels
changes the program and misses the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import sys
import threading
import time
from typing import Callable, Iterable
import warnings

import jax

from gemma4_jax import hlo_buffers

GIB = 1024**3
MODES = ("stock", "patched")
# Tunix's own RematConfig for both modes, or one of the patches' policies
# (`gemma4_jax.patches.tunix_remat`) for the patched step, with Tunix's
# DECODER (its own remat) for the stock step beside it.
TUNIX_REMAT = ("none", "block", "decoder")
POLICY_REMAT = ("full", "minimal", "attention", "offload")
REMAT = TUNIX_REMAT + POLICY_REMAT
SEARCH_GRANULE = 1024
# A longest sequence `search` tries; beyond it the answer is "at least".
SEARCH_MAX_SEQ_LEN = 1 << 20
# HBM per chip by `device.device_kind` (abstract chips do not report memory).
HBM_BYTES = {
    "TPU v5 lite": 16 * GIB,   # v5e
    "TPU v6 lite": 32 * GIB,   # v6e (Trillium)
    "TPU v5": 95 * GIB,        # v5p
}
# Compile seconds per layer on 2 shared CPU cores (E2B, batch 4 x 1024, jax
# 0.10.2 with libtpu 0.0.42.1), for the estimate before the first compile on
# a machine; later estimates use the last measured rate, kept in the cache.
DEFAULT_SECONDS_PER_LAYER = 14.0
RATE_FILE = "seconds_per_layer.json"
MIN_LAYERS_FOR_RATE = 10
HEARTBEAT_SECONDS = 30.0
# Buffers kept per result (and cache entry) for `--buffers`.
LARGEST_BUFFERS = 20
_OOM_PATTERNS = (
    # "... HLO temporaries (17.71G) exceeds available HBM (15.75G)."
    re.compile(r"\(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM "
               r"\(([\d.]+)([KMGT]?)i?B?\)"),
    # "Used 29.50G of 15.75G hbm."
    re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm"),
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """What to compile. `num_layers=None` is the whole model."""
  model: str = "e2b"
  topology: str = "v5e:2x2"
  batch: int = 4
  seq_len: int = 1024
  num_layers: int | None = None
  lora_rank: int = 16
  remat: str = "none"
  implementation: str | None = None

  def validate(self) -> None:
    """Raises `ValueError` naming the bad argument."""
    from gemma4_jax import fit_model  # pylint: disable=g-import-not-at-top
    if self.model not in fit_model.PRESETS:
      raise ValueError(f"unknown model {self.model!r}; known: "
                       f"{', '.join(fit_model.PRESETS)}")
    for name in ("batch", "seq_len", "lora_rank"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name.replace('_', '-')} must be >= 1, got "
                         f"{getattr(self, name)}")
    if self.num_layers is not None:
      fit_model.model_config(self.model, num_layers=self.num_layers)
    if self.remat not in REMAT:
      raise ValueError(f"remat must be one of {', '.join(REMAT)}, got "
                       f"{self.remat!r}")


@dataclasses.dataclass(frozen=True)
class ModeResult:
  """Per-chip HBM of one compiled step (bytes; None where not known)."""
  mode: str
  fits: bool | None            # None: the compile failed for another reason
  argument_bytes: int | None   # XLA's; computed from shapes if out of memory
  weight_bytes: int            # frozen weights, from shapes and shardings
  trainable_bytes: int         # LoRA params + optimizer state, likewise
  input_bytes: int             # tokens and mask, likewise
  temp_bytes: int | None
  output_bytes: int | None
  alias_bytes: int | None      # outputs written into donated arguments
  generated_code_bytes: int | None
  total_bytes: int | None      # args + temps + unaliased outputs + code
  hbm_bytes: int | None        # the chip's HBM
  hbm_limit_bytes: int | None  # XLA's usable limit, when its error names it
  pallas_kernels: int | None   # Mosaic kernels in the compiled program
  compile_seconds: float
  cached: bool = False
  error: str | None = None
  # From the scheduled HLO (`hlo_buffers`): the estimated peak of the
  # temporaries and the largest buffers live there, as
  # {"bytes", "shape", "op"} dicts; None when the step did not compile.
  peak_estimate_bytes: int | None = None
  largest_buffers: list | None = None
  oom_message: str | None = None   # XLA's words, when it ran out of memory


@dataclasses.dataclass(frozen=True)
class Report:
  """`fit`'s answer: the setup and one `ModeResult` per mode."""
  config: FitConfig
  num_layers: int
  device_kind: str
  chips: int
  mesh_shape: dict
  lora_params: int
  lora_tensors: int
  results: dict

  def to_json(self) -> dict:
    common = {
        "model": self.config.model, "topology": self.config.topology,
        "device_kind": self.device_kind, "chips": self.chips,
        "mesh": self.mesh_shape, "batch": self.config.batch,
        "seq_len": self.config.seq_len, "num_layers": self.num_layers,
        "lora_rank": self.config.lora_rank, "remat": self.config.remat,
        "lora_params": self.lora_params,
        "implementation": self.config.implementation,
    }
    return {mode: {**dataclasses.asdict(result), **common,
                   "remat": mode_remat(mode, self.config.remat)}
            for mode, result in self.results.items()}


def mode_remat(mode: str, remat: str) -> str:
  """The remat a mode's step runs with: a patches policy is the patched
  step's; the stock step then runs Tunix's own DECODER remat."""
  if mode == "stock" and remat in POLICY_REMAT:
    return "decoder"
  return remat


def fit(config: FitConfig = FitConfig(), *, modes: Iterable[str] = MODES,
        cache_dir: str | os.PathLike | None = "default",
        progress: Callable[[str], None] | None = None) -> Report:
  """Compiles the LoRA training step of `config` per mode; see the module.

  Args:
    config: model, topology, batch, sequence length, LoRA rank, remat.
    modes: "stock" and/or "patched".
    cache_dir: where results are cached; "default" is `default_cache_dir()`,
      None disables the cache.
    progress: called with progress lines (default: print to stderr).

  Returns:
    A `Report`.

  Raises:
    ValueError: a bad argument (unknown model, topology or mode, sizes < 1).
    RuntimeError: libtpu is missing.
  """
  return Session(config, cache_dir=cache_dir, progress=progress).run(
      config.seq_len, modes)


def search(config: FitConfig = FitConfig(), *, modes: Iterable[str] = MODES,
           cache_dir: str | os.PathLike | None = "default",
           progress: Callable[[str], None] | None = None) -> dict:
  """The largest sequence length that fits at `config.batch`, per mode.

  Doubles from `config.seq_len` until a step does not fit, then bisects to a
  multiple of 1024. Returns `{mode: {"seq_len": n or None, "tried": {...}}}`
  (None: not even the smallest length tried fits); `tried` maps every length
  compiled to whether it fit.
  """
  session = Session(config, cache_dir=cache_dir, progress=progress)
  answers = {}
  for mode in _check_modes(modes):
    tried = {}

    def fits(seq_len, mode=mode, tried=tried):
      result = session.run(seq_len, (mode,)).results[mode]
      if result.error is not None:
        raise RuntimeError(f"{mode} step at seq_len {seq_len}: "
                           f"{result.error}")
      tried[seq_len] = result.fits
      return result.fits

    answers[mode] = {"seq_len": _largest_fitting(config.seq_len, fits),
                     "tried": dict(sorted(tried.items()))}
    session.say(f"{mode}: longest sequence that fits at batch "
                f"{config.batch}: {answers[mode]['seq_len']}")
  return answers


def _largest_fitting(start: int, fits: Callable[[int], bool]) -> int | None:
  low, high = 0, None
  length = start
  while high is None:
    if fits(length):
      low = length
      if length >= SEARCH_MAX_SEQ_LEN:
        return length
      length *= 2
    else:
      high = length
  while True:
    mid = (low + high) // 2 // SEARCH_GRANULE * SEARCH_GRANULE
    if mid <= low:
      mid = (low // SEARCH_GRANULE + 1) * SEARCH_GRANULE
    if mid >= high:
      return low or None
    if fits(mid):
      low = mid
    else:
      high = mid


def default_cache_dir() -> pathlib.Path:
  """`$GEMMA4_JAX_CACHE`, else `~/.cache/gemma4-jax`."""
  return pathlib.Path(os.environ.get("GEMMA4_JAX_CACHE")
                      or pathlib.Path.home() / ".cache" / "gemma4-jax")


def _check_modes(modes: Iterable[str]) -> tuple[str, ...]:
  modes = tuple(modes)
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"mode must be in {MODES}, got {mode!r}")
  return modes


class Session:
  """One abstract model on one mesh; compiles its step per mode and length."""

  def __init__(self, config: FitConfig, *, cache_dir="default",
               progress: Callable[[str], None] | None = None):
    config.validate()
    self.config = config
    self._progress = progress or _print_stderr
    self._start = time.perf_counter()
    self._cache = (None if cache_dir is None else
                   pathlib.Path(default_cache_dir() if cache_dir == "default"
                                else cache_dir) / "fit")
    from gemma4_jax import testing  # pylint: disable=g-import-not-at-top
    self.mesh = _mesh(config.topology, testing)
    self.device_kind = self.mesh.devices.flat[0].device_kind
    self.hbm_bytes = HBM_BYTES.get(self.device_kind)
    from gemma4_jax import fit_model  # pylint: disable=g-import-not-at-top
    self._model = fit_model.AbstractStep(config, self.mesh, say=self.say)

  def say(self, message: str) -> None:
    self._progress(f"[{_clock(time.perf_counter() - self._start)}] {message}")

  def run(self, seq_len: int, modes: Iterable[str]) -> Report:
    results = {}
    for mode in _check_modes(modes):
      results[mode] = self._compile(mode, seq_len)
    config = dataclasses.replace(self.config, seq_len=seq_len)
    return Report(config=config, num_layers=self._model.num_layers,
                  device_kind=self.device_kind,
                  chips=self.mesh.devices.size,
                  mesh_shape=dict(self.mesh.shape),
                  lora_params=self._model.lora_params,
                  lora_tensors=self._model.lora_tensors, results=results)

  def _compile(self, mode: str, seq_len: int) -> ModeResult:
    model = self._model
    sizes = model.argument_sizes(seq_len)
    what = (f"{mode} step, {self.config.model.upper()} "
            f"{model.num_layers} layers, {self.config.batch} x {seq_len} "
            f"on {self.config.topology}")
    self.say(f"lowering the {what}")
    try:
      lowered = model.lower(mode, seq_len)
    except Exception as error:  # pylint: disable=broad-except
      result = self._result(mode, None, f"lowering failed: {_describe(error)}",
                            sizes, 0.0)
      self.say(f"{mode}: {_verdict(result)}")
      return result
    options = _compiler_options(mode)
    key = _cache_key(lowered, self.config.topology, options)
    cached = self._cache_read(key)
    if cached is not None:
      self.say(f"{mode}: result from the cache ({cached['compile_seconds']:.0f}"
               " s compile when measured)")
      return ModeResult(**{**cached, "mode": mode, "cached": True})
    estimate = self._estimate(model.num_layers, seq_len)
    self.say(f"compiling the {what} with XLA:TPU; about {_clock(estimate)} "
             "on 2 CPU cores")
    start = time.perf_counter()
    with _heartbeat(lambda: self.say(
        f"  still compiling {mode} "
        f"({_clock(time.perf_counter() - start)} of ~{_clock(estimate)})")):
      compiled, error = _compile_catching(lowered, options)
    seconds = time.perf_counter() - start
    result = self._result(mode, compiled, error, sizes, seconds)
    self.say(f"{mode}: {_verdict(result)} (compiled in {_clock(seconds)})")
    if result.error is None:
      self._cache_write(key, result)
      if compiled is not None:
        self._record_rate(seconds, model.num_layers, seq_len)
    return result

  def _result(self, mode, compiled, error, sizes, seconds) -> ModeResult:
    common = dict(mode=mode, weight_bytes=sizes["weights"],
                  trainable_bytes=sizes["trainable"],
                  input_bytes=sizes["inputs"], hbm_bytes=self.hbm_bytes,
                  compile_seconds=round(seconds, 1))
    if compiled is not None:
      stats = compiled.memory_analysis()
      total = (stats.argument_size_in_bytes + stats.temp_size_in_bytes
               + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.generated_code_size_in_bytes)
      from gemma4_jax import testing  # pylint: disable=g-import-not-at-top
      peak = hlo_buffers.peak(compiled.as_text())
      return ModeResult(
          fits=True,
          peak_estimate_bytes=peak.bytes,
          largest_buffers=[
              {"bytes": b.bytes, "shape": b.shape.split("{")[0],
               "op": b.op_name or b.opcode}
              for b in peak.buffers[:LARGEST_BUFFERS]],
          argument_bytes=stats.argument_size_in_bytes,
          temp_bytes=stats.temp_size_in_bytes,
          output_bytes=stats.output_size_in_bytes,
          alias_bytes=stats.alias_size_in_bytes,
          generated_code_bytes=stats.generated_code_size_in_bytes,
          total_bytes=total, hbm_limit_bytes=None,
          pallas_kernels=testing.mosaic_kernels(compiled), **common)
    unknown = dict(temp_bytes=None, output_bytes=None, alias_bytes=None,
                   generated_code_bytes=None, pallas_kernels=None)
    required, limit, temporaries_only = _parse_oom(error)
    if required is None and "RESOURCE_EXHAUSTED" not in error:
      return ModeResult(fits=None, argument_bytes=None, total_bytes=None,
                        hbm_limit_bytes=None, error=error, **unknown, **common)
    arguments = sum(sizes.values())
    if temporaries_only and required is not None:
      # XLA named its temporaries; the arguments come on top (code too,
      # unknown here, so the total is a lower bound).
      unknown["temp_bytes"] = required
      required += arguments
    return ModeResult(fits=False, argument_bytes=arguments,
                      total_bytes=required, hbm_limit_bytes=limit,
                      oom_message=_oom_line(error), **unknown, **common)

  def _estimate(self, num_layers: int, seq_len: int) -> float:
    rate = DEFAULT_SECONDS_PER_LAYER
    if self._cache is not None:
      try:
        rate = json.loads((self._cache / RATE_FILE).read_text())[
            "seconds_per_layer"]
      except (OSError, ValueError, KeyError):
        pass
    return rate * num_layers * self._size_factor(seq_len)

  def _record_rate(self, seconds, num_layers, seq_len) -> None:
    # Few-layer compiles are dominated by the embedding and the loss.
    if self._cache is not None and num_layers >= MIN_LAYERS_FOR_RATE:
      _write_json(self._cache / RATE_FILE, {
          "seconds_per_layer": seconds / num_layers
                               / self._size_factor(seq_len)})

  def _size_factor(self, seq_len: int) -> float:
    # Compile time grows with the tokens per step beyond 4 x 1024 (measured
    # roughly; the estimate only has to be the right size).
    return max(1.0, self.config.batch * seq_len / 4096) ** 0.5

  def _cache_read(self, key: str) -> dict | None:
    if self._cache is None:
      return None
    try:
      entry = json.loads((self._cache / f"{key}.json").read_text())
      entry.pop("mode", None)
      return {field.name: entry[field.name]
              for field in dataclasses.fields(ModeResult)
              if field.name in entry}
    except (OSError, ValueError):
      return None

  def _cache_write(self, key: str, result: ModeResult) -> None:
    if self._cache is not None:
      _write_json(self._cache / f"{key}.json", dataclasses.asdict(result))


def _mesh(topology: str, testing) -> jax.sharding.Mesh:
  reason = testing.libtpu_missing()
  if reason is not None:
    raise RuntimeError(
        f"{reason}\nInstall libtpu at the version the pinned jax expects: "
        "pip install 'gemma4-jax[test]' (or pip install 'jax[tpu]==" 
        f"{jax.__version__}').")
  try:
    devices = testing.tpu_devices(topology)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"unknown TPU topology {topology!r} (e.g. v5e:2x2, "
                     f"v5e:4x4, v6e:2x2, v5p:2x2x1): {error}") from None
  if len(devices) < 2 or len(devices) % 2:
    raise ValueError(f"topology {topology!r} has {len(devices)} chips; the "
                     "('fsdp', 'tp') mesh needs an even number")
  return testing.tpu_mesh(topology)


def _compiler_options(mode: str) -> dict:
  """XLA options of the mode's step as a user's process compiles it: the
  patched step with what `patches.apply()` adds to `LIBTPU_INIT_ARGS`
  (identical layers compiled once, `patches.tpu_compiler`), stock without."""
  if mode == "stock":
    return {}
  from gemma4_jax.patches import tpu_compiler  # pylint: disable=g-import-not-at-top
  return tpu_compiler.compiler_options()


def _compile_catching(lowered, options: dict):
  """(compiled, None) or (None, error text) when XLA refuses the program."""
  try:
    from gemma4_jax import testing  # pylint: disable=g-import-not-at-top
    return testing.compile_optimized(lowered, options), None
  except Exception as error:  # pylint: disable=broad-except
    return None, _describe(error)


def _describe(error: Exception) -> str:
  return f"{type(error).__name__}: {error}"


def _oom_line(error: str) -> str:
  """The line of an out-of-memory error that says how much was needed."""
  for line in error.splitlines():
    if any(pattern.search(line) for pattern in _OOM_PATTERNS):
      return line.strip()[:300]
  return error.splitlines()[0][:300] if error else ""


def _parse_oom(error: str) -> tuple[int | None, int | None, bool]:
  """(bytes XLA asked for, bytes it had, whether it counted only its
  temporaries) from a RESOURCE_EXHAUSTED error."""
  for index, pattern in enumerate(_OOM_PATTERNS):
    match = pattern.search(error)
    if match:
      need, need_unit, have, have_unit = match.groups()
      return (int(float(need) * _UNITS[need_unit]),
              int(float(have) * _UNITS[have_unit]), index == 0)
  return None, None, False


def _cache_key(lowered, topology: str, options: dict) -> str:
  digest = hashlib.sha256()
  for part in (topology, jax.__version__, _libtpu_version(),
               os.environ.get("LIBTPU_INIT_ARGS", ""),
               json.dumps(options, sort_keys=True), lowered.as_text()):
    digest.update(part.encode())
    digest.update(b"\0")
  return digest.hexdigest()[:32]


def _libtpu_version() -> str:
  for name in ("libtpu", "libtpu-nightly"):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return "unknown"


def _write_json(path: pathlib.Path, data) -> None:
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1))
    temporary.replace(path)
  except OSError as error:
    warnings.warn(f"gemma4-jax fit: cannot write the cache {path}: {error}")


@contextlib.contextmanager
def _heartbeat(beat: Callable[[], None]):
  stop = threading.Event()

  def loop():
    while not stop.wait(HEARTBEAT_SECONDS):
      beat()

  thread = threading.Thread(target=loop, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()


def _print_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s"


def _gib(n: int | None) -> str:
  return "-" if n is None else f"{n / GIB:.2f}"


def _verdict(result: ModeResult) -> str:
  if result.error is not None:
    return f"failed to compile: {result.error.splitlines()[0][:300]}"
  if result.fits:
    return (f"fits, {_gib(result.total_bytes)} GiB per chip"
            + (f" of {_gib(result.hbm_bytes)}" if result.hbm_bytes else ""))
  if result.total_bytes is None:
    return "out of memory (XLA named no size)"
  at_least = "at least " if result.temp_bytes is not None else ""
  return (f"out of memory: needs {at_least}{_gib(result.total_bytes)} GiB "
          f"of {_gib(result.hbm_limit_bytes)} usable")


def format_buffers(report: Report, count: int) -> str:
  """The `count` largest buffers live at each mode's estimated peak."""
  lines = []
  for mode, result in report.results.items():
    if not result.largest_buffers:
      continue
    lines.append(
        f"{mode}: largest buffers live at the peak of the temporaries "
        f"(estimated from the schedule: {_gib(result.peak_estimate_bytes)} "
        f"GiB; XLA's {_gib(result.temp_bytes)} GiB)")
    for buffer in result.largest_buffers[:count]:
      lines.append(f"  {buffer['bytes'] / 2**20:9.1f} MiB  "
                   f"{buffer['shape']:34} {hlo_buffers.describe(buffer['op'], 80)}")
  return "\n".join(lines)


def format_report(report: Report) -> str:
  """The per-chip table `gemma4-jax fit` prints."""
  config, results = report.config, report.results
  modes = list(results)
  rows = [
      ("frozen weights", lambda r: _gib(r.weight_bytes)),
      ("LoRA + AdamW state", lambda r: _gib(r.trainable_bytes)),
      ("inputs", lambda r: _gib(r.input_bytes)),
      ("arguments (XLA)", lambda r: _gib(r.argument_bytes)
       if r.fits else "-"),
      ("temporaries", lambda r: _gib(r.temp_bytes)),
      ("outputs, not aliased", lambda r: _gib(
          None if r.output_bytes is None
          else r.output_bytes - r.alias_bytes)),
      ("generated code", lambda r: _gib(r.generated_code_bytes)),
      ("total", lambda r: _gib(r.total_bytes) if r.fits is not False
       else f"needs {_gib(r.total_bytes)}"),
      ("HBM", lambda r: _gib(r.hbm_bytes)),
      ("fits", lambda r: {True: "yes", False: "NO", None: "error"}[r.fits]),
      ("Pallas kernels", lambda r: "-" if r.pallas_kernels is None
       else str(r.pallas_kernels)),
      ("compile time", lambda r: _clock(r.compile_seconds)
       + (" (cached)" if r.cached else "")),
  ]
  mesh = " x ".join(f"{k}={v}" for k, v in report.mesh_shape.items())
  lines = [
      f"Gemma 4 {config.model.upper()} ({report.num_layers} layers, bf16), "
      f"LoRA rank {config.lora_rank} (alpha {2 * config.lora_rank}, "
      f"{report.lora_params / 1e6:.1f}M params in {report.lora_tensors} "
      f"tensors) + AdamW; batch {config.batch} x {config.seq_len} tokens; "
      "remat " + ", ".join(f"{mode_remat(m, config.remat)} ({m})"
                           for m in modes),
      f"{config.topology}: {report.chips} x {report.device_kind}, mesh "
      f"{mesh}",
      "",
      f"{'per chip, GiB':24}" + "".join(f"{m:>16}" for m in modes),
  ]
  for name, cell in rows:
    lines.append(f"  {name:22}"
                 + "".join(f"{cell(results[m]):>16}" for m in modes))
  for mode in modes:
    if results[mode].error is not None:
      lines.append(f"\n{mode} failed to compile:\n{results[mode].error}")
  if any(r.fits for r in results.values()):
    lines.append("\nfits: XLA:TPU compiled the step within its HBM limit "
                 "(below the chip's HBM: 15.75 GiB of a v5e's 16).")
  if "patched" in results:
    options = _compiler_options("patched")
    lines.append(
        "patched: compiled with " + (", ".join(
            f"{name}={value}" for name, value in options.items())
            + ", as patches.apply() sets it (identical layers compiled once)"
            if options else "the LIBTPU_INIT_ARGS of this process") + ".")
  return "\n".join(lines)


def main(args) -> int:
  """`gemma4-jax fit` with parsed `args` (see `cli.py`)."""
  config = FitConfig(model=args.model, topology=args.topology,
                     batch=args.batch, seq_len=args.seq_len,
                     num_layers=args.num_layers, lora_rank=args.lora_rank,
                     remat=args.remat, implementation=args.implementation)
  modes = MODES if args.mode == "both" else (args.mode,)
  cache_dir = None if args.no_cache else "default"
  try:
    if args.search:
      answer = search(config, modes=modes, cache_dir=cache_dir)
      if args.json:
        print(json.dumps(answer, indent=1))
      else:
        for mode, found in answer.items():
          print(f"{mode}: longest sequence that fits at batch {config.batch}"
                f": {found['seq_len']} (tried: "
                + ", ".join(f"{n} {'yes' if ok else 'no'}"
                            for n, ok in found["tried"].items()) + ")")
      return 0
    report = fit(config, modes=modes, cache_dir=cache_dir)
  except (ValueError, RuntimeError) as error:
    print(f"gemma4-jax fit: error: {error}", file=sys.stderr)
    return 2
  print(json.dumps(report.to_json(), indent=1) if args.json
        else format_report(report))
  if args.buffers and not args.json:
    print("\n" + format_buffers(report, args.buffers))
  return 1 if any(r.error for r in report.results.values()) else 0

