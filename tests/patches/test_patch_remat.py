"""Remat with every patch: Tunix's RematConfig and the named policies.

A tiny Gemma 4 (KV sharing, local and global layers) with qwix LoRA, a batch
with right- and left-padded rows. Every patched run, with each policy or
Tunix's own `BLOCK`/`DECODER`, must give stock's loss and LoRA gradients
without remat, under the model-level rule (`testing.assert_model_close`:
stock float32's own error against float64). The inputs are made inside each
traced step, so the patched runs get the compact causal mask.
"""

import jax
from jax.ad_checkpoint import print_saved_residuals
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.models.gemma4 import model as gemma4_lib
from tunix.sft import utils as sft_utils

import gemma4_jax.patches as patches
from gemma4_jax import masks
from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax import tiny_models
from gemma4_jax.patches import tunix_remat

pytestmark = pytest.mark.slow

VOCAB = 256


@pytest.fixture(scope="module")
def batch():
  right, left = (tiny_models.synthetic_batches(
      1, batch_size=2, seq_len=12, vocab_size=VOCAB, padding=padding,
      seed=2)[0] for padding in ("right", "left"))
  return type(right)(
      input_tokens=np.concatenate([right.input_tokens, left.input_tokens[1:]]),
      input_mask=np.concatenate([right.input_mask, left.input_mask[1:]]))


def _model(remat=gemma4_lib.RematConfig.NONE, dtype=jnp.float32):
  model = tiny_models.build_model(
      tiny_models.tiny_config(vocab_size=VOCAB), seed=0)
  model = tiny_models.apply_lora(model, seed=1)
  if dtype == jnp.float64:
    model = tiny_models.float64_copy(model)
  # After LoRA: qwix finds no rngs in a model built with remat on.
  for _, module in model.iter_modules():
    if isinstance(getattr(module, "config", None), gemma4_lib.ModelConfig):
      module.config.remat_config = remat
  return model


def _loss_and_grads(model, batch):
  def loss(m):
    return tiny_models.sft_loss(m, **tiny_models.model_inputs(batch))
  value, grads = nnx.jit(nnx.value_and_grad(
      loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
  return value, nnx.to_pure_dict(grads)


@pytest.fixture(scope="module")
def stock(batch):
  result = _loss_and_grads(_model(), batch)
  with jax.enable_x64(True):
    result64 = _loss_and_grads(_model(dtype=jnp.float64), batch)
  return result, result64


def _state(report, feature):
  return {t.feature: t.state for t in report.targets}[feature]


def _assert_matches_stock(patched, stock):
  (loss, grads), (loss64, grads64) = stock
  testing.assert_model_close(patched[0], loss, loss64, name="loss")
  testing.assert_model_close(patched[1], grads, grads64, name="LoRA grads")


@pytest.mark.parametrize("policy", tunix_remat.POLICIES)
def test_policy_matches_no_remat(policy, batch, stock):
  model = _model()
  with patches.applied(remat=policy) as report:
    assert _state(report, "remat") == "patched"
    patched = _loss_and_grads(model, batch)
  _assert_matches_stock(patched, stock)


@pytest.mark.parametrize("remat", [gemma4_lib.RematConfig.BLOCK,
                                   gemma4_lib.RematConfig.DECODER])
def test_tunix_remat_config_with_every_patch(remat, batch, stock):
  model = _model(remat)
  with patches.applied():
    patched = _loss_and_grads(model, batch)
  _assert_matches_stock(patched, stock)


def test_unknown_policy_is_refused():
  with pytest.raises(ValueError, match="remat must be None or one of full"):
    patches.apply(remat="everything")
  assert not any(t.patched for t in patches.status().targets)


def test_compact_mask_is_tunix_mask():
  input_mask = jnp.array([[True, True, False], [False, True, True]])
  stock_mask = sft_utils.make_causal_attn_mask(input_mask)
  with patches.applied():
    compact = sft_utils.make_causal_attn_mask(input_mask)
    # Non-boolean masks keep Tunix's own (dense, same dtype) result.
    ints = sft_utils.make_causal_attn_mask(input_mask.astype(jnp.int32))
  assert isinstance(compact, masks.CausalPaddingMask)
  assert compact.shape == stock_mask.shape and compact.ndim == 3
  np.testing.assert_array_equal(jnp.asarray(compact), stock_mask)
  np.testing.assert_array_equal(compact[:, 1:], stock_mask[:, 1:])
  np.testing.assert_array_equal(compact & True, stock_mask)
  assert ints.dtype == jnp.int32
  np.testing.assert_array_equal(ints, stock_mask)
  # Without the attention patch nothing would read it compactly.
  with patches.applied(attention=False) as report:
    assert _state(report, "mask") == "skipped"
    assert isinstance(sft_utils.make_causal_attn_mask(input_mask), jax.Array)


@pytest.mark.parametrize("implementation,interpret",
                         [("xla", False), ("pallas_tpu", True)])
def test_attention_names_what_the_attention_policy_keeps(implementation,
                                                         interpret, capsys):
  q, k, v = (jnp.ones((1, 256, 2, 128), jnp.float32) for _ in range(3))

  def f(q, k, v):
    out = ops.attention(q, k, v, implementation=implementation,
                        interpret=interpret)
    return jnp.sum(out * out)

  def saved(policy):
    capsys.readouterr()
    print_saved_residuals(jax.checkpoint(f, policy=tunix_remat.policy(policy)),
                          q, k, v)
    return capsys.readouterr().out

  kept = saved("attention")
  assert ops.ATTENTION_OUTPUT in kept and ops.ATTENTION_LOGSUMEXP in kept
  assert ops.ATTENTION_OUTPUT not in saved("full")
