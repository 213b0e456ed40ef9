"""The LoRA op per shard under a simulated 4-device `('fsdp','tp')` mesh.

Sharded == unsharded for each of Tunix's Gemma 4 weight layouts (fsdp
gathered, tp output kept local, tp contraction summed), forward and the
LoRA gradients, for the XLA version and the Pallas kernel (interpret mode).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import ops
from gemma4_jax import testing

SCALE = 2.0
# (equation, x shape, w shape, Tunix's w sharding)
LAYOUTS = [
    ("BTD,NDH->BTNH", (4, 3, 16), (4, 16, 8), ("tp", "fsdp", None)),
    ("BSD,CKDH->CBSKH", (4, 3, 16), (2, 2, 16, 8), (None, "tp", "fsdp", None)),
    ("BTNH,NHD->BTD", (4, 3, 4, 8), (4, 8, 16), ("tp", None, "fsdp")),
    ("mk,kn->mn", (8, 16), (16, 24), ("fsdp", "tp")),   # MLP gate/up
    ("mk,kn->mn", (8, 24), (24, 16), ("tp", "fsdp")),   # MLP down
    ("BTD,DNP->BTNP", (4, 3, 16), (16, 3, 8), ("fsdp", None, "tp")),
]


def _operands(equation, x_shape, w_shape, rank=4, seed=0):
  rng = np.random.default_rng(seed)
  lhs, rhs = equation.split("->")[0].split(",")
  size = dict(zip(lhs, x_shape)) | dict(zip(rhs, w_shape))
  a_shape = tuple(size[c] for c in rhs if c in lhs) + (rank,)
  b_shape = (rank,) + tuple(size[c] for c in rhs if c not in lhs)
  return tuple(jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
               for s in (x_shape, w_shape, a_shape, b_shape))


@pytest.mark.parametrize("implementation, interpret", [
    ("xla", False), ("pallas_tpu", True)])
@pytest.mark.parametrize("equation, x_shape, w_shape, w_axes", LAYOUTS)
def test_sharded_equals_unsharded(equation, x_shape, w_shape, w_axes,
                                  implementation, interpret):
  x, w, a, b = _operands(equation, x_shape, w_shape)
  _assert_sharded_equals_unsharded(
      lambda x, a, b, mesh: ops.lora_einsum(
          equation, x, w, a, b, scale=SCALE, mesh=mesh,
          w_axes=w_axes if mesh else None, implementation=implementation,
          interpret=interpret), x, a, b)


def _assert_sharded_equals_unsharded(op, x, a, b):
  """`op(x, a, b, mesh)`'s output and (dx, da, db) with and without the
  simulated mesh; returns the sharded (da, db)."""
  def loss(x, a, b, mesh):
    out = op(x, a, b, mesh)
    return jnp.sum(jnp.sin(out)), out

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True),
                 static_argnums=3)
  (dx, da, db), out = grad(x, a, b, None)
  (sdx, sda, sdb), sout = grad(x, a, b, testing.simulated_mesh())
  testing.assert_close(sout, out, name="out")
  for name, got, want in (("dx", sdx, dx), ("da", sda, da), ("db", sdb, db)):
    testing.assert_close(got, want, grad=True, name=name)
  return sda, sdb


def test_shard_map_splits_the_batch_and_sums_tp_contractions():
  equation, x_shape, w_shape, w_axes = LAYOUTS[4]  # MLP down: K over tp
  x, w, a, b = _operands(equation, x_shape, w_shape)
  mesh = testing.simulated_mesh()
  text = jax.jit(lambda x: ops.lora_einsum(
      equation, x, w, a, b, scale=SCALE, mesh=mesh, w_axes=w_axes,
      implementation="xla")).lower(x).compile().as_text()
  assert "all-reduce" in text
  assert "f32[4,12]" in text  # x's local block: rows over fsdp, K over tp


@pytest.mark.parametrize("implementation, interpret", [
    ("xla", False), ("pallas_tpu", True)])
@pytest.mark.parametrize("w_axes", [("fsdp", "tp"), ("tp", "fsdp")])
def test_many_adapters_sharded_equals_unsharded(w_axes, implementation,
                                                interpret):
  # Rows over fsdp with their adapter ids; w (and each adapter) split over
  # tp on the output (MLP gate/up) or the contraction (MLP down, psum).
  rng = np.random.default_rng(1)
  num, rank, (m, k, n) = 4, 4, (8, 16, 24)
  x, a, b = (jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
             for s in ((m, k), (num, k, rank), (num, rank, n)))
  w = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
  w_scale = jnp.asarray(rng.uniform(0.001, 0.01, n), jnp.float32)
  ids = jnp.asarray([0, 2, 1, 2, 0, 0, 1, 2], jnp.int32)  # adapter 3 unused
  sda, sdb = _assert_sharded_equals_unsharded(
      lambda x, a, b, mesh: ops.lora_matmul(
          x, w, a, b, scale=SCALE, adapter_ids=ids, w_scale=w_scale,
          mesh=mesh, w_axes=w_axes if mesh else None,
          implementation=implementation, interpret=interpret), x, a, b)
  # An adapter gets a gradient from its own rows only.
  assert np.all(np.any(np.asarray(sda)[:3] != 0, axis=(1, 2)))
  assert not np.any(np.asarray(sda)[3]) and not np.any(np.asarray(sdb)[3])


def test_mesh_needs_w_axes():
  x, w, a, b = _operands("mk,kn->mn", (8, 16), (16, 24))
  with pytest.raises(ValueError, match="w_axes must name a mesh axis"):
    ops.lora_matmul(x, w, a, b, scale=SCALE,
                    mesh=testing.simulated_mesh(), implementation="xla")


@pytest.mark.parametrize("enter", [jax.set_mesh, lambda mesh: mesh],
                         ids=["set_mesh", "with_mesh"])
def test_mesh_in_context_shards_only_with_w_axes(enter):
  # mesh=None is the mesh in context (`jax.set_mesh`, or `with mesh:` as
  # Tunix's trainers use); the op splits w only where w_axes says how it
  # lies on that mesh, and runs unsharded without them.
  equation, x_shape, w_shape, w_axes = LAYOUTS[4]  # MLP down: K over tp
  x, w, a, b = _operands(equation, x_shape, w_shape)
  want = ops.lora_matmul(x, w, a, b, scale=SCALE, implementation="xla")
  with enter(testing.simulated_mesh()):
    sharded = jax.jit(lambda x: ops.lora_matmul(
        x, w, a, b, scale=SCALE, w_axes=w_axes, implementation="xla"))
    unsharded = jax.jit(lambda x: ops.lora_matmul(
        x, w, a, b, scale=SCALE, implementation="xla"))
    sharded_text = sharded.lower(x).compile().as_text()
    unsharded_text = unsharded.lower(x).compile().as_text()
    testing.assert_close(sharded(x), want, name="sharded")
    testing.assert_close(unsharded(x), want, name="unsharded")
  assert "all-reduce" in sharded_text
  assert "f32[4,12]" in sharded_text  # rows over fsdp, K over tp
  assert "all-reduce" not in unsharded_text
