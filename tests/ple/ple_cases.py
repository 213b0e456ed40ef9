"""The PLE cases every implementation's tests share: one input builder, one
Hypothesis case strategy, and the tests each implementation runs on them.

`test_ple_xla.py` and `test_ple_pallas_tpu.py` subclass
`ImplementationTests`, overriding only how the op is called (and would
override tolerances and skips, if one needed others).
"""

import functools

from hypothesis import given, strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import ops, testing
from gemma4_jax.reference import ple as ple_reference


def problem(seed, *, batch, seq_len, vocab, num_layers, per_layer_dim,
            embed_dim=8, flat=False, dtype=jnp.float32):
  """The arguments of `ops.per_layer_inputs`, drawn from `seed`."""
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


def cases(*, batch, seq_len, per_layer_dim):
  """`@given` keyword strategies: the sizes `problem` takes but V, either
  table layout, float32 and bfloat16."""
  return dict(batch=st.sampled_from(batch), seq_len=st.sampled_from(seq_len),
              num_layers=st.sampled_from([1, 3]),
              per_layer_dim=st.sampled_from(per_layer_dim),
              flat=st.booleans(),
              dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
              seed=st.integers(0, 2**16))


# The lookup alone: one token to several blocks, and full 128-lane rows.
LOOKUP_CASES = cases(batch=[1, 3], seq_len=[1, 5, 13], per_layer_dim=[4, 128])
# The whole per-layer inputs with gradients.
PER_LAYER_INPUTS_CASES = cases(batch=[1, 2], seq_len=[3, 7],
                               per_layer_dim=[4, 8])


class ImplementationTests:
  """The public ops run by one implementation against the reference.

  A subclass sets `KWARGS` (the ops' `implementation=` and `interpret=`)
  and may override `assert_close` (tolerances).
  """

  KWARGS: dict = {}

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # Hypothesis refuses one test run from several classes (its executors):
    # each subclass gets its own.
    def test_lookup_is_the_reference_gather(self, **case):
      self.check_lookup_is_the_reference_gather(**case)

    def test_per_layer_inputs_and_gradients_match_reference(self, **case):
      self.check_per_layer_inputs_and_gradients_match_reference(**case)

    cls.test_lookup_is_the_reference_gather = given(**LOOKUP_CASES)(
        test_lookup_is_the_reference_gather)
    cls.test_per_layer_inputs_and_gradients_match_reference = given(
        **PER_LAYER_INPUTS_CASES)(
            test_per_layer_inputs_and_gradients_match_reference)

  def assert_close(self, actual, want, *, dtype, grad=False, name="output"):
    testing.assert_close(actual, want, dtype=dtype, grad=grad, name=name)

  def check_lookup_is_the_reference_gather(self, *, batch, seq_len,
                                           num_layers, per_layer_dim, flat,
                                           dtype, seed):
    p = problem(seed, batch=batch, seq_len=seq_len, vocab=11,
                num_layers=num_layers, per_layer_dim=per_layer_dim, flat=flat,
                dtype=dtype)
    dims = dict(num_layers=num_layers, per_layer_dim=per_layer_dim)
    out = ops.ple_lookup(p["per_layer_table"], p["tokens"], **dims,
                         **self.KWARGS)
    expected = ple_reference.ple_lookup(p["per_layer_table"], p["tokens"],
                                        **dims)
    assert out.dtype == dtype
    # A gather moves bits: exact, in any dtype.
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(expected, np.float32))

  def check_per_layer_inputs_and_gradients_match_reference(
      self, *, batch, seq_len, num_layers, per_layer_dim, flat, dtype, seed):
    p = problem(seed, batch=batch, seq_len=seq_len, vocab=7,
                num_layers=num_layers, per_layer_dim=per_layer_dim, flat=flat,
                dtype=dtype)
    dims = dict(num_layers=num_layers, per_layer_dim=per_layer_dim)
    tokens = p.pop("tokens")
    cotangent = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(
        (batch, seq_len, num_layers, per_layer_dim)), jnp.float32)

    def loss(fn, params):
      out = fn(tokens=tokens, **params, **dims)
      return jnp.sum(out.astype(jnp.float32) * cotangent), out

    ours = functools.partial(ops.per_layer_inputs, **self.KWARGS)
    (_, out), grads = jax.jit(jax.value_and_grad(
        functools.partial(loss, ours), has_aux=True))(p)
    # The reference in float32 from the same (possibly bf16-rounded) inputs.
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p)
    (_, expected), expected_grads = jax.jit(jax.value_and_grad(
        functools.partial(loss, ple_reference.per_layer_inputs),
        has_aux=True))(p32)
    assert out.dtype == dtype
    self.assert_close(out, expected, dtype=dtype, name="per_layer_inputs")
    for name in p:
      assert grads[name].dtype == dtype, name
      ref_grad = expected_grads[name]
      # The table's gradient and d/d(norm scale) are sums over tokens; bf16
      # inputs to the projection make bf16 the tolerance's scale throughout.
      self.assert_close(grads[name], ref_grad, dtype=dtype, grad=True,
                        name=f"d/d {name}")
