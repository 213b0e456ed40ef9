"""The PLE row gather lowered (`jax.export`) and compiled for abstract TPU
v5e chips (XLA:TPU + Mosaic).

The kernel and the fused per-layer inputs lower for TPU at E2B shapes
(`jax.export`: no libtpu needed). With libtpu,
`ops.ple_lookup(..., implementation="pallas_tpu")` is compiled at Gemma 4 E2B
shapes (V=262144, L=35, P=256, bf16, 4x1024 tokens) on both Tunix table layouts,
on one chip and sharded on a v5e:2x2 `('fsdp', 'tp')` mesh as Tunix shards
the table. Mosaic must accept the kernel; the program must not materialize a
copy of the table (XLA lays `[V, L, P]` out L-major, and a kernel reading it
row-major made XLA copy all 4.7 GB: 5120 MiB of temporaries); and the
per-chip HBM temporaries, forward and forward + backward with respect to the
projected activations and the norm scale (the table frozen, as in LoRA),
must stay at most those of the stock `jnp.take` and of our XLA version
compiled the same way, plus `_SLACK`.

`python tests/ple/test_ple_tpu_compile.py` prints the temporaries of all three
(the table in benchmarks/RESULTS.md).
"""

import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gemma4_jax import mesh as mesh_lib
from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.kernels.ple import combine as ple_combine
from gemma4_jax.kernels.ple import pallas_tpu
from gemma4_jax.kernels.ple import xla as ple_xla

_NEEDS_LIBTPU = pytest.mark.skipif(testing.libtpu_missing() is not None,
                                   reason=str(testing.libtpu_missing()))

MiB = 2**20
VOCAB, LAYERS, DIM, BATCH, SEQ_LEN = 262144, 35, 256, 4, 1024
# Tunix's table shardings: Tunix main's `[V, L*P]`, google-tunix 0.1.7's
# `[V, L, P]`.
SPECS = {"flat": P(mesh_lib.TP, mesh_lib.FSDP),
         "per_layer": P(mesh_lib.TP, None, mesh_lib.FSDP)}
IMPLEMENTATIONS = ("pallas_tpu", "xla", "stock")
MODES = ("forward", "forward_backward")
# The Pallas rows come out in the table's layout (`[L, N, P]` physically for
# `[V, L, P]`), so XLA lays out the combine's float32 norm statistics
# (`[B, T, L]`, 0.27 MiB per chip on the mesh) differently, and its
# memory-space assignment then keeps them in HBM where it put the XLA
# version's in VMEM. 1 MiB covers that; a copy of the table would be
# 1120 MiB per chip, of the rows 70 MiB.
_SLACK = 1 * MiB
# `= <result type> <opcode>(`: one HLO instruction.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) ([a-z][\w-]*)\(")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def _table_shape(layout, num_layers=LAYERS):
  return ((VOCAB, num_layers * DIM) if layout == "flat"
          else (VOCAB, num_layers, DIM))


def _program(implementation, layout, mode, mesh, num_layers):
  """The lookup (`forward`), or per-layer inputs and their gradient w.r.t.
  the projected activations and the norm scale (`forward_backward`)."""
  def lookup(table, tokens):
    if implementation == "stock":
      rows = jnp.take(table, tokens, axis=0)  # Tunix: table[tokens]
      return rows.reshape(*tokens.shape, num_layers, DIM)
    sharding = ({} if mesh is None
                else dict(mesh=mesh, table_spec=SPECS[layout]))
    return ops.ple_lookup(table, tokens, num_layers=num_layers,
                          per_layer_dim=DIM, implementation=implementation,
                          **sharding)

  if mode == "forward":
    return lookup

  def step(table, tokens, projected, norm_scale):
    def loss(projected, norm_scale):
      out = ops.combine_per_layer_inputs(projected, lookup(table, tokens),
                                         norm_scale)
      return jnp.sum(out.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1))(projected, norm_scale)
  return step


@functools.cache
def _compiled(implementation, layout, mode, sharded, num_layers=LAYERS):
  """(HBM temporaries per chip, Mosaic kernels, table-sized instructions)."""
  mesh = testing.tpu_mesh("v5e:2x2") if sharded else None
  table_shape = _table_shape(layout, num_layers)

  def struct(shape, dtype, spec=None):
    if mesh is None:
      return testing.tpu_struct(shape, dtype)
    return testing.tpu_struct(shape, dtype, spec, mesh=mesh)

  args = [struct(table_shape, jnp.bfloat16, SPECS[layout]),
          struct((BATCH, SEQ_LEN), jnp.int32, P(mesh_lib.FSDP))]
  if mode == "forward_backward":
    args += [struct((BATCH, SEQ_LEN, num_layers, DIM), jnp.bfloat16,
                    P(mesh_lib.FSDP)),
             struct((DIM,), jnp.bfloat16)]
  compiled = testing.compile_for_tpu(
      _program(implementation, layout, mode, mesh, num_layers), *args,
      mesh=mesh)
  table_elements = np.prod(table_shape) // (4 if sharded else 1)
  return (testing.temp_bytes(compiled), testing.mosaic_kernels(compiled),
          _table_sized(compiled.as_text(), table_elements))


def _table_sized(hlo: str, elements: int) -> list[str]:
  """Instructions that produce an array the size of the (per-chip) table,
  other than the parameter itself and its bitcasts: copies of the table."""
  found = []
  for line in hlo.splitlines():
    match = _INSTRUCTION.match(line)
    if not match or match.group(2) in ("parameter", "bitcast"):
      continue
    for dims in _SHAPE.findall(match.group(1)):
      if dims and np.prod([int(d) for d in dims.split(",")]) == elements:
        found.append(line.strip()[:200])
  return found


@_NEEDS_LIBTPU
@pytest.mark.parametrize("sharded", [False, True], ids=["one_chip", "v5e_2x2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", sorted(SPECS))
def test_pallas_lookup_reads_the_table_in_place(layout, mode, sharded):
  temp, kernels, copies = _compiled("pallas_tpu", layout, mode, sharded)
  assert kernels >= 1, "the lookup did not run the Pallas kernel"
  assert not copies, f"the table is materialized again: {copies}"
  for baseline in ("stock", "xla"):
    limit = _compiled(baseline, layout, mode, sharded)[0] + _SLACK
    assert temp <= limit, (
        f"Pallas temporaries {temp / MiB:.1f} MiB > {baseline}'s + slack "
        f"{limit / MiB:.1f} MiB")


@_NEEDS_LIBTPU
@pytest.mark.parametrize("num_layers", [40, 42], ids=["L40_row_major",
                                                      "L42_e4b"])
def test_per_layer_table_is_read_in_xla_layout(num_layers):
  # L % 8 == 0: XLA keeps [V, L, P] row-major (the one-DMA-per-row kernel);
  # otherwise it lays it out L-major (the whole-tile kernel).
  _, kernels, copies = _compiled("pallas_tpu", "per_layer", "forward", False,
                                 num_layers)
  assert kernels >= 1
  assert not copies, f"the table is materialized again: {copies}"


@pytest.mark.parametrize("layout", ["flat", "per_layer"])
def test_kernel_lowers_for_tpu_at_e2b_shapes(layout):
  vocab, num_layers, per_layer_dim = 262144, 35, 256
  shape = ((vocab, num_layers * per_layer_dim) if layout == "flat"
           else (vocab, num_layers, per_layer_dim))
  table = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  tokens = jax.ShapeDtypeStruct((4, 1024), jnp.int32)  # 4096 tokens
  exported = testing.lower_for_tpu(_pallas_lookup, table, tokens)
  assert "tpu_custom_call" in exported.mlir_module()
  assert exported.out_avals[0].shape == (4096, *shape[1:])


def _pallas_lookup(table, tokens):
  """What `ops.ple_lookup(implementation="pallas_tpu")` runs on a TPU (ops
  refuses to pick Pallas on this CPU machine without interpret mode)."""
  return pallas_tpu.gather_rows(table,
                                ple_xla.valid_ids(tokens, table.shape[0]))


def test_fused_per_layer_inputs_lower_for_tpu_at_e2b_shapes():
  vocab, num_layers, per_layer_dim, embed_dim = 262144, 35, 256, 1536
  args = (jax.ShapeDtypeStruct((4, 1024, embed_dim), jnp.bfloat16),
          jax.ShapeDtypeStruct((4, 1024), jnp.int32),
          jax.ShapeDtypeStruct((vocab, num_layers * per_layer_dim),
                               jnp.bfloat16),
          jax.ShapeDtypeStruct((embed_dim, num_layers * per_layer_dim),
                               jnp.bfloat16),
          jax.ShapeDtypeStruct((per_layer_dim,), jnp.bfloat16))

  def step(x, tokens, table, w, scale):
    def loss(x, w):
      rows = _pallas_lookup(table, tokens).reshape(
          *tokens.shape, num_layers, per_layer_dim)
      out = ple_combine.per_layer_inputs(x, rows, w, scale,
                                         num_layers=num_layers,
                                         per_layer_dim=per_layer_dim)
      return jnp.sum(out.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

  exported = testing.lower_for_tpu(step, *args)
  assert "tpu_custom_call" in exported.mlir_module()


def main():
  print("| table | chips | mode | Pallas | XLA version | stock jnp.take |")
  print("|---|---|---|---|---|---|")
  for sharded in (False, True):
    for layout in ("flat", "per_layer"):
      for mode in MODES:
        temps = [_compiled(i, layout, mode, sharded)[0] / MiB
                 for i in IMPLEMENTATIONS]
        shape = _table_shape(layout)
        print(f"| `[{', '.join(map(str, shape))}]` | "
              f"{'v5e:2x2, per chip' if sharded else 'one v5e'} | "
              f"{mode.replace('_', ' + ')} | "
              + " | ".join(f"{t:.1f} MiB" for t in temps) + " |")


if __name__ == "__main__":
  start = time.time()
  main()
  print(f"({time.time() - start:.0f} s)")
