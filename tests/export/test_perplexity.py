"""`gemma4-jax perplexity` end to end on a tiny checkpoint, and its parts.

The checkpoint is the export tests' tiny Gemma 4 (`tiny_run`) with a real
`tokenizer.json` built here with the `tokenizers` library; the expected
numbers come from the Tunix models' full logits (which include the final
softcap), computed directly.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from gemma4_jax import cli
from gemma4_jax import perplexity
from gemma4_jax import testing
from gemma4_jax.kernels.loss import top_k as top_k_lib
from gemma4_jax.reference import loss as loss_reference

pytestmark = pytest.mark.slow

BOS = 1


def _write_tokenizer(directory, vocab_size):
  vocab = {"<pad>": 0, "<bos>": BOS}
  vocab.update({f"w{i}": i for i in range(2, vocab_size)})
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<bos> $A", special_tokens=[("<bos>", BOS)])
  tokenizer.save(os.path.join(directory, perplexity.TOKENIZER_FILE))


@pytest.fixture(scope="module")
def checkpoint(tiny_run, tmp_path_factory):
  directory = tmp_path_factory.mktemp("ppl") / "checkpoint"
  shutil.copytree(tiny_run.base_dir, directory)
  _write_tokenizer(directory, tiny_run.config.num_embed)
  return str(directory)


def _words(rng, n):
  return " ".join(f"w{i}" for i in rng.integers(2, 256, n))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  rng = np.random.default_rng(0)
  lines = [{"text": _words(rng, 9)},
           {"prompt": _words(rng, 5), "completion": _words(rng, 4)},
           {"text": _words(rng, 20)}]
  path = tmp_path_factory.mktemp("data") / "data.jsonl"
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  return str(path), lines


def _direct_mean_nll(model, lines):
  """From the model's full [T, V] logits: what the command must match."""
  nll_sum, count = 0.0, 0
  for line in lines:
    if "text" in line:
      ids = [BOS] + [int(w[1:]) for w in line["text"].split()]
      first_scored = 1
    else:
      prompt = [BOS] + [int(w[1:]) for w in line["prompt"].split()]
      ids = prompt + [int(w[1:]) for w in line["completion"].split()]
      first_scored = len(prompt)
    tokens = jnp.asarray([ids])
    logits, _ = model(tokens, jnp.arange(len(ids))[None], None,
                      jnp.tril(jnp.ones((1, len(ids), len(ids)), bool)))
    log_probs = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32))
    token_nll = -np.take_along_axis(np.asarray(log_probs),
                                    np.asarray(ids[1:])[:, None], 1)[:, 0]
    nll_sum += float(token_nll[first_scored - 1:].sum())
    count += len(ids) - first_scored
  return nll_sum / count, count


def _table(output):
  rows = {}
  for line in output.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[0] in ("base", "adapted"):
      rows[parts[0]] = (float(parts[1]), float(parts[2]))
  return rows


def test_cli_base_and_adapted_match_direct_logits(tiny_run, checkpoint,
                                                  dataset, capsys):
  path, lines = dataset
  code = cli.main(["perplexity", checkpoint, "--data", path, "--adapter",
                   tiny_run.checkpoint_root, "--alpha", "8", "--top-k", "3",
                   "--inspect", "1", "--no-progress"])
  output = capsys.readouterr().out
  assert code == 0, output
  rows = _table(output)
  base_nll, count = _direct_mean_nll(tiny_run.base_model, lines)
  adapted_nll, _ = _direct_mean_nll(tiny_run.lora_model, lines)
  assert f"3 examples, {count} scored tokens" in output
  # The table prints 4 decimals.
  np.testing.assert_allclose(rows["base"], (base_nll, np.exp(base_nll)),
                             rtol=1e-4)
  # The adapted model is the merged checkpoint; the direct run applies LoRA
  # at run time: equal up to float32 rounding of the merge.
  np.testing.assert_allclose(rows["adapted"],
                             (adapted_nll, np.exp(adapted_nll)), rtol=1e-4)
  assert abs(adapted_nll - base_nll) > 1e-3  # the adapter changes something
  assert "example 1, base: top-3 next tokens" in output
  assert "example 1, adapted: top-3 next tokens" in output


def test_top_k_streams_and_matches_dense(tiny_run, checkpoint):
  tokenizer = perplexity.load_tokenizer(checkpoint)
  example = perplexity.tokenize([{"text": "w5 w9 w200 w7 w31"}],
                                tokenizer)[0]
  assert list(example.tokens) == [BOS, 5, 9, 200, 7, 31]
  model = tiny_run.base_model
  top = perplexity.top_k(model, example, 4)
  ids = jnp.asarray(example.tokens)[None]
  n = ids.shape[1]
  logits, _ = model(ids, jnp.arange(n)[None], None,
                    jnp.tril(jnp.ones((1, n, n), bool)))
  probs = np.asarray(jax.nn.softmax(logits[0, :-1]))
  expected = np.argsort(-probs, axis=1)[:, :4]
  np.testing.assert_array_equal(top.ids, expected)
  testing.assert_close(top.probs, np.take_along_axis(probs, expected, 1),
                       online_softmax=True, name="top-k probabilities")
  testing.assert_close(
      top.target_probs,
      probs[np.arange(n - 1), np.asarray(example.tokens[1:])],
      online_softmax=True, name="next-token probabilities")


@pytest.mark.parametrize("vocab, block", [(300, 64), (64, 64), (7, 3)])
def test_streaming_top_k_kernel(vocab, block):
  rng = np.random.default_rng(vocab)
  hidden = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
  embedding = jnp.asarray(rng.standard_normal((vocab, 16)), jnp.float32)
  k = min(5, vocab)
  ids, probs, log_z = top_k_lib.top_k_next_tokens(
      hidden, embedding, k, softcap=5.0, block_vocab=block)
  logits = 5.0 * np.tanh(np.float64(hidden) @ np.float64(embedding).T / 5.0)
  dense = np.exp(logits - logits.max(1, keepdims=True))
  dense /= dense.sum(1, keepdims=True)
  np.testing.assert_array_equal(ids, np.argsort(-dense, axis=1)[:, :k])
  testing.assert_close(probs, np.take_along_axis(dense, np.asarray(ids), 1),
                       online_softmax=True, name="probs")
  nll = loss_reference.token_nll(hidden, embedding, ids[:, 0], softcap=5.0)
  testing.assert_close(np.exp(-nll), probs[:, 0], online_softmax=True,
                       name="top-1 vs reference nll")
  assert log_z.shape == (5,)
  with pytest.raises(ValueError, match="k must be an int in"):
    top_k_lib.top_k_next_tokens(hidden, embedding, vocab + 1)


@pytest.mark.parametrize("line, match", [
    ('{"txt": "w3"}', r"data.jsonl:2: expected a 'text' field, or 'prompt' "
     r"and 'completion' fields; got \['txt'\]"),
    ('{"prompt": "w3"}', r"data.jsonl:2: expected a 'text' field"),
    ('{"text": 3}', r"data.jsonl:2: field 'text' must be a string, got int"),
    ('[1, 2]', r"data.jsonl:2: expected a JSON object, got list"),
    ('{"text": ', r"data.jsonl:2: not a JSON object"),
])
def test_bad_dataset_lines_name_the_line(tmp_path, checkpoint, capsys, line,
                                         match):
  path = tmp_path / "data.jsonl"
  path.write_text('{"text": "w4 w5"}\n' + line + "\n")
  with pytest.raises(perplexity.DatasetError, match=match):
    perplexity.read_dataset(path)
  assert cli.main(["perplexity", checkpoint, "--data", str(path)]) == 2
  assert "data.jsonl:2:" in capsys.readouterr().err
