"""Bad input to every public op: a clear error naming the argument, or the
documented empty result.

Each row is one input a user may hand an op (a bool where a number goes, a
nan scale, a list where an array goes, an axis the mesh lacks, an empty
dimension, an equation the op cannot express). Rows that are not about the
implementation run once per implementation (reference, XLA, and the Pallas
kernel in interpret mode): the checks sit in front of all three, so every
one must refuse alike. Shapes are tiny; nothing here runs a kernel except
the empty results, which return before one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import implementations
from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.kernels.loss import xla as loss_xla

IMPLEMENTATIONS = {
    "reference": dict(implementation="reference"),
    "xla": dict(implementation="xla"),
    "pallas": dict(implementation="pallas_tpu", interpret=True),
}
NAN, INF = math.nan, math.inf
F32, BF16 = jnp.float32, jnp.bfloat16


def _z(*shape, dtype=F32):
  return jnp.zeros(shape, dtype)


def _mesh(axes=("fsdp", "tp")):
  return testing.simulated_mesh((2, 2), axes)


# attention: q [B=1, T=4, N=2, H=8], k/v [1, S=4, K=1, 8].
def _attention(q=None, k=None, v=None, **kwargs):
  q = _z(1, 4, 2, 8) if q is None else q
  k = _z(1, 4, 1, 8) if k is None else k
  v = _z(1, 4, 1, 8) if v is None else v
  return ops.attention(q, k, v, **kwargs)


ATTENTION = [
    ("q-list", dict(q=[[[[0.0] * 8] * 2] * 4]), TypeError, "q must be an array"),
    ("k-list", dict(k=[[[[0.0] * 8]] * 4]), TypeError, "k must be an array"),
    ("v-scalar", dict(v=0.0), TypeError, "v must be an array"),
    ("q-int", dict(q=_z(1, 4, 2, 8, dtype=jnp.int32)), TypeError,
     "q must be floating"),
    ("q-3d", dict(q=_z(4, 2, 8)), ValueError, "q must be 4-D"),
    ("kv-shapes", dict(v=_z(1, 5, 1, 8)), ValueError, "k and v"),
    ("heads", dict(q=_z(1, 4, 3, 8), k=_z(1, 4, 2, 8), v=_z(1, 4, 2, 8)),
     ValueError, "query heads N=3"),
    ("batch", dict(k=_z(2, 4, 1, 8), v=_z(2, 4, 1, 8)), ValueError, "batch"),
    ("head-dim", dict(k=_z(1, 4, 1, 4), v=_z(1, 4, 1, 4)), ValueError,
     "head_dim"),
    ("dtypes", dict(k=_z(1, 4, 1, 8, dtype=BF16), v=_z(1, 4, 1, 8, dtype=BF16)),
     TypeError, "share a dtype"),
    ("causal-none", dict(causal=None), TypeError, "causal must be True or False"),
    ("causal-str", dict(causal="no"), TypeError, "causal"),
    ("causal-int", dict(causal=1), TypeError, "causal"),
    ("window-bool", dict(sliding_window=True), TypeError, "sliding_window"),
    ("window-zero", dict(sliding_window=0), ValueError, "sliding_window"),
    ("window-float", dict(sliding_window=2.5), ValueError, "sliding_window"),
    ("window-str", dict(sliding_window="4"), TypeError, "sliding_window"),
    ("softcap-bool", dict(softcap=True), TypeError, "softcap"),
    ("softcap-nan", dict(softcap=NAN), ValueError, "softcap"),
    ("softcap-inf", dict(softcap=INF), ValueError, "softcap"),
    ("softcap-zero", dict(softcap=0.0), ValueError, "softcap"),
    ("softcap-str", dict(softcap="30"), TypeError, "softcap"),
    ("scale-nan", dict(scale=NAN), ValueError, "scale"),
    ("scale-inf", dict(scale=INF), ValueError, "scale"),
    ("scale-neg-inf", dict(scale=-INF), ValueError, "scale"),
    ("scale-bool", dict(scale=True), TypeError, "scale"),
    ("scale-array", dict(scale=jnp.float32(1.0)), TypeError, "scale"),
    ("mask-list", dict(mask=[[True] * 4] * 4), TypeError, "mask must be"),
    ("mask-float", dict(mask=jnp.ones((4, 4))), TypeError, "mask must be"),
    ("mask-rank5", dict(mask=jnp.ones((1, 1, 1, 4, 4), bool)), ValueError,
     "mask must have rank"),
    ("mask-keys", dict(mask=jnp.ones((4, 3), bool)), ValueError, "mask of shape"),
    ("segments-list", dict(segment_ids=[[0, 0, 1, 1]]), TypeError,
     "segment_ids must be an integer array"),
    ("segments-pair-list", dict(segment_ids=(_z(1, 4, dtype=jnp.int32),
                                             [0, 0, 1, 1])),
     TypeError, "kv segment_ids"),
    ("segments-float", dict(segment_ids=_z(1, 4)), TypeError,
     "segment_ids must be integer"),
    ("segments-shape", dict(segment_ids=_z(1, 5, dtype=jnp.int32)), ValueError,
     "segment_ids must have shape"),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name, kwargs, error, match", ATTENTION,
                         ids=[row[0] for row in ATTENTION])
def test_attention(impl, name, kwargs, error, match):
  del name
  with pytest.raises(error, match=match):
    _attention(**kwargs, **IMPLEMENTATIONS[impl])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("q, kv, zeros", [
    ((1, 0, 2, 8), (1, 4, 1, 8), False),   # T = 0
    ((1, 4, 2, 8), (1, 0, 1, 8), True),    # S = 0: no query sees a key
    ((1, 4, 2, 0), (1, 4, 1, 0), False),   # H = 0 (the default scale 1/sqrt(H))
    ((0, 4, 2, 8), (0, 4, 1, 8), False),   # B = 0
    ((1, 4, 0, 8), (1, 4, 1, 8), False),   # N = 0
], ids=["T0", "S0", "H0", "B0", "N0"])
def test_attention_empty_dims(impl, q, kv, zeros):
  out = _attention(_z(*q), _z(*kv), _z(*kv), sliding_window=2,
                   **IMPLEMENTATIONS[impl])
  assert out.shape == q and out.dtype == F32
  if zeros:
    assert out.size and not jnp.any(out)
  # The gradient of an empty or constant result is zero, never an error.
  grad = jax.grad(lambda q: _attention(q, _z(*kv), _z(*kv)).sum())(_z(*q))
  assert grad.shape == q and not jnp.any(grad)


# ple_lookup: table [V=5, L=2, P=3], tokens [1, 2].
def _ple(table=None, tokens=None, **kwargs):
  kwargs = dict(num_layers=2, per_layer_dim=3) | kwargs
  table = _z(5, 2, 3) if table is None else table
  tokens = _z(1, 2, dtype=jnp.int32) if tokens is None else tokens
  return ops.ple_lookup(table, tokens, **kwargs)


PLE = [
    ("layers-bool", dict(num_layers=True), TypeError, "num_layers"),
    ("layers-zero", dict(num_layers=0), ValueError, "num_layers"),
    ("dim-float", dict(per_layer_dim=3.0), ValueError, "per_layer_dim"),
    ("dim-str", dict(per_layer_dim="3"), TypeError, "per_layer_dim"),
    ("table-list", dict(table=[[[0.0] * 3] * 2] * 5), TypeError,
     "per_layer_table must be an array"),
    ("tokens-list", dict(tokens=[[1, 2]]), TypeError, "tokens must be"),
    ("tokens-float", dict(tokens=_z(1, 2)), TypeError, "tokens must be an "
     "integer"),
    ("tokens-3d", dict(tokens=_z(1, 2, 1, dtype=jnp.int32)), ValueError,
     r"tokens must be \[B, T\]"),
    ("table-1d", dict(table=_z(5)), ValueError, "per_layer_table must be"),
    ("table-layers", dict(table=_z(5, 3, 3)), ValueError, "num_layers=2"),
    ("table-empty", dict(table=_z(0, 2, 3)), ValueError,
     r"per_layer_table has no rows \(V = 0"),
    ("mesh-no-spec", dict(mesh="MESH"), ValueError, "table_spec"),
    ("spec-axis", dict(mesh="MESH", table_spec=("bogus", None)), ValueError,
     r"table_spec .* names mesh axes \['bogus'\]"),
    ("mesh-str", dict(mesh="fsdp", table_spec=(None,)), TypeError,
     "mesh must be a jax.sharding.Mesh"),
]


def _with_mesh(kwargs):
  if kwargs.get("mesh") == "MESH":
    kwargs = kwargs | {"mesh": _mesh()}
  return kwargs


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name, kwargs, error, match", PLE,
                         ids=[row[0] for row in PLE])
def test_ple_lookup(impl, name, kwargs, error, match):
  del name
  with pytest.raises(error, match=match):
    _ple(**_with_mesh(kwargs), **IMPLEMENTATIONS[impl])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("tokens", [(1, 0), (0, 2)], ids=["T0", "B0"])
def test_ple_lookup_empty_tokens(impl, tokens):
  out = _ple(tokens=_z(*tokens, dtype=jnp.int32), **IMPLEMENTATIONS[impl])
  assert out.shape == (*tokens, 2, 3)


# per_layer_inputs: embeddings [1, 2, D=4], table [5, 2, 3], projection
# [4, 2, 3], norm scale [3].
def _per_layer_inputs(embeddings=None, tokens=None, table=None,
                      projection=None, norm_scale=None, **kwargs):
  kwargs = dict(num_layers=2, per_layer_dim=3) | kwargs
  return ops.per_layer_inputs(
      _z(1, 2, 4) if embeddings is None else embeddings,
      _z(1, 2, dtype=jnp.int32) if tokens is None else tokens,
      _z(5, 2, 3) if table is None else table,
      _z(4, 2, 3) if projection is None else projection,
      _z(3) if norm_scale is None else norm_scale, **kwargs)


PER_LAYER_INPUTS = [
    ("embeddings-list", dict(embeddings=[[[0.0] * 4] * 2]), TypeError,
     "embeddings must be"),
    ("projection-list", dict(projection=[[0.0]]), TypeError,
     "model_projection must be"),
    ("norm-scale-scalar", dict(norm_scale=1.0), TypeError,
     "projection_norm_scale must be"),
    ("embeddings-int", dict(embeddings=_z(1, 2, 4, dtype=jnp.int32)),
     TypeError, "embeddings must be floating"),
    ("projection-int", dict(projection=_z(4, 2, 3, dtype=jnp.int32)),
     TypeError, "model_projection must be floating"),
    ("projection-shape", dict(projection=_z(4, 3, 2)), ValueError,
     "model_projection must be"),
    ("norm-scale-shape", dict(norm_scale=_z(2)), ValueError,
     "projection_norm_scale must be"),
    ("embeddings-tokens", dict(embeddings=_z(1, 3, 4)), ValueError,
     "embeddings .* and tokens .* disagree"),
    ("layers-bool", dict(num_layers=True), TypeError, "num_layers"),
    ("table-empty", dict(table=_z(0, 2, 3)), ValueError, "per_layer_table"),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name, kwargs, error, match", PER_LAYER_INPUTS,
                         ids=[row[0] for row in PER_LAYER_INPUTS])
def test_per_layer_inputs(impl, name, kwargs, error, match):
  del name
  with pytest.raises(error, match=match):
    _per_layer_inputs(**kwargs, **IMPLEMENTATIONS[impl])


COMBINE = [
    ("projected-list", dict(projected=[[[[0.0] * 3] * 2] * 2]), TypeError,
     "projected must be"),
    ("rows-list", dict(rows=[0.0]), TypeError, "rows must be"),
    ("rows-shape", dict(rows=_z(1, 2, 2, 2)), ValueError, "rows must have"),
    ("rows-int", dict(rows=_z(1, 2, 2, 3, dtype=jnp.int32)), TypeError,
     "rows must be floating"),
    ("projected-3d", dict(projected=_z(2, 2, 3)), ValueError,
     r"projected must be \[B, T, L, P\]"),
    ("norm-scale-shape", dict(norm_scale=_z(4)), ValueError,
     "projection_norm_scale must be"),
]


@pytest.mark.parametrize("name, kwargs, error, match", COMBINE,
                         ids=[row[0] for row in COMBINE])
def test_combine_per_layer_inputs(name, kwargs, error, match):
  del name
  args = dict(projected=_z(1, 2, 2, 3), rows=_z(1, 2, 2, 3),
              norm_scale=_z(3)) | kwargs
  with pytest.raises(error, match=match):
    ops.combine_per_layer_inputs(args["projected"], args["rows"],
                                 args["norm_scale"])


# lora_matmul: x [M=2, K=4], w [4, N=3], a [4, r=2], b [2, 3].
def _lora(x=None, w=None, a=None, b=None, **kwargs):
  kwargs = dict(scale=2.0) | kwargs
  return ops.lora_matmul(_z(2, 4) if x is None else x,
                         _z(4, 3) if w is None else w,
                         _z(4, 2) if a is None else a,
                         _z(2, 3) if b is None else b, **kwargs)


LORA = [
    ("x-list", dict(x=[[0.0] * 4] * 2), TypeError, "x must be an array"),
    ("w-list", dict(w=[[0.0] * 3] * 4), TypeError, "w must be an array"),
    ("a-none-like", dict(a=0.5), TypeError, "a must be an array"),
    ("b-tuple", dict(b=((0.0,) * 3,) * 2), TypeError, "b must be an array"),
    ("ids-list", dict(a=_z(2, 4, 2), b=_z(2, 2, 3), adapter_ids=[0, 1]),
     TypeError, "adapter_ids must be an array"),
    ("w-scale-list", dict(w=_z(4, 3, dtype=jnp.int8), w_scale=[1.0] * 3),
     TypeError, "w_scale must be an array"),
    ("scale-nan", dict(scale=NAN), ValueError, "scale must be"),
    ("scale-inf", dict(scale=INF), ValueError, "scale must be"),
    ("scale-bool", dict(scale=True), TypeError, "scale must be"),
    ("scale-str", dict(scale="2"), TypeError, "scale must be"),
    ("scale-array", dict(scale=jnp.float32(2.0)), TypeError, "scale must be"),
    ("w-axes-bogus", dict(mesh="MESH", w_axes=("bogus", None)), ValueError,
     r"w_axes .* names mesh axes \['bogus'\]"),
    ("w-axes-missing", dict(mesh="MESH"), ValueError,
     "with a mesh, w_axes must name"),
    ("w-axes-no-mesh", dict(w_axes=("fsdp", "tp")), ValueError,
     "w_axes .* is only used with a mesh"),
    ("w-axes-str", dict(mesh="MESH", w_axes="tp"), TypeError,
     "w_axes must be a tuple"),
    ("w-axes-long", dict(mesh="MESH", w_axes=("fsdp", "tp", None)),
     ValueError, "w_axes must name"),
    ("mesh-str", dict(mesh="fsdp", w_axes=(None, None)), TypeError,
     "mesh must be a jax.sharding.Mesh"),
    ("rank-zero", dict(a=_z(4, 0), b=_z(0, 3)), ValueError, "rank r = 0"),
    ("k-zero", dict(x=_z(2, 0), w=_z(0, 3), a=_z(0, 2)), ValueError,
     r"w has no input features \(K = 0\)"),
    ("x-int", dict(x=_z(2, 4, dtype=jnp.int32)), TypeError,
     "x must be a floating"),
    ("w-dtype", dict(w=_z(4, 3, dtype=BF16)), TypeError, "w must have x's"),
    ("k-mismatch", dict(w=_z(5, 3), a=_z(5, 2)), ValueError, "same K"),
    ("rank-mismatch", dict(b=_z(3, 3)), ValueError, "rank mismatch"),
    ("ids-float", dict(a=_z(2, 4, 2), b=_z(2, 2, 3), adapter_ids=_z(2)),
     TypeError, "adapter_ids must be an integer"),
    ("ids-range", dict(a=_z(2, 4, 2), b=_z(2, 2, 3),
                       adapter_ids=jnp.array([0, 2])), ValueError,
     r"adapter_ids must lie in \[0, 2\)"),
    ("w-scale-float-w", dict(w_scale=_z(3)), TypeError, "w_scale is for an "
     "int8 w"),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name, kwargs, error, match", LORA,
                         ids=[row[0] for row in LORA])
def test_lora_matmul(impl, name, kwargs, error, match):
  del name
  with pytest.raises(error, match=match):
    _lora(**_with_mesh(kwargs), **IMPLEMENTATIONS[impl])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("x, w, out", [
    ((0, 4), (4, 3), (0, 3)),          # M = 0
    ((2, 4), (4, 0), (2, 0)),          # N = 0
    ((2, 0, 4), (4, 3), (2, 0, 3)),    # an empty leading axis
], ids=["M0", "N0", "lead0"])
def test_lora_matmul_empty(impl, x, w, out):
  result = _lora(x=_z(*x), w=_z(*w), b=_z(2, w[1]), **IMPLEMENTATIONS[impl])
  assert result.shape == out


# lora_einsum: "BTD,DN->BTN", x [1, 2, 4], w [4, 3], a [4, 2], b [2, 3].
def _einsum(equation="BTD,DN->BTN", x=None, w=None, lora_a=None,
            lora_b=None, **kwargs):
  kwargs = dict(scale=2.0) | kwargs
  return ops.lora_einsum(equation, _z(1, 2, 4) if x is None else x,
                         _z(4, 3) if w is None else w,
                         _z(4, 2) if lora_a is None else lora_a,
                         _z(2, 3) if lora_b is None else lora_b, **kwargs)


EINSUM = [
    ("equation-none", dict(equation=None), TypeError, "equation must be a str"),
    ("no-arrow", dict(equation="BTD,DN"), ValueError,
     "equation 'BTD,DN': expected two operands"),
    ("one-operand", dict(equation="BTD->BTD"), ValueError,
     "expected two operands"),
    ("three-operands", dict(equation="BTD,DN,NM->BTM"), ValueError,
     "expected two operands"),
    ("two-arrows", dict(equation="BTD,DN->BTN->BTN"), ValueError,
     "expected two operands"),
    ("digits", dict(equation="BT1,1N->BTN"), ValueError,
     "expected two operands of letters"),
    ("ellipsis", dict(equation="...D,DN->...N"), ValueError,
     "expected two operands of letters"),
    ("stray-output", dict(equation="BTD,DN->BTX"), ValueError,
     r"output letters \['X'\] are in neither operand"),
    ("repeated", dict(equation="BTT,TN->BTN"), ValueError,
     "x's operand 'BTT' repeats a letter"),
    ("summed-batch", dict(equation="BTD,DN->TN"), ValueError,
     r"x's letters \['B'\] are neither contracted nor in the output"),
    ("x-rank", dict(equation="BD,DN->BN"), ValueError,
     r"gives x 2 axes \('BD'\) but x has shape \(1, 2, 4\)"),
    ("w-rank", dict(equation="BTD,DNM->BTNM"), ValueError,
     "gives w 3 axes"),
    ("d-mismatch", dict(w=_z(5, 3), lora_a=_z(5, 2)), ValueError,
     r"axis 'D' of 'BTD,DN->BTN' is 4 in x \(1, 2, 4\) but 5 in w"),
    ("moe-expert", dict(equation="EBD,EDF->EBF", x=_z(2, 1, 4),
                        w=_z(2, 4, 3)), ValueError,
     "lora_einsum cannot express 'EBD,EDF->EBF'"),
    ("x-list", dict(x=[[[0.0] * 4] * 2]), TypeError, "x must be an array"),
    ("lora-a-list", dict(lora_a=[[0.0] * 2] * 4), TypeError,
     "lora_a must be an array"),
    ("lora-a-shape", dict(lora_a=_z(3, 2)), ValueError,
     r"lora_a must be \(4, 2\)"),
    ("scale-nan", dict(scale=NAN), ValueError, "scale must be"),
    ("scale-bool", dict(scale=False), TypeError, "scale must be"),
    ("w-axes-bogus", dict(mesh="MESH", w_axes=("tp", "bogus")), ValueError,
     r"w_axes .* names mesh axes \['bogus'\]"),
    ("w-axes-no-mesh", dict(w_axes=(None, "tp")), ValueError,
     "only used with a mesh"),
    ("w-scale-shape", dict(w=_z(4, 3, dtype=jnp.int8), w_scale=_z(3)),
     ValueError, r"w_scale must be \(1, 3\)"),
    ("rank-zero", dict(lora_a=_z(4, 0), lora_b=_z(0, 3)), ValueError,
     "rank r = 0"),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name, kwargs, error, match", EINSUM,
                         ids=[row[0] for row in EINSUM])
def test_lora_einsum(impl, name, kwargs, error, match):
  del name
  with pytest.raises(error, match=match):
    _einsum(**_with_mesh(kwargs), **IMPLEMENTATIONS[impl])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_lora_einsum_empty_batch(impl):
  out = _einsum(x=_z(0, 2, 4), **IMPLEMENTATIONS[impl])
  assert out.shape == (0, 2, 3)


@pytest.mark.parametrize("equation", ["BTD,DN->BTX", "BTD,DN->TN", "BTD,DN",
                                      "...D,DN->...N", "EBD,EDF->EBF"])
def test_lora_einsum_plan_says_none(equation):
  # The qwix patch asks `lora_einsum_plan` about every einsum it sees and
  # keeps qwix's path on None: it must answer, never raise.
  assert ops.lora_einsum_plan(equation, (2, 1, 4), (2, 4, 3)) is None


# softcapped_cross_entropy: hidden [1, T=3, D=4], embedding [V=8, 4].
def _loss(hidden=None, embedding=None, targets=None, weights=None, **kwargs):
  return ops.softcapped_cross_entropy(
      _z(1, 3, 4) if hidden is None else hidden,
      _z(8, 4) if embedding is None else embedding,
      _z(1, 3, dtype=jnp.int32) if targets is None else targets,
      _z(1, 3) if weights is None else weights, **kwargs)


LOSS = [
    ("hidden-list", dict(hidden=[[[0.0] * 4] * 3]), TypeError,
     "hidden must be an array"),
    ("embedding-list", dict(embedding=[[0.0] * 4] * 8), TypeError,
     "embedding must be an array"),
    ("targets-list", dict(targets=[[1, 2, 3]]), TypeError,
     "targets must be an array"),
    ("weights-scalar", dict(weights=1.0), TypeError, "weights must be an array"),
    ("softcap-bool", dict(softcap=True), TypeError, "softcap must be"),
    ("softcap-nan", dict(softcap=NAN), ValueError, "softcap must be"),
    ("softcap-inf", dict(softcap=INF), ValueError, "softcap must be"),
    ("softcap-zero", dict(softcap=0), ValueError, "softcap must be"),
    ("softcap-negative", dict(softcap=-30.0), ValueError, "softcap must be"),
    ("softcap-str", dict(softcap="30"), TypeError, "softcap must be"),
    ("vocab-zero", dict(embedding=_z(0, 4)), ValueError,
     r"embedding must have V >= 1 rows"),
    ("dim-zero", dict(hidden=_z(1, 3, 0), embedding=_z(8, 0)), ValueError,
     "embedding must have V >= 1 rows and D >= 1 columns"),
    ("mesh-axes", dict(mesh="DATA_MODEL"), ValueError,
     r"mesh has axes \('data', 'model'\), none of \('fsdp', 'tp'\)"),
    ("mesh-str", dict(mesh="fsdp"), TypeError, "mesh must be a jax.sharding"),
    ("targets-float", dict(targets=_z(1, 3)), TypeError,
     "targets must be integer"),
    ("targets-range", dict(targets=jnp.array([[0, 8, 1]])), ValueError,
     r"targets must be in \[0, V\) = \[0, 8\), got 8 at \(0, 1\)"),
    ("targets-negative", dict(targets=jnp.array([[0, -1, 1]])), ValueError,
     "targets must be in"),
    ("weights-int", dict(weights=_z(1, 3, dtype=jnp.int32)), TypeError,
     "weights must be boolean or floating"),
    ("targets-shape", dict(targets=_z(3, dtype=jnp.int32)), ValueError,
     r"targets must have shape \[B, T\]"),
    ("dtypes", dict(embedding=_z(8, 4, dtype=BF16)), TypeError,
     "hidden and embedding must share a dtype"),
    ("dim-mismatch", dict(embedding=_z(8, 5)), ValueError, "same D"),
    ("hidden-2d", dict(hidden=_z(3, 4)), ValueError,
     r"hidden must be \[B, T, D\]"),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name, kwargs, error, match", LOSS,
                         ids=[row[0] for row in LOSS])
def test_softcapped_cross_entropy(impl, name, kwargs, error, match):
  del name
  if kwargs.get("mesh") == "DATA_MODEL":
    kwargs = kwargs | {"mesh": _mesh(("data", "model"))}
  with pytest.raises(error, match=match):
    _loss(**kwargs, **IMPLEMENTATIONS[impl])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("tokens", [(1, 0), (0, 3)], ids=["T0", "B0"])
def test_softcapped_cross_entropy_no_tokens(impl, tokens):
  loss_sum, weight_sum = _loss(_z(*tokens, 4), _z(8, 4),
                               _z(*tokens, dtype=jnp.int32), _z(*tokens),
                               **IMPLEMENTATIONS[impl])
  assert (float(loss_sum), float(weight_sum)) == (0.0, 0.0)


def test_loss_block_sizes_of_another_implementation():
  with pytest.raises(TypeError, match="block_sizes must be a"):
    _loss(implementation="reference",
          block_sizes=loss_xla.BlockSizes.get_default())


# Implementation selection, once per op: the argument and the environment.
def _call(op, **kwargs):
  return {"attention": _attention, "ple_lookup": _ple, "lora_matmul": _lora,
          "lora_einsum": _einsum, "softcapped_cross_entropy": _loss,
          "per_layer_inputs": _per_layer_inputs}[op](**kwargs)


OPS = ("attention", "ple_lookup", "per_layer_inputs", "lora_matmul",
       "lora_einsum", "softcapped_cross_entropy")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(implementation="bogus"), ValueError, "unknown implementation 'bogus'"),
    (dict(implementation="XLA"), ValueError, "unknown implementation 'XLA'"),
    (dict(implementation=3), TypeError, "implementation must be a str"),
    (dict(interpret="yes"), TypeError, "interpret must be True or False"),
    (dict(interpret=None), TypeError, "interpret must be True or False"),
], ids=["unknown", "case", "int", "interpret-str", "interpret-none"])
def test_implementation_argument(op, kwargs, error, match):
  with pytest.raises(error, match=match):
    _call(op, **kwargs)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("value, error, match", [
    ("bogus", ValueError, r"unknown \$GEMMA4_JAX_IMPLEMENTATION 'bogus'"),
    ("pallas_tpu", RuntimeError,
     r"'pallas_tpu' \(from \$GEMMA4_JAX_IMPLEMENTATION\) can only be lowered "
     "for TPU"),
], ids=["unknown", "pallas-on-cpu"])
def test_implementation_environment(op, value, error, match, monkeypatch):
  monkeypatch.setenv(implementations.ENV_VAR, value)
  with pytest.raises(error, match=match):
    _call(op)


# Under jit the checks see tracers: shapes, dtypes and static Python values
# are all they need.
@pytest.mark.parametrize("name, fn, error, match", [
    ("attention-causal", lambda q: _attention(q, causal=None), TypeError,
     "causal"),
    ("attention-scale", lambda q: _attention(q, scale=NAN), ValueError,
     "scale"),
    ("lora-scale", lambda q: _lora(x=q.reshape(8, 8)[:2, :4], scale=INF),
     ValueError, "scale"),
    ("loss-softcap", lambda q: _loss(hidden=q.reshape(1, 8, 8)[:, :3, :4],
                                     softcap=NAN), ValueError, "softcap"),
    ("einsum-equation", lambda q: _einsum("BTD,DN->BTX",
                                          x=q.reshape(1, 8, 8)[:, :2, :4]),
     ValueError, "equation"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_under_jit(name, fn, error, match):
  del name
  with pytest.raises(error, match=match):
    jax.jit(fn)(_z(1, 4, 2, 8))


def test_empty_result_under_jit():
  out = jax.jit(lambda q: _attention(q[:, :0]))(_z(1, 4, 2, 8))
  assert out.shape == (1, 0, 2, 8)
  sums = jax.jit(lambda h: _loss(h[:, :0], targets=_z(1, 0, dtype=jnp.int32),
                                 weights=_z(1, 0)))(_z(1, 3, 4))
  assert [float(s) for s in sums] == [0.0, 0.0]


def test_numpy_scalars_are_numbers():
  # Refusing bools must not refuse numpy's own numbers.
  out = _attention(scale=np.float32(0.5), sliding_window=np.int64(2),
                   softcap=np.float64(30.0))
  assert out.shape == (1, 4, 2, 8)
