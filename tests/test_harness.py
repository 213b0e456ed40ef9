"""The test harness itself: tolerances catch errors, TPU lowering, the mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma4_jax import ops
from gemma4_jax import testing


def test_assert_close_uses_the_dtype_table():
  ref = np.ones(4, np.float32)
  testing.assert_close(ref + 9e-6, ref, dtype=jnp.float32)  # 1e-5 + 1e-5*1
  with pytest.raises(AssertionError, match="outside"):
    testing.assert_close(ref + 3e-5, ref, dtype=jnp.float32)
  testing.assert_close(ref + 3e-5, ref, dtype=jnp.float32, grad=True)
  testing.assert_close(ref + 0.03, ref, dtype=jnp.bfloat16)
  with pytest.raises(AssertionError, match="outside"):
    testing.assert_close(ref + 0.05, ref, dtype=jnp.bfloat16)
  with pytest.raises(AssertionError, match="non-finite"):
    testing.assert_close(ref * np.nan, ref, dtype=jnp.float32)
  with pytest.raises(AssertionError, match="shape"):
    testing.assert_close(ref[:2], ref, dtype=jnp.float32)


def test_assert_model_close_bounds_by_stock_float32_error():
  stock64 = np.linspace(-2.0, 2.0, 101)
  noise = np.where(np.arange(101) == 50, 1e-4, 0.0)  # stock's float32 error
  stock = stock64 + noise
  floor = testing.MODEL_ERROR_FLOOR_ULPS * np.finfo(np.float32).eps * 2.0
  bound = testing.MODEL_ERROR_MULTIPLE * 1e-4 + floor
  # The error may sit on another element than stock's, up to the bound.
  error, got_bound = testing.assert_model_close(
      stock64 - 0.99 * bound * (np.arange(101) == 3), stock, stock64)
  np.testing.assert_allclose((error, got_bound), (0.99 * bound, bound))
  with pytest.raises(AssertionError, match=r"bound is 8 x 0.0001"):
    testing.assert_model_close(stock64 + 1.01 * bound, stock, stock64)
  # Stock exact: only the floor of a few ulps of max|stock64| is allowed.
  testing.assert_model_close(stock64 + 0.9 * floor, stock64, stock64)
  with pytest.raises(AssertionError, match="from float64"):
    testing.assert_model_close(stock64 + 1.1 * floor, stock64, stock64)
  # Pytrees, leaf by leaf, named in the error.
  tree = lambda x: {"a": x, "b": [2 * stock64]}
  testing.assert_model_close(tree(stock), tree(stock), tree(stock64))
  with pytest.raises(AssertionError, match=r"grads\['b'\]\[0\]"):
    testing.assert_model_close({"a": stock, "b": [2 * stock64 + 1e-3]},
                               tree(stock), tree(stock64), name="grads")
  with pytest.raises(AssertionError, match="structure"):
    testing.assert_model_close({"a": stock}, tree(stock), tree(stock64))
  with pytest.raises(AssertionError, match="non-finite"):
    testing.assert_model_close(stock * np.nan, stock, stock64)


def test_perturbed_stock_runs_widen_the_noise_to_their_spread():
  stock64 = np.linspace(-2.0, 2.0, 101)
  stock = stock64 + 1e-6  # a lucky rounding: 1e-6 from float64
  perturbed = [stock + 3e-5 * (np.arange(101) == 7), stock - 1e-5]
  floor = testing.MODEL_ERROR_FLOOR_ULPS * np.finfo(np.float32).eps * 2.0
  bound = testing.MODEL_ERROR_MULTIPLE * 3e-5 + floor
  actual = stock64 + 0.99 * bound
  with pytest.raises(AssertionError, match="from float64"):
    testing.assert_model_close(actual, stock, stock64)
  error, got_bound = testing.assert_model_close(actual, stock, stock64,
                                                perturbed=perturbed)
  np.testing.assert_allclose((error, got_bound), (0.99 * bound, bound))
  with pytest.raises(AssertionError, match=r"noise 3e-05"):
    testing.assert_model_close(stock64 + 1.01 * bound, stock, stock64,
                               perturbed=perturbed)
  with pytest.raises(AssertionError, match="structure"):
    testing.assert_model_close(actual, stock, stock64,
                               perturbed=[{"a": stock}])


def test_float16_probe_agrees_with_a_float16_computation():
  # Whatever the CPU: the probe says True iff other float16 code runs too.
  run = lambda: jax.jit(lambda x: jnp.sum(x * 3))(
      jnp.ones(4, jnp.float16)).block_until_ready()
  if testing.float16_compiles():
    assert float(run()) == 12
  else:
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match="Failed to materialize symbols"):
      run()


@pytest.mark.parametrize("head_dim, window", [(256, 512), (512, None)])
def test_attention_lowers_for_tpu_at_e2b_shapes(head_dim, window):
  # E2B: 8 query heads, 1 KV head; no 1/sqrt(H) scale; 4 x 1024 tokens.
  q = jax.ShapeDtypeStruct((4, 1024, 8, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4, 1024, 1, head_dim), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((4, 1024, 1024), jnp.bool_)
  exported = testing.lower_for_tpu(
      lambda q, k, v, m: ops.attention(q, k, v, mask=m, sliding_window=window,
                                       scale=1.0, implementation="xla"),
      q, kv, kv, mask)
  assert exported.platforms == ("tpu",)
  assert exported.out_avals[0].shape == (4, 1024, 8, head_dim)


def test_attention_is_unchanged_by_sharding_over_the_simulated_mesh():
  mesh = testing.simulated_mesh()
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(4, 24, 4, 32)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(4, 24, 1, 32)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(4, 24, 1, 32)), jnp.float32)
  mask = jnp.asarray(rng.random((4, 24, 24)) > 0.2)
  run = jax.jit(lambda q, k, v, m: ops.attention(q, k, v, mask=m,
                                                 sliding_window=8))
  want = run(q, k, v, mask)
  # Batch over 'fsdp' and query heads over 'tp', as Tunix's act_btnh does.
  shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  got = run(shard(q, P("fsdp", None, "tp", None)),
            shard(k, P("fsdp", None, None, None)),
            shard(v, P("fsdp", None, None, None)),
            shard(mask, P("fsdp", None, None)))
  assert len(got.sharding.device_set) == 4
  testing.assert_close(got, want, dtype=jnp.float32)
