"""The adapter mapping at real Gemma 4 E2B names and shapes.

tests/data holds the E2B text model's Hugging Face tensor shapes and the
LoRA parameters qwix creates on Tunix's E2B at rank 16 (no weights).
"""

import json
import pathlib

import numpy as np

from gemma4_jax.export import mapping

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
PREFIX = "model.language_model."


def _load():
  hf = json.loads((DATA / "gemma4_e2b_hf_text_shapes.json").read_text())
  lora = json.loads((DATA / "gemma4_e2b_tunix_shapes.json").read_text())["lora"]
  # Zero arrays of the real shapes: the mapping only reshapes and transposes.
  flat = {name: np.zeros(shape, np.float32)
          for name, (shape, _, _) in lora.items()}
  return hf, flat


def test_every_e2b_lora_pair_lands_on_an_hf_weight_of_its_shape():
  hf, flat = _load()
  pairs = mapping.pair_tunix_params(flat)
  assert len(pairs) == len(flat) // 2 == 262
  assert mapping.tunix_layout(pairs) == mapping.LAYOUT_TUNIX_0_1_7
  assert mapping.tunix_rank(pairs) == 16
  deltas = mapping.tunix_to_deltas(pairs, scale=2.0)
  # kv_einsum pairs become two deltas (k_proj and v_proj share lora_a).
  kv_pairs = sum(1 for path in pairs if ".kv_einsum." in path)
  assert kv_pairs > 0
  assert len(deltas) == len(pairs) + kv_pairs
  for delta in deltas:
    name = ("model.language_model.embed_tokens.weight"
            if delta.target == mapping.LM_HEAD  # tied: lm_head is embed_tokens
            else f"{PREFIX}{delta.target}.weight")
    assert name in hf, f"{delta.source} -> {name}: no such E2B tensor"
    assert list(delta.shape) == hf[name], (delta.source, name)
  assert len({d.target for d in deltas}) == len(deltas)


def test_e2b_per_layer_model_projection_delta_is_divided_by_its_scale():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(1536, 16)).astype(np.float32)
  b = rng.normal(size=(16, 35, 256)).astype(np.float32)
  pairs = {"embedder.per_layer_model_projection.w": (a, b)}
  (delta,) = mapping.tunix_to_deltas(pairs, scale=1.0)
  assert delta.target == "per_layer_model_projection"
  # Tunix computes x @ (w * 1536**-0.5) + x @ a @ b; Hugging Face computes
  # (x @ W_hf.T) * 1536**-0.5. Equal outputs need W_hf += (a @ b).T * sqrt(D).
  x = rng.normal(size=(3, 1536)).astype(np.float32)
  tunix_delta = x @ a @ b.reshape(16, -1)
  hf_delta = (x @ (delta.lora_b @ delta.lora_a).T) * 1536 ** -0.5
  np.testing.assert_allclose(hf_delta, tunix_delta, rtol=1e-4, atol=1e-3)
