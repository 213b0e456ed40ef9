"""The Tunix PLE patch (`apply(ple=True|"host")`) on real tiny Tunix models.

Layout-agnostic: Tunix is reached through `gemma4_jax.tiny_models` and the
patch's own layout detection, so this file also runs against Tunix main
(`[V, L*P]` table in `layers.py`). Model-level comparisons use
`testing.assert_model_close` (the stock float32 error against float64).

jit caches a trace per function, not per patch state: every jitted function
here is built fresh for the state it runs in.
"""

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
from gemma4_jax.host_table import HostTable
from gemma4_jax.patches import tunix_ple

# The PLE patch alone (the others are tested in their own files).
OTHERS_OFF = dict(attention=False, lora=False, loss=False)

pytestmark = pytest.mark.slow

VOCAB = 64


def _loss(model, inputs):
  return tiny_models.sft_loss(model, **inputs)


@pytest.fixture(scope="module")
def lora_model():
  # 3 layers (local, local, global), no KV sharing: the smallest model whose
  # every layer reads its per-layer input.
  config = tiny_models.tiny_config(num_layers=3, vocab_size=VOCAB,
                                   frac_shared_layers=0.0)
  return tiny_models.apply_lora(tiny_models.build_model(config, seed=0),
                                seed=1)


@pytest.fixture(scope="module")
def inputs():
  batch = tiny_models.synthetic_batches(1, batch_size=2, seq_len=12,
                                        vocab_size=VOCAB, padding="right",
                                        seed=0)[0]
  inputs = tiny_models.model_inputs(batch)
  tokens = np.array(inputs["input_tokens"])
  tokens[0, 3] = VOCAB + 5  # out of range: Tunix reads PLE row 0
  return dict(inputs, input_tokens=tokens)


def _copy(model):
  return nnx.merge(*nnx.split(model))


def _host_copy(model):
  model = _copy(model)
  tunix_ple.offload_table(model)
  return model


def _logits(model, inputs):
  @nnx.jit
  def forward(model, tokens, positions, mask):
    return model(tokens, positions, None, mask)[0]
  return forward(model, inputs["input_tokens"], inputs["positions"],
                 inputs["attention_mask"])


def _lora_grads(model, inputs):
  loss = lambda m: _loss(m, inputs)
  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(
      model)
  return {jax.tree_util.keystr(p): np.asarray(g)
          for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}


@pytest.fixture(scope="module")
def stock(lora_model, inputs):
  """Stock float32 and float64 logits and LoRA gradients."""
  patches.revert()
  result = dict(logits=_logits(lora_model, inputs),
                grads=_lora_grads(lora_model, inputs))
  with jax.enable_x64(True):
    model64 = tiny_models.float64_copy(lora_model)
    result["logits64"] = np.asarray(_logits(model64, inputs))
    result["grads64"] = _lora_grads(model64, inputs)
  return result


@pytest.mark.parametrize("ple, options", [
    (True, dict(implementation="xla")),
    (True, dict(implementation="pallas_tpu", interpret=True)),
    ("host", {}),
])
def test_logits_and_lora_grads_match_stock(lora_model, inputs, stock, ple,
                                           options):
  model = _host_copy(lora_model) if ple == "host" else lora_model
  with patches.applied(**OTHERS_OFF, ple=ple, **options) as report:
    assert any(t.feature == "ple" and t.state == "patched"
               for t in report.targets)
    logits = _logits(model, inputs)
    grads = _lora_grads(model, inputs)
  testing.assert_model_close(logits, stock["logits"], stock["logits64"],
                             name="logits")
  assert grads.keys() == stock["grads"].keys()
  assert any("per_layer_model_projection" in k for k in grads)
  testing.assert_model_close(grads, stock["grads"], stock["grads64"],
                             name="LoRA grads")


def test_host_mode_is_bit_identical_to_device_mode(lora_model, inputs):
  with patches.applied(**OTHERS_OFF, ple=True, implementation="xla"):
    device = np.asarray(_logits(lora_model, inputs))
  with patches.applied(**OTHERS_OFF, ple="host"):
    host = np.asarray(_logits(_host_copy(lora_model), inputs))
  np.testing.assert_array_equal(host, device)


def test_host_mode_step_has_no_table_among_device_arguments(lora_model,
                                                            inputs):
  table = lora_model.embedder.per_layer_input_embedding.value

  def argument_bytes(model):
    graphdef, state = nnx.split(model)
    def forward(state, tokens, positions, mask):
      return nnx.merge(graphdef, state)(tokens, positions, None, mask)[0]
    compiled = jax.jit(forward).lower(
        state, inputs["input_tokens"], inputs["positions"],
        inputs["attention_mask"]).compile()
    return compiled.memory_analysis().argument_size_in_bytes

  with patches.applied(**OTHERS_OFF, ple=True, implementation="xla"):
    on_device = argument_bytes(lora_model)
  with patches.applied(**OTHERS_OFF, ple="host"):
    on_host = argument_bytes(_host_copy(lora_model))
  assert on_device - on_host == table.nbytes


def test_gradient_into_host_table_is_a_clear_error(lora_model, inputs):
  model = _host_copy(lora_model)
  loss = lambda m: _loss(m, inputs)
  with patches.applied(**OTHERS_OFF, ple="host"):
    with pytest.raises(TypeError, match="host-resident and frozen"):
      # Every Param, the table's marker too; raised while tracing.
      nnx.jit(nnx.grad(loss))(model)


def test_jit_inside_simulated_mesh_with_tunix_table_sharding(lora_model,
                                                             inputs, stock):
  mesh = testing.simulated_mesh()
  model = _copy(lora_model)
  embedder = model.embedder
  spec = P(*model.config.shd_config.per_layer_input_embedding)
  embedder.per_layer_input_embedding.value = jax.device_put(
      embedder.per_layer_input_embedding.value, NamedSharding(mesh, spec))
  with patches.applied(**OTHERS_OFF, ple=True, implementation="xla"), \
      jax.set_mesh(mesh):
    logits = _logits(model, inputs)
  testing.assert_model_close(logits, stock["logits"], stock["logits64"],
                             name="logits under the mesh")
  # Host mode under the mesh: each device fetches its own block of rows.
  tunix_ple.offload_table(model)
  with patches.applied(**OTHERS_OFF, ple="host"), jax.set_mesh(mesh):
    host_logits = _logits(model, inputs)
  testing.assert_model_close(host_logits, stock["logits"], stock["logits64"],
                             name="host-mode logits under the mesh")


def test_report_revert_and_switching_modes(lora_model, inputs):
  embedder_cls = type(lora_model.embedder)
  original = embedder_cls.encode_per_layer_input
  report = patches.apply(**OTHERS_OFF, ple=True)
  (ple_report,) = [t for t in report.targets if t.feature == "ple"]
  assert ple_report.target.endswith("Embedder.encode_per_layer_input")
  assert "no-op on models without PLE" in ple_report.stock
  device_method = embedder_cls.encode_per_layer_input
  assert device_method.__wrapped__ is original
  patches.apply(**OTHERS_OFF, ple="host")
  assert embedder_cls.encode_per_layer_input is not device_method
  with pytest.raises(ValueError, match="offload_table"):
    _logits(lora_model, inputs)  # host mode, table still on the device
  patches.apply(**OTHERS_OFF, ple=True)
  with pytest.raises(ValueError, match="ple='host'"):
    _logits(_host_copy(lora_model), inputs)  # device mode, host table
  patches.revert()
  assert embedder_cls.encode_per_layer_input is original


def test_model_without_ple_is_unaffected():
  config = tiny_models.tiny_config(num_layers=3, vocab_size=VOCAB,
                                   per_layer_input_dim=0,
                                   frac_shared_layers=0.0)
  model = tiny_models.build_model(config, seed=2)
  tokens = jnp.asarray(np.arange(8, dtype=np.int32)[None] % VOCAB)
  inputs = tiny_models.model_inputs(peft_trainer.TrainingInput(
      input_tokens=tokens, input_mask=np.ones((1, 8), bool)))
  stock = np.asarray(_logits(model, inputs))
  with patches.applied(**OTHERS_OFF, ple=True):
    patched = np.asarray(_logits(model, inputs))
  np.testing.assert_array_equal(patched, stock)
  with pytest.raises(ValueError, match="no per-layer embedding"):
    tunix_ple.offload_table(model)


@pytest.mark.parametrize("ple", ["yes", "Host", 1, None])
def test_unknown_ple_value_is_a_clear_error(ple):
  with pytest.raises(ValueError, match="ple must be True, False or 'host'"):
    patches.apply(ple=ple)


def test_offload_rejects_a_mismatched_table(lora_model):
  model = _copy(lora_model)
  table = model.embedder.per_layer_input_embedding.value
  with pytest.raises(ValueError, match="does not match"):
    tunix_ple.offload_table(model, HostTable(np.zeros((3, *table.shape[1:]),
                                                      np.float32)))
