"""The merged checkpoint in transformers and the exported adapter in PEFT
(torch CPU) reproduce the Tunix LoRA model's logits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gemma4_jax import cli
from tests.export import conftest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow


def _hf_logits(model, run) -> np.ndarray:
  ids = torch.from_numpy(np.asarray(run.inputs["input_tokens"], np.int64))
  mask = torch.from_numpy(np.asarray(run.inputs["input_mask"], np.int64))
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def test_merged_checkpoint_loads_in_transformers(tiny_run, tmp_path):
  out = str(tmp_path / "merged")
  assert cli.main(["merge", "--base", tiny_run.base_dir, "--adapter",
                        tiny_run.checkpoint_root, "--out", out, "--alpha",
                        str(conftest.ALPHA), "--quiet"]) == 0
  with open(os.path.join(out, "config.json")) as f:
    text_config = transformers.Gemma4TextConfig(
        **json.load(f)["text_config"])
  # The release names are `model.language_model.*` (Gemma4ForConditional-
  # Generation); the text-only class calls them `model.*`.
  model = transformers.Gemma4ForCausalLM.from_pretrained(
      out, config=text_config, dtype=torch.float32,
      key_mapping={r"^model\.language_model\.": "model."})
  model.eval()
  base = transformers.Gemma4ForCausalLM.from_pretrained(
      tiny_run.base_dir, config=text_config, dtype=torch.float32,
      key_mapping={r"^model\.language_model\.": "model."})
  base.eval()
  # transformers reproduces the Tunix base model, so the merge is what is
  # being checked below.
  conftest.assert_logits_close(_hf_logits(base, tiny_run),
                               tiny_run.base_logits, name="hf base logits")
  conftest.assert_logits_close(_hf_logits(model, tiny_run),
                               tiny_run.lora_logits, name="hf merged logits")


def test_exported_adapter_loads_with_peft(tiny_run, tmp_path):
  out = str(tmp_path / "peft")
  assert cli.main(["export-adapter", "--adapter",
                        tiny_run.checkpoint_root, "--out", out, "--alpha",
                        str(conftest.ALPHA), "--base",
                        tiny_run.base_dir]) == 0
  with open(os.path.join(out, "adapter_config.json")) as f:
    config = json.load(f)
  assert config["r"] == conftest.RANK
  assert config["lora_alpha"] == conftest.ALPHA
  assert isinstance(config["target_modules"], list)
  assert len(config["target_modules"]) == 6 * 7 + 3 * 2 + 1
  base = transformers.Gemma4ForConditionalGeneration.from_pretrained(
      tiny_run.base_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, out)
  model.eval()
  conftest.assert_logits_close(_hf_logits(model, tiny_run),
                               tiny_run.lora_logits, name="peft logits")
