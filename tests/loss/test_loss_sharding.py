"""The fused loss under the simulated 4-device `('fsdp', 'tp')` mesh.

Tokens split over `fsdp`, vocab over `tp`: per-shard partial max/sum-exp and
target logits combined over `tp` must give the unsharded values and
gradients.
"""

import jax
import loss_cases
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.kernels.loss import pallas_tpu
from gemma4_jax.kernels.loss import xla

BLOCKS = {"xla": xla.BlockSizes(4, 64),
          "pallas_tpu": pallas_tpu.BlockSizes(16, 128)}


def _value_and_grads(implementation, mesh=None):
  def loss(h, e, t, w):
    return ops.softcapped_cross_entropy(
        h, e, t, w, implementation=implementation, interpret=True,
        block_sizes=BLOCKS[implementation], mesh=mesh)[0]
  return jax.value_and_grad(loss, argnums=(0, 1))


@pytest.mark.parametrize("implementation", ["xla", "pallas_tpu"])
@pytest.mark.parametrize("vocab", [512, 301])
def test_sharded_equals_unsharded(implementation, vocab):
  args = loss_cases.problem(0, batch=4, seq=6, dim=16, vocab=vocab)
  expected, expected_grads = jax.jit(_value_and_grads(implementation))(*args)
  mesh = testing.simulated_mesh()
  # As under Tunix: embedding ('tp', 'fsdp'), activations batch-sharded.
  embedding_spec = P("tp", "fsdp") if vocab % 2 == 0 else P(None, "fsdp")
  placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(
      args, (P("fsdp"), embedding_spec, P("fsdp"), P("fsdp")))]
  with jax.set_mesh(mesh):
    fn = jax.jit(_value_and_grads(implementation))
    jaxpr = str(jax.make_jaxpr(fn)(*placed))
    value, grads = fn(*placed)
  # 301 ids do not split over tp=2: the vocab is then replicated.
  assert jaxpr.count("shard_map") == 2  # forward and backward
  assert ("psum" in jaxpr and "pmax" in jaxpr) == (vocab == 512)
  testing.assert_close(value, expected, online_softmax=True, name="loss")
  for name, grad, expected_grad in zip(("d hidden", "d embedding"), grads,
                                       expected_grads):
    testing.assert_close(grad, expected_grad, grad=True, online_softmax=True,
                         name=name)
