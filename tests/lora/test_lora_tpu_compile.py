"""The fused LoRA kernels, lowered and compiled for TPU at Gemma 4 shapes.

Lowering (`jax.export` for TPU, no libtpu needed): forward and backward
(`dx` kernel plus the XLA `dA`/`dB` dots) with `jax.ShapeDtypeStruct`
arguments (no memory): M = 4096 tokens, the E2B projections, ranks 16 and
64, bfloat16, the default tiles; plus the E4B MLP up-projection and the
grouped layouts of the attention einsums. This catches block-shape and
lowering errors; it proves neither speed nor VMEM fit.

Compiling (for abstract TPU chips, with libtpu): the fused LoRA kernel
needs no more HBM than XLA. Each case compiles a training step's use of
the op (the output `y` and the gradients w.r.t. x, A and B for a cotangent;
W frozen) for abstract TPU chips with XLA:TPU and Mosaic, at the Gemma 4
E2B shapes the qwix patch routes (4096 tokens, rank 16, bfloat16), three
ways: `ops.lora_einsum` (`ops.lora_matmul` for many adapters) with
`implementation="pallas_tpu"` and with `"xla"` (per shard in `shard_map`
under a mesh), and the stock formulation (qwix's einsums, GSPMD under a
mesh). The Pallas program must call Mosaic and need at most the others' HBM
temporaries per chip plus `_rank_slack`.

HBM only: XLA:TPU also places temporaries of up to tens of MiB in VMEM
(memory space S(1)), which `temp_bytes` does not count, for all three.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import pytest

from gemma4_jax import ops
from gemma4_jax import testing
from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels.lora import einsum
from gemma4_jax.kernels.lora import pallas_tpu

needs_libtpu = pytest.mark.skipif(testing.libtpu_missing() is not None,
                                  reason=str(testing.libtpu_missing()))

BF16 = jnp.bfloat16
SCALE, RANK, ADAPTERS = 2.0, 16, 4
B, T = 2, 2048
TOKENS = B * T

# (K, N): q (sliding), kv, attention out, MLP up/down, wide MLP up/down
# (double-wide layers), per-layer model projection (35 layers x 256).
E2B_SHAPES = [(1536, 2048), (1536, 512), (2048, 1536), (1536, 6144),
              (6144, 1536), (1536, 12288), (12288, 1536), (1536, 8960)]
E4B_SHAPES = [(2560, 10240)]


def _spec(*shape, dtype=BF16):
  return jax.ShapeDtypeStruct(shape, dtype)


def _forward_and_backward(fn):
  def run(x, *params):
    out, vjp = jax.vjp(fn, x, *params)
    return out, vjp(out)
  return run


def _exported_kernels(exported):
  text = exported.mlir_module()
  return text.count("tpu_custom_call")


@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("k, n", E2B_SHAPES + E4B_SHAPES)
def test_lowers_for_tpu(k, n, rank):
  def fn(x, a, b, w):
    return pallas_tpu.lora_matmul(x, w, a, b, scale=2.0)
  w_spec = _spec(k, n)
  exported = testing.lower_for_tpu(
      lambda x, a, b, w: _forward_and_backward(
          lambda x, a, b: fn(x, a, b, w))(x, a, b),
      _spec(TOKENS, k), _spec(k, rank), _spec(rank, n), w_spec)
  assert _exported_kernels(exported) == 2  # fused forward, fused dx
  text = exported.mlir_module()  # the pallas_calls are named
  assert "lora_matmul_fwd" in text and "lora_matmul_dx" in text


@pytest.mark.parametrize("equation, x_shape, w_shape", [
    ("BTD,NDH->BTNH", (2, 2048, 1536), (8, 1536, 256)),    # sliding q
    ("BTD,NDH->BTNH", (2, 2048, 1536), (8, 1536, 512)),    # global q
    ("BSD,CKDH->CBSKH", (2, 2048, 1536), (2, 1, 1536, 256)),  # kv
    ("BSD,KDH->BSKH", (2, 2048, 1536), (1, 1536, 512)),    # k == v
    ("BTNH,NHD->BTD", (2, 2048, 8, 256), (8, 256, 1536)),  # attention out
    ("BTD,DNP->BTNP", (2, 2048, 1536), (1536, 35, 256)),   # per-layer proj
])
def test_grouped_einsums_lower_for_tpu(equation, x_shape, w_shape):
  plan = einsum.plan(equation, x_shape, w_shape)
  assert plan.grouped  # no transpose of w at real Gemma 4 shapes
  rank = 16
  lhs, rhs = equation.split("->")[0].split(",")
  a_shape = tuple(d for c, d in zip(rhs, w_shape) if c in lhs) + (rank,)
  b_shape = (rank,) + tuple(d for c, d in zip(rhs, w_shape) if c not in lhs)

  def run(x, a, b, w):
    return _forward_and_backward(lambda x, a, b: einsum.run_pallas(
        plan, x, w, a, b, scale=2.0))(x, a, b)
  exported = testing.lower_for_tpu(run, _spec(*x_shape), _spec(*a_shape),
                                   _spec(*b_shape), _spec(*w_shape))
  assert _exported_kernels(exported) == 2


def test_int8_and_multi_adapter_lower_for_tpu():
  k, n, rank, adapters = 1536, 6144, 16, 4
  def run(x, a, b, w, w_scale, ids):
    return _forward_and_backward(lambda x, a, b: pallas_tpu.lora_matmul(
        x, w, a, b, scale=2.0, w_scale=w_scale, adapter_ids=ids))(x, a, b)
  exported = testing.lower_for_tpu(
      run, _spec(TOKENS, k), _spec(adapters, k, rank),
      _spec(adapters, rank, n), _spec(k, n, dtype=jnp.int8),
      _spec(n, dtype=jnp.float32), _spec(TOKENS, dtype=jnp.int32))
  assert _exported_kernels(exported) == 2


# name -> (equation, x shape, w shape, Tunix's w sharding); E2B, as qwix
# calls them (nnx.Linear's dot_general becomes "mk,kn->mn").
CASES = {
    "q global": ("BTD,NDH->BTNH", (B, T, 1536), (8, 1536, 512),
                 ("tp", "fsdp", None)),
    "mlp gate/up": ("mk,kn->mn", (TOKENS, 1536), (1536, 6144),
                    ("fsdp", "tp")),
    "mlp down wide": ("mk,kn->mn", (TOKENS, 12288), (12288, 1536),
                      ("tp", "fsdp")),
}


def _rank_slack(k: int, n: int, m: int = TOKENS) -> int:
  """HBM the kernel may use beyond XLA's: the rank padded to 128 lanes.

  A and B padded to `[K, 128]`, `[128, N]` and transposed for the dx kernel
  (bf16), and the backward's `[M, 128]` float32 `x @ A` and `dy @ B^T`;
  XLA and the stock path keep these `R = 16` wide.
  """
  lanes = _tpu.NUM_LANES
  return 2 * (k + n) * lanes * 2 + 2 * m * lanes * 4


def _lora_shapes(equation, x_shape, w_shape, adapters=None):
  lhs, rhs = equation.split("->")[0].split(",")
  size = dict(zip(lhs, x_shape)) | dict(zip(rhs, w_shape))
  a_shape = tuple(size[c] for c in rhs if c in lhs) + (RANK,)
  b_shape = (RANK,) + tuple(size[c] for c in rhs if c not in lhs)
  if adapters:
    a_shape, b_shape = (adapters, *a_shape), (adapters, *b_shape)
  out_shape = tuple(size[c] for c in equation.split("->")[1])
  return a_shape, b_shape, out_shape


def _op(kind, equation, mesh, w_axes):
  """`op(x, w, a, b, ids)` as `kind` runs it: `ops` with the Pallas kernel
  or the XLA version (per shard under a mesh), or qwix's stock einsums."""
  if kind != "stock":
    implementation = {"pallas": "pallas_tpu", "xla": "xla"}[kind]
    options = dict(scale=SCALE, mesh=mesh, w_axes=w_axes if mesh else None,
                   implementation=implementation)
    def op(x, w, a, b, ids):
      if ids is not None:
        return ops.lora_matmul(x, w, a, b, adapter_ids=ids, **options)
      return ops.lora_einsum(equation, x, w, a, b, **options)
    return op

  def stock(x, w, a, b, ids):  # GSPMD partitions it under a mesh
    w = jax.lax.stop_gradient(w)
    if ids is not None:  # many adapters: "mk,kn->mn"
      onehot = jax.nn.one_hot(ids, a.shape[0], dtype=x.dtype)
      down = jnp.einsum("mk,nkr->mnr", x, a) * onehot[:, :, None]
      return x @ w + SCALE * jnp.einsum("mnr,nrj->mj", down, b)
    # qwix: the frozen einsum plus the low-rank einsums in x's dtype.
    plan = einsum.plan(equation, x.shape, w.shape)
    rank = a.shape[-1]
    delta = (x.reshape(plan.m, plan.k) @ a.reshape(plan.k, rank)) @ (
        b.reshape(rank, plan.n))
    return (jnp.einsum(equation, x, w) +
            SCALE * einsum.to_output(plan, delta))
  return stock


def _training_step(op):
  """`y` and the gradients of `sum(y * ct)`: `y` stays live, as when it
  feeds the next layer."""
  def step(x, w, a, b, ids, ct):
    y, vjp = jax.vjp(lambda x, a, b: op(x, w, a, b, ids), x, a, b)
    return y, vjp(ct)
  return step


def _linear_loss_grads(op):
  """Only the gradients of `sum(y * ct)`: `y` itself is dead."""
  def grads(x, w, a, b, ids, ct):
    def loss(x, a, b):
      return jnp.sum(op(x, w, a, b, ids).astype(jnp.float32) *
                     ct.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(x, a, b)
  return grads


def _structs(equation, x_shape, w_shape, w_axes, *, mesh=None, adapters=None,
             device=None):
  """Arguments on one chip (`device`, default v5e), or sharded over `mesh`:
  x's batch over fsdp and its contracted axes over tp where w's are, as
  Tunix's activations are."""
  a_shape, b_shape, out_shape = _lora_shapes(equation, x_shape, w_shape,
                                             adapters)
  shapes = [(x_shape, BF16), (w_shape, BF16), (a_shape, BF16),
            (b_shape, BF16), ((x_shape[0],), jnp.int32), (out_shape, BF16)]
  if mesh is None:
    device = device or testing.tpu_devices("v5e:2x2")[0]
    structs = [jax.ShapeDtypeStruct(
        shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))
               for shape, dtype in shapes]
  else:
    lhs, rhs = equation.split("->")[0].split(",")
    out = equation.split("->")[1]
    axis = {lhs[0]: "fsdp"} | {c: "tp" for c, a in zip(rhs, w_axes)
                               if a == "tp"}
    kept = {c: axis.get(c) for c in out if c not in lhs or c not in rhs}
    specs = [P(*(axis.get(c) for c in lhs)), P(*w_axes), P(), P(),
             P("fsdp"), P(*(kept.get(c) for c in out))]
    structs = [testing.tpu_struct(shape, dtype, spec, mesh=mesh)
               for (shape, dtype), spec in zip(shapes, specs)]
  if not adapters:
    structs[4] = None
  return structs


def _temp_bytes(program, equation, w_axes, structs, mesh):
  """`{kind: (temp bytes, compiled)}` for pallas, xla and stock."""
  result = {}
  for kind in ("pallas", "xla", "stock"):
    compiled = testing.compile_for_tpu(
        program(_op(kind, equation, mesh, w_axes)), *structs, mesh=mesh)
    result[kind] = (testing.temp_bytes(compiled), compiled)
  return result


def _assert_no_more_hbm(result, slack, kernels):
  pallas_bytes, compiled = result["pallas"]
  assert testing.mosaic_kernels(compiled) == kernels
  mib = {kind: f"{b / 2**20:.2f} MiB" for kind, (b, _) in result.items()}
  for kind in ("xla", "stock"):
    assert pallas_bytes <= result[kind][0] + slack, (
        f"Pallas needs more HBM than {kind}: {mib} (slack "
        f"{slack / 2**20:.2f} MiB)")


@needs_libtpu
def test_training_step_needs_no_more_hbm():
  # The widest head-grouped einsum: 8 x 512 query heads, no transpose of w.
  equation, x_shape, w_shape, w_axes = CASES["q global"]
  plan = einsum.plan(equation, x_shape, w_shape)
  result = _temp_bytes(_training_step, equation, w_axes,
                       _structs(equation, x_shape, w_shape, w_axes), None)
  # Two Mosaic kernels: the fused forward and the fused dx.
  _assert_no_more_hbm(result, _rank_slack(plan.k, plan.n), kernels=2)


@needs_libtpu
def test_dead_output_is_not_computed():
  # A loss linear in y needs only dy = ct: XLA drops its x @ W, and the
  # forward kernel, whose only output is y, must be dropped too (a second,
  # live output would keep an [M, N] y in HBM: 48 MiB here).
  equation, x_shape, w_shape, w_axes = CASES["mlp gate/up"]
  result = _temp_bytes(_linear_loss_grads, equation, w_axes,
                       _structs(equation, x_shape, w_shape, w_axes), None)
  _assert_no_more_hbm(result, _rank_slack(*w_shape), kernels=1)


@needs_libtpu
@pytest.mark.parametrize("name, adapters", [
    ("mlp down wide", None),  # K over tp: the psum
    ("mlp gate/up", ADAPTERS)])
def test_sharded_training_step_needs_no_more_hbm(name, adapters):
  equation, x_shape, w_shape, w_axes = CASES[name]
  plan = einsum.plan(equation, x_shape, w_shape)
  mesh = testing.tpu_mesh("v5e:2x2")
  structs = _structs(equation, x_shape, w_shape, w_axes, mesh=mesh,
                     adapters=adapters)
  result = _temp_bytes(_training_step, equation, w_axes, structs, mesh)
  # Per chip; the slack is the unsharded one, an upper bound.
  _assert_no_more_hbm(result, _rank_slack(plan.k, plan.n), kernels=2)


@needs_libtpu
def test_v6e_training_step_needs_no_more_hbm():
  equation, x_shape, w_shape, w_axes = CASES["mlp gate/up"]
  structs = _structs(equation, x_shape, w_shape, w_axes,
                     device=testing.tpu_devices("v6e:2x2")[0])
  result = _temp_bytes(_training_step, equation, w_axes, structs, None)
  _assert_no_more_hbm(result, _rank_slack(*w_shape), kernels=2)
