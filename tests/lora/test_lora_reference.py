"""The LoRA reference against real qwix LoRA on Tunix Gemma 4 modules.

qwix intercepts only the top-level call of the model it was applied to, so a
submodule of a LoRA model called on its own computes without its adapter.
Each submodule is therefore wrapped again with the same rule: qwix finds the
`w_lora_a`/`w_lora_b` (`kernel_lora_*` for `nnx.Linear`) already there and
reuses them, so the module runs exactly as inside the model.
"""

import jax.numpy as jnp
import lora_cases
import numpy as np
import pytest
import qwix
from flax import nnx
from hypothesis import given, strategies as st
from tunix.models.gemma4 import model as gemma4_lib

from gemma4_jax import testing, tiny_models
from gemma4_jax.reference import lora

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def lora_model():
  model = tiny_models.build_model(tiny_models.tiny_config(), seed=1)
  return tiny_models.apply_lora(model, rank=RANK, alpha=ALPHA, seed=2)


def _run_with_qwix(module, x):
  """Calls `module` under qwix LoRA with its own adapter weights."""
  provider = qwix.LoraProvider(module_path=".*", rank=RANK, alpha=ALPHA)
  wrapped = qwix.apply_lora_to_model(module, provider, x, rngs=nnx.Rngs(0))
  name = "kernel" if isinstance(module, nnx.Linear) else "w"
  for suffix in ("_lora_a", "_lora_b"):  # reused, not re-initialized
    np.testing.assert_array_equal(getattr(wrapped, name + suffix)[...],
                                  getattr(module, name + suffix)[...])
  return wrapped(x)


def f32(array):
  return jnp.asarray(array, jnp.float32)


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


# (module path in the model, einsum form, input shape)
EINSUM_MODULES = [
    ("layers.0.attn.q_einsum", "BTD,NDH->BTNH", (2, 5, 64)),
    ("layers.2.attn.q_einsum", "BTD,NDH->BTNH", (2, 5, 64)),  # global, H=64
    ("layers.0.attn.kv_einsum", "BSD,CKDH->CBSKH", (2, 5, 64)),
    ("layers.2.attn.kv_einsum", "BSD,CKDH->CBSKH", (2, 5, 64)),
    ("layers.0.attn.attn_vec_einsum", "BTNH,NHD->BTD", (2, 5, 4, 32)),
    ("layers.2.attn.attn_vec_einsum", "BTNH,NHD->BTD", (2, 5, 4, 64)),
    ("embedder.per_layer_model_projection", "BTD,DNP->BTNP", (2, 5, 64)),
    ("layers.1.per_layer_input_gate", "BTD,DP->BTP", (2, 5, 64)),
    ("layers.1.per_layer_projection", "BTP,PD->BTD", (2, 5, 16)),
]
LINEAR_MODULES = [
    ("layers.0.mlp.gate_proj", (2, 5, 64)),
    ("layers.0.mlp.up_proj", (2, 5, 64)),
    ("layers.0.mlp.down_proj", (2, 5, 128)),
]


def _submodule(model, path):
  module = model
  for part in path.split("."):
    module = module[int(part)] if part.isdigit() else getattr(module, part)
  return module


@pytest.mark.slow
@pytest.mark.parametrize("path, equation, x_shape", EINSUM_MODULES)
def test_einsum_matches_qwix_on_gemma4(lora_model, path, equation, x_shape):
  module = _submodule(lora_model, path)
  assert module.einsum_str == equation
  assert module.w_lora_einsum_str == lora.lora_equation(equation)
  x = _random(x_shape, seed=len(path))
  expected = _run_with_qwix(module, x)

  w = module.w[...]
  if module.w_scale is not None:  # the per-layer model projection's D**-0.5
    w = w * module.w_scale
  out = lora.lora_einsum(equation, x, w, module.w_lora_a[...],
                         module.w_lora_b[...], scale=ALPHA / RANK)
  testing.assert_close(out, expected, name=path)
  frozen = lora.lora_einsum(equation, x, w, module.w_lora_a[...],
                            0 * module.w_lora_b[...], scale=ALPHA / RANK)
  assert float(jnp.max(jnp.abs(out - frozen))) > 1e-2  # the adapter counts


@pytest.mark.slow
@pytest.mark.parametrize("path, x_shape", LINEAR_MODULES)
def test_linear_matches_qwix_on_gemma4(lora_model, path, x_shape):
  module = _submodule(lora_model, path)
  x = _random(x_shape, seed=len(path))
  expected = _run_with_qwix(module, x)
  out = lora.lora_matmul(x, module.kernel[...], module.kernel_lora_a[...],
                         module.kernel_lora_b[...], scale=ALPHA / RANK)
  testing.assert_close(out, expected, name=path)


# Forms Gemma 4 uses that the default tiny model does not build: `k_einsum`
# (k == v global layers) and current Tunix's 2-D per-layer projection.
@given(equation=st.sampled_from(["BSD,KDH->BSKH", "BTD,DX->BTX",
                                 "BTD,NDH->BTNH", "BTNH,NHD->BTD"]),
       dim=st.sampled_from([8, 24]), heads=st.sampled_from([1, 3]),
       rank=st.sampled_from([1, 4]), seed=st.integers(0, 2**16))
def test_einsum_matches_qwix_over_forms(equation, dim, heads, rank, seed):
  sizes = {"B": 2, "T": 3, "S": 3, "D": dim, "K": heads, "N": heads,
           "H": 16, "X": 2 * heads * 4}
  lhs, rhs = equation.split("->")[0].split(",")
  module = gemma4_lib.Einsum(
      einsum_str=equation, shape=tuple(sizes[c] for c in rhs),
      rngs=nnx.Rngs(seed), sharding=(None,) * len(rhs), dtype=jnp.float32,
      param_dtype=jnp.float32)
  x = _random(tuple(sizes[c] for c in lhs), seed)
  provider = qwix.LoraProvider(module_path=".*", rank=rank, alpha=ALPHA)
  wrapped = qwix.apply_lora_to_model(module, provider, x, rngs=nnx.Rngs(seed))
  wrapped.w_lora_b[...] = _random(wrapped.w_lora_b.shape, seed + 1)
  expected = wrapped(x)
  out = lora.lora_einsum(equation, x, wrapped.w[...], wrapped.w_lora_a[...],
                         wrapped.w_lora_b[...], scale=ALPHA / rank)
  testing.assert_close(out, expected, name=equation)


def test_lora_equation_moves_shared_axes_into_a():
  assert lora.lora_equation("BTD,NDH->BTNH") == "BTD,Dr,rNH->BTNH"
  assert lora.lora_equation("BSD,CKDH->CBSKH") == "BSD,Dr,rCKH->CBSKH"
  assert lora.lora_equation("BTNH,NHD->BTD") == "BTNH,NHr,rD->BTD"
  assert lora.lora_equation("btr,rd->btd") == "btr,rA,Ad->btd"


def test_adapter_ids_by_hand():
  x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  w = jnp.eye(2)
  a = jnp.array([[[1.0], [0.0]], [[0.0], [1.0]]])  # [n=2, K=2, r=1]
  b = jnp.array([[[0.0, 1.0]], [[1.0, 1.0]]])      # [n=2, r=1, N=2]
  # Row 0, adapter 1: x @ a1 = 2, times b1 = [2, 2], halved: [1, 1].
  # Row 1, adapter 0: x @ a0 = 3, times b0 = [0, 3], halved: [0, 1.5].
  out = lora.lora_matmul(x, w, a, b, scale=0.5,
                         adapter_ids=jnp.array([1, 0]))
  np.testing.assert_array_equal(np.asarray(out), [[2.0, 3.0], [3.0, 5.5]])


@given(rows=st.sampled_from([1, 5, 16]), k=st.sampled_from([8, 32]),
       n=st.sampled_from([8, 24]), rank=st.sampled_from([1, 4]),
       adapters=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_adapter_ids_select_rows(rows, k, n, rank, adapters, seed):
  rng = np.random.default_rng(seed)
  x, w = rng.standard_normal((rows, k)), rng.standard_normal((k, n))
  a = rng.standard_normal((adapters, k, rank))
  b = rng.standard_normal((adapters, rank, n))
  ids = rng.integers(0, adapters, rows)
  out = lora.lora_matmul(f32(x), f32(w), f32(a), f32(b), scale=0.25,
                         adapter_ids=jnp.asarray(ids, jnp.int32))
  for adapter in np.unique(ids):
    rows_of = ids == adapter
    single = lora.lora_matmul(f32(x[rows_of]), f32(w), f32(a[adapter]),
                              f32(b[adapter]), scale=0.25)
    testing.assert_close(out[rows_of], single, name=f"adapter {adapter}")
  exact = x @ w + 0.25 * np.einsum("mk,mkr,mrn->mn", x, a[ids], b[ids])
  testing.assert_close(out, exact, name="float64")


@pytest.mark.parametrize("change, error, match", [
    (dict(w=jnp.ones((7, 6))), ValueError, "same K"),
    (dict(adapter_ids=jnp.array([0.0, 1.0, 1.0, 0.0])), TypeError,
     "adapter_ids must be an integer"),
    (dict(adapter_ids=jnp.array([0, 1, 2, 0])), ValueError, r"\[0, 2\)"),
    (dict(adapter_ids=jnp.array([0, 1])), ValueError, "adapter_ids must have"),
    (dict(a=jnp.ones((8, 3)), b=jnp.ones((3, 6))), ValueError, r"\[n, K, r\]"),
    (dict(adapter_ids=None), ValueError, r"a must be \[K, r\]"),
    (dict(scale=jnp.float32(2.0)), TypeError, "scale"),
    (dict(x=jnp.ones((4, 8), jnp.int32)), TypeError, "x must be a floating"),
])
def test_lora_matmul_bad_inputs_raise(change, error, match):
  with pytest.raises(error, match=match):
    lora.lora_matmul(**lora_cases.small_args(**change))


@pytest.mark.parametrize("equation, x_shape, a_shape, match", [
    ("...D,NDH->...NH", (2, 5, 8), (8, 2), "letters only"),
    ("BTD,NDH", (2, 5, 8), (8, 2), "letters only"),
    ("BTD,NDH->BTNH", (2, 8), (8, 2), "x must have rank 3"),
    ("BTD,NDH->BTNH", (2, 5, 8), (3, 2), "lora_a must be"),
])
def test_lora_einsum_bad_inputs_raise(equation, x_shape, a_shape, match):
  with pytest.raises(ValueError, match=match):
    lora.lora_einsum(equation, jnp.ones(x_shape), jnp.ones((4, 8, 16)),
                     jnp.ones(a_shape), jnp.ones((2, 4, 16)), scale=1.0)
