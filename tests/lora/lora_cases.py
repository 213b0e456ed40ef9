"""The LoRA matmul's cases, shared by every implementation's tests.

One Hypothesis strategy (`CASES`) and input builder (`inputs`), and the
tests every implementation passes against the float32 reference
(`LoraMatmulCases`): outputs and the gradients dx, dA, dB; any M/K/N
(including non-multiples of 128 and dimensions larger than a tile), ranks
8-128, float32 and bfloat16, one or several adapters; an int8 weight; `W`
frozen; out-of-range ids under `jit`. Each implementation's test module
subclasses `LoraMatmulCases`, naming the implementation and overriding only
tolerances and skips.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st

from gemma4_jax import testing
from gemma4_jax.reference import lora as reference

SCALE = 0.75

CASES = st.fixed_dictionaries(dict(
    m=st.sampled_from([1, 5, 130, 300]),
    k=st.sampled_from([8, 100, 256, 200, 384]),
    n=st.sampled_from([24, 128, 200, 384]),
    rank=st.sampled_from([8, 16, 64, 128]),
    adapters=st.sampled_from([None, 1, 3]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16)))


def inputs(m, k, n, rank, adapters, dtype, seed):
  """`x, w, a, b, ids, cotangent`, scaled so the output, its parts and dA,
  dB are O(1)."""
  rng = np.random.default_rng(seed)
  def draw(shape, std):
    return jnp.asarray(rng.standard_normal(shape) * std, jnp.float32).astype(
        dtype)
  lead = () if adapters is None else (adapters,)
  x = draw((m, k), 1.0)
  w = draw((k, n), k ** -0.5)
  a = draw((*lead, k, rank), k ** -0.5)
  b = draw((*lead, rank, n), rank ** -0.5)
  ids = None if adapters is None else jnp.asarray(
      rng.integers(0, adapters, m), jnp.int32)
  # dA and dB sum over the m rows: a 1/sqrt(m) cotangent keeps them O(1),
  # so the absolute tolerance is not compared with float32 noise of O(10).
  cotangent = jnp.asarray(rng.standard_normal((m, n)) * m ** -0.5,
                          jnp.float32)
  return x, w, a, b, ids, cotangent


def value_and_grads(fn, x, w, a, b, ids, cotangent):
  """`fn`'s output and the gradients (dx, da, db) of `sum(out * ct)`."""
  def loss(x, a, b):
    out = fn(x, w, a, b, scale=SCALE, adapter_ids=ids)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, a, b)
  return out, grads


def small_args(**change):
  """`lora_matmul`'s keyword arguments for a tiny valid call with two
  adapters (`x [4, 8]`, `w [8, 6]`, rank 3), with `change` applied: the
  bad-input tests of the op and of the reference."""
  args = dict(x=jnp.ones((4, 8)), w=jnp.ones((8, 6)), a=jnp.ones((2, 8, 3)),
              b=jnp.ones((2, 3, 6)), scale=2.0,
              adapter_ids=jnp.array([0, 1, 1, 0]))
  return {**args, **change}


class LoraMatmulCases:
  """The tests of one LoRA matmul implementation against the reference.

  A subclass sets `lora_matmul` (`fn(x, w, a, b, *, scale, adapter_ids=None,
  w_scale=None)`) and may override `assert_close` (tolerances).
  """

  lora_matmul = None

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # Hypothesis refuses one test run from several classes (its executors):
    # each subclass gets its own.
    def test_matches_reference(self, case):
      self.check_matches_reference(case)
    cls.test_matches_reference = given(case=CASES)(test_matches_reference)

  def assert_close(self, actual, want, *, grad=False, name="output"):
    testing.assert_close(actual, want, grad=grad, name=name)

  def check_matches_reference(self, case):
    x, w, a, b, ids, cotangent = inputs(**case)
    ref_out, ref_grads = value_and_grads(reference.lora_matmul, x, w, a, b,
                                         ids, cotangent)
    out, grads = value_and_grads(self.lora_matmul, x, w, a, b, ids,
                                 cotangent)
    assert out.dtype == case["dtype"] and out.shape == (case["m"],
                                                        case["n"])
    self.assert_close(out, ref_out, name="out")
    for name, got, want in zip(("dx", "da", "db"), grads, ref_grads):
      assert got.dtype == want.dtype and got.shape == want.shape, name
      self.assert_close(got, want, grad=True, name=name)

  def test_int8_weight_dequantized_per_channel(self):
    x, w, a, b, _, cotangent = inputs(130, 256, 200, 16, None, jnp.float32,
                                      3)
    w_scale = jnp.max(jnp.abs(w), axis=0) / 127
    w_int8 = jnp.round(w / w_scale).astype(jnp.int8)
    quantized = lambda x, w, a, b, **kw: self.lora_matmul(
        x, w_int8, a, b, w_scale=w_scale, **kw)
    dequantized = lambda x, w, a, b, **kw: reference.lora_matmul(
        x, w_int8.astype(jnp.float32) * w_scale, a, b, **kw)
    out, grads = value_and_grads(quantized, x, w, a, b, None, cotangent)
    ref_out, ref_grads = value_and_grads(dequantized, x, w, a, b, None,
                                         cotangent)
    self.assert_close(out, ref_out, name="out")
    for name, got, want in zip(("dx", "da", "db"), grads, ref_grads):
      self.assert_close(got, want, grad=True, name=name)

  def test_w_is_frozen(self):
    x, w, a, b, _, _ = inputs(5, 8, 24, 8, None, jnp.float32, 0)
    d_w = jax.grad(lambda w: jnp.sum(self.lora_matmul(x, w, a, b,
                                                      scale=SCALE)))(w)
    np.testing.assert_array_equal(d_w, np.zeros_like(w))

  def test_out_of_range_adapter_under_jit_gets_the_base_product(self):
    x, w, a, b, _, _ = inputs(6, 8, 24, 8, 2, jnp.float32, 1)
    ids = jnp.array([0, 1, 2, -1, 1, 0], jnp.int32)
    out = jax.jit(lambda ids: self.lora_matmul(x, w, a, b, scale=SCALE,
                                               adapter_ids=ids))(ids)
    base = reference.lora_matmul(x, w, a[0], 0 * b[0], scale=SCALE)
    self.assert_close(out[2:4], base[2:4], name="no adapter")
    self.assert_close(out[:2], reference.lora_matmul(
        x, w, a, b, scale=SCALE, adapter_ids=jnp.clip(ids, 0, 1))[:2])
