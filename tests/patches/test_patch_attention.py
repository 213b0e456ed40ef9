"""The Tunix Gemma 4 attention patch on real tiny Tunix models.

Patched and unpatched runs of the same model are compared with the
model-level rule (`testing.assert_model_close`): the patched float32 logits
or gradients may be at most a few times as far from a float64 run of the
stock model as the stock float32 run is, on whatever CPU runs the test.
Tunix gives a fully masked query row (left padding) the mean of all values
where the patch gives 0, so logits are compared on rows that see at least one
key, and the patched fully masked rows are checked to be finite.

jit caches a trace per function, not per patch state: every jitted function
here is only ever called in one state.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.generate import utils as generate_utils
from tunix.models.gemma4 import model as gemma4_lib
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils

import gemma4_jax.patches as patches
from gemma4_jax import testing
from gemma4_jax import tiny_models

pytestmark = pytest.mark.slow

VOCAB = 256
WINDOW = 8
sft_loss = tiny_models.sft_loss


@pytest.fixture(scope="module")
def config():
  return tiny_models.tiny_config(vocab_size=VOCAB, sliding_window=WINDOW)


@pytest.fixture(scope="module")
def model(config):
  return tiny_models.build_model(config, seed=0)


@pytest.fixture(scope="module")
def lora_model(model):
  return tiny_models.apply_lora(nnx.merge(*nnx.split(model)), seed=1)


@pytest.fixture(scope="module")
def model64(model):
  with jax.enable_x64(True):
    return tiny_models.float64_copy(model)


@pytest.fixture(scope="module")
def lora_model64(lora_model):
  with jax.enable_x64(True):
    return tiny_models.float64_copy(lora_model)


@pytest.fixture(scope="module")
def flash_model(model):
  """`model`'s weights under `use_flash_attention=True`."""
  flash_config = tiny_models.tiny_config(vocab_size=VOCAB,
                                         sliding_window=WINDOW,
                                         use_flash_attention=True)
  abstract = nnx.eval_shape(
      lambda: gemma4_lib.Gemma4(flash_config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, nnx.state(model))


def _jitted_forward():
  @nnx.jit
  def forward(model, tokens, positions, mask):
    return model(tokens, positions, None, mask)[0]
  return forward


@pytest.fixture(scope="module")
def forward():
  """`forward(model, inputs, patched=..., mask=None)` -> logits, jitted."""
  fns = {False: _jitted_forward(), True: _jitted_forward()}

  def run(model, inputs, *, patched, mask=None):
    mask = inputs["attention_mask"] if mask is None else mask
    with patches.applied() if patched else contextlib.nullcontext():
      return fns[patched](model, inputs["input_tokens"], inputs["positions"],
                          mask)
  return run


@pytest.fixture(scope="module")
def forward64():
  """`forward64(model64, inputs, mask=None)` -> stock float64 logits."""
  fn = _jitted_forward()

  def run(model64, inputs, *, mask=None):
    mask = inputs["attention_mask"] if mask is None else mask
    with jax.enable_x64(True):
      return np.asarray(fn(model64, inputs["input_tokens"],
                           inputs["positions"], mask))
  return run


@pytest.fixture(scope="module")
def assert_matches_stock(lora_model, lora_model64, forward, forward64):
  """Patched vs stock float32 logits of `lora_model` on the rows that see a
  key, bounded by stock's own float32 error against float64."""
  def check(inputs, *, mask=None, rows=None, patched_mask=None):
    rows = _rows_with_a_key(inputs) if rows is None else rows
    patched = forward(lora_model, inputs, patched=True,
                      mask=mask if patched_mask is None else patched_mask)
    stock = forward(lora_model, inputs, patched=False, mask=mask)
    stock64 = forward64(lora_model64, inputs, mask=mask)
    testing.assert_model_close(patched[rows], stock[rows], stock64[rows],
                               name="logits")
    assert np.all(np.isfinite(np.asarray(patched)))
  return check


def _inputs(padding, *, batch_size=4, seq_len=24, seed=0):
  batch = tiny_models.synthetic_batches(
      1, batch_size=batch_size, seq_len=seq_len, vocab_size=VOCAB,
      padding=padding, seed=seed)[0]
  return tiny_models.model_inputs(batch)


def _rows_with_a_key(inputs):
  return np.asarray(inputs["attention_mask"]).any(-1)  # [B, T]


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_logits_match_unpatched(assert_matches_stock, padding):
  inputs = _inputs(padding)
  assert_matches_stock(inputs)
  if padding == "left":
    assert not _rows_with_a_key(inputs).all()  # fully masked rows to check


def _lora_grads(model, inputs, loss_mask):
  loss = lambda m: sft_loss(m, inputs["input_tokens"], loss_mask,
                            inputs["positions"], inputs["attention_mask"])
  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(
      model)
  return {jax.tree_util.keystr(path): grad for path, grad in
          jax.tree_util.tree_flatten_with_path(grads)[0]}


def test_lora_grads_match_unpatched(lora_model, lora_model64):
  """LoRA gradients of Tunix's SFT loss, patched vs stock.

  This tiny random model's float32 LoRA gradients are ill-conditioned:
  moving every weight by one ulp moves stock's own gradients by up to 9x
  stock's error against float64 on some leaves (under SSE4_2, where all
  four patches together then measured up to 18.7x stock's error and at
  most 2.3x the perturbed spread). So the bound's noise is the larger of
  stock's error and the spread of two ulp-perturbed stock runs
  (`assert_model_close(perturbed=...)`).
  """
  # One batch with an unpadded, a right-padded and a left-padded row.
  right, left = (tiny_models.synthetic_batches(
      1, batch_size=2, seq_len=24, vocab_size=VOCAB, padding=padding,
      seed=1)[0] for padding in ("right", "left"))
  inputs = tiny_models.model_inputs(peft_trainer.TrainingInput(
      input_tokens=np.concatenate([right.input_tokens, left.input_tokens]),
      input_mask=np.concatenate([right.input_mask, left.input_mask])))
  mask = np.asarray(inputs["input_mask"])
  assert not mask[1].all() and mask[1, 0] and not mask[3, 0]
  # The last pad position predicts the first real token, from a query row
  # with no visible key (there Tunix and the patch differ by design); leave
  # that target out of the loss.
  loss_mask = mask & np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
  with jax.enable_x64(True):
    stock64 = _lora_grads(lora_model64, inputs, loss_mask)
    stock64 = {k: np.asarray(g) for k, g in stock64.items()}
  stock = _lora_grads(lora_model, inputs, loss_mask)
  perturbed = [_lora_grads(tiny_models.ulp_perturbed(lora_model, seed=seed),
                           inputs, loss_mask) for seed in (0, 1)]
  with patches.applied():
    patched = _lora_grads(lora_model, inputs, loss_mask)
  assert len(patched) > 40 and patched.keys() == stock.keys() == stock64.keys()
  assert all(g.dtype == np.float64 for g in stock64.values())
  assert max(np.abs(g).max() for g in stock64.values()) > 1e-2
  # The perturbed runs are other float32 answers, not the same one.
  assert all(any(np.any(p[k] != stock[k]) for k in stock) for p in perturbed)
  testing.assert_model_close(patched, stock, stock64, name="LoRA grads",
                             perturbed=perturbed)


def test_mask_ranks_give_identical_logits(lora_model, forward, config):
  inputs = _inputs("right")
  mask = inputs["attention_mask"]  # [B, T, T]
  batch, seq_len, _ = mask.shape
  rank3 = forward(lora_model, inputs, patched=True)
  for form in (mask[:, None], jnp.broadcast_to(
      mask[:, None], (batch, config.num_heads, seq_len, seq_len)),
               mask.astype(jnp.int32)):
    testing.assert_close(forward(lora_model, inputs, patched=True, mask=form),
                         rank3, name=f"mask {form.shape} {form.dtype}")
  unpadded = _inputs("none")
  causal = jnp.tril(jnp.ones((seq_len, seq_len), jnp.bool_))  # [T, T]
  testing.assert_close(
      forward(lora_model, unpadded, patched=True, mask=causal),
      forward(lora_model, unpadded, patched=True), name="rank-2 mask")


def test_bidirectional_mask_matches_unpatched(assert_matches_stock):
  # Not causal: Tunix's sliding band is two-sided on local layers.
  inputs = _inputs("right")
  input_mask = jnp.asarray(inputs["input_mask"])
  mask = input_mask[:, None, :] & input_mask[:, :, None]  # [B, T, T]
  # Pad queries see no key here.
  assert_matches_stock(inputs, mask=mask, rows=np.asarray(input_mask))


def test_unpatched_tunix_breaks_on_rank4_mask_patched_works(
    lora_model, forward, assert_matches_stock):
  inputs = _inputs("right")
  rank4 = inputs["attention_mask"][:, None]
  with pytest.raises(ValueError, match="Einstein sum subscript"):
    forward(lora_model, inputs, patched=False, mask=rank4)
  # Patched with the rank-4 mask against stock with the rank-3 one.
  assert_matches_stock(inputs, patched_mask=rank4)


# Prime: a multiple of no block size; several sliding windows long.
FLASH_SEQ_LEN = 251


def test_flash_config_uses_mask_at_any_length(model, model64, flash_model,
                                              forward, forward64):
  # Left padding: causal attention alone would attend the pads, which
  # Tunix's splash path does (it ignores attn_mask).
  inputs = _inputs("left", batch_size=2, seq_len=FLASH_SEQ_LEN, seed=2)
  flash = forward(flash_model, inputs, patched=True)
  dense = forward(model, inputs, patched=True)
  assert flash.shape == (2, FLASH_SEQ_LEN, VOCAB)
  testing.assert_close(flash, dense, name="flash vs dense config")
  rows = _rows_with_a_key(inputs)
  testing.assert_model_close(dense[rows],
                             forward(model, inputs, patched=False)[rows],
                             forward64(model64, inputs)[rows],
                             name="patched vs unpatched")

  # Padding is not attended: other tokens in the padded slots change nothing.
  input_mask = np.asarray(inputs["input_mask"])
  assert not input_mask.all()
  changed = dict(inputs)
  changed["input_tokens"] = np.where(input_mask, inputs["input_tokens"],
                                     7).astype(np.int32)
  flash_changed = forward(flash_model, changed, patched=True)
  testing.assert_close(flash_changed[input_mask], flash[input_mask],
                       name="unpadded logits after changing padded tokens")
  assert not np.allclose(flash_changed[~input_mask], flash[~input_mask])


def _jitted_step():
  @nnx.jit
  def step(model, tokens, positions, cache, mask):
    return model(tokens, positions, cache, mask)
  return step


def _generate(model, step, tokens, input_mask, *, cache_size, decode_steps,
              fed=None):
  """Tunix's sampler loop: prefill into a KV cache, then one token a step.

  Feeds `fed[s]` at decode step s when given (so two runs see the same
  tokens), else the argmax. Returns (prefill logits, decode logits, fed).
  """
  batch, seq_len = tokens.shape
  cache = model.init_cache(batch, cache_size, model.config.dtype)
  if jax.config.jax_enable_x64:
    # Tunix's decode slices the cache at (0, end_index, 0, 0): with x64 the
    # literals are int64, and the int32 end_index must match them.
    cache = jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(jnp.int64)
        if "end_index" in jax.tree_util.keystr(path) else x, cache)
  positions = sft_utils.build_positions_from_mask(input_mask)
  prefill, cache = step(
      model, tokens, positions, cache,
      generate_utils.make_causal_attn_mask(input_mask, cache_size))
  pad = np.zeros((batch, cache_size), bool)
  pad[:, :seq_len] = ~input_mask
  logits, fed_now, last = prefill[:, -1], [], positions[:, -1]
  decoded = []
  for s in range(decode_steps):
    token = (fed[s] if fed is not None else
             jnp.argmax(logits, -1).astype(jnp.int32))[:, None]
    fed_now.append(token[:, 0])
    mask = generate_utils.compute_attention_masks(seq_len + s, cache_size,
                                                  jnp.asarray(pad))
    out, cache = step(model, token, (last + 1 + s)[:, None], cache, mask)
    logits = out[:, -1]
    decoded.append(logits)
  return prefill, jnp.stack(decoded, 1), fed_now


def test_decode_with_kv_cache_matches_unpatched(lora_model, lora_model64):
  # Left padding, as Tunix's sampler pads prompts; 12 > WINDOW wraps the
  # sliding-window cache during prefill.
  inputs = _inputs("left", batch_size=2, seq_len=12, seed=3)
  tokens, input_mask = inputs["input_tokens"], inputs["input_mask"]
  kwargs = dict(cache_size=16, decode_steps=3)
  prefill, decoded, fed = _generate(lora_model, _jitted_step(), tokens,
                                    input_mask, **kwargs)
  with jax.enable_x64(True):
    prefill64, decoded64, _ = _generate(lora_model64, _jitted_step(), tokens,
                                        input_mask, fed=fed, **kwargs)
    prefill64, decoded64 = np.asarray(prefill64), np.asarray(decoded64)
  with patches.applied():
    prefill_p, decoded_p, _ = _generate(lora_model, _jitted_step(), tokens,
                                        input_mask, fed=fed, **kwargs)
  testing.assert_model_close(prefill_p[input_mask], prefill[input_mask],
                             prefill64[input_mask], name="prefill logits")
  testing.assert_model_close(decoded_p, decoded, decoded64,
                             name="decode logits")


def test_peft_trainer_runs_patched(lora_model):
  # Left padding makes patched and unpatched losses differ (see
  # test_lora_grads_match_unpatched), which shows the trainer's jitted step
  # ran the patched block.
  batches = tiny_models.synthetic_batches(2, batch_size=4, seq_len=16,
                                          vocab_size=VOCAB, padding="left",
                                          seed=4)
  inputs = tiny_models.model_inputs(batches[0])
  unpatched_loss = float(nnx.jit(lambda m: sft_loss(m, **inputs))(lora_model))
  model = nnx.clone(lora_model)
  with patches.applied():
    patched_loss = float(nnx.jit(lambda m: sft_loss(m, **inputs))(model))
    run = tiny_models.train(model, batches)
  assert len(run.losses) == 2 and np.all(np.isfinite(run.losses))
  assert abs(patched_loss - unpatched_loss) > 1e-4
  np.testing.assert_allclose(run.losses[0], patched_loss, rtol=1e-5)
  lora_before = jax.tree.leaves(nnx.state(lora_model, nnx.LoRAParam))
  lora_after = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  assert any(not np.allclose(a, b) for a, b in zip(lora_before, lora_after))


def test_jit_inside_simulated_mesh(model, model64, forward, forward64):
  inputs = _inputs("left", seed=5)
  mesh = testing.simulated_mesh()
  batch_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "fsdp"))
  args = [jax.device_put(inputs[name], batch_sharded)
          for name in ("input_tokens", "positions", "attention_mask")]
  with patches.applied(), jax.set_mesh(mesh):
    sharded = _jitted_forward()(model, *args)
  assert sharded.sharding.spec[0] == "fsdp"
  rows = _rows_with_a_key(inputs)
  assert not rows.all() and np.all(np.isfinite(np.asarray(sharded)))
  stock64 = forward64(model64, inputs)
  testing.assert_model_close(sharded[rows],
                             forward(model, inputs, patched=False)[rows],
                             stock64[rows],
                             name="logits under the mesh vs unpatched")


def test_lora_can_be_applied_while_patched(config):
  # qwix traces the model with Tunix's dummy inputs, whose attention mask is
  # a [B, 1, S] key mask that broadcasts over queries.
  with patches.applied():
    lora = tiny_models.apply_lora(tiny_models.build_model(config, seed=3))
  assert jax.tree.leaves(nnx.state(lora, nnx.LoRAParam))
