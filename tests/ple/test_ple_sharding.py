"""The sharded PLE lookup on the simulated 4-device ('fsdp', 'tp') mesh,
given or in context.

Tunix's default table shardings: `('tp', None, 'fsdp')` on `[V, L, P]`
(google-tunix 0.1.7) and `('tp', 'fsdp')` on `[V, L*P]` (Tunix main), i.e.
vocab-parallel over tp and feature-parallel over fsdp at once.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma4_jax import mesh as mesh_lib
from gemma4_jax import ops, testing
from gemma4_jax.reference import ple as ple_reference

VOCAB, LAYERS, DIM = 256, 3, 8  # the table is larger than the rows
FSDP, TP = mesh_lib.FSDP, mesh_lib.TP
LAYOUTS = {
    "per_layer": ((VOCAB, LAYERS, DIM), P(TP, None, FSDP)),
    "flat": ((VOCAB, LAYERS * DIM), P(TP, FSDP)),
}
IMPLEMENTATIONS = [dict(implementation="xla"),
                   dict(implementation="pallas_tpu", interpret=True)]
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "f64": 8, "u32": 4}


def _setup(layout, dtype, seq_len=6):
  shape, spec = LAYOUTS[layout]
  mesh = testing.simulated_mesh()
  rng = np.random.default_rng(0)
  table = jax.device_put(jnp.asarray(rng.standard_normal(shape), dtype),
                         NamedSharding(mesh, spec))
  tokens = rng.integers(0, VOCAB, (2, seq_len)).astype(np.int32)
  tokens[0, :3] = [-1, VOCAB, VOCAB + 5]  # read row 0, as Tunix
  return mesh, spec, table, jnp.asarray(tokens)


def _lookup(mesh, spec, kwargs):
  return jax.jit(functools.partial(
      ops.ple_lookup, num_layers=LAYERS, per_layer_dim=DIM, mesh=mesh,
      table_spec=spec, **kwargs))


@pytest.mark.parametrize("kwargs", IMPLEMENTATIONS,
                         ids=["xla", "pallas_interpret"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
def test_sharded_equals_unsharded_reference(kwargs, layout, dtype):
  # seq_len 5: 10 tokens do not divide over tp=2 * ... -> psum; 6 -> scatter.
  for seq_len in (5, 6):
    mesh, spec, table, tokens = _setup(layout, dtype, seq_len)
    out = _lookup(mesh, spec, kwargs)(table, tokens)
    expected = ple_reference.ple_lookup(np.asarray(table), tokens,
                                        num_layers=LAYERS, per_layer_dim=DIM)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(expected, np.float32))


def test_sharded_table_gradient_equals_unsharded():
  mesh, spec, table, tokens = _setup("flat", jnp.float32)
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(
      (*tokens.shape, LAYERS, DIM)), jnp.float32)

  def loss(lookup, table):
    return jnp.sum(lookup(table, tokens) * cotangent)

  sharded = jax.jit(jax.grad(functools.partial(
      loss, functools.partial(ops.ple_lookup, num_layers=LAYERS,
                              per_layer_dim=DIM, mesh=mesh, table_spec=spec,
                              implementation="xla"))))(table)
  expected = jax.grad(functools.partial(
      loss, functools.partial(ple_reference.ple_lookup, num_layers=LAYERS,
                              per_layer_dim=DIM)))(np.asarray(table))
  testing.assert_close(sharded, expected, grad=True, name="d/d table")


def _collectives(hlo_text):
  """(op, result bytes) of every collective in compiled HLO text."""
  found = []
  for match in re.finditer(
      r"= (?:\()?(\w+)\[([\d,]*)\][^=]*? (all-gather|all-reduce|"
      r"reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
      hlo_text):
    dtype, dims, op = match.groups()
    size = int(np.prod([int(d) for d in dims.split(",") if d]))
    found.append((op, size * _DTYPE_BYTES.get(dtype, 4)))
  return found


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_no_table_all_gather_and_table_bytes_split_four_ways(layout):
  mesh, spec, table, tokens = _setup(layout, jnp.bfloat16, seq_len=8)
  lowered = _lookup(mesh, spec, dict(implementation="xla")).lower(
      table, tokens)
  compiled = lowered.compile()
  table_bytes = table.size * 2
  collectives = _collectives(compiled.as_text())
  assert collectives, "expected the vocab-parallel reduction"
  assert not [c for c in collectives
              if c[0] == "all-gather" and c[1] >= table_bytes // 4], (
                  collectives)
  # The reduction is emitted in the table's dtype (bf16), as a
  # reduce-scatter (XLA:CPU then widens bf16 reductions to f32; TPU does not).
  assert re.search(r"reduce_scatter.*\n(.*\n){0,6}.*-> tensor<[\dx]*bf16>",
                   lowered.as_text())
  per_device_arguments = compiled.memory_analysis().argument_size_in_bytes
  assert per_device_arguments == table_bytes // 4 + tokens.size * 4


@pytest.mark.parametrize("spec, match", [
    (P(TP, "data"), "mesh axes"),
    (P(TP, None, FSDP), "more entries"),
])
def test_bad_table_spec_raises(spec, match):
  mesh, _, table, tokens = _setup("flat", jnp.float32)
  with pytest.raises(ValueError, match=match):
    ops.ple_lookup(table, tokens, num_layers=LAYERS, per_layer_dim=DIM,
                   mesh=mesh, table_spec=spec, implementation="xla")


def test_mesh_without_table_spec_raises():
  mesh, _, table, tokens = _setup("flat", jnp.float32)
  with pytest.raises(ValueError, match="together"):
    ops.ple_lookup(table, tokens, num_layers=LAYERS, per_layer_dim=DIM,
                   mesh=mesh, implementation="xla")


def test_mesh_in_context_with_table_spec_shards_as_the_mesh_given():
  mesh, spec, table, tokens = _setup("flat", jnp.float32)
  given_mesh = _lookup(mesh, spec, dict(implementation="xla"))(table, tokens)
  with jax.set_mesh(mesh):
    in_context = _lookup(None, spec, dict(implementation="xla"))(table,
                                                                  tokens)
  np.testing.assert_array_equal(in_context, given_mesh)
  assert in_context.sharding.is_equivalent_to(given_mesh.sharding,
                                              in_context.ndim)


def test_mesh_in_context_without_table_spec_runs_unsharded():
  mesh, _, table, tokens = _setup("flat", jnp.float32)
  with jax.set_mesh(mesh):
    out = _lookup(None, None, dict(implementation="xla"))(table, tokens)
  expected = ple_reference.ple_lookup(np.asarray(table), tokens,
                                      num_layers=LAYERS, per_layer_dim=DIM)
  np.testing.assert_array_equal(out, expected)


def test_table_spec_without_any_mesh_raises():
  _, spec, table, tokens = _setup("flat", jnp.float32)
  with pytest.raises(ValueError, match="pass mesh and table_spec together, "
                     "got mesh=None"):
    ops.ple_lookup(table, tokens, num_layers=LAYERS, per_layer_dim=DIM,
                   table_spec=spec, implementation="xla")
