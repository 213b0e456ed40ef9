"""One tiny Gemma 4, its Hugging Face checkpoint and a trained LoRA adapter,
built once per session and shared by the export tests."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gemma4_jax import testing
from gemma4_jax import tiny_models
from gemma4_jax.export import hf_writer

RANK = 4
ALPHA = 8.0
# Tunix's safetensors loader cannot tell the axes of a K/V weight apart when
# embed_dim equals a head dim (tiny_config's default 64 == global_head_dim).
EMBED_DIM = 96


@dataclasses.dataclass(frozen=True)
class TinyRun:
  config: object
  base_model: object
  lora_model: object
  base_dir: str
  checkpoint_root: str
  inputs: dict
  lora_logits: np.ndarray
  base_logits: np.ndarray


def logits_of(model, inputs) -> np.ndarray:
  out, _ = model(inputs["input_tokens"], inputs["positions"], None,
                 inputs["attention_mask"])
  return np.asarray(out)


def write_tunix_checkpoint(flat: dict[str, np.ndarray], root: str,
                           step: int = 1) -> str:
  """Saves dotted-path arrays the way Tunix's CheckpointManager lays them out
  (`<root>/<step>/model_params`, NNX `value` leaves)."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path.split("."):
      node = node.setdefault(key, {})
    node["value"] = np.asarray(value)
  step_dir = os.path.join(root, str(step))
  os.makedirs(step_dir, exist_ok=True)
  ocp.PyTreeCheckpointer().save(os.path.join(step_dir, "model_params"), tree)
  return step_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
  root = tmp_path_factory.mktemp("tiny")
  config = tiny_models.tiny_config(embed_dim=EMBED_DIM)
  base_model = tiny_models.build_model(config, seed=0)
  base_dir = hf_writer.write_hf_checkpoint(base_model, root / "base",
                                           num_shards=2)
  lora_model = tiny_models.apply_lora(tiny_models.build_model(config, seed=0),
                                      rank=RANK, alpha=ALPHA)
  batches = tiny_models.synthetic_batches(2, batch_size=2, seq_len=8,
                                          vocab_size=config.num_embed)
  checkpoint_root = str(root / "ckpt")
  tiny_models.train(lora_model, batches, checkpoint_dir=checkpoint_root)
  eval_batch = tiny_models.synthetic_batches(
      1, batch_size=2, seq_len=8, vocab_size=config.num_embed, seed=7)[0]
  inputs = tiny_models.model_inputs(eval_batch)
  return TinyRun(config, base_model, lora_model, str(base_dir),
                 checkpoint_root, inputs, logits_of(lora_model, inputs),
                 logits_of(base_model, inputs))


def lora_params(model) -> dict[str, np.ndarray]:
  state = nnx.state(model, nnx.LoRAParam).to_pure_dict()
  flat = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    flat[".".join(str(getattr(k, "key", k)) for k in key_path)] = np.asarray(
        leaf)
  return flat


def assert_logits_close(actual, reference, name="logits"):
  """float32 tolerance relative to the logits' scale: merging reassociates
  `x @ W + s * (x @ A) @ B` into `x @ (W + s * B A)`, which moves each logit
  by float32 rounding of terms as large as the largest logit, so elementwise
  relative error is meaningless where a logit is near zero."""
  actual = np.asarray(actual, np.float64)
  reference = np.asarray(reference, np.float64)
  atol, rtol = testing.tolerance(jnp.float32)
  bound = atol + rtol * np.abs(reference).max()
  err = np.abs(actual - reference).max()
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  assert err <= bound, f"{name}: max |diff| {err:.3g} > {bound:.3g}"
