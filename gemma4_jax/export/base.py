"""The base Hugging Face checkpoint: its tensors, its config, and where each
adapter pair lands in it."""

from __future__ import annotations

import dataclasses
import os

from gemma4_jax import validation
from gemma4_jax.export import mapping
from gemma4_jax.export import safetensors_io

CONFIG_NAME = "config.json"
_EMBED_SUFFIX = "embed_tokens.weight"


class BaseCheckpointError(ValueError):
  """A base checkpoint that does not match the adapter or is incomplete."""


@dataclasses.dataclass(frozen=True)
class BaseCheckpoint:
  """A Hugging Face safetensors directory, described but not loaded."""
  directory: str
  tensors: dict[str, safetensors_io.TensorInfo]
  config: dict
  prefix: str  # e.g. "model.language_model." in the Gemma 4 release

  @property
  def text_config(self) -> dict:
    return self.config.get("text_config") or self.config

  @property
  def tie_word_embeddings(self) -> bool:
    if "tie_word_embeddings" in self.config:
      return bool(self.config["tie_word_embeddings"])
    return bool(self.text_config.get("tie_word_embeddings", True))

  @property
  def first_kv_shared_layer(self) -> int | None:
    text = self.text_config
    shared = int(text.get("num_kv_shared_layers") or 0)
    layers = text.get("num_hidden_layers")
    return None if not shared or layers is None else int(layers) - shared

  def weight_name(self, target: str) -> str:
    if target == mapping.LM_HEAD:
      return "lm_head.weight"
    return f"{self.prefix}{target}.weight"


def open_base(directory: str | os.PathLike) -> BaseCheckpoint:
  """Reads the headers (all files) and config of a base checkpoint."""
  directory = os.fspath(directory)
  tensors = safetensors_io.load_checkpoint_index(directory)
  config_path = os.path.join(directory, CONFIG_NAME)
  config = {}
  if os.path.exists(config_path):
    config = validation.load_json(config_path, lambda e: BaseCheckpointError(
        f"base: {config_path} is not valid JSON: {e}"))
    check_config(config, config_path)
  embeds = [n for n in tensors if n.endswith(_EMBED_SUFFIX) and
            "per_layer" not in n and "vision" not in n and "audio" not in n]
  if len(embeds) != 1:
    raise BaseCheckpointError(
        f"base: expected one text `{_EMBED_SUFFIX}` tensor in {directory}, "
        f"found {embeds or 'none'}; is this a Gemma 4 checkpoint?")
  prefix = embeds[0][:-len(_EMBED_SUFFIX)]
  return BaseCheckpoint(directory, tensors, config, prefix)


def check_config(config, where: str) -> None:
  """The `config.json` fields the merge reads, checked like arguments."""
  validation.json_object(config, f"base: {where}")
  text = config.get("text_config")
  if text is not None:
    validation.json_object(text, f"base: {where}: text_config")
  for container, label in ((config, where), (text or {}, f"{where}: "
                                             "text_config")):
    validation.json_field(container, "tie_word_embeddings", f"base: {label}",
                          kind="bool")
  text = text or config
  for field in ("num_kv_shared_layers", "num_hidden_layers"):
    value = validation.json_field(text, field, f"base: {where}", kind="int")
    if value is not None and value < 0:
      raise BaseCheckpointError(f"base: {where}: field {field!r} must be >= "
                                f"0, got {value}")


def place_deltas(base: BaseCheckpoint, deltas, *, untie: bool
                 ) -> dict[str, mapping.LoraDelta]:
  """Base tensor name -> the delta that changes it, after every check.

  Raises:
    BaseCheckpointError: a target missing from the base, a shape that
      differs (an adapter from another model size), an adapter on K/V of a
      KV-shared layer, two deltas on one weight, or an adapter on the tied
      embedding without `untie`.
  """
  placed: dict[str, mapping.LoraDelta] = {}
  first_shared = base.first_kv_shared_layer
  for delta in deltas:
    name = base.weight_name(delta.target)
    if delta.target == mapping.LM_HEAD:
      name = _place_lm_head(base, delta, untie)
    elif name not in base.tensors:
      raise BaseCheckpointError(
          f"base: the adapter changes {name} ({delta.source}), which the base "
          f"checkpoint {base.directory} does not have")
    if (first_shared is not None and delta.layer is not None and
        delta.layer >= first_shared and
        delta.target.endswith(("k_proj", "v_proj"))):
      raise BaseCheckpointError(
          f"adapter: {delta.source} adapts {name}, but layer {delta.layer} is "
          f"KV-shared (layers >= {first_shared} reuse earlier K/V), so that "
          f"weight is never used; refusing to merge an inert adapter")
    info = base.tensors[name] if name in base.tensors else base.tensors[
        base.weight_name("embed_tokens")]
    if tuple(info.shape) != delta.shape:
      raise BaseCheckpointError(
          f"adapter/base shape mismatch for {name}: the adapter "
          f"({delta.source}) gives [{delta.shape[0]}, {delta.shape[1]}] but "
          f"the base has {list(info.shape)}; the adapter was trained on a "
          f"different model size")
    if info.dtype not in safetensors_io.FLOAT_DTYPES:
      raise BaseCheckpointError(
          f"base: {name} is {info.dtype}; only float weights can be merged")
    if name in placed:
      raise BaseCheckpointError(
          f"adapter: {placed[name].source} and {delta.source} both change "
          f"{name}")
    placed[name] = delta
  return placed


def _place_lm_head(base: BaseCheckpoint, delta, untie: bool) -> str:
  name = "lm_head.weight"
  if name in base.tensors:
    return name
  if not base.tie_word_embeddings:
    raise BaseCheckpointError(
        f"base: the adapter changes the output projection but {base.directory} "
        f"has no lm_head.weight and tie_word_embeddings is false")
  if not untie:
    raise BaseCheckpointError(
        f"adapter: {delta.source} adapts the tied input/output embedding "
        f"(Tunix applies it to the logits only). Merging it into "
        f"embed_tokens would change the input embedding too. Pass --untie to "
        f"write a separate lm_head.weight (and tie_word_embeddings: false), "
        f"or train without LoRA on the embedding")
  return name


__all__ = ["BaseCheckpoint", "BaseCheckpointError", "CONFIG_NAME",
           "open_base", "place_deltas"]
