"""Real files for the bad-input suite, built once per session in about a
second: a tiny Gemma 4 Hugging Face checkpoint (two safetensors shards, an
index, the release-style config, a `tokenizer.json`), a Tunix LoRA
checkpoint saved by orbax, the same adapter exported in PEFT format, and a
JSONL dataset.

The checkpoint's tensors come from the Tunix model's abstract state
(`nnx.eval_shape`: every name and shape Tunix has) filled with random
numbers, so no model is built; nothing here ever loads the model, since
every bad input must be refused before that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import tokenizers
from tokenizers import models as tokenizer_models
from tokenizers import pre_tokenizers
from tokenizers import processors

from gemma4_jax import perplexity
from gemma4_jax import tiny_models
from gemma4_jax.export import adapter as adapter_lib
from gemma4_jax.export import hf_writer
from gemma4_jax.export import peft_export
from gemma4_jax.export import safetensors_io

VOCAB = 256
RANK = 4
ALPHA = 8.0
EMBED_DIM = 96
BOS = 1


@dataclasses.dataclass(frozen=True)
class Files:
  base_dir: str
  tunix_root: str  # <root>/1/model_params, alpha not recorded
  peft_dir: str    # lora_alpha recorded
  data: str        # a valid JSONL dataset for `perplexity`
  config: object   # the Tunix ModelConfig


def write_tokenizer(directory, vocab_size: int) -> str:
  """A word-level `tokenizer.json`: `w<i>` is id i, `<bos>` is prepended."""
  vocab = {"<pad>": 0, "<bos>": BOS}
  vocab.update({f"w{i}": i for i in range(2, vocab_size)})
  tokenizer = tokenizers.Tokenizer(tokenizer_models.WordLevel(
      vocab, unk_token="<pad>"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<bos> $A", special_tokens=[("<bos>", BOS)])
  path = os.path.join(directory, perplexity.TOKENIZER_FILE)
  tokenizer.save(path)
  return path


def _base_params(config, rng) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tunix.models.gemma4 import model as gemma4_lib  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(
      lambda: gemma4_lib.Gemma4(config, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param).to_pure_dict()
  params = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = ".".join(str(getattr(k, "key", k)) for k in key_path)
    params[name] = (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return params


def write_base(config, directory: str, rng) -> str:
  os.makedirs(directory)
  tensors = sorted(hf_writer.hf_state_from_tunix(
      _base_params(config, rng)).items())
  files = safetensors_io.shard_file_names(2)
  weight_map = {}
  for file, group in zip(files, (tensors[0::2], tensors[1::2])):
    safetensors_io.write_safetensors(os.path.join(directory, file), group,
                                     {"format": "pt"})
    weight_map.update({name: file for name, _ in group})
  safetensors_io.write_index(directory, weight_map,
                             sum(a.nbytes for _, a in tensors))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_writer.hf_config(config), f, indent=2)
  write_tokenizer(directory, VOCAB)
  return directory


def tunix_lora(config, rng) -> dict[str, np.ndarray]:
  """qwix LoRA leaves on layer 0's query projection and MLP gate."""
  d, n, h = config.embed_dim, config.num_heads, config.head_dim
  return {
      "layers.0.attn.q_einsum.w_lora_a": rng.standard_normal((d, RANK)),
      "layers.0.attn.q_einsum.w_lora_b": rng.standard_normal((RANK, n, h)),
      "layers.0.mlp.gate_proj.kernel_lora_a": rng.standard_normal((d, RANK)),
      "layers.0.mlp.gate_proj.kernel_lora_b": rng.standard_normal(
          (RANK, config.hidden_dim)),
  }


def write_tunix_checkpoint(flat: dict[str, np.ndarray], root: str,
                           step: int = 1) -> str:
  """Saves dotted-path arrays as Tunix's CheckpointManager lays them out
  (`<root>/<step>/model_params`, NNX `value` leaves)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path.split("."):
      node = node.setdefault(key, {})
    node["value"] = np.asarray(value, np.float32)
  step_dir = os.path.join(root, str(step))
  os.makedirs(step_dir, exist_ok=True)
  ocp.PyTreeCheckpointer().save(
      os.path.join(os.path.abspath(step_dir), adapter_lib.TUNIX_PARAMS_ITEM),
      tree)
  return step_dir


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> Files:
  root = tmp_path_factory.mktemp("bad_input")
  rng = np.random.default_rng(0)
  config = tiny_models.tiny_config(embed_dim=EMBED_DIM, vocab_size=VOCAB,
                                   num_layers=3, frac_shared_layers=0.0)
  base_dir = write_base(config, str(root / "base"), rng)
  tunix_root = str(root / "tunix")
  write_tunix_checkpoint(tunix_lora(config, rng), tunix_root)
  peft_dir = peft_export.export_adapter(tunix_root, root / "peft",
                                        base_dir=base_dir, alpha=ALPHA)
  data = root / "data.jsonl"
  data.write_text(json.dumps({"text": "w5 w9 w200 w7"}) + "\n" + json.dumps(
      {"prompt": "w3 w4", "completion": "w8 w9"}) + "\n")
  return Files(base_dir, tunix_root, str(peft_dir), str(data), config)


def copy_dir(src: str, dst) -> str:
  return shutil.copytree(src, dst)
