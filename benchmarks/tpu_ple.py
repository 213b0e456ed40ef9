"""PLE at Gemma 4 E2B size on a TPU v5litepod (or any TPU slice).

Times one LoRA-style step (per-layer inputs plus the gradient w.r.t. the
projection; the table frozen) for Tunix's stock `encode_per_layer_input`,
the patched one (Pallas row gather, sharded over Tunix's ('fsdp', 'tp') mesh)
and the host-resident table, and prints per-device HBM of each compiled step
and the collective bytes in its HLO, as ratios against stock.

  python benchmarks/tpu_ple.py                # on the TPU VM
  python benchmarks/tpu_ple.py --dry-run      # any machine: lowers the
                                              # patched step for TPU only

Absolute times are only meaningful on the accelerator; `--dry-run` checks
that the Pallas kernel and the step lower to Mosaic/StableHLO at E2B shapes.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import gemma4_jax.patches as patches
from gemma4_jax.kernels.ple import combine
from gemma4_jax.kernels.ple import pallas_tpu
from gemma4_jax.kernels.ple import xla
from gemma4_jax.patches import tunix_ple
import ple_workload


def dry_run(batch: int, seq_len: int) -> None:
  """Lowers the patched kernel and step for TPU with abstract arguments."""
  config = ple_workload.e2b_config()
  vocab, layers, dim = (config.num_embed, config.num_layers,
                        config.per_layer_input_dim)
  table = jax.ShapeDtypeStruct((vocab, layers, dim), jnp.bfloat16)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  x = jax.ShapeDtypeStruct((batch, seq_len, config.embed_dim), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((config.embed_dim, layers, dim), jnp.bfloat16)
  scale = jax.ShapeDtypeStruct((dim,), jnp.bfloat16)

  # What ops.per_layer_inputs runs on a TPU (ops will not pick Pallas on a
  # CPU without interpret mode, which would not lower to Mosaic).
  def patched(x, tokens, table, w, scale):
    def loss(w):
      rows = pallas_tpu.gather_rows(table, xla.valid_ids(tokens, vocab))
      out = combine.per_layer_inputs(
          x, rows.reshape(batch, seq_len, layers, dim), w, scale,
          num_layers=layers, per_layer_dim=dim)
      return jnp.sum(out.astype(jnp.float32))
    return jax.value_and_grad(loss)(w)

  exported = jax.export.export(jax.jit(patched), platforms=["tpu"])(
      x, tokens, table, w, scale)
  text = exported.mlir_module()
  print(f"lowered for TPU: {len(text)} chars of StableHLO, "
        f"{text.count('tpu_custom_call')} Mosaic kernel call(s), "
        f"{batch * seq_len} tokens, table {table.shape} bf16")


def run(batch: int, seq_len: int, steps: int) -> None:
  """Times stock / patched / host steps on the TPU devices present."""
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices) // 2 or 1, min(2, len(devices))),
                       ("fsdp", "tp"))
  config = ple_workload.e2b_config()
  embedder = ple_workload.embedder_module().Embedder(config, rngs=nnx.Rngs(0))
  shd = config.shd_config
  specs = {"per_layer_input_embedding": shd.per_layer_input_embedding,
           "per_layer_model_projection": shd.per_layer_model_projection,
           "input_embedding": shd.emb_vd}

  def place(path, leaf):
    key = next((k for k in specs if k in jax.tree_util.keystr(path)), None)
    return jax.device_put(leaf, NamedSharding(mesh, P(*specs[key]) if key
                                              else P()))
  nnx.update(embedder, jax.tree_util.tree_map_with_path(
      place, nnx.state(embedder)))
  rng = np.random.default_rng(0)
  x = jax.device_put(jnp.asarray(rng.standard_normal(
      (batch, seq_len, config.embed_dim)), jnp.bfloat16),
                     NamedSharding(mesh, P(*shd.act_btd)))
  tokens = jax.device_put(jnp.asarray(rng.integers(
      0, config.num_embed, (batch, seq_len)), jnp.int32),
                          NamedSharding(mesh, P("fsdp")))
  results = {}
  for name, ple in (("stock", False), ("patched", True), ("host", "host")):
    if ple == "host":
      tunix_ple.offload_table(embedder)  # the last mode: frees the HBM copy
    graphdef, projection, rest = ple_workload.split(embedder)
    with patches.applied(attention=False, ple=ple), jax.set_mesh(mesh):
      step = jax.jit(ple_workload.step(graphdef))
      compiled = step.lower(projection, rest, x, tokens).compile()
      jax.block_until_ready(step(projection, rest, x, tokens))
      start = time.perf_counter()
      for _ in range(steps):
        out = step(projection, rest, x, tokens)
      jax.block_until_ready(out)
      seconds = (time.perf_counter() - start) / steps
    memory = compiled.memory_analysis()
    results[name] = (seconds, memory.argument_size_in_bytes
                     + memory.temp_size_in_bytes,
                     ple_workload.collective_bytes(compiled.as_text())[0])
  stock = results["stock"]
  for name, (seconds, hbm, collective) in results.items():
    print(f"{name:8s} {seconds * 1e3:8.2f} ms/step ({seconds / stock[0]:.2f}x "
          f"stock)  HBM args+temp {hbm / 2**20:9.1f} MiB/device "
          f"({hbm / stock[1]:.2f}x)  collectives {collective / 2**20:8.1f} "
          f"MiB ({collective / max(1, stock[2]):.2f}x)")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="lower for TPU on this machine; run nothing")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)
  if args.dry_run:
    dry_run(args.batch, args.seq_len)
  else:
    run(args.batch, args.seq_len, args.steps)


if __name__ == "__main__":
  main()
