"""The PLE reference against Tunix 0.1.7's `Embedder.encode_per_layer_input`.

Current Tunix (2-D `[V, L*P]` table and `[D, L*P]` projection) cannot be
installed here; its layout is checked by slicing: row t's columns
`[l*P, (l+1)*P)` are layer l's vector, which is what its reshape to
`[..., L, P]` means.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, strategies as st
from tunix.models.gemma4 import model as gemma4_lib

from gemma4_jax import testing, tiny_models
from gemma4_jax.reference import ple


def _params(embedder):
  return dict(
      per_layer_table=embedder.per_layer_input_embedding[...],
      model_projection=embedder.per_layer_model_projection.w[...],
      projection_norm_scale=embedder.per_layer_projection_norm.scale[...])


def _flat(params):
  """The same parameters in current Tunix's 2-D layout."""
  table, projection = params["per_layer_table"], params["model_projection"]
  return dict(params,
              per_layer_table=table.reshape(table.shape[0], -1),
              model_projection=projection.reshape(projection.shape[0], -1))


def _random_embedder(config, seed):
  """A Tunix `Embedder` with every parameter (norm scale too) drawn at random;
  built abstractly first, since Tunix's own initializers cost seconds."""
  embedder = nnx.eval_shape(lambda: gemma4_lib.Embedder(config,
                                                        rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  state = jax.tree_util.tree_map(
      lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), jnp.float32),
      nnx.state(embedder))
  nnx.update(embedder, state)
  return embedder


def test_matches_tunix_embedder_with_out_of_range_tokens():
  config = tiny_models.tiny_config()
  embedder = _random_embedder(config, seed=3)
  vocab = config.num_embed
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, size=(2, 9)).astype(np.int32)
  tokens[0, :4] = [-1, -vocab, vocab, vocab + 7]  # all read row 0 in Tunix
  tokens = jnp.asarray(tokens)
  embeddings = embedder.encode(jnp.clip(tokens, 0, vocab - 1))
  expected = embedder.encode_per_layer_input(embeddings, tokens)
  dims = dict(num_layers=config.num_layers,
              per_layer_dim=config.per_layer_input_dim)
  params = _params(embedder)
  assert expected.shape == (2, 9, config.num_layers,
                            config.per_layer_input_dim)

  for layout in (params, _flat(params)):
    out = ple.per_layer_inputs(embeddings, tokens, **layout, **dims)
    testing.assert_close(out, expected, name="per_layer_inputs")
  zeros = jnp.zeros_like(tokens)
  from_row_0 = ple.per_layer_inputs(embeddings, zeros, **params, **dims)
  testing.assert_close(out[0, :4], from_row_0[0, :4], name="out of range")


def test_lookup_of_flat_table_is_layer_major_slices():
  vocab, layers, dim = 7, 3, 4
  flat = np.arange(vocab * layers * dim, dtype=np.float32).reshape(vocab, -1)
  tokens = np.array([[0, 6, -2], [7, 3, 1]], np.int32)
  out = np.asarray(ple.ple_lookup(jnp.asarray(flat), jnp.asarray(tokens),
                                  num_layers=layers, per_layer_dim=dim))
  assert out.shape == (2, 3, layers, dim)
  for (b, t), token in np.ndenumerate(tokens):
    row = flat[token] if 0 <= token < vocab else flat[0]
    for layer in range(layers):
      np.testing.assert_array_equal(out[b, t, layer],
                                    row[layer * dim:(layer + 1) * dim])


@given(batch=st.sampled_from([1, 2]), seq_len=st.sampled_from([1, 3, 7]),
       embed_dim=st.sampled_from([8, 16]), num_layers=st.sampled_from([1, 3]),
       per_layer_dim=st.sampled_from([4, 8]), vocab=st.sampled_from([5, 11]),
       flat=st.booleans(), magnitude=st.sampled_from([3.0, 1e-3]),
       seed=st.integers(0, 2**16))
def test_matches_tunix_embedder_over_shapes(batch, seq_len, embed_dim,
                                            num_layers, per_layer_dim, vocab,
                                            flat, magnitude, seed):
  # At magnitude 1e-3 the projection's variance is near the norm's epsilon,
  # so its D**-0.5 scale shows (a norm hides any scale far above epsilon).
  config = tiny_models.tiny_config(
      num_layers=num_layers, vocab_size=vocab, embed_dim=embed_dim,
      per_layer_input_dim=per_layer_dim)
  embedder = _random_embedder(config, seed)
  rng = np.random.default_rng(seed)
  embeddings = jnp.asarray(magnitude * rng.standard_normal(
      (batch, seq_len, embed_dim)), jnp.float32)
  tokens = jnp.asarray(rng.integers(-3, vocab + 3, (batch, seq_len)),
                       jnp.int32)

  expected = jax.jit(embedder.encode_per_layer_input)(embeddings, tokens)
  params = _params(embedder)
  out = jax.jit(functools.partial(
      ple.per_layer_inputs, num_layers=num_layers,
      per_layer_dim=per_layer_dim))(embeddings, tokens,
                                    **(_flat(params) if flat else params))
  testing.assert_close(out, expected, name="per_layer_inputs")


def _good_args():
  vocab, dim, layers, per_layer = 11, 8, 3, 4
  return dict(
      embeddings=jnp.ones((2, 5, dim)),
      tokens=jnp.zeros((2, 5), jnp.int32),
      per_layer_table=jnp.ones((vocab, layers, per_layer)),
      model_projection=jnp.ones((dim, layers, per_layer)),
      projection_norm_scale=jnp.ones((per_layer,)),
      num_layers=layers, per_layer_dim=per_layer)


@pytest.mark.parametrize("change, error, match", [
    (dict(tokens=jnp.zeros((2, 5), jnp.float32)), TypeError, "tokens"),
    (dict(tokens=jnp.zeros((10,), jnp.int32)), ValueError,
     r"tokens must be \[B, T\]"),
    (dict(embeddings=jnp.ones((10, 8))), ValueError, "embeddings"),
    (dict(embeddings=jnp.ones((2, 4, 8))), ValueError, "disagree"),
    (dict(per_layer_table=jnp.ones((11, 13))), ValueError, "per_layer_table"),
    (dict(per_layer_table=jnp.ones((11, 3, 4, 1))), ValueError,
     "per_layer_table"),
    (dict(model_projection=jnp.ones((8, 4, 3))), ValueError,
     "model_projection"),
    (dict(projection_norm_scale=jnp.ones((3,))), ValueError,
     "projection_norm_scale"),
    (dict(num_layers=0), ValueError, "num_layers"),
])
def test_bad_inputs_raise(change, error, match):
  with pytest.raises(error, match=match):
    ple.per_layer_inputs(**{**_good_args(), **change})


def test_lookup_rejects_non_integer_tokens():
  with pytest.raises(TypeError, match="tokens must be an integer"):
    ple.ple_lookup(jnp.ones((11, 12)), jnp.zeros((2, 5)), num_layers=3,
                   per_layer_dim=4)
