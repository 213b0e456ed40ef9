"""Test support: writes a Tunix Gemma 4 model as a Hugging Face checkpoint.

Not part of the public API nor of the export tool's streaming path (no
stability promise). Used by the tests (`tests/export/`, the CLI's bad-input
and fine-tuning tests) and by `gemma4-jax demo` to make small real
checkpoints. Depends on numpy and `export.safetensors_io`; Tunix, flax and
jax are imported when a model is converted.

The inverse of Tunix's `params_safetensors` mapping, with the tensor names
and `config.json` of the Gemma 4 release (`model.language_model.*`,
`Gemma4ForConditionalGeneration`, text only). KV-shared layers keep their
unused `k_proj`/`v_proj`/`k_norm` as the release does.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from gemma4_jax.export import safetensors_io

PREFIX = "model.language_model."
_NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "post_per_layer_input_norm": "post_per_layer_input_norm",
}


def hf_text_config(config) -> dict:
  """Hugging Face `Gemma4TextConfig` fields for a Tunix `ModelConfig`."""
  # Imported lazily: tunix pulls in jax.
  from tunix.models.gemma4 import model as gemma4_lib  # pylint: disable=g-import-not-at-top
  pattern = config.attention_pattern or gemma4_lib.GEMMA4_ATTENTION_PATTERN
  layer_types = [
      "full_attention" if pattern[i % len(pattern)] ==
      gemma4_lib.AttentionType.GLOBAL else "sliding_attention"
      for i in range(config.num_layers)]
  num_unshared = int(config.num_layers -
                     config.frac_shared_layers * config.num_layers)
  if config.enable_moe:
    raise ValueError("config: MoE Gemma 4 models are not supported")
  if config.override_kv_shared_ffw_hidden not in (None,
                                                  2 * config.hidden_dim):
    raise ValueError(
        f"config: override_kv_shared_ffw_hidden="
        f"{config.override_kv_shared_ffw_hidden} has no Hugging Face "
        f"equivalent (only 2 * hidden_dim, use_double_wide_mlp)")
  return {
      "model_type": "gemma4_text",
      "vocab_size": config.num_embed,
      "vocab_size_per_layer_input": config.num_embed,
      "hidden_size": config.embed_dim,
      "intermediate_size": config.hidden_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "num_global_key_value_heads": config.num_global_kv_heads,
      "head_dim": config.head_dim,
      "global_head_dim": config.global_key_size or config.head_dim,
      "hidden_size_per_layer_input": config.per_layer_input_dim,
      "sliding_window": config.sliding_window_size,
      "layer_types": layer_types,
      "num_kv_shared_layers": config.num_layers - num_unshared,
      "use_double_wide_mlp": config.override_kv_shared_ffw_hidden is not None,
      "attention_k_eq_v": config.k_eq_v_global,
      "final_logit_softcapping": config.final_logit_softcap,
      "hidden_activation": "gelu_pytorch_tanh",
      # Hugging Face's own value (Gemma4TextConfig's default), which Tunix's
      # RMSNorm hard-codes; Tunix's ModelConfig has no field to read it from.
      "rms_norm_eps": 1e-6,
      "tie_word_embeddings": True,
      "rope_parameters": {
          "sliding_attention": {
              "rope_type": "default",
              "rope_theta": float(config.local_base_frequency)},
          "full_attention": {
              "rope_type": "proportional",
              "partial_rotary_factor": config.global_rope_proportion,
              "rope_theta": float(config.global_base_frequency)},
      },
  }


def hf_config(config) -> dict:
  """A release-style `config.json` (text only) for a Tunix `ModelConfig`."""
  return {"architectures": ["Gemma4ForConditionalGeneration"],
          "model_type": "gemma4", "text_config": hf_text_config(config),
          "vision_config": None, "audio_config": None,
          "tie_word_embeddings": True}


def hf_state_from_tunix(params: dict[str, np.ndarray]
                        ) -> dict[str, np.ndarray]:
  """Tunix 0.1.7 parameter paths (`layers.0.attn.q_einsum.w`) -> Hugging
  Face names and layouts."""
  out: dict[str, np.ndarray] = {}
  unknown = []
  for path, value in params.items():
    converted = _convert(path, np.asarray(value))
    if not converted:
      unknown.append(path)
    for name, array in converted:
      out[PREFIX + name] = np.ascontiguousarray(array)
  if unknown:
    raise ValueError(f"params: no Hugging Face name for {unknown[:5]}")
  return out


def _convert(path: str, w: np.ndarray) -> list:
  m = re.fullmatch(r"layers\.(\d+)\.(.+)", path)
  if m is None:
    top = {
        "embedder.input_embedding": lambda: w,
        "embedder.per_layer_input_embedding": lambda: w.reshape(
            w.shape[0], -1),
        "embedder.per_layer_model_projection.w": lambda: w.reshape(
            w.shape[0], -1).T,
        "embedder.per_layer_projection_norm.scale": lambda: w,
        "final_norm.scale": lambda: w,
    }
    names = {
        "embedder.input_embedding": "embed_tokens.weight",
        "embedder.per_layer_input_embedding": "embed_tokens_per_layer.weight",
        "embedder.per_layer_model_projection.w":
            "per_layer_model_projection.weight",
        "embedder.per_layer_projection_norm.scale":
            "per_layer_projection_norm.weight",
        "final_norm.scale": "norm.weight",
    }
    return [(names[path], top[path]())] if path in top else []
  layer, rest = f"layers.{m.group(1)}.", m.group(2)
  if rest == "attn.q_einsum.w":  # [N, D, H] -> [N*H, D]
    return [(layer + "self_attn.q_proj.weight",
             w.transpose(1, 0, 2).reshape(w.shape[1], -1).T)]
  if rest == "attn.kv_einsum.w":  # [2, K, D, H] -> 2 x [K*H, D]
    kv = [x.transpose(1, 0, 2).reshape(x.shape[1], -1).T for x in w]
    return [(layer + "self_attn.k_proj.weight", kv[0]),
            (layer + "self_attn.v_proj.weight", kv[1])]
  if rest == "attn.k_einsum.w":
    return [(layer + "self_attn.k_proj.weight",
             w.transpose(1, 0, 2).reshape(w.shape[1], -1).T)]
  if rest == "attn.attn_vec_einsum.w":  # [N, H, D] -> [D, N*H]
    return [(layer + "self_attn.o_proj.weight", w.reshape(-1, w.shape[-1]).T)]
  if rest == "attn._query_norm.scale":
    return [(layer + "self_attn.q_norm.weight", w)]
  if rest == "attn._key_norm.scale":
    return [(layer + "self_attn.k_norm.weight", w)]
  mm = re.fullmatch(r"mlp\.(gate_proj|up_proj|down_proj)\.kernel", rest)
  if mm:
    return [(layer + f"mlp.{mm.group(1)}.weight", w.T)]
  mm = re.fullmatch(r"(per_layer_input_gate|per_layer_projection)\.w", rest)
  if mm:
    return [(layer + f"{mm.group(1)}.weight", w.T)]
  mm = re.fullmatch(r"(\w+)\.scale", rest)
  if mm and mm.group(1) in _NORMS:
    return [(layer + f"{_NORMS[mm.group(1)]}.weight", w)]
  if rest == "skip_scale":
    return [(layer + "layer_scalar", w)]
  return []


def write_hf_checkpoint(model, out_dir: str | os.PathLike, *,
                        dtype=np.float32, num_shards: int = 1) -> str:
  """Writes the base (non-LoRA) weights of a Tunix Gemma 4 as a Hugging Face
  checkpoint directory: safetensors (an index when `num_shards > 1`),
  `config.json` and a placeholder `tokenizer_config.json`."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if num_shards < 1:
    raise ValueError(f"num_shards: expected >= 1, got {num_shards}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  # LoRAParam subclasses Param: keep only the base weights.
  state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  params = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(
      state.to_pure_dict())[0]:
    keys = [str(getattr(k, "key", k)) for k in key_path]
    params[".".join(keys)] = np.asarray(leaf)
  tensors = hf_state_from_tunix(params)
  items = [(name, array.astype(dtype)) for name, array in
           sorted(tensors.items())]
  groups = [items[i::num_shards] for i in range(num_shards)]
  if num_shards == 1:
    safetensors_io.write_safetensors(
        os.path.join(out_dir, "model.safetensors"), items, {"format": "pt"})
  else:
    files = safetensors_io.shard_file_names(num_shards)
    weight_map = {}
    for file, group in zip(files, groups):
      safetensors_io.write_safetensors(os.path.join(out_dir, file), group,
                                       {"format": "pt"})
      weight_map.update({name: file for name, _ in group})
    safetensors_io.write_index(out_dir, weight_map,
                               sum(a.nbytes for _, a in items))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config(model.config), f, indent=2)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "GemmaTokenizer"}, f)
  return out_dir


__all__ = ["PREFIX", "hf_config", "hf_state_from_tunix", "hf_text_config",
           "write_hf_checkpoint"]
