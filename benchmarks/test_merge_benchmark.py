"""LoRA merge at Gemma 4 E2B size: peak RSS and throughput against `cp`.

A synthetic checkpoint with the exact E2B text tensor names and shapes
(tests/data/gemma4_e2b_hf_text_shapes.json, bf16, ~9.3 GB) and a
rank-16 adapter on every qwix target an eagerly built E2B gets (522 tensors
of gemma4_e2b_tunix_shapes.json `lora`; the tied-embedding pair is left out
because merging it needs `--untie`, which adds an lm_head the `cp` baseline
would not have). Each job runs in its own process so its peak RSS is its
own. The anchor is Tunix's `save_lora_merged_model_as_safetensors` on a
~2 GB subset (it loads the whole file, so E2B size would need ~2x 9.3 GB).

Not part of CI (benchmarks/ is outside testpaths). Run:
  python -m pytest benchmarks/test_merge_benchmark.py -s --benchmark-enable
Set GEMMA4_JAX_BENCH_DIR to pick the disk (default: the system temp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
import pytest

from gemma4_jax.export import safetensors_io

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "tests", "data")
HF_SHAPES = os.path.join(DATA, "gemma4_e2b_hf_text_shapes.json")
TUNIX_SHAPES = os.path.join(DATA, "gemma4_e2b_tunix_shapes.json")
PREFIX = "model.language_model."
RANK, ALPHA = 16, 32.0
ANCHOR_BYTES = 2 * 10**9
SHARD_SIZE = 5 * 10**9
# Random bytes are generated once and tiled: content does not change I/O.
BLOCK_BYTES = 64 << 20

_CHILD = """
import json, resource, sys, time
start = time.perf_counter()
exec(sys.argv[1])
print("RESULT " + json.dumps({
    "seconds": time.perf_counter() - start,
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

_MERGE_JOB = """
from gemma4_jax import cli
assert cli.main(["merge", "--base", sys.argv[2], "--adapter",
                 sys.argv[3], "--out", sys.argv[4], "--alpha", "{alpha}",
                 "--quiet"]) == 0
"""

_TUNIX_JOB = """
import numpy as np
from flax import nnx
from tunix.models import safetensors_saver
lora = np.load(sys.argv[3])
class Pair(nnx.Module):
  def __init__(self, a, b):
    self.w_lora_a = nnx.LoRAParam(a)
    self.w_lora_b = nnx.LoRAParam(b)
class Holder(nnx.Module):
  pass
holder = Holder()
names = sorted({{k[:-2] for k in lora.files}})
for i, name in enumerate(names):
  setattr(holder, f"p{{i}}", Pair(lora[name + "_a"], lora[name + "_b"]))
safetensors_saver.save_lora_merged_model_as_safetensors(
    sys.argv[2], sys.argv[4], holder, rank={rank}, alpha={alpha},
    state_key_transform_fn=lambda p: names[int(p[1:])],
    transpose_rules={{"": (1, 0)}})
"""


def _run_child(job: str, *args: str) -> dict:
  proc = subprocess.run([sys.executable, "-c", _CHILD, job, *args],
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"child failed:\n{proc.stderr[-4000:]}")
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def _write_base(directory: str, shapes: dict[str, list[int]]) -> int:
  """Streams a bf16 checkpoint of `shapes` to disk; returns its bytes."""
  os.makedirs(directory)
  block = np.random.default_rng(0).standard_normal(
      BLOCK_BYTES // 2, np.float32).astype(ml_dtypes.bfloat16).view(np.uint8)
  names = sorted(shapes)
  sizes = [int(np.prod(shapes[n])) * 2 for n in names]
  shards = safetensors_io.plan_shards(sizes, SHARD_SIZE)
  files = (["model.safetensors"] if len(shards) == 1 else
           safetensors_io.shard_file_names(len(shards)))
  weight_map = {}
  for file, shard in zip(files, shards):
    header = safetensors_io.encode_header(
        [(names[i], "BF16", tuple(shapes[names[i]])) for i in shard],
        {"format": "pt"})
    with open(os.path.join(directory, file), "wb") as f:
      f.write(header)
      for i in shard:
        left = sizes[i]
        while left:
          n = min(left, block.size)
          f.write(block[:n].data)
          left -= n
      weight_map.update({names[i]: file for i in shard})
  if len(shards) > 1:
    safetensors_io.write_index(directory, weight_map, sum(sizes))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"model_type": "gemma4", "text_config": {
        "num_hidden_layers": 35, "num_kv_shared_layers": 20,
        "hidden_size": 1536}, "tie_word_embeddings": True}, f)
  return sum(sizes)


def _lora_arrays(names=None) -> dict[str, np.ndarray]:
  with open(TUNIX_SHAPES) as f:
    lora = json.load(f)["lora"]
  rng = np.random.default_rng(1)
  out = {}
  for path, (shape, _, _) in sorted(lora.items()):
    if path.startswith("embedder.input_embedding"):
      continue
    if names is not None and path.rsplit("_lora_", 1)[0] not in names:
      continue
    out[path] = (0.01 * rng.standard_normal(shape, np.float32)).astype(
        ml_dtypes.bfloat16)
  return out


def _write_adapter(root: str) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree: dict = {}
  for path, value in _lora_arrays().items():
    node = tree
    for key in path.split("."):
      node = node.setdefault(key, {})
    node["value"] = value
  ocp.PyTreeCheckpointer().save(os.path.join(root, "1", "model_params"), tree)


def _sync_tree(directory: str) -> None:
  subprocess.run(["sync", "-f", directory], check=True)


@pytest.fixture(scope="module")
def workdir():
  parent = os.environ.get("GEMMA4_JAX_BENCH_DIR", tempfile.gettempdir())
  with open(HF_SHAPES) as f:
    shapes = json.load(f)
  needed = 3 * sum(int(np.prod(s)) * 2 for s in shapes.values()) + 3 * \
      ANCHOR_BYTES + (2 << 30)
  free = shutil.disk_usage(parent).free
  if free < needed:
    pytest.skip(f"needs {needed / 1e9:.1f} GB free in {parent} (base, merged "
                f"output, cp copy, anchor), has {free / 1e9:.1f} GB")
  path = tempfile.mkdtemp(prefix="gemma4-merge-bench-", dir=parent)
  yield path
  shutil.rmtree(path, ignore_errors=True)


def test_e2b_merge_vs_cp(workdir, benchmark):
  with open(HF_SHAPES) as f:
    shapes = json.load(f)
  base = os.path.join(workdir, "base")
  num_bytes = _write_base(base, shapes)
  adapter = os.path.join(workdir, "adapter")
  _write_adapter(adapter)
  _sync_tree(workdir)

  copy_dir = os.path.join(workdir, "cp")
  os.makedirs(copy_dir)
  start = time.perf_counter()
  files = [os.path.join(base, f) for f in sorted(os.listdir(base))
           if f.endswith(".safetensors")]
  subprocess.run(["cp", *files, copy_dir], check=True)
  subprocess.run(["sync", *[os.path.join(copy_dir, os.path.basename(f))
                            for f in files]], check=True)
  cp_seconds = time.perf_counter() - start
  shutil.rmtree(copy_dir)

  out = os.path.join(workdir, "merged")
  load_before = os.getloadavg()[0]
  result = benchmark.pedantic(
      _run_child, args=(_MERGE_JOB.format(alpha=ALPHA), base, adapter,
                        out), rounds=1, iterations=1)
  merge_gbs = num_bytes / result["seconds"] / 1e9
  cp_gbs = num_bytes / cp_seconds / 1e9
  info = {
      "bytes": num_bytes, "tensors": len(shapes),
      "adapter_tensors": len(_lora_arrays()),
      "merge_seconds": result["seconds"], "merge_GBps": merge_gbs,
      "merge_peak_rss_MiB": result["peak_rss"] / 2**20,
      "cp_seconds": cp_seconds, "cp_GBps": cp_gbs,
      "throughput_ratio_vs_cp": merge_gbs / cp_gbs,
      # Other jobs share the 2 cores; 1-minute load before and after.
      "load_avg": [load_before, os.getloadavg()[0]],
  }
  benchmark.extra_info.update(info)
  print("\nE2B merge:", json.dumps(info, indent=2))
  shutil.rmtree(out)
  shutil.rmtree(base)


def test_tunix_saver_anchor_2gb(workdir, benchmark):
  with open(HF_SHAPES) as f:
    shapes = json.load(f)
  # The layer weights of the first layers, up to ~2 GB.
  subset, total = {}, 0
  for name in sorted(shapes, key=lambda n: (len(n.split(".")), n)):
    if ".layers." not in name or not name.endswith("proj.weight"):
      continue
    size = int(np.prod(shapes[name])) * 2
    if total + size > ANCHOR_BYTES:
      break
    subset[name] = shapes[name]
    total += size
  base = os.path.join(workdir, "anchor_base")
  num_bytes = _write_base_single(base, subset)
  hf_of = _tunix_to_hf_names()
  targets = {t for t, hf in hf_of.items() if hf in subset}
  lora = _lora_arrays(targets)
  # The saver wants 2-D a [in, r] and b [r, out] per HF weight.
  pairs = {}
  for t in sorted(targets):
    a = lora[t + "_lora_a"].astype(np.float32)
    b = lora[t + "_lora_b"].astype(np.float32)
    if t.endswith("kv_einsum.w"):
      for i, proj in enumerate(("k_proj", "v_proj")):
        name = hf_of[t].replace("k_proj", proj)
        pairs[name + "_a"], pairs[name + "_b"] = a, b[:, i].reshape(RANK, -1)
    else:
      pairs[hf_of[t] + "_a"] = a.reshape(-1, RANK)
      pairs[hf_of[t] + "_b"] = b.reshape(RANK, -1)
  lora_file = os.path.join(workdir, "anchor_lora.npz")
  np.savez(lora_file, **pairs)
  out = os.path.join(workdir, "anchor_out")
  tunix = benchmark.pedantic(
      _run_child, args=(_TUNIX_JOB.format(rank=RANK, alpha=ALPHA), base,
                        lora_file, out), rounds=1, iterations=1)
  shutil.rmtree(out)
  info = {"bytes": num_bytes, "tunix_seconds": tunix["seconds"],
          "tunix_GBps": num_bytes / tunix["seconds"] / 1e9,
          "tunix_peak_rss_MiB": tunix["peak_rss"] / 2**20}
  benchmark.extra_info.update(info)
  print("\nTunix saver anchor:", json.dumps(info, indent=2))
  shutil.rmtree(base)


def _write_base_single(directory: str, shapes) -> int:
  saved = SHARD_SIZE
  globals()["SHARD_SIZE"] = 10**15  # Tunix's saver reads one model.safetensors
  try:
    return _write_base(directory, shapes)
  finally:
    globals()["SHARD_SIZE"] = saved


def _tunix_to_hf_names() -> dict[str, str]:
  with open(TUNIX_SHAPES) as f:
    lora = json.load(f)["lora"]
  out = {}
  for path in lora:
    t = path.rsplit("_lora_", 1)[0]
    parts = t.split(".")
    if parts[0] != "layers":
      continue
    layer = f"{PREFIX}layers.{parts[1]}."
    leaf = ".".join(parts[2:])
    out[t] = layer + {
        "attn.q_einsum.w": "self_attn.q_proj.weight",
        "attn.kv_einsum.w": "self_attn.k_proj.weight",
        "attn.attn_vec_einsum.w": "self_attn.o_proj.weight",
        "mlp.gate_proj.kernel": "mlp.gate_proj.weight",
        "mlp.up_proj.kernel": "mlp.up_proj.weight",
        "mlp.down_proj.kernel": "mlp.down_proj.weight",
        "per_layer_input_gate.w": "per_layer_input_gate.weight",
        "per_layer_projection.w": "per_layer_projection.weight",
    }[leaf]
  return out
