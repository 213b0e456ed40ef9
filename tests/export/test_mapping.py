"""Each Tunix LoRA pair maps onto the Hugging Face weight it changes.

The check is against Tunix's own semantics: qwix adds
`scale * einsum(x, a, b)` to the layer's einsum, so the equivalent Tunix
weight is `W + scale * delta_tunix`; converting that to Hugging Face layout
(the inverse of Tunix's loader, `hf_writer`) must equal
`W_hf + scale * lora_b @ lora_a` from `mapping`.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from gemma4_jax.export import hf_writer
from gemma4_jax.export import mapping

D, N, H, K, F, P, L = 24, 3, 8, 2, 40, 4, 5


def _cases(rng, r):
  """(tunix path, W, a, b, einsum of the LoRA delta in Tunix layout)."""
  n = lambda *s: rng.standard_normal(s).astype(np.float32)  # pylint: disable=unnecessary-lambda-assignment
  return [
      ("layers.0.attn.q_einsum.w", n(N, D, H), n(D, r), n(r, N, H),
       "dr,rnh->ndh"),
      ("layers.0.attn.kv_einsum.w", n(2, K, D, H), n(D, r), n(r, 2, K, H),
       "dr,rckh->ckdh"),
      ("layers.0.attn.attn_vec_einsum.w", n(N, H, D), n(N, H, r), n(r, D),
       "nhr,rd->nhd"),
      ("layers.0.mlp.gate_proj.kernel", n(D, F), n(D, r), n(r, F),
       "dr,rf->df"),
      ("layers.0.mlp.down_proj.kernel", n(F, D), n(F, r), n(r, D),
       "fr,rd->fd"),
      ("layers.0.per_layer_input_gate.w", n(D, P), n(D, r), n(r, P),
       "dr,rp->dp"),
      ("layers.0.per_layer_projection.w", n(P, D), n(P, r), n(r, D),
       "pr,rd->pd"),
  ]


@given(seed=st.integers(0, 2**16), rank=st.sampled_from([1, 2, 4]),
       scale=st.sampled_from([0.5, 2.0]))
def test_layer_pairs_match_tunix_semantics(seed, rank, scale):
  rng = np.random.default_rng(seed)
  for path, w, a, b, spec in _cases(rng, rank):
    deltas = mapping.tunix_to_deltas({path: (a, b)}, scale=scale)
    merged_tunix = w + scale * np.einsum(spec, a, b)
    want = dict(hf_writer._convert(path, merged_tunix))  # pylint: disable=protected-access
    base = dict(hf_writer._convert(path, w))  # pylint: disable=protected-access
    assert len(deltas) == len(want)
    for delta in deltas:
      name = delta.target + ".weight"
      got = base[name] + delta.scale * delta.lora_b @ delta.lora_a
      np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [mapping.LAYOUT_TUNIX_0_1_7,
                                    mapping.LAYOUT_TUNIX_HEAD])
def test_ple_model_projection_both_layouts(layout):
  rng = np.random.default_rng(0)
  r, scale = 3, 1.5
  w = rng.standard_normal((D, L, P)).astype(np.float32)
  a = rng.standard_normal((D, r)).astype(np.float32)
  b = rng.standard_normal((r, L, P)).astype(np.float32)
  if layout == mapping.LAYOUT_TUNIX_HEAD:
    b = b.reshape(r, L * P)
  path = "embedder.per_layer_model_projection.w"
  pairs = {path: (a, b)}
  assert mapping.tunix_layout(pairs) == layout
  (delta,) = mapping.tunix_to_deltas(pairs, scale=scale)
  # Tunix computes x @ (s * W) + scale * x @ a @ b with s = D**-0.5.
  s = D ** -0.5
  x = rng.standard_normal((2, D)).astype(np.float32)
  tunix_out = x @ (s * w.reshape(D, -1)) + scale * x @ a @ b.reshape(r, -1)
  (name, w_hf), = hf_writer._convert(path, w)  # pylint: disable=protected-access
  assert name == "per_layer_model_projection.weight"
  # transformers computes (x @ W_hf.T) * s.
  merged_hf = w_hf + delta.scale * delta.lora_b @ delta.lora_a
  np.testing.assert_allclose((x @ merged_hf.T) * s, tunix_out, rtol=1e-5,
                             atol=1e-5)


def test_tied_embedding_maps_to_lm_head():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((D, 2)).astype(np.float32)
  b = rng.standard_normal((2, 50)).astype(np.float32)
  (delta,) = mapping.tunix_to_deltas(
      {"embedder.input_embedding": (a, b)}, scale=1.0)
  assert delta.target == mapping.LM_HEAD
  np.testing.assert_allclose(delta.lora_b @ delta.lora_a, (a @ b).T,
                             rtol=1e-6)


def test_unknown_and_unpaired_parameters():
  a, b = np.zeros((D, 2)), np.zeros((2, D))
  with pytest.raises(mapping.AdapterMappingError, match="vision_encoder"):
    mapping.tunix_to_deltas({"vision_encoder.proj.w": (a, b)}, scale=1.0)
  with pytest.raises(mapping.AdapterMappingError, match="not qwix LoRA"):
    mapping.pair_tunix_params({"layers.0.attn.q_einsum.w": a})
  with pytest.raises(mapping.AdapterMappingError, match="missing"):
    mapping.pair_tunix_params({"layers.0.attn.q_einsum.w_lora_a": a})
  with pytest.raises(mapping.AdapterMappingError, match="ranks"):
    mapping.tunix_rank({"x": (a, b), "y": (np.zeros((D, 3)),
                                           np.zeros((3, D)))})
