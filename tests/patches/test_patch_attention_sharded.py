"""A patched tiny Gemma 4 LoRA train step under the simulated ('fsdp','tp')
mesh: it compiles, its gradients match the stock float32 step's against a
float64 run (model-level tolerance; the unsharded patched model is compared
the same way in test_patch_attention.py), and its HLO has no all-gather the
stock step does not have.

jit caches a trace per function, not per patch state: each jitted function
here is built fresh for the one state it runs in.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tunix.sft import peft_trainer

import gemma4_jax.patches as patches
from gemma4_jax import testing
from gemma4_jax import tiny_models

pytestmark = pytest.mark.slow

VOCAB = 128
sft_loss = peft_trainer._default_loss_fn  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def lora_model():
  # 4 query heads, 1 KV head (MQA, as E2B): tp=2 splits the query heads and
  # replicates K/V; the last 3 of the 6 layers reuse KV (both kinds).
  config = tiny_models.tiny_config(vocab_size=VOCAB, sliding_window=8)
  return tiny_models.apply_lora(tiny_models.build_model(config, seed=0),
                                seed=1)


@pytest.fixture(scope="module")
def inputs():
  # Right padding: every query row sees a key, so stock and patched agree.
  batch = tiny_models.synthetic_batches(1, batch_size=4, seq_len=16,
                                        vocab_size=VOCAB, padding="right",
                                        seed=2)[0]
  return tiny_models.model_inputs(batch)


def _grad_step(model, inputs, mesh=None):
  """(jitted step, its args): LoRA gradients of Tunix's SFT loss, as a
  fresh function; with `mesh`, the inputs are batch-sharded over fsdp."""
  graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

  def step(lora_state, rest, tokens, input_mask, positions, mask):
    def loss(lora_state):
      return sft_loss(nnx.merge(graphdef, lora_state, rest), tokens,
                      input_mask, positions, mask)
    return jax.grad(loss)(lora_state)

  data = [jnp.asarray(inputs[name]) for name in
          ("input_tokens", "input_mask", "positions", "attention_mask")]
  if mesh is not None:
    data = [jax.device_put(x, NamedSharding(mesh, P("fsdp"))) for x in data]
  return jax.jit(step), (lora_state, rest, *data)


def _all_gathers(hlo: str) -> collections.Counter:
  """Result shapes of the all-gathers in compiled HLO text."""
  return collections.Counter(re.findall(
      r"= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\(", hlo))


def _flat(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sharded_train_step_matches_and_gathers_nothing_more(lora_model,
                                                             inputs):
  mesh = testing.simulated_mesh()
  with jax.set_mesh(mesh):
    stock_step, args = _grad_step(lora_model, inputs, mesh)
    stock_hlo = stock_step.lower(*args).compile().as_text()
    stock = _flat(stock_step(*args))
    with patches.applied(ple=False, lora=False, loss=False):
      patched_step, _ = _grad_step(lora_model, inputs, mesh)
      patched_lowered = patched_step.lower(*args)
      patched_hlo = patched_lowered.compile().as_text()
      sharded = _flat(patched_step(*args))
  with jax.enable_x64(True):
    step, args = _grad_step(tiny_models.float64_copy(lora_model), inputs)
    stock64 = _flat(step(*args))

  assert len(sharded) > 20 and max(np.abs(g).max() for g in stock.values()) > 0
  testing.assert_model_close(sharded, stock, stock64, name="sharded grads")
  # The patched step ran its attention in shard_map (manual partitioning).
  assert "manual_computation" in patched_lowered.as_text()  # Shardy
  extra = _all_gathers(patched_hlo) - _all_gathers(stock_hlo)
  assert not extra, (f"all-gathers the stock step does not have: "
                     f"{dict(extra)}; stock has "
                     f"{dict(_all_gathers(stock_hlo))}")
