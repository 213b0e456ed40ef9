"""Adapter-only export in PEFT format (`adapter_model.safetensors` +
`adapter_config.json`), so PEFT or vLLM can hot-swap it on one base model.

Module names are the base checkpoint's (the Gemma 4 release uses
`model.language_model.layers.N...`), Tunix's shared K/V `lora_a` becomes two
PEFT pairs with the same A, and the `per_layer_model_projection` pair carries
the `embed_dim**-0.5` fix (see `mapping`), because Hugging Face applies that
scale after the Linear that PEFT wraps.
"""

from __future__ import annotations

import os

import numpy as np

from gemma4_jax import validation
from gemma4_jax.export import adapter as adapter_lib
from gemma4_jax.export import base as base_lib
from gemma4_jax.export import mapping
from gemma4_jax.export import output_dir
from gemma4_jax.export import safetensors_io

DEFAULT_PREFIX = "model.language_model."


def export_adapter(adapter, out_dir: str | os.PathLike, *,
                   base_dir: str | os.PathLike | None = None,
                   rank: int | None = None, alpha: float | None = None,
                   force: bool = False) -> str:
  """Writes `adapter` (a path or `adapter.Adapter`) as a PEFT LoRA adapter.

  Args:
    adapter: Tunix checkpoint or PEFT directory, or a loaded `Adapter`.
    out_dir: output directory; must not exist unless `force`.
    base_dir: optional base checkpoint: module names follow its tensor names
      and every shape is checked against it. Without it, the names of the
      Gemma 4 release (`model.language_model.`) are used.
    rank, alpha: checked against / completing the adapter (see
      `adapter.load_adapter`).
    force: replace an existing `out_dir`.

  Returns:
    The output directory.
  """
  validation.check_bool("force", force)
  adapter_lib.check_rank_alpha(rank, alpha)
  out_dir = os.path.abspath(os.fspath(out_dir))
  output_dir.check_new(out_dir, force=force)
  if base_dir is not None:
    validation.check_input_dir("base (--base)", base_dir)
  if not isinstance(adapter, adapter_lib.Adapter):
    adapter = adapter_lib.load_adapter(adapter, rank=rank, alpha=alpha)
  _check_untied(adapter)
  prefix = DEFAULT_PREFIX
  if base_dir is not None:
    base = base_lib.open_base(base_dir)
    base_lib.place_deltas(base, adapter.deltas, untie=False)
    prefix = base.prefix
  tensors, modules = _peft_tensors(adapter, prefix)
  config = _peft_config(adapter, modules, base_dir)
  with output_dir.staged(out_dir) as tmp_dir:
    safetensors_io.write_safetensors(
        os.path.join(tmp_dir, adapter_lib.PEFT_WEIGHTS), tensors,
        {"format": "pt"})
    output_dir.write_json(os.path.join(tmp_dir, adapter_lib.PEFT_CONFIG),
                          config)
  return out_dir


def _check_untied(adapter: adapter_lib.Adapter) -> None:
  for delta in adapter.deltas:
    if delta.target == mapping.LM_HEAD:
      raise ValueError(
          f"adapter: {delta.source} adapts the tied embedding's output "
          f"projection; a PEFT adapter on a tied Gemma 4 cannot express that "
          f"without changing the input embedding. Use `gemma4-jax merge "
          f"--untie` instead")


def _peft_tensors(adapter: adapter_lib.Adapter, prefix: str
                  ) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
  """PEFT's `(name, array)` pairs of `lora_A`/`lora_B` weights, and the
  module names they adapt."""
  tensors = []
  modules = []
  for delta in adapter.deltas:
    module = prefix + delta.target
    modules.append(module)
    # PEFT computes scale * B @ A with its own scale; keep alpha/r as-is.
    tensors.append((f"base_model.model.{module}.lora_A.weight",
                    delta.lora_a.astype(np.float32)))
    tensors.append((f"base_model.model.{module}.lora_B.weight",
                    delta.lora_b.astype(np.float32)))
  return tensors, modules


def _peft_config(adapter: adapter_lib.Adapter, modules: list[str],
                 base_dir: str | os.PathLike | None) -> dict:
  """PEFT's `adapter_config.json`."""
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": (os.path.abspath(os.fspath(base_dir))
                                  if base_dir is not None else None),
      "r": adapter.rank,
      "lora_alpha": adapter.alpha,
      "use_rslora": adapter.scale != adapter.alpha / adapter.rank,
      "target_modules": sorted(modules),
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_dora": False,
      "inference_mode": True,
      "modules_to_save": None,
  }


__all__ = ["DEFAULT_PREFIX", "export_adapter"]
