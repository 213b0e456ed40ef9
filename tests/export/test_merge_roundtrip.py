"""Merging a real Tunix LoRA checkpoint into a real Hugging Face checkpoint
and loading the result with Tunix's own safetensors loader."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tunix.models.gemma4 import params_safetensors

from gemma4_jax import cli
from gemma4_jax import testing
from gemma4_jax.export import adapter as adapter_lib
from gemma4_jax.export import hf_writer
from gemma4_jax.export import mapping
from gemma4_jax.export import merging
from gemma4_jax.export import safetensors_io
from tests.export import conftest

pytestmark = pytest.mark.slow


def _merged_logits(run, out_dir):
  model = params_safetensors.create_model_from_safe_tensors(out_dir,
                                                            run.config)
  return conftest.logits_of(model, run.inputs)


def _tensor_bytes(directory):
  index = safetensors_io.load_checkpoint_index(directory)
  return {name: safetensors_io.read_tensor(info).tobytes()
          for name, info in index.items()}


@pytest.fixture(scope="module")
def cli_merged(tiny_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cli") / "merged")
  # The console script's entry point, with the relative paths users type.
  cwd = os.getcwd()
  os.chdir(os.path.dirname(tiny_run.checkpoint_root))
  try:
    code = cli.main([
        "merge", "--base", os.path.relpath(tiny_run.base_dir), "--adapter",
        os.path.relpath(tiny_run.checkpoint_root), "--out", out, "--alpha",
        str(conftest.ALPHA), "--shard-size", "300KB", "--quiet"])
  finally:
    os.chdir(cwd)
  assert code == 0
  return out


def test_cli_merge_matches_lora_model(tiny_run, cli_merged):
  # The adapter must matter, or the comparison below proves nothing.
  assert np.abs(tiny_run.lora_logits - tiny_run.base_logits).max() > 1e-2
  conftest.assert_logits_close(_merged_logits(tiny_run, cli_merged),
                               tiny_run.lora_logits, name="merged logits")


def test_merge_output_layout_and_report(tiny_run, cli_merged):
  files = sorted(os.listdir(cli_merged))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 1 and safetensors_io.INDEX_NAME in files
  assert {"config.json", "tokenizer_config.json",
          merging.REPORT_NAME} <= set(files)
  for shard in shards:
    st = safetensors_io.SafetensorsFile(os.path.join(cli_merged, shard))
    assert st.metadata == {"format": "pt"}
  base = _tensor_bytes(tiny_run.base_dir)
  merged = _tensor_bytes(cli_merged)
  assert merged.keys() == base.keys()
  with open(os.path.join(cli_merged, merging.REPORT_NAME)) as f:
    report = json.load(f)
  changed = {n for n in base if base[n] != merged[n]}
  assert changed == set(report["merged"])
  # 6 layers x (q, o, gate, up, down, ple gate, ple proj) + k/v of the 3
  # unshared layers + per_layer_model_projection.
  assert len(changed) == 6 * 7 + 3 * 2 + 1
  prefix = hf_writer.PREFIX
  for layer in (3, 4, 5):  # KV-shared: k/v pass through byte for byte
    for proj in ("k_proj", "v_proj"):
      assert f"{prefix}layers.{layer}.self_attn.{proj}.weight" not in changed
  assert f"{prefix}embed_tokens_per_layer.weight" not in changed
  assert report["layout"] == mapping.LAYOUT_TUNIX_0_1_7
  assert report["verification"]["num_tensors"] == len(base)
  assert report["verification"]["probes"]
  assert all(p["ok"] for p in report["verification"]["probes"])
  for stats in report["merged"].values():
    assert stats["max_abs_delta"] > 0


def test_head_layout_checkpoint_merges_identically(tiny_run, cli_merged,
                                                   tmp_path):
  # Current Tunix stores per_layer_model_projection as [D, L*P]: its LoRA b
  # is [r, L*P]. That Tunix cannot be installed here, so the checkpoint is
  # the real 0.1.7 one with that array reshaped.
  step_dir, params_dir = adapter_lib.resolve_tunix_step(
      tiny_run.checkpoint_root)
  flat = adapter_lib.read_tunix_params(params_dir)
  key = "embedder.per_layer_model_projection.w_lora_b"
  assert flat[key].ndim == 3
  flat[key] = flat[key].reshape(flat[key].shape[0], -1)
  root = str(tmp_path / "head")
  conftest.write_tunix_checkpoint(flat, root, step=int(os.path.basename(
      step_dir)))
  adapter = adapter_lib.load_adapter(root, alpha=conftest.ALPHA)
  assert adapter.layout == mapping.LAYOUT_TUNIX_HEAD
  out = str(tmp_path / "merged")
  merging.merge(tiny_run.base_dir, adapter, out, shard_size="300KB",
                progress=False)
  assert _tensor_bytes(out) == _tensor_bytes(cli_merged)


def test_ple_projection_delta_is_divided_by_runtime_scale(tiny_run, tmp_path):
  adapter = adapter_lib.load_adapter(tiny_run.checkpoint_root,
                                     alpha=conftest.ALPHA)
  runtime_scale = tiny_run.config.embed_dim ** -0.5
  # Tunix's own saver adds the raw LoRA delta: undo the fix to reproduce it.
  unfixed = tuple(
      dataclasses.replace(d, lora_b=d.lora_b * runtime_scale)
      if d.target == "per_layer_model_projection" else d
      for d in adapter.deltas)
  assert len([d for d in unfixed if d.target ==
              "per_layer_model_projection"]) == 1
  out = str(tmp_path / "unfixed")
  merging.merge(tiny_run.base_dir, dataclasses.replace(adapter,
                                                       deltas=unfixed),
                out, progress=False)
  with pytest.raises(AssertionError):
    conftest.assert_logits_close(_merged_logits(tiny_run, out),
                                 tiny_run.lora_logits)


def test_bf16_base_merges_in_float32_and_rounds_once(tiny_run, tmp_path):
  base_dir = hf_writer.write_hf_checkpoint(
      tiny_run.base_model, tmp_path / "base_bf16", dtype=ml_dtypes.bfloat16)
  adapter = adapter_lib.load_adapter(tiny_run.checkpoint_root,
                                     alpha=conftest.ALPHA)
  out = str(tmp_path / "merged")
  merging.merge(base_dir, adapter, out, progress=False)
  base = safetensors_io.load_checkpoint_index(base_dir)
  merged = safetensors_io.load_checkpoint_index(out)
  deltas = {hf_writer.PREFIX + d.target + ".weight": d
            for d in adapter.deltas}
  for name, info in base.items():
    got = safetensors_io.read_tensor(merged[name])
    assert got.dtype == ml_dtypes.bfloat16
    w = safetensors_io.read_tensor(info)
    if name in deltas:
      d = deltas[name]
      want = (w.astype(np.float32) +
              np.float32(d.scale) * (d.lora_b @ d.lora_a)).astype(
                  ml_dtypes.bfloat16)
      np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    else:
      assert got.tobytes() == w.tobytes()


def test_tied_embedding_adapter_needs_untie(tiny_run, tmp_path):
  flat = conftest.lora_params(tiny_run.lora_model)
  rng = np.random.default_rng(3)
  d, v = tiny_run.config.embed_dim, tiny_run.config.num_embed
  a = rng.standard_normal((d, conftest.RANK)).astype(np.float32)
  b = 0.1 * rng.standard_normal((conftest.RANK, v)).astype(np.float32)
  flat["embedder.input_embedding_lora_a"] = a
  flat["embedder.input_embedding_lora_b"] = b
  root = str(tmp_path / "ckpt")
  conftest.write_tunix_checkpoint(flat, root)
  out = str(tmp_path / "merged")
  args = ["merge", "--base", tiny_run.base_dir, "--adapter", root, "--out",
          out, "--alpha", str(conftest.ALPHA), "--quiet"]
  with pytest.raises(ValueError, match="--untie"):
    merging.merge(tiny_run.base_dir, root, out, alpha=conftest.ALPHA,
                  progress=False)
  assert not os.path.exists(out)
  assert cli.main(args + ["--untie"]) == 0
  merged = safetensors_io.load_checkpoint_index(out)
  base = safetensors_io.load_checkpoint_index(tiny_run.base_dir)
  embed = hf_writer.PREFIX + "embed_tokens.weight"
  assert safetensors_io.read_tensor(merged[embed]).tobytes() == \
      safetensors_io.read_tensor(base[embed]).tobytes()
  scale = conftest.ALPHA / conftest.RANK
  want = safetensors_io.read_tensor(base[embed]) + scale * (a @ b).T
  testing.assert_close(safetensors_io.read_tensor(merged["lm_head.weight"]),
                       want, dtype=jnp.float32, name="lm_head")
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["tie_word_embeddings"] is False
  assert config["text_config"]["tie_word_embeddings"] is False


def test_peft_adapter_merges_like_the_tunix_checkpoint(tiny_run, cli_merged,
                                                       tmp_path):
  peft_dir = str(tmp_path / "peft")
  assert cli.main(["export-adapter", "--adapter",
                        tiny_run.checkpoint_root, "--out", peft_dir,
                        "--alpha", str(conftest.ALPHA)]) == 0
  out = str(tmp_path / "merged")
  assert cli.main(["merge", "--base", tiny_run.base_dir, "--adapter",
                        peft_dir, "--out", out, "--quiet"]) == 0
  assert _tensor_bytes(out) == _tensor_bytes(cli_merged)
