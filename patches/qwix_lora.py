"""qwix LoRA through `gemma4_jax.ops.lora_einsum` / `lora_matmul`.

qwix runs LoRA by intercepting `jax.numpy.einsum` and `jax.lax.dot_general`
inside the top-level call of a LoRA model and sending them to
`LoraProvider.einsum` / `LoraProvider.dot_general`, which compute the frozen
product, then `x @ A`, then `@ B` (three matmuls; `x @ A` rounded to the
compute dtype). The patch replaces `LoraProvider.get_intercept_map` (which
qwix calls on every model call to build its interceptor) so that those two
entries go to functions that run the fused op instead. `revert()` removes
the override and `LoraProvider` inherits qwix's own method again.

A routed call does exactly what qwix's does around the matmuls: the same
rule lookups and op counting, the same `lora_a`/`lora_b` created or reused
(through qwix's `_get_or_create_lora_params`, so shapes, initializers and
shardings are qwix's), the same `<weight>_lora_einsum_str` attribute, and
the result in qwix's dtype (`result_type(x, w, lora_a, lora_b)`). Numerics
differ only in that `x @ A` stays in float32.

A QLoRA base that qwix quantized to per-channel symmetric int8
(`weight_qtype="int8"`) is routed too: the op gets the int8 values and the
per-channel scales and dequantizes each tile in VMEM (the call that first
quantizes the weight stays on qwix).

These stay on qwix's own path (`SPEC.stock`, also in the report):
- LoRA dropout > 0 (qwix draws the mask from the model's rngs);
- other quantized bases (int4, nf4, asymmetric or subchannel-tiled int8)
  and activation quantization (`act_qtype`);
- an einsum the op cannot express (an axis shared by x and w that is not
  contracted, as the MoE expert einsums of 26B-A4B), and `dot_general`
  forms other than `[..., K] x [K, N]`;
- calls with `precision`, `preferred_element_type` or `out_sharding` set;
- inputs other than float32/bfloat16 when the Pallas kernel is selected.
Modules outside the LoRA rules are not intercepted by qwix at all.
"""

from __future__ import annotations

import importlib
import re

import jax
import jax.numpy as jnp

from gemma4_jax import implementations
from gemma4_jax import mesh as mesh_lib
from gemma4_jax import ops
from gemma4_jax.ops import lora as lora_op
from gemma4_jax.patches import _framework

_LORA = "qwix._src.providers.lora"
_QCONFIG = "qwix._src.qconfig"
_FLAX_UTIL = "qwix._src.utils.flax_util"
_PTQ = "qwix._src.providers.ptq"

SPEC = _framework.PatchSpec(
    feature="lora", distribution="qwix",
    attribute="LoraProvider.get_intercept_map",
    layouts=(_framework.Layout(
        name="qwix 0.1.8", module=_LORA, parameters=("self",),
        known_versions=("0.1.8",),
        # What the routed calls use of qwix, to do exactly what its own
        # einsum and dot_general do around the matmuls.
        requirements=(
            _framework.Requirement(
                None, "LoraProvider.einsum",
                parameters=("self", "einsum_str", "operands", "kwargs"),
                names=("_get_current_rule_and_op_id", "find_param",
                       "_parse_einsum_str_for_lora",
                       "_get_or_create_lora_params", "dropout", "alpha",
                       "rank")),
            _framework.Requirement(
                None, "LoraProvider.dot_general",
                parameters=("self", "lhs", "rhs", "dimension_numbers",
                            "precision", "preferred_element_type",
                            "out_sharding"),
                names=("_get_current_rule_and_op_id", "find_param",
                       "_create_lora_layer_shapes",
                       "_get_or_create_lora_params")),
            _framework.Requirement(
                None, "_parse_einsum_str_for_lora",
                parameters=("lhs_shape", "rhs_shape", "einsum_str",
                            "lora_rank")),
            _framework.Requirement(
                None, "_create_lora_layer_shapes",
                parameters=("rhs_ca", "rhs_ba", "rhs_ra", "contract_shape",
                            "batch_shape", "remain_shape", "rank")),
            _framework.Requirement(
                None, "_get_or_create_lora_params",
                parameters=("name", "rule", "a_shape", "b_shape",
                            "a_sharding_transpose", "b_sharding_transpose")),
            *(_framework.Requirement(None, f"LoraRule.{field}")
              for field in ("rank", "alpha", "dropout")),
            *(_framework.Requirement(_QCONFIG, f"QuantizationRule.{field}")
              for field in ("module_path", "op_names", "weight_qtype")),
            _framework.Requirement(
                _QCONFIG, "QuantizationProvider._get_current_rule_and_op_id",
                parameters=("self", "op_name", "only_rule", "repeated_call")),
            _framework.Requirement(_QCONFIG, "QuantizationProvider.__init__",
                                   names=("_rules",)),
            _framework.Requirement(_FLAX_UTIL, "find_param",
                                   parameters=("x", "ptq_array_type")),
            _framework.Requirement(_FLAX_UTIL, "get_current_module",
                                   parameters=()),
            _framework.Requirement(_FLAX_UTIL, "get_current_module_path",
                                   parameters=()),
            _framework.Requirement(_PTQ, "WithAux"),
        )),),
    ops=("lora_einsum",),
    note=("qwix LoRA einsum/dot_general run ops.lora_einsum (int8 "
          "per-channel QLoRA base included)"),
    stock=("on qwix's own path: dropout > 0 (qwix draws the mask), other "
           "weight_qtype (int4/nf4/tiled), act_qtype, "
           "einsums with a shared uncontracted axis (MoE expert einsums), "
           "non-default precision/preferred_element_type/out_sharding"))


def targets() -> tuple[_framework.Target, ...]:
  """`SPEC` in the installed qwix, replaced by the routing below."""
  return SPEC.targets(_make_get_intercept_map)


# qwix's LoRA einsum and dot_general, restated around `ops.lora_einsum`.


def _make_get_intercept_map(original, options: _framework.OpOptions,
                            layout: _framework.Layout):
  qwix = _Qwix(layout.module)

  def get_intercept_map(self):
    mapping = original(self)
    mapping["jax.numpy.einsum"] = lambda *a, **k: _einsum(
        self, qwix, options, *a, **k)
    mapping["jax.lax.dot_general"] = lambda *a, **k: _dot_general(
        self, qwix, options, *a, **k)
    return mapping

  return _framework.wraps(
      original, get_intercept_map,
      note="qwix LoRA interceptor map, patched by gemma4_jax.patches: LoRA "
      "einsum/dot_general run the fused gemma4_jax.ops LoRA matmul.")


class _Qwix:
  """The qwix modules the routed calls use (imported at patch time)."""

  def __init__(self, lora_module: str):
    self.lora = importlib.import_module(lora_module)
    self.flax_util = importlib.import_module(_FLAX_UTIL)
    self.ptq = importlib.import_module(_PTQ)


def _lora_rule(provider, qwix: _Qwix, op_name: str):
  """qwix's rule lookup without its side effects (match counts, op ids)."""
  path = "/".join(map(str, qwix.flax_util.get_current_module_path()))
  for rule in provider._rules:  # pylint: disable=protected-access
    if re.fullmatch(rule.module_path, path) and (
        not rule.op_names or op_name in rule.op_names):
      return rule
  return None


def _int8_channelwise(qwix, rhs, contracted: tuple[int, ...]):
  """`(qvalue, scale)` of a qwix per-channel symmetric int8 weight, or None.

  That is `WithAux(QArray)` with an int8 `qvalue`, no zero point, and one
  scale per output channel (size 1 on every contracted axis, no subchannel
  tiles); anything else (int4, nf4, asymmetric, tiled) stays on qwix.
  """
  if not isinstance(rhs, qwix.ptq.WithAux):
    return None
  array = rhs.array
  qvalue = getattr(array, "qvalue", None)
  scale = getattr(array, "scale", None)
  if (qvalue is None or scale is None or
      getattr(array, "zero_point", None) is not None or
      qvalue.dtype != jnp.int8 or scale.ndim != qvalue.ndim or
      getattr(array, "qtype", None) not in (None, jnp.int8, "int8")):
    return None
  want = tuple(1 if i in contracted else d
               for i, d in enumerate(qvalue.shape))
  return (qvalue, scale) if scale.shape == want else None


def _routable(provider, qwix, op_name, lhs, rhs, options, kwargs,
              contracted) -> bool:
  rule = _lora_rule(provider, qwix, op_name)
  if (not isinstance(rule, qwix.lora.LoraRule) or rule.dropout > 0 or
      getattr(rule, "act_qtype", None) is not None or any(
          v is not None for v in kwargs.values())):
    return False
  if rule.weight_qtype is not None:
    # QLoRA: route the per-channel int8 weight qwix has already quantized
    # (its first call, which quantizes, stays on qwix).
    quantized = _int8_channelwise(qwix, rhs, contracted)
    if quantized is None:
      return False
    dtype = jnp.result_type(lhs, quantized[1])
  elif isinstance(rhs, qwix.ptq.WithAux) or not hasattr(rhs, "dtype"):
    return False
  else:
    dtype = jnp.result_type(lhs, rhs)
  if not jnp.issubdtype(dtype, jnp.floating):
    return False
  name = implementations.resolve("lora_matmul", options.implementation,
                                 ops.AVAILABLE["lora_matmul"],
                                 interpret=options.interpret)
  # A forced kernel cannot take this dtype (the default runs XLA for it).
  if (name == implementations.PALLAS_TPU and
      not lora_op.kernel_takes(dtype)):
    return False
  return qwix.flax_util.find_param(rhs, qwix.ptq.WithAux) is not None


def _einsum(provider, qwix: _Qwix, options, einsum_str, *operands, **kwargs):
  original = type(provider).einsum
  if (len(operands) != 2 or not isinstance(einsum_str, str) or
      set(kwargs) - {"precision", "preferred_element_type", "out_sharding"}):
    return original(provider, einsum_str, *operands, **kwargs)
  lhs, rhs = operands
  plan = (ops.lora_einsum_plan(einsum_str, lhs.shape, rhs.shape)
          if hasattr(rhs, "shape") and hasattr(lhs, "shape") else None)
  if plan is None or not _routable(
      provider, qwix, "einsum", lhs, rhs, options, kwargs,
      _contracted(einsum_str)):
    return original(provider, einsum_str, *operands, **kwargs)
  # What PtqProvider.einsum and LoraProvider.einsum do around the matmuls.
  provider._get_current_rule_and_op_id("einsum")  # pylint: disable=protected-access
  rule, _ = provider._get_current_rule_and_op_id(  # pylint: disable=protected-access
      "einsum", repeated_call=True)
  weight_name = qwix.flax_util.find_param(rhs, qwix.ptq.WithAux)
  a_shape, b_shape, lora_einsum_str, a_transpose, b_transpose = (
      qwix.lora._parse_einsum_str_for_lora(  # pylint: disable=protected-access
          lhs.shape, rhs.shape, einsum_str, rule.rank))
  setattr(qwix.flax_util.get_current_module(),
          weight_name + "_lora_einsum_str", lora_einsum_str)
  lora_a, lora_b = qwix.lora._get_or_create_lora_params(  # pylint: disable=protected-access
      name=weight_name, rule=rule, a_shape=a_shape, b_shape=b_shape,
      a_sharding_transpose=a_transpose, b_sharding_transpose=b_transpose)
  return _run(qwix, einsum_str, lhs, rhs, lora_a, lora_b, rule, weight_name,
              options)


def _dot_general(provider, qwix: _Qwix, options, lhs, rhs, dimension_numbers,
                 precision=None, preferred_element_type=None, **kwargs):
  original = type(provider).dot_general
  call_kwargs = dict(precision=precision,
                     preferred_element_type=preferred_element_type, **kwargs)
  simple = (getattr(rhs, "ndim", None) == 2 and getattr(lhs, "ndim", 0) >= 1
            and _as_tuples(dimension_numbers) ==
            (((lhs.ndim - 1,), (0,)), ((), ())) and
            set(kwargs) <= {"out_sharding"})
  if not (simple and _routable(provider, qwix, "dot_general", lhs, rhs,
                               options, call_kwargs, (0,))):
    return original(provider, lhs, rhs, dimension_numbers, **call_kwargs)
  # What PtqProvider.dot_general and LoraProvider.dot_general do around the
  # matmuls, for `[..., K] x [K, N]`.
  provider._get_current_rule_and_op_id("dot_general")  # pylint: disable=protected-access
  rule, _ = provider._get_current_rule_and_op_id(  # pylint: disable=protected-access
      "dot_general", repeated_call=True)
  weight_name = qwix.flax_util.find_param(rhs, qwix.ptq.WithAux)
  k, n = rhs.shape
  a_shape, a_transpose, b_shape, b_transpose = (
      qwix.lora._create_lora_layer_shapes(  # pylint: disable=protected-access
          (0,), (), (1,), (k,), (), (n,), rule.rank))
  lora_a, lora_b = qwix.lora._get_or_create_lora_params(  # pylint: disable=protected-access
      name=weight_name, rule=rule, a_shape=a_shape, b_shape=b_shape,
      a_sharding_transpose=a_transpose, b_sharding_transpose=b_transpose)
  out = _run(qwix, "mk,kn->mn", lhs.reshape(-1, k), rhs, lora_a, lora_b,
             rule, weight_name, options)
  return out.reshape(*lhs.shape[:-1], n)


def _contracted(einsum_str):
  lhs, rhs = einsum_str.replace(" ", "").split("->")[0].split(",")
  return tuple(i for i, c in enumerate(rhs) if c in lhs)


def _run(qwix, equation, lhs, rhs, lora_a, lora_b, rule, weight_name,
         options):
  """The op in qwix's result dtype, per shard under a mesh with known axes."""
  w_scale = None
  if isinstance(rhs, qwix.ptq.WithAux):  # checked by _int8_channelwise
    rhs, w_scale = rhs.array.qvalue, rhs.array.scale
    dtype = jnp.result_type(lhs, w_scale, lora_a, lora_b)
  else:
    dtype = jnp.result_type(lhs, rhs, lora_a, lora_b)
    rhs = rhs.astype(dtype)
  mesh, w_axes = mesh_lib.in_context(), None
  if mesh is not None:
    w_axes = _weight_axes(qwix, weight_name, rhs.ndim)
    if w_axes is None:  # unknown layout: one unsharded call, as GSPMD would
      mesh = None
  return ops.lora_einsum(equation, lhs.astype(dtype), rhs, lora_a, lora_b,
                         scale=rule.alpha / rule.rank, w_scale=w_scale,
                         mesh=mesh, w_axes=w_axes, **options.op_kwargs)


def _weight_axes(qwix, weight_name, ndim):
  """The mesh axes Tunix gave the weight (nnx metadata), or None."""
  variable = getattr(qwix.flax_util.get_current_module(), weight_name, None)
  get_metadata = getattr(variable, "get_metadata", None)
  metadata = get_metadata() if get_metadata else {}
  for key in ("out_sharding", "sharding", "sharding_names"):
    axes = metadata.get(key)
    # google-tunix 0.1.7 stores a tuple, Tunix main a PartitionSpec (which
    # may be shorter than the rank: the rest is replicated).
    if isinstance(axes, (tuple, list, jax.sharding.PartitionSpec)):
      axes = tuple(axes)
      if len(axes) <= ndim:
        return axes + (None,) * (ndim - len(axes))
  return None


def _as_tuples(dimension_numbers):
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
  except (TypeError, ValueError):
    return None
