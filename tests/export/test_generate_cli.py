"""`gemma4-jax generate --chat --adapter` and `perplexity --chat` end to end
on the export tests' tiny checkpoint and trained adapter, with a
`tokenizer.json` that has Gemma 4's special tokens.

The test process has 4 CPU devices (tests/conftest.py), so both commands
run on their default `('fsdp', 'tp')` mesh of 4 x 1: the checkpoint is
loaded sharded and the rows are split over `fsdp`.
"""

import json
import shutil

import numpy as np
import pytest

from gemma4_jax import chat
from gemma4_jax import cli
from gemma4_jax import testing
from gemma4_jax import tiny_tokenizer
from gemma4_jax.reference import generate as reference_generate

pytestmark = pytest.mark.slow

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tiny_run, tmp_path_factory):
  directory = tmp_path_factory.mktemp("chat") / "checkpoint"
  shutil.copytree(tiny_run.base_dir, directory)
  tiny_tokenizer.write(directory, tiny_run.config.num_embed)
  return str(directory)


def test_generate_chat_with_adapter_matches_reference(tiny_run, checkpoint,
                                                      tmp_path, capsys):
  data = tmp_path / "prompts.jsonl"
  prompts = ["w9 w10 w11", "w200", "w17 w3 w99 w45 w8 w61 w30"]
  data.write_text("\n".join(json.dumps({"prompt": p, "completion": "w1"})
                            for p in prompts[1:]) + "\n")
  code = cli.main(["generate", checkpoint, "--prompt", prompts[0], "--data",
                   str(data), "--chat", "--adapter", tiny_run.checkpoint_root,
                   "--alpha", "8", "--max-new-tokens", str(NEW_TOKENS),
                   "--batch-size", "2", "--json"])
  out = capsys.readouterr().out
  assert code == 0, out
  results = [json.loads(line) for line in out.splitlines()]
  assert [r["prompt"] for r in results] == prompts
  assert [r.get("reference") for r in results] == [None, "w1", "w1"]
  tokenizer = tiny_tokenizer.build(tiny_run.config.num_embed)
  ids = [chat.encode_prompt(tokenizer, p, chat=True) for p in prompts]
  assert ids[1] == [2, 3, 5, 200, 4, 3, 6]  # <bos><|turn>user w200<turn|><|turn>model
  # The merged checkpoint against the LoRA model applying its adapter at
  # run time: the same greedy tokens up to float32 near-ties.
  reference = testing.greedy_reference(tiny_run.lora_model, ids, NEW_TOKENS)
  stops = chat.stop_token_ids(tokenizer, checkpoint)
  for result in results:
    assert result["stopped"] == (len(result["tokens"]) < NEW_TOKENS)
    assert result["completion"] == tokenizer.decode(result["tokens"])
  # A reference token that is a stop token ends the comparison there.
  cut = [t[:next((i for i, x in enumerate(t) if x in stops), len(t))]
         for t in reference[0]]
  testing.assert_greedy_matches([r["tokens"] for r in results],
                                (cut, reference[1], reference[2]),
                                name="generate --chat --adapter")


def test_perplexity_chat_scores_completion_and_turn_end(tiny_run, checkpoint,
                                                        tmp_path, capsys):
  lines = [{"prompt": "w5 w6", "completion": "w7 w8 w9"},
           {"prompt": "w100", "completion": "w101"},
           {"prompt": "w40 w41 w42 w43", "completion": "w44 w45"}]
  data = tmp_path / "eval.jsonl"
  data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  code = cli.main(["perplexity", checkpoint, "--data", str(data), "--chat",
                   "--batch-size", "2", "--no-progress"])
  out = capsys.readouterr().out
  assert code == 0, out
  tokenizer = tiny_tokenizer.build(tiny_run.config.num_embed)
  examples = [chat.encode_example(tokenizer, l["prompt"], l["completion"],
                                  chat=True) for l in lines]
  # Completion words and the closing <turn|>; nothing of the prompt.
  assert [int(m.sum()) for _, m in examples] == [4, 2, 3]
  forward = reference_generate.full_logits_fn(tiny_run.base_model)
  length = max(len(t) for t, _ in examples)
  rows = np.zeros((len(examples), length), np.int32)
  for r, (tokens, _) in enumerate(examples):
    rows[r, :len(tokens)] = tokens
  logits = forward(rows).astype(np.float64)
  nll = []
  for r, (tokens, mask) in enumerate(examples):
    z = logits[r, :len(tokens) - 1]
    log_probs = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(
        1, keepdims=True)) - z.max(1, keepdims=True)
    token_nll = -log_probs[np.arange(len(tokens) - 1), tokens[1:]]
    nll.extend(token_nll[mask[1:]])
  assert f"3 examples, {len(nll)} scored tokens" in out
  row = next(l.split() for l in out.splitlines() if l.startswith("base "))
  # The table prints 4 decimals.
  np.testing.assert_allclose(float(row[1]), np.mean(nll), rtol=1e-4,
                             atol=1e-4)
