"""`gemma4_jax.generate`: greedy tokens equal a step-by-step reference and
stock Tunix's `Sampler`, stock and patched; batched equals one by one;
stop tokens; the sampling filters.

The model is a tiny Gemma 4 (local and global layers, KV sharing of both
kinds, sliding window 8); 12 new tokens after prompts of up to 15 tokens
wrap the 8-slot ring buffer of the local layers more than once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tunix.generate import sampler as sampler_lib

import gemma4_jax.patches as patches
from gemma4_jax import generate as generate_lib
from gemma4_jax import testing
from gemma4_jax import tiny_models

pytestmark = pytest.mark.slow

VOCAB = 128
BOS = 2
NEW_TOKENS = 12
PROMPT_LENGTHS = (4, 8, 15, 6, 11)


@pytest.fixture(scope="module")
def model():
  return tiny_models.build_model(
      tiny_models.tiny_config(vocab_size=VOCAB, sliding_window=8), seed=0)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [[BOS] + rng.integers(3, VOCAB, n - 1).tolist()
          for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def reference(model, prompts):
  return testing.greedy_reference(model, prompts, NEW_TOKENS)


def _assert_greedy_matches(completions, reference, name):
  assert all(len(c.tokens) == NEW_TOKENS and not c.stopped
             for c in completions)
  testing.assert_greedy_matches([c.tokens for c in completions], reference,
                                name=name)


@pytest.fixture(scope="module")
def greedy(model, prompts):
  # Batches of 4: the 5 prompts make a full batch and one padded with
  # copies; lengths 4..15 are left-padded to 16.
  return generate_lib.generate(model, prompts, max_new_tokens=NEW_TOKENS,
                               batch_size=4)


def test_greedy_matches_reference_loop(greedy, reference):
  _assert_greedy_matches(greedy, reference, "stock")


def test_greedy_patched_matches_reference_loop(model, prompts, reference):
  with patches.applied():
    completions = generate_lib.generate(model, prompts,
                                        max_new_tokens=NEW_TOKENS,
                                        batch_size=4)
  _assert_greedy_matches(completions, reference, "patched")


class _IdTokenizer:
  """Space-separated ids as text: what Tunix's TokenizerAdapter asks of a
  tokenizer that is neither SentencePiece nor Hugging Face."""

  def encode(self, text, **unused_kwargs):
    return [int(word) for word in text.split()]

  def decode(self, ids, **unused_kwargs):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return BOS

  def eos_id(self):
    return 1

  def pad_id(self):
    return 0


def test_greedy_matches_stock_tunix_sampler(model, prompts, greedy):
  config = model.config
  sampler = sampler_lib.Sampler(
      transformer=model, tokenizer=_IdTokenizer(),
      cache_config=sampler_lib.CacheConfig(
          cache_size=16 + NEW_TOKENS, num_layers=config.num_layers,
          num_kv_heads=config.num_kv_heads, head_dim=config.head_dim))
  # The sampler prepends <bos> itself; eos VOCAB + 1 is never sampled.
  out = sampler([" ".join(map(str, p[1:])) for p in prompts],
                max_generation_steps=NEW_TOKENS, max_prompt_length=16,
                eos_tokens=[VOCAB + 1])
  for index, (ours, theirs) in enumerate(zip(greedy, out.tokens)):
    np.testing.assert_array_equal(ours.tokens, np.asarray(theirs),
                                  err_msg=f"prompt {index}")


def test_batched_equals_one_by_one_and_stops(model, prompts, greedy):
  sampling = generate_lib.SamplingConfig(temperature=1.0, top_k=40,
                                         top_p=0.95)
  batched = generate_lib.generate(model, prompts, max_new_tokens=NEW_TOKENS,
                                  sampling=sampling, seed=3, batch_size=8)
  sampled = np.concatenate([c.tokens for c in batched])
  greedy_tokens = np.concatenate([c.tokens for c in greedy])
  assert (sampled != greedy_tokens).mean() > 0.3  # it does sample
  # One prompt per call, now stopping at the 6th token prompt 0 sampled:
  # every prompt draws from its own key, so each completion must be the
  # batched one up to the first occurrence of that token (all of it when
  # there is none).
  stop = int(batched[0].tokens[5])
  single = generate_lib.generate(model, prompts, max_new_tokens=NEW_TOKENS,
                                 sampling=sampling, seed=3, batch_size=1,
                                 stop_ids=[stop])
  for index, (full, cut) in enumerate(zip(batched, single)):
    hits = np.flatnonzero(full.tokens == stop)
    end = hits[0] if hits.size else NEW_TOKENS
    np.testing.assert_array_equal(cut.tokens, full.tokens[:end],
                                  err_msg=f"prompt {index}")
    assert cut.stopped == bool(hits.size)
  assert single[0].stopped and len(single[0].tokens) <= 5


def test_sample_next_filters():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal(50) * 3, jnp.float32)
  order = np.argsort(-np.asarray(logits))
  keys = jax.random.split(jax.random.key(0), 2000)

  def draws(config):
    return np.asarray(jax.vmap(
        lambda k: generate_lib.sample_next(logits, k, config))(keys))

  assert int(generate_lib.sample_next(
      logits, keys[0], generate_lib.SamplingConfig())) == order[0]
  top5 = draws(generate_lib.SamplingConfig(temperature=2.0, top_k=5))
  assert set(top5) == set(order[:5].tolist())
  # top_p keeps the most likely tokens until their mass exceeds p.
  probs = np.exp(np.asarray(logits, np.float64) - logits.max())
  probs = probs[order] / probs.sum()
  kept = int(np.searchsorted(np.cumsum(probs), 0.7) + 1)
  nucleus = draws(generate_lib.SamplingConfig(temperature=1.0, top_p=0.7))
  assert set(nucleus) == set(order[:kept].tolist())
  # Unfiltered draws follow softmax(logits / T): each token's frequency
  # within 5 standard deviations of a binomial around its probability.
  free = draws(generate_lib.SamplingConfig(temperature=1.0))
  freq = np.bincount(free, minlength=50)[order] / len(keys)
  assert np.all(np.abs(freq - probs) <=
                5 * np.sqrt(probs * (1 - probs) / len(keys)) + 1e-3)
  with pytest.raises(ValueError, match="greedy"):
    generate_lib.SamplingConfig(top_k=5)
