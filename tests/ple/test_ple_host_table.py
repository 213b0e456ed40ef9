"""The host-resident PLE table: `HostTable` through `ops.ple_lookup` and
`ops.per_layer_inputs`, bit-identical to the device path."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gemma4_jax import mesh as mesh_lib
from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.export import safetensors_io
from gemma4_jax.host_table import HostTable
from gemma4_jax.reference import ple as ple_reference

VOCAB, LAYERS, DIM, EMBED = 13, 3, 8, 16
FSDP, TP = mesh_lib.FSDP, mesh_lib.TP


def _tokens():
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 7)).astype(np.int32)
  tokens[0, :3] = [-4, VOCAB, VOCAB + 9]  # read row 0, as Tunix
  return jnp.asarray(tokens)


@pytest.mark.parametrize("shape", [(VOCAB, LAYERS, DIM),
                                   (VOCAB, LAYERS * DIM)],
                         ids=["per_layer", "flat"])
def test_memory_mapped_checkpoint_table_matches_reference(tmp_path, shape):
  table = np.random.default_rng(1).standard_normal(shape).astype(
      ml_dtypes.bfloat16)
  path = str(tmp_path / "model.safetensors")
  safetensors_io.write_safetensors(path, [("other", np.ones(3, np.float32)),
                                          ("per_layer", table)])
  host = HostTable.from_safetensors(path, "per_layer")
  assert isinstance(host._data.array, np.memmap)  # pylint: disable=protected-access
  tokens = _tokens()
  lookup = jax.jit(functools.partial(ops.ple_lookup, num_layers=LAYERS,
                                     per_layer_dim=DIM))
  out = lookup(host, tokens)
  expected = ple_reference.ple_lookup(jnp.asarray(table), tokens,
                                      num_layers=LAYERS, per_layer_dim=DIM)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(expected, np.float32))
  with pytest.raises(KeyError, match="no tensor 'missing'"):
    HostTable.from_safetensors(path, "missing")


def test_host_per_layer_inputs_bit_identical_to_device_with_gradients():
  rng = np.random.default_rng(2)
  table = rng.standard_normal((VOCAB, LAYERS * DIM)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((2, 7, EMBED)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((EMBED, LAYERS * DIM)), jnp.float32)
  scale = jnp.asarray(rng.standard_normal(DIM), jnp.float32)
  tokens = _tokens()

  def run(table):
    def loss(x, w):
      out = ops.per_layer_inputs(x, tokens, table, w, scale,
                                 num_layers=LAYERS, per_layer_dim=DIM,
                                 implementation="xla")
      return jnp.sum(out * out), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        x, w)

  (_, host_out), host_grads = run(HostTable(table))
  (_, device_out), device_grads = run(jnp.asarray(table))
  np.testing.assert_array_equal(host_out, device_out)
  for host_grad, device_grad in zip(host_grads, device_grads):
    np.testing.assert_array_equal(host_grad, device_grad)


def test_gradient_into_host_table_is_a_clear_error():
  host = HostTable(np.ones((VOCAB, LAYERS, DIM), np.float32))

  def loss(table):
    return jnp.sum(ops.ple_lookup(table, _tokens(), num_layers=LAYERS,
                                  per_layer_dim=DIM))

  with pytest.raises(TypeError, match="host-resident and frozen"):
    jax.grad(loss)(host)


def test_host_table_is_one_zero_size_leaf_and_rejects_indexing():
  host = HostTable(np.ones((VOCAB, LAYERS * DIM), np.float32))
  (leaf,) = jax.tree_util.tree_leaves(host)
  assert leaf.shape == (0,) and leaf.dtype == jnp.float32
  assert host.nbytes == VOCAB * LAYERS * DIM * 4
  with pytest.raises(TypeError, match="host-resident"):
    host[jnp.zeros((2, 3), jnp.int32)]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match=r"\[V, L, P\] or \[V, L\*P\]"):
    HostTable(np.ones(5))


@pytest.mark.parametrize("shape, spec", [
    ((16, LAYERS, DIM), (TP, None, FSDP)),  # V divides over tp, as E2B's
    ((16, LAYERS * DIM), (TP, FSDP)),
], ids=["per_layer", "flat"])
def test_host_lookup_on_a_mesh_gathers_each_devices_block(shape, spec):
  mesh = testing.simulated_mesh()
  table = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
  tokens = jnp.concatenate([_tokens(), _tokens()[:, :1]], axis=1)  # 16
  lookup = jax.jit(functools.partial(
      ops.ple_lookup, num_layers=LAYERS, per_layer_dim=DIM, mesh=mesh,
      table_spec=spec))
  out = lookup(HostTable(table), tokens)
  expected = ple_reference.ple_lookup(jnp.asarray(table), tokens,
                                      num_layers=LAYERS, per_layer_dim=DIM)
  np.testing.assert_array_equal(out, expected)
  device = lookup(jnp.asarray(table), tokens)
  assert out.sharding.is_equivalent_to(device.sharding, out.ndim)
  if len(shape) == 3:
    # (The flat table's feature split is mid-layer at odd L, so the reshape
    # to [B, T, L, P] reshards; Tunix main's projection reshape does too.)
    hlo = lookup.lower(HostTable(table), tokens).compile().as_text()
    assert not re.search(r" (all-gather|all-reduce|all-to-all)(-start)?\(",
                         hlo), "the host rows should need no collective"
