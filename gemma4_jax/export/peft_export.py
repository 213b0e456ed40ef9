"""Adapter-only export in PEFT format (`adapter_model.safetensors` +
`adapter_config.json`), so PEFT or vLLM can hot-swap it on one base model.

Module names are the base checkpoint's (the Gemma 4 release uses
`model.language_model.layers.N...`), Tunix's shared K/V `lora_a` becomes two
PEFT pairs with the same A, and the `per_layer_model_projection` pair carries
the `embed_dim**-0.5` fix (see `mapping`), because Hugging Face applies that
scale after the Linear that PEFT wraps.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from gemma4_jax.export import adapter as adapter_lib
from gemma4_jax.export import base as base_lib
from gemma4_jax.export import mapping
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
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not force:
    raise FileExistsError(
        f"out: {out_dir!r} already exists; pass --force to replace it")
  if not isinstance(adapter, adapter_lib.Adapter):
    adapter = adapter_lib.load_adapter(adapter, rank=rank, alpha=alpha)
  for delta in adapter.deltas:
    if delta.target == mapping.LM_HEAD:
      raise ValueError(
          f"adapter: {delta.source} adapts the tied embedding's output "
          f"projection; a PEFT adapter on a tied Gemma 4 cannot express that "
          f"without changing the input embedding. Use `gemma4-jax merge "
          f"--untie` instead")
  prefix = DEFAULT_PREFIX
  if base_dir is not None:
    base = base_lib.open_base(base_dir)
    base_lib.place_deltas(base, adapter.deltas, untie=False)
    prefix = base.prefix
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
  config = {
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
  tmp_dir = os.path.join(os.path.dirname(out_dir),
                         f".{os.path.basename(out_dir)}.partial-{os.getpid()}")
  os.makedirs(tmp_dir)
  try:
    safetensors_io.write_safetensors(
        os.path.join(tmp_dir, adapter_lib.PEFT_WEIGHTS), tensors,
        {"format": "pt"})
    with open(os.path.join(tmp_dir, adapter_lib.PEFT_CONFIG), "w") as f:
      json.dump(config, f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return out_dir


__all__ = ["DEFAULT_PREFIX", "export_adapter"]
