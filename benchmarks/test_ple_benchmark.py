"""Per-Layer Embedding: accelerator bytes, collective bytes and step time,
Tunix's stock `Embedder.encode_per_layer_input` against the patched one.

- Memory and collectives at Gemma 4 E2B size (V=262144, L=35, P=256,
  D=1536, bf16, 4096 tokens) on the simulated 4-device ('fsdp', 'tp') mesh
  with Tunix's default shardings, from the compiled step
  (`memory_analysis()` per device, collectives parsed from the HLO); all
  arguments are `jax.ShapeDtypeStruct`s, and the host table is a memory map
  of a sparse file, so nothing of E2B size is allocated.
- CPU time per step (forward + backward for the projection, as in LoRA
  training) at a reduced size: stock vs patched combine, and host-resident
  vs device-resident table.

Not part of CI (benchmarks/ is outside testpaths). Run:
  python -m pytest benchmarks/test_ple_benchmark.py -q --benchmark-enable \
      -o testpaths=benchmarks -s
"""

from __future__ import annotations

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import gemma4_jax.patches as patches
from gemma4_jax import testing
from gemma4_jax.host_table import HostTable
from gemma4_jax.patches import tunix_ple
import ple_workload

TOKENS = (4, 1024)


def _abstract_embedder(config):
  return nnx.eval_shape(lambda: ple_workload.embedder_module().Embedder(
      config, rngs=nnx.Rngs(0)))


def _sharded_structs(state, mesh, config):
  shd = config.shd_config
  specs = {"per_layer_input_embedding": shd.per_layer_input_embedding,
           "per_layer_model_projection": shd.per_layer_model_projection,
           "input_embedding": shd.emb_vd}

  def place(path, leaf):
    key = next((k for k in specs if k in jax.tree_util.keystr(path)), None)
    # The host table's marker is a zero-size leaf: replicated.
    spec = P(*specs[key]) if key and leaf.ndim == len(specs[key]) else P()
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=NamedSharding(mesh, spec))
  return jax.tree_util.tree_map_with_path(place, state)


def _compiled(mode, mesh, config, sparse_dir):
  embedder = _abstract_embedder(config)
  if mode == "host":
    table = embedder.per_layer_input_embedding.value
    path = os.path.join(sparse_dir, "table.bin")
    array = np.memmap(path, dtype=ml_dtypes.bfloat16, mode="w+",
                      shape=table.shape)  # sparse: no bytes written
    tunix_ple.offload_table(embedder, HostTable(array))
  graphdef, projection, rest = ple_workload.split(embedder)
  projection, rest = (_sharded_structs(s, mesh, config)
                      for s in (projection, rest))
  act = NamedSharding(mesh, P(*config.shd_config.act_btd))
  x = jax.ShapeDtypeStruct((*TOKENS, config.embed_dim), jnp.bfloat16,
                           sharding=act)
  tokens = jax.ShapeDtypeStruct(TOKENS, jnp.int32,
                                sharding=NamedSharding(mesh, P("fsdp")))
  context = (patches.applied(attention=False, ple=mode) if mode
             else patches.applied(attention=False, ple=False))
  with context, jax.set_mesh(mesh):
    return jax.jit(ple_workload.step(graphdef)).lower(
        projection, rest, x, tokens).compile()


def test_e2b_accelerator_and_collective_bytes():
  mesh = testing.simulated_mesh()
  config = ple_workload.e2b_config()
  table_bytes = (config.num_embed * config.num_layers
                 * config.per_layer_input_dim * 2)
  rows = {}
  with tempfile.TemporaryDirectory() as sparse_dir:
    for name, mode in (("stock", None), ("sharded", True), ("host", "host")):
      compiled = _compiled(mode, mesh, config, sparse_dir)
      memory = compiled.memory_analysis()
      collective, ops = ple_workload.collective_bytes(compiled.as_text())
      rows[name] = dict(arguments=memory.argument_size_in_bytes,
                        temp=memory.temp_size_in_bytes,
                        output=memory.output_size_in_bytes,
                        collective=collective, ops=ops)
  print(f"\nE2B PLE step (table {table_bytes / 2**30:.2f} GiB bf16, tokens "
        f"{TOKENS}, 4-device ('fsdp','tp') mesh), per device:")
  for name, row in rows.items():
    print(f"  {name:8s} arguments {row['arguments'] / 2**20:9.1f} MiB  temp "
          f"{row['temp'] / 2**20:8.1f} MiB  output "
          f"{row['output'] / 2**20:7.1f} MiB  collectives "
          f"{row['collective'] / 2**20:8.1f} MiB {row['ops']}")
  stock, sharded, host = rows["stock"], rows["sharded"], rows["host"]
  print(f"  table bytes among host-mode arguments: "
        f"{(stock['arguments'] - host['arguments']) / 2**20:.1f} MiB fewer "
        f"than stock (table/4 = {table_bytes / 4 / 2**20:.1f} MiB)")
  print(f"  collective bytes, sharded / stock: "
        f"{sharded['collective'] / stock['collective']:.3f}")
  assert stock["arguments"] - host["arguments"] == table_bytes // 4
  assert sharded["arguments"] == stock["arguments"]


def _small_problem(seed=0, *, vocab=4096, embed_dim=256, tokens=(4, 256)):
  config = ple_workload.e2b_config(num_embed=vocab, embed_dim=embed_dim)
  embedder = nnx.eval_shape(lambda: ple_workload.embedder_module().Embedder(
      config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  state = jax.tree_util.tree_map(
      lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype),
      nnx.state(embedder))
  nnx.update(embedder, state)
  x = jnp.asarray(rng.standard_normal((*tokens, embed_dim)), jnp.bfloat16)
  ids = jnp.asarray(rng.integers(0, vocab, tokens), jnp.int32)
  return embedder, x, ids


def _timed_step(embedder, x, ids, benchmark):
  graphdef, projection, rest = ple_workload.split(embedder)
  step = jax.jit(ple_workload.step(graphdef))
  jax.block_until_ready(step(projection, rest, x, ids))
  return benchmark(lambda: jax.block_until_ready(
      step(projection, rest, x, ids)))


@pytest.mark.parametrize("mode", ["stock", "fused", "host"])
def test_cpu_step_time(benchmark, mode):
  embedder, x, ids = _small_problem()
  if mode == "host":
    tunix_ple.offload_table(embedder)
  ple = {"stock": False, "fused": True, "host": "host"}[mode]
  benchmark.group = "PLE step, 4x256 tokens, D=256, L=35, P=256, bf16"
  with patches.applied(attention=False, ple=ple, implementation="xla"):
    _timed_step(embedder, x, ids, benchmark)


def test_e2b_combine_temp_bytes_single_device():
  """What the fused combine saves: the step's temporaries on one device."""
  config = ple_workload.e2b_config()
  temps = {}
  for name, ple in (("stock", False), ("fused", True)):
    embedder = _abstract_embedder(config)
    graphdef, projection, rest = ple_workload.split(embedder)
    x = jax.ShapeDtypeStruct((*TOKENS, config.embed_dim), jnp.bfloat16)
    tokens = jax.ShapeDtypeStruct(TOKENS, jnp.int32)
    with patches.applied(attention=False, ple=ple, implementation="xla"):
      compiled = jax.jit(ple_workload.step(graphdef)).lower(
          projection, rest, x, tokens).compile()
    temps[name] = compiled.memory_analysis().temp_size_in_bytes
  print(f"\nE2B PLE step on one device, temp bytes: stock "
        f"{temps['stock'] / 2**20:.1f} MiB, fused "
        f"{temps['fused'] / 2**20:.1f} MiB "
        f"({temps['fused'] / temps['stock']:.2f}x)")
