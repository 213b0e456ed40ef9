"""`ops.softcapped_cross_entropy` compiled for abstract TPU chips.

Gemma 4 E2B shapes (D = 1536, V = 262144, bf16), 4 x 1024 tokens, as
`ShapeDtypeStruct`s on v5e chips (no memory). With `implementation=None`
the op must pick the Pallas kernels when lowered for TPU from this CPU host,
Mosaic must accept them, and the per-chip HBM temporaries must stay at most
those of Tunix's loss (f32 logits, one-hot, log-softmax) and of our XLA
version compiled the same way (plus the stated slack of the kernels'
per-token rows).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from gemma4_jax import ops
from gemma4_jax import testing

pytestmark = pytest.mark.skipif(testing.libtpu_missing() is not None,
                                reason=str(testing.libtpu_missing()))

E2B = dict(batch=4, seq=1024, dim=1536, vocab=262144)
MiB = 2**20


def _args(mesh, dtype=jnp.bfloat16):
  # Tunix's shardings: activations over fsdp, the tied embedding [V, D]
  # vocab over tp and D over fsdp.
  token_spec = P("fsdp") if mesh is not None else None
  s = lambda shape, dt, spec: testing.tpu_struct(shape, dt, spec, mesh=mesh)
  return (s((E2B["batch"], E2B["seq"], E2B["dim"]), dtype, token_spec),
          s((E2B["vocab"], E2B["dim"]), dtype,
            P("tp", "fsdp") if mesh is not None else None),
          s((E2B["batch"], E2B["seq"]), jnp.int32, token_spec),
          s((E2B["batch"], E2B["seq"]), jnp.float32, token_spec))


def _loss(implementation):
  def loss(hidden, embedding, targets, weights):
    total, count = ops.softcapped_cross_entropy(
        hidden, embedding, targets, weights, softcap=30.0,
        implementation=implementation)
    return total / (count + 1e-8)
  return loss


def _stock_loss(hidden, embedding, targets, weights):
  # Tunix's default SFT loss on Gemma 4's tied, softcapped logits.
  logits = jnp.einsum("btd,vd->btv", hidden, embedding).astype(jnp.float32)
  logits = jnp.tanh(logits / 30.0) * 30.0
  one_hot = jax.nn.one_hot(targets, logits.shape[-1])
  nll = -jnp.sum(jax.nn.log_softmax(logits) * one_hot, axis=-1)
  return jnp.sum(nll * weights) / (jnp.sum(weights) + 1e-8)


@pytest.mark.parametrize("on_mesh", [False, True], ids=["chip", "v5e_2x2"])
def test_default_compiles_with_kernels_and_no_more_hbm(on_mesh):
  mesh = testing.tpu_mesh() if on_mesh else None
  args = _args(mesh)
  # LoRA training: the hidden gradient only (forward + one backward kernel).
  grad = lambda loss: jax.grad(loss)
  pallas = testing.compile_for_tpu(grad(_loss(None)), *args, mesh=mesh)
  assert testing.mosaic_kernels(pallas) == 2
  xla = testing.compile_for_tpu(grad(_loss("xla")), *args, mesh=mesh)
  assert testing.mosaic_kernels(xla) == 0
  stock = testing.compile_for_tpu(grad(_stock_loss), *args, mesh=mesh)
  used, by_xla, by_stock = (testing.temp_bytes(c) for c in (pallas, xla,
                                                            stock))
  assert used <= by_stock, (used / MiB, by_stock / MiB)
  # Slack: the kernels pass per-token float32 values (the forward's three
  # statistics, the backward's logsumexp, scale and targets) as [1, N]
  # rows, which HBM pads to 8 sublanes.
  chips = 1 if mesh is None else mesh.size
  slack = 3 * E2B["batch"] * E2B["seq"] * 8 * 4 // chips
  assert used <= by_xla + slack, (used / MiB, by_xla / MiB, slack / MiB)


def test_embedding_gradient_compiles_on_v6e():
  # Full fine-tuning differentiates the tied embedding too: three kernels.
  v6e = jax.sharding.SingleDeviceSharding(testing.tpu_devices("v6e:2x2")[0])
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=v6e)
          for a in _args(None)]
  both = jax.grad(_loss(None), argnums=(0, 1))
  assert testing.mosaic_kernels(testing.compile_for_tpu(both, *args)) == 3
