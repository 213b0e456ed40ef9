"""The TPU runner: patched against stock on a v5litepod, timed, as JSON.

On a TPU host (a v5litepod; figures are per chip):

  python benchmarks/run_tpu.py --out benchmarks/results/tpu_v5e.json

1. checks: a small real Tunix Gemma 4 with qwix LoRA, patched (every patch,
   each op's TPU default: the Pallas kernels for attention and the loss)
   against stock Tunix on the device: logits, loss and LoRA gradients,
   bounded by stock's own float32 error against a float64 run on the host
   CPU (`testing.assert_model_close`); and each op's kernel against its
   float32 reference at small shapes (T = 100, left padding, MQA).
2. memory: each op forward + backward at real single-op E2B shapes,
   compiled for one v5e chip: HBM temporaries of stock, our XLA version and
   the TPU default (the Pallas kernel where it is one), per sequence length.
3. timing: each op forward + backward against its stock path (attention
   also against JAX's splash attention, LoRA against qwix's three matmuls),
   median of `--iters`, with useful TFLOP/s, the fraction of v5e's 197
   TFLOP/s bf16 peak, HBM GB/s from XLA's bytes accessed and the fraction
   of the 819 GB/s roofline time (max of FLOPs / peak, bytes / bandwidth).
4. step: the whole E2B LoRA training step (`gemma4_jax.fit_model
   .AbstractStep`, Tunix's shardings on all chips) stock vs patched, run
   with random weights: compiled HBM and step time.

`--dry-run` does what needs no TPU, on any machine with libtpu installed:
the op checks in interpret mode (the Pallas kernels run on the CPU), the
model check with our XLA versions (`--interpret-model`: the Pallas kernels
in interpret mode, about two CPU-minutes), and the memory figures compiled
for abstract v5e chips. Timing and the step need a TPU and are skipped.
tests/test_run_tpu.py runs the dry run at one sequence length.

The JSON (`--out`) is what `benchmarks/report.py` reads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_attention  # pylint: disable=g-import-not-at-top,wrong-import-position
import tpu_lora  # pylint: disable=g-import-not-at-top,wrong-import-position
import tpu_loss  # pylint: disable=g-import-not-at-top,wrong-import-position

from gemma4_jax import implementations  # pylint: disable=g-import-not-at-top,wrong-import-position
from gemma4_jax import ops  # pylint: disable=g-import-not-at-top,wrong-import-position
from gemma4_jax import testing  # pylint: disable=g-import-not-at-top,wrong-import-position

V5E_PEAK_FLOPS = 197e12   # bf16 MXU, per chip
V5E_HBM_BYTES_PER_S = 819e9
# E2B: 8 query heads, 1 KV head; (name, head_dim, sliding window).
ATTENTION_LAYERS = tpu_attention.LAYERS
NUM_HEADS = tpu_attention.NUM_HEADS
EMBED_DIM, VOCAB = 1536, 262144
LOSS_BATCH = 4    # the training step's batch at each sequence length
LORA_SHAPE = "mlp up/gate"
LORA_RANK = 16
STOCK, XLA, DEFAULT = "stock", "xla", "default"
PARTS = ("checks", "model", "memory", "timing")


# Each op takes Tunix's inputs (attention: q, k, v and the `[B, T]` padding
# mask) and runs three ways: stock (what Tunix 0.1.7 / qwix compute without
# the patches; attention's is `testing.stock_attention`, as tests/attention/
# test_attention_tpu_compile.py compiles it), our XLA version, the default.
def ops_attention(window, implementation):
  """`ops.attention` as the Tunix patch calls it (with the `mask` patch:
  causal, and a `[B, 1, 1, S]` key mask)."""
  def attention(q, k, v, valid):
    return ops.attention(q, k, v, mask=valid[:, None, None, :], causal=True,
                         sliding_window=window, scale=1.0,
                         implementation=implementation)
  return attention


def splash_attention(seq_len, window):
  """JAX's splash attention (`tpu_attention`); it ignores padding."""
  splash = tpu_attention.splash_attention(seq_len, window)
  return lambda q, k, v, valid: splash(q, k, v)


def ops_loss(implementation):
  def loss(hidden, embedding, targets, mask):
    loss_sum, weight_sum = ops.softcapped_cross_entropy(
        hidden, embedding, targets, mask.astype(jnp.float32),
        softcap=tpu_loss.SOFTCAP,
        implementation=implementation)
    return loss_sum / (weight_sum + 1e-8)
  return loss


def ops_lora(implementation):
  def lora(x, w, a, b):
    return ops.lora_matmul(x, w, a, b, scale=tpu_lora.SCALE,
                           implementation=implementation)
  return lora


def _attention_grad(attention):
  def loss(q, k, v, valid):
    return jnp.sum(attention(q, k, v, valid).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def _loss_grad(loss):
  return jax.grad(loss)  # hidden only: LoRA training's loss gradient


def _lora_grad(lora):
  return tpu_lora.forward_backward(lora)


def op_cases(seq_len: int):
  """(op, case, batch, tokens, shapes, dtype_per_arg, {impl: fn}, flops)
  for each op at `seq_len`; fn is forward + backward."""
  cases = []
  for layer, head_dim, window in ATTENTION_LAYERS:
    shapes = [((1, seq_len, NUM_HEADS, head_dim), jnp.bfloat16),
              ((1, seq_len, 1, head_dim), jnp.bfloat16),
              ((1, seq_len, 1, head_dim), jnp.bfloat16),
              ((1, seq_len), jnp.bool_)]
    cases.append((
        "attention", f"{layer} (H={head_dim}"
        f"{f', W={window}' if window else ''})", 1, seq_len, shapes, {
            STOCK: _attention_grad(testing.stock_attention(window)),
            XLA: _attention_grad(ops_attention(window, XLA)),
            DEFAULT: _attention_grad(ops_attention(window, None))},
        tpu_attention.useful_flops(seq_len, head_dim, window,
                                   backward=True)))
  tokens = LOSS_BATCH * seq_len
  cases.append((
      "softcapped_cross_entropy", f"D={EMBED_DIM}, V={VOCAB}", LOSS_BATCH,
      tokens, [((LOSS_BATCH, seq_len, EMBED_DIM), jnp.bfloat16),
               ((VOCAB, EMBED_DIM), jnp.bfloat16),
               ((LOSS_BATCH, seq_len), jnp.int32),
               ((LOSS_BATCH, seq_len), jnp.bool_)], {
                   STOCK: _loss_grad(tpu_loss.stock_loss),
                   XLA: _loss_grad(ops_loss(XLA)),
                   DEFAULT: _loss_grad(ops_loss(None))},
      # Forward logits matmul, backward hidden gradient.
      2 * 2 * tokens * VOCAB * EMBED_DIM))
  k, n = tpu_lora.SHAPES[LORA_SHAPE]
  cases.append((
      "lora_matmul", f"{LORA_SHAPE} {k}->{n}, r={LORA_RANK}", LOSS_BATCH,
      tokens, [((tokens, k), jnp.bfloat16), ((k, n), jnp.bfloat16),
               ((k, LORA_RANK), jnp.bfloat16),
               ((LORA_RANK, n), jnp.bfloat16)], {
                   STOCK: _lora_grad(tpu_lora.qwix_path),
                   XLA: _lora_grad(ops_lora(XLA)),
                   DEFAULT: _lora_grad(ops_lora(None))},
      # Forward x @ W and dx = dy @ W^T (W frozen); LoRA terms not counted.
      2 * 2 * tokens * k * n))
  return cases


def _default_name(op: str) -> str:
  key = {"lora_matmul": "lora_matmul"}.get(op, op)
  return implementations.describe(implementations.BY_PLATFORM,
                                  tpu_default=ops.TPU_DEFAULT[key])


OPS = ("attention", "softcapped_cross_entropy", "lora_matmul")


def memory(seq_lens, *, on_device: bool, ops_=OPS) -> list[dict]:
  """Compiled HBM temporaries per op, implementation and sequence length,
  for one v5e chip (abstract with `on_device=False`)."""
  rows = []
  device = jax.devices()[0] if on_device else testing.tpu_devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  for seq_len in seq_lens:
    for op, case, batch, tokens, shapes, fns, flops in op_cases(seq_len):
      if op not in ops_:
        continue
      args = [jax.ShapeDtypeStruct(s, d, sharding=sharding)
              for s, d in shapes]
      for impl, fn in fns.items():
        start = time.perf_counter()
        row = {"op": op, "case": case, "implementation": impl,
               "runs": (_default_name(op) if impl == DEFAULT else impl),
               "seq_len": seq_len, "batch": batch, "tokens": tokens,
               "useful_flops": flops}
        try:
          compiled = testing.compile_optimized(jax.jit(fn).lower(*args))
        except jax.errors.JaxRuntimeError as e:
          # XLA:TPU refuses a program over the chip's HBM, naming what its
          # temporaries need: a lower bound of the stock figure.
          need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
          if need is None:
            raise
          rows.append({**row, "fits": False,
                       "temp_bytes": int(float(need.group(1)) * 2**30),
                       "compile_seconds": round(time.perf_counter() - start,
                                                2)})
          print(f"memory {op:25} {case:28} T={seq_len:<6} {impl:8} out of "
                f"HBM (needs {need.group(1)} GiB)", file=sys.stderr)
          continue
        analysis = compiled.memory_analysis()
        rows.append({
            **row, "fits": True,
            "temp_bytes": analysis.temp_size_in_bytes,
            "argument_bytes": analysis.argument_size_in_bytes,
            "output_bytes": analysis.output_size_in_bytes,
            "pallas_kernels": testing.mosaic_kernels(compiled),
            "compile_seconds": round(time.perf_counter() - start, 2)})
        print(f"memory {op:25} {case:28} T={seq_len:<6} {impl:8} "
              f"{analysis.temp_size_in_bytes / 2**20:10.1f} MiB "
              f"({rows[-1]['pallas_kernels']} Pallas kernels)",
              file=sys.stderr)
  return rows


def op_checks(*, interpret: bool) -> list[dict]:
  """Each op's TPU kernel (in interpret mode off TPU) against its float32
  reference at small shapes, with the dtype tolerance of `testing`."""
  from gemma4_jax.reference import attention as attention_ref  # pylint: disable=g-import-not-at-top
  from gemma4_jax.reference import lora as lora_ref  # pylint: disable=g-import-not-at-top
  from gemma4_jax.reference import loss as loss_ref  # pylint: disable=g-import-not-at-top
  impl = implementations.PALLAS_TPU
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  rows = []

  def check(name, actual, reference, *, grad=False):
    # Attention and the loss keep an online (flash-style) softmax.
    online = not name.startswith("lora")
    error = float(jnp.max(jnp.abs(actual - reference)))
    atol, rtol = testing.tolerance(jnp.float32, grad=grad,
                                   online_softmax=online)
    bound = float(atol + rtol * jnp.max(jnp.abs(reference)))
    testing.assert_close(actual, reference, dtype=jnp.float32, grad=grad,
                         online_softmax=online, name=name)
    rows.append({"check": name, "error": error, "bound": bound,
                 "implementation": impl, "interpret": interpret})

  # Attention: MQA, T = 100 (no tile multiple), sliding window, left padding
  # (fully masked query rows).
  # As the kernel tests draw them: q, k * 0.3 keep logits O(1) at scale
  # 1.0; the cotangent over sqrt(T * N / K) keeps dk and dv (sums over the
  # query rows) O(1), the scale the tolerance table is for.
  t, window = 100, 32
  q, k, v = normal(2, t, 4, 64) * 0.3, normal(2, t, 1, 64) * 0.3, normal(
      2, t, 1, 64)
  cotangent = normal(2, t, 4, 64) / np.sqrt(t * 4)
  valid = jnp.arange(t)[None, :] >= jnp.array([[0], [30]])
  mask = valid[:, None, :] & valid[:, :, None]
  kwargs = dict(mask=mask, sliding_window=window, scale=1.0)
  out_grad = jax.grad(lambda *a: jnp.sum(ops.attention(
      *a, **kwargs, implementation=impl, interpret=interpret) * cotangent),
                      argnums=(0, 1, 2))
  ref_grad = jax.grad(lambda *a: jnp.sum(attention_ref.attention(
      *a, **kwargs) * cotangent), argnums=(0, 1, 2))
  check("attention forward", ops.attention(
      q, k, v, **kwargs, implementation=impl, interpret=interpret),
        attention_ref.attention(q, k, v, **kwargs))
  for name, a, r in zip("qkv", out_grad(q, k, v), ref_grad(q, k, v)):
    check(f"attention d{name}", a, r, grad=True)
  # Loss: 3 x 50 tokens, V = 1000 (no tile multiple), padding weights 0.
  hidden, embedding = normal(3, 50, 64), normal(1000, 64) * 0.2
  targets = jnp.asarray(rng.integers(0, 1000, (3, 50)), jnp.int32)
  weights = jnp.asarray(rng.random((3, 50)) < 0.8, jnp.float32)
  def fused(h):
    loss_sum, weight_sum = ops.softcapped_cross_entropy(
        h, embedding, targets, weights, implementation=impl,
        interpret=interpret)
    return loss_sum / (weight_sum + 1e-8)
  reference = lambda h: loss_ref.softcapped_cross_entropy(
      h, embedding, targets, weights)
  check("loss", fused(hidden), reference(hidden))
  check("loss d hidden", jax.grad(fused)(hidden), jax.grad(reference)(hidden),
        grad=True)
  # LoRA: M = 100, K = 96, N = 160, rank 4.
  # As the LoRA tests: each matmul's inputs over sqrt(K) (O(1) outputs),
  # the cotangent over sqrt(M) (dA, dB sum over the M rows).
  x, w = normal(100, 96), normal(96, 160) / np.sqrt(96)
  a, b = normal(96, 4) / np.sqrt(96), normal(4, 160) / 2
  lora_cotangent = normal(100, 160) / 10
  fused = lambda x, a, b: ops.lora_matmul(x, w, a, b, scale=2.0,
                                          implementation=impl,
                                          interpret=interpret)
  reference = lambda x, a, b: lora_ref.lora_matmul(x, w, a, b, scale=2.0)
  check("lora forward", fused(x, a, b), reference(x, a, b))
  grads = [jax.grad(lambda *p, f=f: jnp.sum(f(*p) * lora_cotangent),
                    argnums=(0, 1, 2))(x, a, b) for f in (fused, reference)]
  for name, actual, expected in zip(("x", "A", "B"), *grads):
    check(f"lora d{name}", actual, expected, grad=True)
  return rows


def model_checks(*, implementation, interpret: bool,
                 num_layers: int = 4) -> list[dict]:
  """A tiny real Tunix Gemma 4 with qwix LoRA: logits, SFT loss and LoRA
  gradients patched vs stock on the default device, bounded by stock's
  float32 error against float64 on the host CPU."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import gemma4_jax.patches as patches  # pylint: disable=g-import-not-at-top
  from gemma4_jax import tiny_models  # pylint: disable=g-import-not-at-top
  vocab = 256
  # 4 layers: local, local, global, then one reading the global layer's KV
  # (E2B's KV sharing); 2: local, global. Right padding as Tunix SFT pads.
  model = tiny_models.apply_lora(tiny_models.build_model(
      tiny_models.tiny_config(
          vocab_size=vocab, num_layers=num_layers,
          frac_shared_layers=0.25 if num_layers >= 4 else 0.0), seed=0),
                                 seed=1)
  batch = tiny_models.synthetic_batches(1, batch_size=2, seq_len=12,
                                        vocab_size=vocab, padding="right",
                                        seed=0)[0]
  inputs = tiny_models.model_inputs(batch)

  def results(model):
    # A new function per call: jit caches a trace per function, not per
    # patch state, so a shared one would run stock code "patched".
    @nnx.jit
    def run(model):
      logits = model(inputs["input_tokens"], inputs["positions"], None,
                     inputs["attention_mask"])[0]
      value, grads = nnx.value_and_grad(
          lambda m: tiny_models.sft_loss(m, **inputs),
          argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
      return logits, value, grads
    logits, value, grads = run(model)
    return {"logits": logits, "loss": value,
            "LoRA gradients": nnx.to_pure_dict(grads)}

  stock = results(model)
  with patches.applied(implementation=implementation, interpret=interpret):
    patched = results(model)
  with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
    stock64 = results(tiny_models.float64_copy(model))
  rows = []
  for name in stock:
    error, bound = testing.assert_model_close(patched[name], stock[name],
                                              stock64[name], name=name)
    rows.append({"check": f"tiny Gemma 4 {name}", "error": float(error),
                 "bound": float(bound),
                 "implementation": implementation or _default_name(
                     "attention"), "interpret": interpret,
                 "device": str(jax.devices()[0].platform)})
    print(f"check tiny Gemma 4 {name}: error {error:.3g} <= bound "
          f"{bound:.3g}", file=sys.stderr)
  return rows


def _roofline(flops: int, bytes_accessed: float, seconds: float) -> dict:
  ideal = max(flops / V5E_PEAK_FLOPS, bytes_accessed / V5E_HBM_BYTES_PER_S)
  return {"seconds": seconds, "tflops": flops / seconds / 1e12,
          "peak_fraction": flops / seconds / V5E_PEAK_FLOPS,
          "hbm_GBps": bytes_accessed / seconds / 1e9,
          "roofline_fraction": ideal / seconds}


def timing(seq_lens, iters: int) -> list[dict]:
  """Each op forward + backward on the chip: stock, our XLA version, the
  TPU default, and splash attention. Needs a TPU."""
  rows = []
  for seq_len in seq_lens:
    for op, case, batch, tokens, shapes, fns, flops in op_cases(seq_len):
      if op == "attention":
        head_dim = shapes[0][0][-1]
        window = dict((h, w) for _, h, w in ATTENTION_LAYERS)[head_dim]
        fns = {**fns, "splash": _attention_grad(
            splash_attention(seq_len, window))}
      keys = jax.random.split(jax.random.key(seq_len), len(shapes))
      args = [(jax.random.normal(key, s, jnp.float32) * 0.1).astype(d)
              if jnp.issubdtype(d, jnp.floating) else
              (jax.random.randint(key, s, 0, VOCAB, d) if d == jnp.int32
               else jnp.ones(s, d)) for key, (s, d) in zip(keys, shapes)]
      for impl, fn in fns.items():
        jitted = jax.jit(fn)
        try:
          compiled = testing.compile_optimized(jitted.lower(*args))
          seconds = tpu_attention.time_it(compiled, args, iters)
        except jax.errors.JaxRuntimeError as e:  # stock may not fit in HBM
          rows.append({"op": op, "case": case, "implementation": impl,
                       "seq_len": seq_len, "error": str(e).splitlines()[0]})
          continue
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        rows.append({"op": op, "case": case, "implementation": impl,
                     "seq_len": seq_len, "batch": batch, "tokens": tokens,
                     "useful_flops": flops,
                     "bytes_accessed": float(cost.get("bytes accessed", 0)),
                     **_roofline(flops, float(cost.get("bytes accessed", 0)),
                                 seconds)})
        print(f"time {op:25} {case:28} T={seq_len:<6} {impl:8} "
              f"{seconds * 1e3:9.3f} ms {rows[-1]['tflops']:6.1f} TFLOP/s "
              f"{rows[-1]['roofline_fraction']:6.1%} of roofline",
              file=sys.stderr)
  return rows


def step(seq_len: int, batch: int, iters: int) -> list[dict]:
  """The E2B LoRA step stock vs patched on all chips, with random weights."""
  from gemma4_jax import fit  # pylint: disable=g-import-not-at-top
  from gemma4_jax import fit_model  # pylint: disable=g-import-not-at-top
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices.reshape(-1, 2 if devices.size % 2 == 0
                                           else 1), ("fsdp", "tp"))
  config = fit.FitConfig(model="e2b", batch=batch, seq_len=seq_len)
  abstract = fit_model.AbstractStep(config, mesh)
  rows = []
  for mode in fit.MODES:
    compiled = testing.compile_optimized(abstract.lower(mode, seq_len))
    frozen, trainable, inputs = (
        _materialize(tree, seed)
        for seed, tree in enumerate(abstract.arguments(seq_len)))
    memory_analysis = compiled.memory_analysis()
    out = compiled(frozen, trainable, inputs)   # warm-up; donates trainable
    trainable = out[2]
    times = []
    for _ in range(iters):
      start = time.perf_counter()
      out = compiled(frozen, trainable, inputs)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
      trainable = out[2]
    rows.append({"mode": mode, "seq_len": seq_len, "batch": batch,
                 "seconds": float(np.median(times)),
                 "loss": float(out[0]),
                 "temp_bytes": memory_analysis.temp_size_in_bytes,
                 "tokens_per_second": batch * seq_len / float(
                     np.median(times))})
  return rows


def _materialize(structs, seed: int):
  """Random arrays (small normal; ints: 1; bools: True) with the
  shardings of `structs`."""
  leaves, tree = jax.tree.flatten(structs)

  def make():
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [
        (jax.random.normal(k, s.shape, jnp.float32) * 0.02).astype(s.dtype)
        if jnp.issubdtype(s.dtype, jnp.floating) else jnp.ones(s.shape,
                                                               s.dtype)
        for k, s in zip(keys, leaves)])
  return jax.jit(make, out_shardings=jax.tree.map(lambda s: s.sharding,
                                                  structs))()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="no TPU: interpret-mode checks and memory compiled "
                      "for abstract v5e chips (any machine with libtpu)")
  parser.add_argument("--interpret-model", action="store_true",
                      help="with --dry-run: the tiny model check runs the "
                      "Pallas kernels in interpret mode (~2 CPU-minutes) "
                      "instead of our XLA versions")
  parser.add_argument("--seq-lens", type=int, nargs="+",
                      default=[1024, 2048, 4096, 8192])
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--step-seq-len", type=int, default=1024)
  parser.add_argument("--step-batch", type=int, default=4)
  parser.add_argument("--model-layers", type=int, default=4,
                      help="layers of the tiny model checked (>= 4 includes "
                      "a KV-sharing layer)")
  parser.add_argument("--parts", nargs="+", default=list(PARTS),
                      choices=PARTS, help="what to run (default all)")
  parser.add_argument("--memory-ops", nargs="+", default=list(OPS),
                      choices=OPS)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  on_tpu = jax.default_backend() == "tpu"
  if not args.dry_run and not on_tpu:
    parser.error(f"needs a TPU (backend is {jax.default_backend()!r}); "
                 "use --dry-run elsewhere")
  if args.dry_run:
    missing = testing.libtpu_missing()
    if missing:
      parser.error(missing)
  started = time.perf_counter()
  result = {
      "meta": {"dry_run": args.dry_run,
               "backend": jax.default_backend(),
               "device_kind": (jax.devices()[0].device_kind if on_tpu
                               else testing.tpu_devices()[0].device_kind),
               "jax": jax.__version__, "host": platform.node(),
               "date": datetime.date.today().isoformat(),
               "peak_flops": V5E_PEAK_FLOPS,
               "hbm_bytes_per_s": V5E_HBM_BYTES_PER_S},
      "checks": (op_checks(interpret=not on_tpu)
                 if "checks" in args.parts else [])}
  if "model" in args.parts:
    # On TPU the defaults (Pallas attention and loss); off TPU our XLA
    # versions, or the Pallas kernels in interpret mode if asked.
    interpret_model = not on_tpu and args.interpret_model
    result["checks"] += model_checks(
        implementation=(None if on_tpu else implementations.PALLAS_TPU
                        if interpret_model else XLA),
        interpret=interpret_model, num_layers=args.model_layers)
  result["memory"] = (memory(args.seq_lens, on_device=on_tpu,
                             ops_=args.memory_ops)
                      if "memory" in args.parts else [])
  if on_tpu and not args.dry_run and "timing" in args.parts:
    result["timing"] = timing(args.seq_lens, args.iters)
    result["step"] = step(args.step_seq_len, args.step_batch, args.iters)
  result["meta"]["seconds"] = round(time.perf_counter() - started, 1)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out} ({len(result['checks'])} checks passed, "
        f"{len(result['memory'])} memory figures"
        + ("" if "timing" in result else "; no timing: not on a TPU")
        + ")", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
