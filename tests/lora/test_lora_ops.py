"""`ops.lora_matmul` / `ops.lora_einsum`: selection, einsum forms, bad input."""

import jax
import jax.numpy as jnp
import lora_cases
import numpy as np
import pytest

from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.reference import lora as reference

SIZES = {"B": 2, "T": 3, "S": 3, "D": 40, "N": 2, "K": 2, "C": 2, "H": 128,
         "P": 16, "X": 256}
# Every form qwix LoRA produces on Gemma 4 (H=128: the grouped layout; H=32:
# group widths below a lane tile, so w is transposed to [K, N] instead).
FORMS = ["BTD,NDH->BTNH", "BSD,CKDH->CBSKH", "BSD,KDH->BSKH",
         "BTNH,NHD->BTD", "BTD,DNP->BTNP", "BTD,DX->BTX", "BTP,PD->BTD"]


def _einsum_operands(equation, head_dim, rank=4, seed=0):
  sizes = dict(SIZES, H=head_dim)
  rng = np.random.default_rng(seed)
  lhs, rhs = equation.split("->")[0].split(",")
  def draw(axes, extra=(), std=1.0):
    shape = tuple(sizes[c] for c in axes) + extra
    return jnp.asarray(rng.standard_normal(shape) * std, jnp.float32)
  a_axes = "".join(c for c in rhs if c in lhs)
  b_axes = "".join(c for c in rhs if c not in lhs)
  k = int(np.prod([sizes[c] for c in a_axes]))
  return (draw(lhs), draw(rhs, std=k ** -0.5),
          draw(a_axes, (rank,), k ** -0.5),
          draw("", (rank,) + tuple(sizes[c] for c in b_axes), rank ** -0.5))


# The XLA version does not depend on the layout: one head dim is enough.
@pytest.mark.parametrize("head_dim, implementation", [
    (128, "pallas_tpu"), (32, "pallas_tpu"), (128, "xla")])
@pytest.mark.parametrize("equation", FORMS)
def test_einsum_forms_match_reference(equation, head_dim, implementation):
  x, w, a, b = _einsum_operands(equation, head_dim)
  def run(fn, x, a, b):
    out = fn(x, a, b)
    return jnp.sum(jnp.sin(out)), out
  ours = lambda x, a, b: ops.lora_einsum(
      equation, x, w, a, b, scale=2.0, implementation=implementation,
      interpret=True)
  ref = lambda x, a, b: reference.lora_einsum(equation, x, w, a, b,
                                              scale=2.0)
  grads, out = jax.grad(run, argnums=(1, 2, 3), has_aux=True)(ours, x, a, b)
  ref_grads, ref_out = jax.grad(run, argnums=(1, 2, 3), has_aux=True)(
      ref, x, a, b)
  testing.assert_close(out, ref_out, name=equation)
  for name, got, want in zip(("dx", "da", "db"), grads, ref_grads):
    testing.assert_close(got, want, grad=True, name=name)


def test_moe_expert_einsum_is_not_expressed():
  assert ops.lora_einsum_plan("EBD,EDF->EBF", (4, 8, 16), (4, 16, 32)) is None
  with pytest.raises(ValueError, match="cannot express 'EBD,EDF->EBF'"):
    ops.lora_einsum("EBD,EDF->EBF", jnp.ones((4, 8, 16)),
                    jnp.ones((4, 16, 32)), jnp.ones((4, 16, 2)),
                    jnp.ones((2, 32)), scale=1.0)


def test_default_on_cpu_is_xla_and_interpret_selects_pallas():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 6))
  a, b = jnp.ones((8, 2)), jnp.ones((2, 6))
  expected = reference.lora_matmul(x, w, a, b, scale=0.5)
  for kwargs in ({}, {"interpret": True}, {"implementation": "reference"}):
    testing.assert_close(ops.lora_matmul(x, w, a, b, scale=0.5, **kwargs),
                         expected)
  with pytest.raises(RuntimeError, match="lora_matmul: implementation "
                     "'pallas_tpu' can only be lowered for TPU"):
    ops.lora_matmul(x, w, a, b, scale=0.5, implementation="pallas_tpu")


def test_leading_axes_are_rows():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  w, a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((8, 6), (3, 8, 2), (3, 2, 6)))
  ids = jnp.array([[0, 1, 2], [2, 1, 0]])
  testing.assert_close(
      ops.lora_matmul(x, w, a, b, scale=0.5, adapter_ids=ids),
      reference.lora_matmul(x, w, a, b, scale=0.5, adapter_ids=ids))


@pytest.mark.parametrize("change, error, match", [
    (dict(b=jnp.ones((2, 4, 6))), ValueError, r"rank mismatch: a \(2, 8, 3\) "
     r"has r=3 but b \(2, 4, 6\) has r=4"),
    (dict(w=jnp.ones((7, 6))), ValueError, "same K"),
    (dict(a=jnp.ones((2, 7, 3))), ValueError, "a's K must match w's K=8"),
    (dict(b=jnp.ones((2, 3, 5))), ValueError, "b's N must match w's N=6"),
    (dict(adapter_ids=jnp.array([0, 1, 2, 0])), ValueError,
     r"adapter_ids must lie in \[0, 2\) \(a has 2 adapters\), got values in "
     r"\[0, 2\]"),
    (dict(adapter_ids=jnp.array([0.0, 1.0, 1.0, 0.0])), TypeError,
     "adapter_ids must be an integer"),
    (dict(adapter_ids=jnp.array([0, 1])), ValueError, "adapter_ids must have"),
    (dict(adapter_ids=None), ValueError, r"a must be \[K, r\]"),
    (dict(x=jnp.ones((4, 8), jnp.int32)), TypeError, "x must be a floating"),
    (dict(w=jnp.ones((8, 6), jnp.bfloat16)), TypeError,
     "w must have x's dtype float32"),
    (dict(b=jnp.ones((2, 3, 6), jnp.bfloat16)), TypeError,
     "a and b must share a dtype"),
    (dict(w_scale=jnp.ones((6,))), TypeError, "w_scale is for an int8 w"),
    (dict(w=jnp.ones((8, 6), jnp.int8), w_scale=jnp.ones((5,))), ValueError,
     r"w_scale must be \[N\]"),
    (dict(scale=jnp.float32(2.0)), TypeError, "scale must be a Python number"),
])
def test_bad_inputs_raise(change, error, match):
  with pytest.raises(error, match=match):
    ops.lora_matmul(**lora_cases.small_args(**change))


def test_float16_is_refused_by_the_kernel_only():
  args = lora_cases.small_args(x=jnp.ones((4, 8), jnp.float16),
                              w=jnp.ones((8, 6), jnp.float16))
  with pytest.raises(TypeError, match="takes float32 or bfloat16"):
    ops.lora_matmul(**args, interpret=True)
  if not testing.float16_compiles():
    pytest.skip(testing.FLOAT16_UNSUPPORTED)
  assert ops.lora_matmul(**args, implementation="xla").dtype == jnp.float16


def test_out_of_range_ids_under_jit_are_documented_not_checked():
  args = lora_cases.small_args()
  f = jax.jit(lambda ids: ops.lora_matmul(**{**args, "adapter_ids": ids}))
  out = f(jnp.array([0, 1, 5, 0]))  # no error under jit: row 2 gets x @ w
  np.testing.assert_allclose(out[2], args["x"][2] @ args["w"])
