"""Reading LoRA adapters: Tunix (orbax) checkpoints and PEFT directories.

A Tunix checkpoint is restored with orbax straight into host numpy arrays,
from its own metadata: no model is built, no accelerator is touched. The
result is an `Adapter`: its LoRA pairs in the Hugging Face convention
(`mapping.LoraDelta`), with rank and alpha resolved and cross-checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import sys

import numpy as np

from gemma4_jax import validation
from gemma4_jax.export import mapping
from gemma4_jax.export import safetensors_io

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
TUNIX_PARAMS_ITEM = "model_params"
# Keys under which a Tunix checkpoint's custom metadata may record LoRA
# hyper-parameters (Tunix itself records none by default).
_RANK_KEYS = ("lora_rank", "rank")
_ALPHA_KEYS = ("lora_alpha", "alpha")


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A LoRA adapter mapped onto Hugging Face Gemma 4 weight names."""
  deltas: tuple[mapping.LoraDelta, ...]
  rank: int
  alpha: float
  scale: float
  layout: str  # mapping.LAYOUT_*
  source: str  # the step or PEFT directory actually read
  num_source_tensors: int

  def targets(self) -> list[str]:
    return [d.target for d in self.deltas]


class AdapterError(ValueError):
  """An adapter that cannot be read or whose settings contradict it."""


def load_adapter(path: str | os.PathLike, *, rank: int | None = None,
                 alpha: float | None = None) -> Adapter:
  """Reads a Tunix checkpoint (root -> newest step, or a step directory) or
  a PEFT adapter directory.

  Args:
    path: the adapter location.
    rank: expected LoRA rank; checked against the tensors (and the recorded
      value, if any). Optional: the tensors determine it.
    alpha: LoRA alpha used in training. Required for a Tunix checkpoint that
      does not record it; checked against the recorded value otherwise.

  Raises:
    AdapterError: unreadable adapter, missing alpha, rank/alpha mismatch,
      parameters that are not Gemma 4 LoRA targets.
  """
  path = os.fspath(path)
  check_rank_alpha(rank, alpha)
  if not os.path.isdir(path):
    raise AdapterError(f"adapter: {path!r} is not a directory")
  if os.path.exists(os.path.join(path, PEFT_CONFIG)):
    return _load_peft(path, rank, alpha)
  return _load_tunix(path, rank, alpha)


def check_rank_alpha(rank, alpha) -> None:
  """`rank` (--rank) a positive int and `alpha` (--alpha) a finite
  positive number, each or None."""
  if rank is not None and (isinstance(rank, bool) or
                           not isinstance(rank, int) or rank <= 0):
    raise AdapterError(f"rank (--rank): expected a positive int, got "
                       f"{rank!r}")
  if alpha is not None and (isinstance(alpha, bool) or not (
      isinstance(alpha, (int, float)) and math.isfinite(alpha) and
      alpha > 0)):
    raise AdapterError(f"alpha (--alpha): expected a positive number, got "
                       f"{alpha!r}")


def _recorded(meta: dict, keys, where: str, *, kind: str):
  """A rank or alpha recorded in a file, checked as `--rank`/`--alpha`
  are: a recorded alpha of 0 would drop the adapter, a negative one
  subtract it, and either would still pass verification."""
  for key in keys:
    if meta.get(key) is None:
      continue
    value = meta[key]
    ok = (not isinstance(value, bool) and
          isinstance(value, int if kind == "rank" else (int, float)) and
          math.isfinite(value) and value > 0)
    if not ok:
      raise AdapterError(
          f"adapter: {where}: field {key!r} must be a positive "
          f"{'integer' if kind == 'rank' else 'number'} (the LoRA {kind}), "
          f"got {value!r}")
    return value
  return None


def _check_shape_rank(rank: int, where: str) -> None:
  if rank < 1:
    raise AdapterError(f"adapter: the LoRA tensors in {where} have rank "
                       f"{rank} (empty A and B); nothing to merge")


def resolve_tunix_step(path: str) -> tuple[str, str]:
  """(step directory, its `model_params` directory) for a root, step or
  `model_params` path."""
  if os.path.basename(os.path.normpath(path)) == TUNIX_PARAMS_ITEM:
    return os.path.dirname(os.path.normpath(path)), path
  if os.path.isdir(os.path.join(path, TUNIX_PARAMS_ITEM)):
    return path, os.path.join(path, TUNIX_PARAMS_ITEM)
  steps = [int(d) for d in os.listdir(path)
           if d.isdigit() and
           os.path.isdir(os.path.join(path, d, TUNIX_PARAMS_ITEM))]
  if not steps:
    raise AdapterError(
        f"adapter: {path!r} is neither a PEFT directory ({PEFT_CONFIG}) nor "
        f"a Tunix checkpoint (a step directory with {TUNIX_PARAMS_ITEM}/, or "
        f"a root holding numbered steps)")
  step_dir = os.path.join(path, str(max(steps)))
  return step_dir, os.path.join(step_dir, TUNIX_PARAMS_ITEM)


def read_tunix_params(params_dir: str) -> dict[str, np.ndarray]:
  """Restores an orbax PyTree as host numpy arrays, keyed by dotted path
  (`layers.0.attn.q_einsum.w_lora_a`; NNX's trailing `.value` dropped)."""
  # Imported here: only Tunix checkpoints need orbax (and with it jax).
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _drop_closed_loop_noise()
  checkpointer = ocp.PyTreeCheckpointer()
  params_dir = os.path.abspath(params_dir)  # orbax refuses relative paths
  try:
    with _quiet_absl():
      metadata = checkpointer.metadata(params_dir)
      tree = getattr(metadata, "item_metadata", metadata)
      tree = getattr(tree, "tree", tree)
      restore_args = jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      restored = checkpointer.restore(params_dir, restore_args=restore_args)
  except Exception as e:  # orbax raises many types for a damaged checkpoint
    raise AdapterError(
        f"adapter: cannot restore the orbax checkpoint {params_dir!r}: "
        f"{type(e).__name__}: {_first_line(e)}") from e
  flat = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path]
    if keys and keys[-1] == "value":
      keys = keys[:-1]
    flat[".".join(keys)] = np.asarray(leaf)
  return flat


def _first_line(error: BaseException, limit: int = 300) -> str:
  """orbax/tensorstore errors end in a JSON spec of thousands of
  characters; the cause is in the first part."""
  text = str(error).split(" [tensorstore_spec=")[0].strip().splitlines()
  text = text[0] if text else ""
  return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def _quiet_absl():
  """orbax logs a damaged checkpoint's symptoms through absl before it
  raises; the raised error says it in one line."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


_NOISE_FILTER_INSTALLED = False


def _drop_closed_loop_noise() -> None:
  """Drops one known message from the process's unraisable hook.

  When orbax gives up on a damaged checkpoint it closes its asyncio loop
  while tensorstore's I/O threads still post results to it; each post then
  raises "Event loop is closed" inside a C callback, which Python reports
  through `sys.unraisablehook` as a bare traceback (up to ~90, at any time
  later in the process). Those are noise: the restore's own error is
  raised. Anything else goes to the previous hook.
  """
  global _NOISE_FILTER_INSTALLED
  if _NOISE_FILTER_INSTALLED:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == \
        "Event loop is closed":
      return
    previous(unraisable)
  sys.unraisablehook = hook
  _NOISE_FILTER_INSTALLED = True


def _tunix_custom_metadata(step_dir: str) -> dict:
  """The custom metadata of a Tunix step, where a rank/alpha may be."""
  path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  if not os.path.exists(path):
    return {}
  meta = validation.load_json(path, lambda e: AdapterError(
      f"adapter: {path} is not valid JSON ({e}); the checkpoint is damaged"))
  if not isinstance(meta, dict):
    raise AdapterError(f"adapter: {path}: expected a JSON object, got "
                       f"{type(meta).__name__}")
  custom = meta.get("custom_metadata") or {}
  if not isinstance(custom, dict):
    raise AdapterError(f"adapter: {path}: field 'custom_metadata' must be an "
                       f"object, got {custom!r}")
  return custom


def _resolve(name: str, given, recorded, from_shapes, where: str):
  for label, value in (("recorded in the adapter", recorded),
                       ("in the tensor shapes", from_shapes)):
    if given is not None and value is not None and float(given) != float(value):
      raise AdapterError(
          f"{name}: given {given} but {where} has {name} {value} {label}; "
          f"the adapter was trained with a different {name}")
  if recorded is not None and from_shapes is not None and \
      float(recorded) != float(from_shapes):
    raise AdapterError(f"{name}: {where} records {recorded} but its tensors "
                       f"have {from_shapes}")
  for value in (given, recorded, from_shapes):
    if value is not None:
      return value
  return None


def _load_tunix(path: str, rank, alpha) -> Adapter:
  step_dir, params_dir = resolve_tunix_step(path)
  meta = _tunix_custom_metadata(step_dir)  # cheap: before the restore
  flat = read_tunix_params(params_dir)
  if not flat:
    raise AdapterError(f"adapter: {params_dir!r} holds no parameters")
  try:
    pairs = mapping.pair_tunix_params(flat)
    shape_rank = mapping.tunix_rank(pairs)
  except mapping.AdapterMappingError as e:
    raise AdapterError(f"{e} (in {params_dir})") from None
  where = os.path.join(step_dir, "_CHECKPOINT_METADATA") + " custom_metadata"
  rank = _resolve("rank", rank, _recorded(meta, _RANK_KEYS, where,
                                          kind="rank"), shape_rank, step_dir)
  alpha = _resolve("alpha", alpha, _recorded(meta, _ALPHA_KEYS, where,
                                             kind="alpha"), None, step_dir)
  if alpha is None:
    raise AdapterError(
        f"alpha: the Tunix checkpoint {step_dir!r} does not record the LoRA "
        f"alpha; pass --alpha (and optionally --rank) with the values given "
        f"to qwix.LoraProvider in training (rank in the tensors: {rank})")
  _check_shape_rank(shape_rank, params_dir)
  scale = float(alpha) / int(rank)
  try:
    deltas = mapping.tunix_to_deltas(pairs, scale=scale)
  except mapping.AdapterMappingError as e:
    raise AdapterError(f"{e} (in {params_dir})") from None
  return Adapter(tuple(deltas), int(rank), float(alpha), scale,
                 mapping.tunix_layout(pairs), step_dir, len(flat))


_PEFT_KEY = re.compile(
    r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight")


def _load_peft(path: str, rank, alpha) -> Adapter:
  config_path = os.path.join(path, PEFT_CONFIG)
  config = _read_peft_config(config_path)
  recorded_rank = _recorded(config, ("r",), config_path, kind="rank")
  recorded_alpha = _recorded(config, ("lora_alpha",), config_path,
                             kind="alpha")
  _check_peft_supported(config)
  weights = os.path.join(path, PEFT_WEIGHTS)
  modules, num_tensors = _read_peft_weights(weights)
  shape_rank = _peft_rank(modules)
  _check_shape_rank(shape_rank, weights)
  rank = _resolve("rank", rank, recorded_rank, shape_rank, path)
  alpha = _resolve("alpha", alpha, recorded_alpha, None, path)
  if alpha is None:
    raise AdapterError(f"alpha: {config_path} has no lora_alpha; pass --alpha")
  scale = (float(alpha) / math.sqrt(rank) if config.get("use_rslora")
           else float(alpha) / rank)
  deltas = tuple(
      mapping.LoraDelta(mapping.peft_module_to_target(module), ab["A"],
                        ab["B"], scale, module)
      for module, ab in sorted(modules.items()))
  return Adapter(deltas, int(rank), float(alpha), scale, mapping.LAYOUT_PEFT,
                 path, num_tensors)


def _read_peft_config(config_path: str) -> dict:
  """`adapter_config.json` as a dict whose boolean flags are booleans."""
  config = validation.load_json(config_path, lambda e: AdapterError(
      f"adapter: {config_path} is not valid JSON: {e}"))
  if not isinstance(config, dict):
    raise AdapterError(f"adapter: {config_path}: expected a JSON object, got "
                       f"{type(config).__name__}")
  for flag in ("use_dora", "fan_in_fan_out", "use_rslora"):
    if config.get(flag) is not None and not isinstance(config[flag], bool):
      raise AdapterError(f"adapter: {config_path}: field {flag!r} must be "
                         f"true or false, got {config[flag]!r}")
  return config


def _check_peft_supported(config: dict) -> None:
  """Refuses PEFT settings the merge cannot reproduce."""
  if config.get("peft_type", "LORA") != "LORA":
    raise AdapterError(f"adapter: peft_type {config.get('peft_type')!r} is "
                       "not LORA")
  for flag in ("use_dora", "fan_in_fan_out"):
    if config.get(flag):
      raise AdapterError(f"adapter: {flag}=true is not supported")
  for pattern in ("rank_pattern", "alpha_pattern"):
    if config.get(pattern):
      raise AdapterError(f"adapter: per-module {pattern} is not supported")


def _read_peft_weights(weights: str
                       ) -> tuple[dict[str, dict[str, np.ndarray]], int]:
  """`{module: {"A": lora_A, "B": lora_B}}` in float32 from
  `adapter_model.safetensors`, and how many tensors the file holds."""
  if not os.path.exists(weights):
    raise AdapterError(f"adapter: {weights} is missing (only safetensors "
                       "PEFT adapters are read)")
  infos = safetensors_io.SafetensorsFile(weights).tensors
  modules: dict[str, dict[str, np.ndarray]] = {}
  unknown = []
  for name, info in infos.items():
    m = _PEFT_KEY.fullmatch(name)
    if not m:
      unknown.append(name)
      continue
    modules.setdefault(m.group(1), {})[m.group(2)] = np.asarray(
        safetensors_io.read_tensor(info), np.float32)
  if unknown:
    raise AdapterError(
        f"adapter: {len(unknown)} tensor(s) in {weights} are not LoRA A/B "
        f"weights: {', '.join(sorted(unknown)[:5])}")
  return modules, len(infos)


def _peft_rank(modules: dict[str, dict[str, np.ndarray]]) -> int:
  """The one rank of every module's `[r, in]` A and `[out, r]` B."""
  shape_ranks = set()
  for module, ab in modules.items():
    if set(ab) != {"A", "B"}:
      raise AdapterError(f"adapter: lora_A or lora_B missing for {module}")
    if ab["A"].ndim != 2 or ab["B"].ndim != 2 or \
        ab["A"].shape[0] != ab["B"].shape[1]:
      raise AdapterError(
          f"adapter: {module}: lora_A {list(ab['A'].shape)} and lora_B "
          f"{list(ab['B'].shape)} are not [r, in] and [out, r]")
    shape_ranks.add(ab["A"].shape[0])
  if len(shape_ranks) != 1:
    raise AdapterError(f"adapter: modules have ranks {sorted(shape_ranks)}")
  return shape_ranks.pop()


__all__ = ["Adapter", "AdapterError", "load_adapter", "read_tunix_params",
           "resolve_tunix_step"]
