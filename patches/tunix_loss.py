"""Tunix's default SFT loss on Gemma 4 through the fused softcapped loss.

Replaces `tunix.sft.peft_trainer._default_loss_fn`, which `PeftTrainer`
takes as its loss when built, and in Tunix main also
`tunix.experimental.train.peft_trainer_v2._default_loss_fn` (its second
trainer's copy of the same loss). For a Tunix Gemma 4 model (with or without
qwix LoRA) and no images, the model body runs to the final norm and the tied
LM head, the final softcap and the cross-entropy run in
`gemma4_jax.ops.softcapped_cross_entropy`: the `[B, T, 262144]` float32
logits, one-hot and log-softmax are never built. Everything else is left to
Tunix's own function: other models, image inputs, and any loss given with
`PeftTrainer.with_loss_fn` (which replaces the default, patched or not).
A `PeftTrainer` built before `apply()` keeps the loss it was built with.

The result is what Tunix's loss returns: the scalar `sum(mask * nll) /
(sum(mask) + 1e-8)` in google-tunix 0.1.7, a `LossOutput` with the unreduced
sum and the mask sum in Tunix main.

Two layouts of `Gemma4.__call__`: Tunix main's has `skip_lm_head` (the body
stops at the final norm); google-tunix 0.1.7's has not, so the final norm's
output is captured from a full call (`nnx.capture`) and the unused logits are
removed by XLA (the tests check the compiled step holds no `[B, T, V]`
array). The model is always called through its own `__call__`: qwix LoRA
intercepts only that method, so calling its submodules directly would
silently drop the adapters.
"""

from __future__ import annotations

import importlib

from flax import nnx
import jax.numpy as jnp

from gemma4_jax import ops
from gemma4_jax.patches import _framework

TRAINER_MODULE = "tunix.sft.peft_trainer"
# Tunix main's second trainer, with its own copy of the same loss; absent in
# google-tunix 0.1.7, where it is simply not part of the plan.
TRAINER_V2_MODULE = "tunix.experimental.train.peft_trainer_v2"
MODEL_MODULE = "tunix.models.gemma4.model"
# google-tunix 0.1.7: the module whose output is captured.
_FINAL_NORM = "final_norm"
# Tunix main: the body stops at the final norm when asked.
_SKIPS_LM_HEAD = _framework.Requirement(MODEL_MODULE, "Gemma4.__call__",
                                       takes=("skip_lm_head",))

SPEC = _framework.PatchSpec(
    feature="loss", distribution="google-tunix", attribute="_default_loss_fn",
    layouts=(_framework.Layout(
        name="google-tunix 0.1.7 and Tunix main", module=TRAINER_MODULE,
        parameters=("model", "input_tokens", "input_mask", "positions",
                    "attention_mask", "images"),
        copies=(TRAINER_V2_MODULE,), known_versions=("0.1.7",),
        where=f"{MODEL_MODULE}.Gemma4.__call__ with or without skip_lm_head",
        requirements=(
            # The trainer takes the module's default loss when built.
            _framework.Requirement(None, "PeftTrainer.__init__",
                                   names=("_default_loss_fn",)),
            _framework.Requirement(MODEL_MODULE, "Gemma4.__call__"),
            _framework.Requirement(MODEL_MODULE, "Embedder.decode"),
            _framework.Requirement(MODEL_MODULE,
                                   "ModelConfig.final_logit_softcap"),
            _framework.Requirement(MODEL_MODULE, "ModelConfig.dtype"),
            # Without skip_lm_head, the final norm's output is captured.
            _framework.Requirement(MODEL_MODULE, "Gemma4.__call__",
                                   names=(_FINAL_NORM,),
                                   unless=_SKIPS_LM_HEAD),
            _framework.Requirement("flax.nnx", "capture",
                                   unless=_SKIPS_LM_HEAD),
        )),),
    ops=("softcapped_cross_entropy",),
    stock="other models, image inputs, losses set with with_loss_fn, and "
    "trainers built before apply() keep Tunix's loss")


def targets() -> tuple[_framework.Target, ...]:
  """`SPEC` in the installed Tunix: `PeftTrainer`'s `_default_loss_fn` and,
  where the module exists (Tunix main), `peft_trainer_v2`'s; each replaced
  by the restated loss below."""
  return SPEC.targets(_make_loss_fn)


# Tunix's default loss, restated around `ops.softcapped_cross_entropy`.

# Tunix's own normalizer: an all-zero mask gives loss 0.
NORMALIZER_EPS = 1e-8


def _make_loss_fn(original, options: _framework.OpOptions,
                  layout: _framework.Layout):
  del layout  # the model's layout is probed per call (`final_hidden`)
  model_module = importlib.import_module(MODEL_MODULE)
  gemma4 = model_module.Gemma4
  # Tunix main returns a LossOutput (unreduced sum and denominator).
  loss_output = None
  if "LossOutput" in original.__code__.co_names:
    loss_output = importlib.import_module("tunix.sft.utils")

  def loss_fn(model, input_tokens, input_mask, positions, attention_mask,
              images=None):
    if images is not None or not isinstance(model, gemma4):
      return original(model, input_tokens, input_mask, positions,
                      attention_mask, images)
    config = model.config
    hidden = final_hidden(model, input_tokens, positions, attention_mask)
    # As Embedder.decode: both operands in the compute dtype.
    embedding = jnp.asarray(model.embedder.input_embedding.value, config.dtype)
    loss_sum, weight_sum = ops.softcapped_cross_entropy(
        hidden[:, :-1].astype(config.dtype), embedding, input_tokens[:, 1:],
        input_mask[:, 1:], softcap=config.final_logit_softcap,
        **options.op_kwargs)
    if loss_output is None:
      return loss_sum / (weight_sum + NORMALIZER_EPS)
    return loss_output.LossOutput(
        primary_loss=loss_output.WeightedMetric(loss_sum, weight_sum,
                                                eps=NORMALIZER_EPS),
        aux_metrics={})

  return _framework.wraps(
      original, loss_fn,
      note="Tunix's default SFT loss, patched by gemma4_jax.patches: on "
      "Gemma 4 the LM head, final softcap and cross-entropy run fused in "
      "gemma4_jax.ops.softcapped_cross_entropy.")


def final_hidden(model, tokens, positions, attention_mask):
  """A Tunix Gemma 4's final-norm output `[B, T, D]`, without its LM head.

  Also used by `gemma4_jax.perplexity`. Works for both layouts (see the
  module docstring) and for models with qwix LoRA.
  """
  if _framework.holds(_SKIPS_LM_HEAD):
    return _final_hidden_skip_lm_head(model, tokens, positions,
                                      attention_mask)
  return _final_hidden_captured(model, tokens, positions, attention_mask)


def _final_hidden_skip_lm_head(model, tokens, positions, attention_mask):
  hidden, _ = model(tokens, positions, None, attention_mask,
                    skip_lm_head=True)
  return hidden


def _final_hidden_captured(model, tokens, positions, attention_mask):
  """google-tunix 0.1.7: the final norm's output, captured from a full call.

  The call must go through `model(...)`: qwix LoRA intercepts only the
  model's own `__call__`. The logits it also returns are unused, so XLA
  removes their computation (the tests check the compiled step).
  """
  forward = nnx.capture(
      lambda m: m(tokens, positions, None, attention_mask)[0],
      nnx.Intermediate, method_outputs=nnx.Intermediate)
  _, intermediates = forward(model)
  (hidden,) = intermediates[_FINAL_NORM]["__call__"].get_value()
  return hidden
