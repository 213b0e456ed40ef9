"""The fine-tuning script at tiny scale, on data generated here: a tiny
Gemma 4 written as a Hugging Face checkpoint (with a Gemma 4-style
tokenizer), a counting task in the turn format, real PeftTrainer steps with
patches applied, orbax checkpoints, the merge, perplexity and generation.

The test process has 4 CPU devices (tests/conftest.py): the script runs on
its default ('fsdp', 'tp') mesh of 4 x 1.
"""

import json
import os
import re

import numpy as np
import pytest

from gemma4_jax import chat
from gemma4_jax import finetune
from gemma4_jax import patches
from gemma4_jax import tiny_models
from gemma4_jax import tiny_tokenizer
from gemma4_jax.export import hf_writer

pytestmark = pytest.mark.slow

VOCAB = 256
COUNT = 4


def _pairs(starts):
  # "w17" -> "w18 w19 w20 w21": the next COUNT ids, a task LoRA can learn.
  return [{"prompt": f"w{s}", "completion": " ".join(
      f"w{s + i}" for i in range(1, COUNT + 1))} for s in starts]


def test_finetune_script_end_to_end(tmp_path, capsys):
  # embed_dim 96: Tunix's loader cannot tell a K/V weight's axes apart when
  # embed_dim equals a head dim (tiny_config's 64).
  config = tiny_models.tiny_config(vocab_size=VOCAB, embed_dim=96)
  base = hf_writer.write_hf_checkpoint(
      tiny_models.build_model(config, seed=0), tmp_path / "base")
  tiny_tokenizer.write(base, VOCAB)
  # Starts in [10, 50): the completions use 44 of the 256 ids, so a few
  # steps already move probability onto them; held-out starts are unseen.
  rng = np.random.default_rng(0)
  starts = rng.permutation(np.arange(10, 50))
  train, held_out = _pairs(starts[:32]), _pairs(starts[32:])
  # One example too long for --seq-len: dropped, not truncated.
  train.append({"prompt": "w9", "completion": " ".join(["w10"] * 40)})
  for name, records in (("train", train), ("eval", held_out)):
    (tmp_path / f"{name}.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n")

  code = finetune.main([
      "--base", base, "--train", str(tmp_path / "train.jsonl"),
      "--eval", str(tmp_path / "eval.jsonl"), "--out", str(tmp_path / "run"),
      "--steps", "12", "--batch-size", "8", "--seq-len", "16",
      "--lora-rank", "4", "--lora-alpha", "8", "--learning-rate", "5e-2",
      "--num-samples", "2", "--max-new-tokens", "6"])
  out = capsys.readouterr().out
  assert code == 0, out
  summary = json.loads(out.strip().splitlines()[-1])
  assert "32 training examples (1 longer than 16 tokens dropped)" in out
  assert "patched" in out  # the patch report
  # Training ran patched; the merge, perplexity and generation after it and
  # the caller get Tunix back as it was.
  assert not any(row.patched for row in patches.status().targets)
  # A Tunix checkpoint of the last step, merged into a loadable checkpoint.
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "12")
  merged = tmp_path / "run" / "merged"
  for name in ("config.json", "tokenizer.json"):
    assert os.path.exists(merged / name), name
  assert list(merged.glob("*.safetensors"))
  # Trained on completions only, in the turn format: held-out completions
  # (and their <turn|>) are likelier after fine-tuning.
  ppl = summary["perplexity"]
  assert ppl["adapted"] < 0.95 * ppl["base"], ppl
  first, last = re.search(r"train loss: ([\d.]+) \(step 1\) -> ([\d.]+)",
                          out).groups()
  assert float(last) < float(first)
  assert float(last) == pytest.approx(summary["final_loss"], abs=1e-4)
  tokenizer = tiny_tokenizer.build(VOCAB)
  prompt_ids = chat.encode_prompt(tokenizer, held_out[0]["prompt"],
                                  chat=True)
  assert len(prompt_ids) == 7
  assert out.count("### prompt: ") == 4  # 2 samples, base and fine-tuned
