"""The Tunix loss patch on real tiny Gemma 4 models and PeftTrainer steps.

Layout-agnostic: runs against google-tunix 0.1.7 and Tunix main (whose loss
returns a `LossOutput` and whose `Gemma4.__call__` has `skip_lm_head`).
Patched float32 results are compared with stock float32 and a float64 copy
of the model (`testing.assert_model_close`).

jit caches a trace per function, not per patch state: every jitted function
here is only ever called in one state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tunix.sft import peft_trainer

import gemma4_jax.patches as patches
from gemma4_jax import testing
from gemma4_jax.patches import _framework
from gemma4_jax.patches import tunix_loss
from gemma4_jax import tiny_models

pytestmark = pytest.mark.slow

VOCAB = 256
STOCK_LOSS = peft_trainer._default_loss_fn  # pylint: disable=protected-access
LOSS_ONLY = dict(attention=False, ple=False, lora=False, loss=True)


@pytest.fixture(scope="module")
def lora_model():
  # The loss sees only the final norm's output: 3 layers (local, local,
  # global) without KV sharing are enough and compile twice as fast.
  model = tiny_models.build_model(
      tiny_models.tiny_config(vocab_size=VOCAB, num_layers=3,
                              frac_shared_layers=0.0), seed=0)
  return tiny_models.apply_lora(model, seed=1)


def _scalar(out):
  """Tunix 0.1.7 returns the loss; Tunix main a LossOutput."""
  if hasattr(out, "primary_loss"):
    return out.primary_loss.compute()
  return out


def _patched_loss():
  with patches.applied(**LOSS_ONLY):
    loss_fn = peft_trainer._default_loss_fn  # pylint: disable=protected-access
  assert loss_fn is not STOCK_LOSS and loss_fn.__wrapped__ is STOCK_LOSS
  return loss_fn


def _value_and_lora_grads(loss_fn, model, inputs):
  fn = lambda m: _scalar(loss_fn(m, **inputs))
  value, grads = nnx.jit(nnx.value_and_grad(
      fn, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
  return value, nnx.to_pure_dict(grads)


def _inputs(padding, seed, batch_size=4):
  batch = tiny_models.synthetic_batches(
      1, batch_size=batch_size, seq_len=12, vocab_size=VOCAB,
      padding=padding, seed=seed)[0]
  return tiny_models.model_inputs(batch)


def test_loss_and_lora_grads_match_stock(lora_model):
  # One batch with an unpadded, a right-padded and a left-padded row.
  right, left = (_inputs(padding, seed=2, batch_size=2)
                 for padding in ("right", "left"))
  inputs = {name: np.concatenate([right[name], left[name][1:]])
            for name in right}
  patched = _value_and_lora_grads(_patched_loss(), lora_model, inputs)
  stock = _value_and_lora_grads(STOCK_LOSS, lora_model, inputs)
  with jax.enable_x64(True):
    model64 = tiny_models.float64_copy(lora_model)
    stock64 = _value_and_lora_grads(STOCK_LOSS, model64, inputs)
  testing.assert_model_close(patched[0], stock[0], stock64[0], name="loss")
  testing.assert_model_close(patched[1], stock[1], stock64[1],
                             name="LoRA grads")


def test_compiled_step_never_holds_the_logits(lora_model):
  """Tunix 0.1.7's model still returns logits; XLA must drop them."""
  inputs = _inputs("right", seed=3)
  batch, seq = inputs["input_tokens"].shape
  graphdef, state = nnx.split(lora_model)

  def compiled(loss_fn):
    grad = nnx.grad(lambda m: _scalar(loss_fn(m, **inputs)),
                    argnums=nnx.DiffState(0, nnx.LoRAParam))
    step = jax.jit(lambda state: grad(nnx.merge(graphdef, state)))
    return step.lower(state).compile().as_text()

  logits = [f"f32[{batch},{t},{VOCAB}]" for t in (seq, seq - 1)]
  stock = str(jax.make_jaxpr(lambda state: nnx.grad(
      lambda m: _scalar(STOCK_LOSS(m, **inputs)),
      argnums=nnx.DiffState(0, nnx.LoRAParam))(nnx.merge(graphdef, state)))(
          state))
  assert all(s in stock for s in logits)  # the pattern would find them
  patched = compiled(_patched_loss())
  assert not any(s in patched for s in logits)


def test_peft_trainer_loss_curve_matches_stock(lora_model):
  batches = tiny_models.synthetic_batches(3, batch_size=4, seq_len=12,
                                          vocab_size=VOCAB, padding="right",
                                          seed=4)
  stock = tiny_models.train(nnx.clone(lora_model), batches).losses
  with patches.applied(**LOSS_ONLY):
    patched = tiny_models.train(nnx.clone(lora_model), batches).losses
  with jax.enable_x64(True):
    stock64 = tiny_models.train(tiny_models.float64_copy(lora_model),
                                batches).losses
  assert len(patched) == 3 and patched[-1] < patched[0]
  testing.assert_model_close(np.array(patched), np.array(stock),
                             np.array(stock64), name="loss curve")


class _TinyLM(nnx.Module):
  """A real (non-Gemma 4) language model with Tunix's call signature."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, 8, rngs=rngs)

  def __call__(self, tokens, positions, cache, attention_mask):
    del positions, cache, attention_mask
    return self.embed.attend(self.embed(tokens)), None


def test_other_models_and_custom_losses_are_left_alone(lora_model):
  inputs = _inputs("right", seed=5)
  other = _TinyLM(nnx.Rngs(0))
  patched = _patched_loss()
  np.testing.assert_array_equal(_scalar(patched(other, **inputs)),
                                _scalar(STOCK_LOSS(other, **inputs)))
  config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=1)
  before = peft_trainer.PeftTrainer(lora_model, optax.sgd(0.1), config)
  with patches.applied(**LOSS_ONLY):
    during = peft_trainer.PeftTrainer(lora_model, optax.sgd(0.1), config)
    assert during.loss_fn is peft_trainer._default_loss_fn  # pylint: disable=protected-access
    custom = lambda model, **kwargs: jnp.zeros(())
    assert during.with_loss_fn(custom).loss_fn is custom
  assert before.loss_fn is STOCK_LOSS


@pytest.mark.skipif(
    not _framework.module_exists(tunix_loss.TRAINER_V2_MODULE),
    reason="this Tunix has no tunix.experimental.train.peft_trainer_v2 "
    "(google-tunix 0.1.7); tests/tunix_main runs this on Tunix main")
def test_peft_trainer_v2_loss_is_patched_too(lora_model):
  """Tunix main's second trainer (`peft_trainer_v2`) has its own copy of the
  default loss; the loss patch replaces it as well. google-tunix 0.1.7 has
  no such module (then it is not part of the plan: test_patch_framework)."""
  from tunix.experimental.train import peft_trainer_v2  # pylint: disable=g-import-not-at-top
  stock_v2 = peft_trainer_v2._default_loss_fn  # pylint: disable=protected-access
  inputs = _inputs("right", seed=6)
  with patches.applied(**LOSS_ONLY) as report:
    patched_v2 = peft_trainer_v2._default_loss_fn  # pylint: disable=protected-access
    assert (f"{peft_trainer_v2.__name__}:_default_loss_fn" in report.patched)
  assert patched_v2.__wrapped__ is stock_v2
  assert peft_trainer_v2._default_loss_fn is stock_v2  # pylint: disable=protected-access
  patched = _value_and_lora_grads(patched_v2, lora_model, inputs)
  stock = _value_and_lora_grads(stock_v2, lora_model, inputs)
  with jax.enable_x64(True):
    stock64 = _value_and_lora_grads(
        stock_v2, tiny_models.float64_copy(lora_model), inputs)
  testing.assert_model_close(patched[0], stock[0], stock64[0], name="loss")
  testing.assert_model_close(patched[1], stock[1], stock64[1],
                             name="LoRA grads")
