"""`ops.attention` under the simulated 4-device ('fsdp', 'tp') mesh: the
sharded op equals the unsharded one, outputs and gradients, including the
cases that replicate an axis (K/V with fewer heads than tp, a batch or head
count the mesh does not divide), and its forward needs no collective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma4_jax import ops
from gemma4_jax import testing

# (batch, query heads, kv heads, mask form)
CASES = [
    (2, 8, 1, "rank3"),       # E2B-like MQA: K/V replicated, one head picked
    (2, 8, 2, "heads"),       # GQA 8:2, K/V split with q; per-head mask
    (4, 4, 4, "rank2"),       # MHA, a [T,S] mask (replicated)
    (3, 8, 1, "segments"),    # batch 3 does not divide fsdp=2: replicated
    (2, 6, 3, "rank4"),       # 3 heads per tp shard straddle KV heads
]


def _inputs(batch, num_heads, num_kv_heads, form, *, seed=0, t=24, h=64):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, t, num_heads, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, t, num_kv_heads, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, t, num_kv_heads, h)), jnp.float32)
  valid = np.ones((batch, t), bool)
  valid[-1, :5] = False  # left padding
  pair = valid[:, None, :] & valid[:, :, None]
  kwargs = {}
  if form == "rank3":
    kwargs["mask"] = pair
  elif form == "rank4":
    kwargs["mask"] = pair[:, None]
  elif form == "rank2":
    kwargs["mask"] = np.tril(np.ones((t, t), bool)) | np.eye(t, k=3, dtype=bool)
  elif form == "heads":
    kwargs["mask"] = pair[:, None] & (rng.random((batch, num_heads, t, t))
                                      > 0.3)
  else:
    kwargs["segment_ids"] = jnp.asarray(
        (np.arange(t)[None, :] >= rng.integers(0, t, (batch, 1))).astype(
            np.int32))
  kwargs = {name: jnp.asarray(x) for name, x in kwargs.items()}
  return q, k, v, kwargs


def _loss_and_grads(q, k, v, kwargs, cotangent):
  def loss(q, k, v):
    out = ops.attention(q, k, v, sliding_window=16, softcap=20.0, scale=0.2,
                        implementation="xla", **kwargs)
    return jnp.sum(out * cotangent), out
  (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


@pytest.mark.parametrize("batch, num_heads, num_kv_heads, form", CASES)
def test_sharded_equals_unsharded(batch, num_heads, num_kv_heads, form):
  q, k, v, kwargs = _inputs(batch, num_heads, num_kv_heads, form)
  cotangent = jax.random.normal(jax.random.key(1), q.shape) * 0.1
  unsharded = jax.jit(_loss_and_grads)(q, k, v, kwargs, cotangent)
  mesh = testing.simulated_mesh()
  act = NamedSharding(mesh, P("fsdp" if batch % 2 == 0 else None, None,
                              "tp" if num_kv_heads % 2 == 0 else None))
  with jax.set_mesh(mesh):
    placed = [jax.device_put(x, act) for x in (q, k, v)]
    sharded = jax.jit(_loss_and_grads)(*placed, kwargs, cotangent)
  for name, a, b in zip(("out", "dq", "dk", "dv"),
                        (sharded[0], *sharded[1]),
                        (unsharded[0], *unsharded[1])):
    testing.assert_close(a, b, online_softmax=True, grad=name != "out",
                         name=name)


def test_forward_needs_no_collective_and_keeps_tunix_layout():
  """E2B-like MQA with batch-sharded inputs: no all-gather, no all-reduce;
  the output comes out as Tunix's act_btnh, P('fsdp', None, 'tp', None)."""
  q, k, v, kwargs = _inputs(4, 8, 1, "rank3")
  mesh = testing.simulated_mesh()
  forward = jax.jit(lambda q, k, v, mask: ops.attention(
      q, k, v, mask=mask, sliding_window=16, implementation="xla"))
  with jax.set_mesh(mesh):
    args = [jax.device_put(x, NamedSharding(mesh, P("fsdp")))
            for x in (q, k, v, kwargs["mask"])]
    hlo = forward.lower(*args).compile().as_text()
    out = forward(*args)
  assert "all-gather" not in hlo and "all-reduce" not in hlo
  assert out.sharding.spec[:3] == ("fsdp", None, "tp")
