"""`ops.ple_lookup` / `ops.per_layer_inputs` (Pallas in interpret mode and
XLA) against the float32 reference, and the kernel's TPU lowering at E2B."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gemma4_jax import ops, testing
from gemma4_jax.kernels.ple import combine as ple_combine
from gemma4_jax.kernels.ple import pallas_tpu
from gemma4_jax.kernels.ple import xla as ple_xla
from gemma4_jax.reference import ple as ple_reference

IMPLEMENTATIONS = [
    pytest.param(dict(implementation="pallas_tpu", interpret=True),
                 id="pallas_interpret"),
    pytest.param(dict(implementation="xla"), id="xla"),
]


def _problem(seed, *, batch, seq_len, vocab, num_layers, per_layer_dim,
             embed_dim=8, flat=False, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shape = ((vocab, num_layers * per_layer_dim) if flat
           else (vocab, num_layers, per_layer_dim))
  # Ids from -3 to V+2: negative and out-of-range ones read row 0.
  tokens = rng.integers(-3, vocab + 3, (batch, seq_len)).astype(np.int32)
  tokens.flat[0] = -1
  return dict(
      embeddings=jnp.asarray(rng.standard_normal((batch, seq_len, embed_dim)),
                             dtype),
      tokens=jnp.asarray(tokens),
      per_layer_table=jnp.asarray(rng.standard_normal(shape), dtype),
      model_projection=jnp.asarray(
          rng.standard_normal((embed_dim, *shape[1:])), dtype),
      projection_norm_scale=jnp.asarray(
          rng.standard_normal(per_layer_dim), dtype))


@pytest.mark.parametrize("kwargs", IMPLEMENTATIONS)
@given(batch=st.sampled_from([1, 3]), seq_len=st.sampled_from([1, 5, 13]),
       num_layers=st.sampled_from([1, 3]),
       per_layer_dim=st.sampled_from([4, 128]), flat=st.booleans(),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 2**16))
def test_lookup_is_the_reference_gather(kwargs, batch, seq_len, num_layers,
                                        per_layer_dim, flat, dtype, seed):
  p = _problem(seed, batch=batch, seq_len=seq_len, vocab=11,
               num_layers=num_layers, per_layer_dim=per_layer_dim, flat=flat,
               dtype=dtype)
  dims = dict(num_layers=num_layers, per_layer_dim=per_layer_dim)
  out = ops.ple_lookup(p["per_layer_table"], p["tokens"], **dims, **kwargs)
  expected = ple_reference.ple_lookup(p["per_layer_table"], p["tokens"],
                                      **dims)
  assert out.dtype == dtype
  # A gather moves bits: exact, in any dtype.
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(expected, np.float32))


@pytest.mark.parametrize("kwargs", IMPLEMENTATIONS)
@given(batch=st.sampled_from([1, 2]), seq_len=st.sampled_from([3, 7]),
       num_layers=st.sampled_from([1, 3]), per_layer_dim=st.sampled_from([4, 8]),
       flat=st.booleans(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 2**16))
def test_per_layer_inputs_and_gradients_match_reference(
    kwargs, batch, seq_len, num_layers, per_layer_dim, flat, dtype, seed):
  p = _problem(seed, batch=batch, seq_len=seq_len, vocab=7,
               num_layers=num_layers, per_layer_dim=per_layer_dim, flat=flat,
               dtype=dtype)
  dims = dict(num_layers=num_layers, per_layer_dim=per_layer_dim)
  tokens = p.pop("tokens")
  cotangent = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(
      (batch, seq_len, num_layers, per_layer_dim)), jnp.float32)

  def loss(fn, params):
    out = fn(tokens=tokens, **params, **dims)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  ours = functools.partial(ops.per_layer_inputs, **kwargs)
  (_, out), grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, ours), has_aux=True))(p)
  # The reference in float32 from the same (possibly bf16-rounded) inputs.
  p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p)
  (_, expected), expected_grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, ple_reference.per_layer_inputs),
      has_aux=True))(p32)
  assert out.dtype == dtype
  testing.assert_close(out, expected, dtype=dtype, name="per_layer_inputs")
  for name in p:
    assert grads[name].dtype == dtype, name
    ref_grad = expected_grads[name]
    # The table's gradient and d/d(norm scale) are sums over tokens; bf16
    # inputs to the projection make bf16 the tolerance's scale throughout.
    testing.assert_close(grads[name], ref_grad, dtype=dtype, grad=True,
                         name=f"d/d {name}")


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


def test_block_sizes_validate():
  with pytest.raises(ValueError, match="block_tokens"):
    pallas_tpu.BlockSizes(block_tokens=24)
  with pytest.raises(ValueError, match="in_flight"):
    pallas_tpu.BlockSizes(in_flight=0)


def _good():
  p = _problem(0, batch=2, seq_len=5, vocab=11, num_layers=3, per_layer_dim=4)
  return dict(p, num_layers=3, per_layer_dim=4)


@pytest.mark.parametrize("change, error, match", [
    (dict(tokens=jnp.zeros((2, 5), jnp.float32)), TypeError,
     "tokens must be an integer"),
    (dict(tokens=jnp.zeros((10,), jnp.int32)), ValueError,
     r"tokens must be \[B, T\]"),
    (dict(per_layer_table=jnp.ones((11, 13))), ValueError, "per_layer_table"),
    (dict(per_layer_table=jnp.ones((11,))), ValueError, "per_layer_table"),
    (dict(per_layer_table=jnp.ones((11, 3, 4, 1))), ValueError,
     "per_layer_table"),
    (dict(per_layer_table=jnp.ones((11, 4, 3))), ValueError,
     "does not match"),
    (dict(embeddings=jnp.ones((2, 4, 8))), ValueError, "disagree"),
    (dict(model_projection=jnp.ones((8, 4, 3))), ValueError,
     "model_projection"),
    (dict(projection_norm_scale=jnp.ones((3,))), ValueError,
     "projection_norm_scale"),
    (dict(per_layer_dim=0), ValueError, "per_layer_dim"),
    (dict(implementation="cuda"), ValueError, "unknown implementation"),
    (dict(implementation="pallas_tpu"), RuntimeError, "interpret=True"),
])
def test_bad_inputs_raise(change, error, match):
  with pytest.raises(error, match=match):
    ops.per_layer_inputs(**{**_good(), **change})


def test_combine_after_own_projection_equals_whole_op():
  p = _problem(5, batch=2, seq_len=3, vocab=7, num_layers=3, per_layer_dim=4)
  dims = dict(num_layers=3, per_layer_dim=4)
  whole = ops.per_layer_inputs(**p, **dims, implementation="xla")
  w = p["model_projection"] * 8 ** -0.5
  projected = jnp.einsum("btd,dlp->btlp", p["embeddings"], w)
  rows = ops.ple_lookup(p["per_layer_table"], p["tokens"], **dims,
                        implementation="xla")
  combined = ops.combine_per_layer_inputs(projected, rows,
                                          p["projection_norm_scale"])
  testing.assert_close(combined, whole, name="combine")


@pytest.mark.parametrize("change, error, match", [
    (dict(projected=jnp.ones((2, 3, 12))), ValueError, r"\[B, T, L, P\]"),
    (dict(rows=jnp.ones((2, 3, 3, 5))), ValueError, "rows must have"),
    (dict(rows=jnp.ones((2, 3, 3, 4), jnp.int32)), TypeError, "rows"),
    (dict(projection_norm_scale=jnp.ones((3,))), ValueError,
     "projection_norm_scale"),
])
def test_combine_bad_inputs_raise(change, error, match):
  good = dict(projected=jnp.ones((2, 3, 3, 4)), rows=jnp.ones((2, 3, 3, 4)),
              projection_norm_scale=jnp.ones((4,)))
  with pytest.raises(error, match=match):
    ops.combine_per_layer_inputs(**{**good, **change})
