"""Decode through the patch: Tunix's own `Sampler` generates the same tokens
patched and stock, and a decode step (one token against the KV cache, the
sliding-window ring buffer and the shared KV cache) gives the same logits
with every mask rank.

jit caches a trace per function, not per patch state: each jitted function
(and each Sampler, which jits its own) is built for the one state it runs in.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.generate import utils as generate_utils
from tunix.sft import utils as sft_utils

import gemma4_jax.patches as patches
from gemma4_jax import testing
from gemma4_jax import tiny_models

pytestmark = pytest.mark.slow

VOCAB = 128
WINDOW = 8


@pytest.fixture(scope="module")
def model():
  # 6 layers: local, local, global, then three reusing the KV of layers 1
  # (local) and 2 (global), so decode runs both shared-cache paths.
  return tiny_models.build_model(
      tiny_models.tiny_config(vocab_size=VOCAB, sliding_window=WINDOW),
      seed=0)


class ByteTokenizer:
  """Bytes as tokens 3..VOCAB-1 (0 pad, 1 bos, 2 eos): the methods Tunix's
  TokenizerAdapter asks of a tokenizer that is neither SentencePiece nor
  Hugging Face."""

  def encode(self, text, **unused_kwargs):
    return [3 + b % (VOCAB - 3) for b in text.encode()]

  def decode(self, ids, **unused_kwargs):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return 1

  def eos_id(self):
    return 2

  def pad_id(self):
    return 0


def _sample(model, prompts, *, steps):
  config = model.config
  sampler = sampler_lib.Sampler(
      transformer=model, tokenizer=ByteTokenizer(),
      cache_config=sampler_lib.CacheConfig(
          cache_size=32, num_layers=config.num_layers,
          num_kv_heads=config.num_kv_heads, head_dim=config.head_dim))
  out = sampler(prompts, max_generation_steps=steps, max_prompt_length=16,
                return_logits=True, eos_tokens=[VOCAB + 1])  # never sampled
  return [np.asarray(t) for t in out.tokens], out.logits


def test_sampler_generates_the_same_tokens_patched(model):
  # Prompts of 4..15 tokens, left-padded to 16 by the sampler; 14 decode
  # steps wrap the sliding-window cache (8 slots) more than once.
  prompts = ["ab", "hello gemma", "0123456789abc"]
  stock_tokens, stock_logits = _sample(model, prompts, steps=14)
  with patches.applied():
    patched_tokens, patched_logits = _sample(model, prompts, steps=14)
  assert [len(t) for t in stock_tokens] == [14] * 3
  for stock, patched in zip(stock_tokens, patched_tokens):
    np.testing.assert_array_equal(patched, stock)
  assert len(set(np.concatenate(stock_tokens).tolist())) > 3  # not constant
  for stock, patched in zip(stock_logits, patched_logits):
    testing.assert_close(patched, stock, name="sampler logits")


def _decode_fn():
  @nnx.jit
  def step(model, tokens, positions, cache, mask):
    return model(tokens, positions, cache, mask)
  return step


def _decode_logits(model, tokens, input_mask, fed, *, cache_size,
                   mask_form=lambda mask: mask):
  """Tunix's sampler loop (prefill, then one fed token a step); decode
  masks go through `mask_form`. Returns decode logits `[B, steps, V]`."""
  step = _decode_fn()
  batch, seq_len = tokens.shape
  dtype = model.config.dtype
  cache = model.init_cache(batch, cache_size, dtype)
  if dtype == jnp.float64:
    # Tunix indexes the cache with Python ints next to the int32 end_index,
    # which dynamic_update_slice rejects under x64 (ints become int64).
    cache = {name: dict(layer, end_index=layer["end_index"].astype(jnp.int64))
             for name, layer in cache.items()}
  positions = sft_utils.build_positions_from_mask(input_mask)
  _, cache = step(model, tokens, positions, cache,
                  generate_utils.make_causal_attn_mask(input_mask,
                                                       cache_size))
  pad = np.zeros((batch, cache_size), bool)
  pad[:, :seq_len] = ~input_mask
  logits = []
  for s, token in enumerate(fed):
    mask = generate_utils.compute_attention_masks(seq_len + s, cache_size,
                                                  jnp.asarray(pad))  # [B,1,S]
    out, cache = step(model, jnp.asarray(token)[:, None],
                      jnp.asarray(positions[:, -1] + 1 + s)[:, None], cache,
                      mask_form(mask))
    logits.append(out[:, -1])
  return jnp.stack(logits, 1)


def test_decode_step_every_mask_rank_matches_stock(model):
  batch = tiny_models.synthetic_batches(1, batch_size=2, seq_len=12,
                                        vocab_size=VOCAB, padding="left",
                                        seed=3)[0]
  tokens, input_mask = batch.input_tokens, batch.input_mask
  fed = np.random.default_rng(0).integers(3, VOCAB, (10, 2)).astype(np.int32)
  kwargs = dict(cache_size=24)
  stock = _decode_logits(model, tokens, input_mask, fed, **kwargs)
  with jax.enable_x64(True):
    stock64 = _decode_logits(tiny_models.float64_copy(model), tokens,
                             input_mask, fed, **kwargs)
  num_heads = model.config.num_heads
  forms = {
      "[B,1,S]": lambda m: m,
      "[B,1,1,S]": lambda m: m[:, None],
      "[B,N,1,S]": lambda m: jnp.broadcast_to(
          m[:, None], (m.shape[0], num_heads) + m.shape[1:]),
  }
  for name, form in forms.items():
    with patches.applied():
      patched = _decode_logits(model, tokens, input_mask, fed,
                               mask_form=form, **kwargs)
    testing.assert_model_close(patched, stock, stock64,
                               name=f"decode logits, mask {name}")
  # A full-length cache on local layers (no ring buffer): the patch windows
  # the mask at its last visible position, as Tunix's
  # create_sliding_window_mask means to, and gives the same logits.
  with patches.applied():
    patched = _decode_logits(_with_full_length_cache(model), tokens,
                             input_mask, fed, **kwargs)
  testing.assert_model_close(patched, stock, stock64,
                             name="decode logits, full-length local cache")
  # Stock decode cannot take a rank-4 mask at all.
  with pytest.raises(ValueError):
    _decode_logits(model, tokens, input_mask, fed[:1],
                   mask_form=forms["[B,1,1,S]"], **kwargs)


def _with_full_length_cache(model):
  """`model`'s weights with `use_sliding_window_kv_cache=False`."""
  config = dataclasses.replace(model.config,
                               use_sliding_window_kv_cache=False)
  abstract = nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0)))
  return nnx.merge(nnx.graphdef(abstract), nnx.state(model))


def test_decode_rank2_mask_on_an_unpadded_batch(model):
  """A `[1, S]` decode mask (one row for the whole batch) equals the
  `[B, 1, S]` one when no row is padded."""
  batch = tiny_models.synthetic_batches(1, batch_size=2, seq_len=12,
                                        vocab_size=VOCAB, seed=4)[0]
  fed = np.random.default_rng(1).integers(3, VOCAB, (3, 2)).astype(np.int32)
  with patches.applied():
    rank3 = _decode_logits(model, batch.input_tokens, batch.input_mask, fed,
                           cache_size=16)
    rank2 = _decode_logits(model, batch.input_tokens, batch.input_mask, fed,
                           cache_size=16, mask_form=lambda m: m[0])
  testing.assert_close(rank2, rank3, name="rank-2 vs rank-3 decode mask")
