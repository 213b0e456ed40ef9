"""Bad inputs and failures mid-merge: clear errors, no complete-looking
output."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gemma4_jax import cli
from gemma4_jax import tiny_models
from gemma4_jax.export import adapter as adapter_lib
from gemma4_jax.export import commands
from gemma4_jax.export import hf_writer
from gemma4_jax.export import merging
from gemma4_jax.export import peft_export
from gemma4_jax.export import safetensors_io
from tests.export import conftest

pytestmark = pytest.mark.slow


def _merge(run, out, **kwargs):
  kwargs.setdefault("alpha", conftest.ALPHA)
  return merging.merge(kwargs.pop("base", run.base_dir),
                       kwargs.pop("adapter", run.checkpoint_root), out,
                       progress=False, **kwargs)


def _assert_no_output(out):
  assert not os.path.exists(out)
  parent = os.path.dirname(out)
  leftovers = [f for f in os.listdir(parent)
               if f.startswith(f".{os.path.basename(out)}.")]
  assert not leftovers, leftovers


def _copy_base(run, tmp_path):
  return shutil.copytree(run.base_dir, tmp_path / "base")


def test_truncated_base_file(tiny_run, tmp_path):
  base = _copy_base(tiny_run, tmp_path)
  shard = os.path.join(base, safetensors_io.shard_file_names(2)[1])
  os.truncate(shard, os.path.getsize(shard) - 100)
  out = str(tmp_path / "out")
  with pytest.raises(safetensors_io.CorruptFileError, match="truncated"):
    _merge(tiny_run, out, base=base)
  _assert_no_output(out)


def test_corrupt_header(tiny_run, tmp_path):
  base = _copy_base(tiny_run, tmp_path)
  shard = os.path.join(base, safetensors_io.shard_file_names(2)[0])
  with open(shard, "r+b") as f:
    f.seek(8)
    f.write(b"\x00garbage{")
  out = str(tmp_path / "out")
  assert cli.main(["merge", "--base", str(base), "--adapter",
                        tiny_run.checkpoint_root, "--out", out, "--alpha",
                        "8", "--quiet"]) == commands.EXIT_ERROR
  _assert_no_output(out)


def test_index_lists_a_missing_tensor(tiny_run, tmp_path):
  base = _copy_base(tiny_run, tmp_path)
  index_path = os.path.join(base, safetensors_io.INDEX_NAME)
  with open(index_path) as f:
    index = json.load(f)
  index["weight_map"]["model.language_model.extra.weight"] = (
      safetensors_io.shard_file_names(2)[0])
  with open(index_path, "w") as f:
    json.dump(index, f)
  with pytest.raises(safetensors_io.CorruptFileError,
                     match="missing tensor.*extra.weight"):
    _merge(tiny_run, str(tmp_path / "out"), base=base)


def test_adapter_target_missing_from_base(tiny_run, tmp_path):
  tensors = safetensors_io.load_checkpoint_index(tiny_run.base_dir)
  dropped = hf_writer.PREFIX + "layers.0.mlp.up_proj.weight"
  base = tmp_path / "base"
  base.mkdir()
  safetensors_io.write_safetensors(
      str(base / "model.safetensors"),
      [(n, safetensors_io.read_tensor(t)) for n, t in sorted(tensors.items())
       if n != dropped])
  with pytest.raises(ValueError, match="does not have"):
    _merge(tiny_run, str(tmp_path / "out"), base=str(base))


def test_rank_and_alpha_mismatch(tiny_run, tmp_path):
  out = str(tmp_path / "out")
  with pytest.raises(adapter_lib.AdapterError, match="rank"):
    _merge(tiny_run, out, rank=conftest.RANK * 2)
  with pytest.raises(adapter_lib.AdapterError, match="--alpha"):
    _merge(tiny_run, out, alpha=None)
  peft_dir = peft_export.export_adapter(tiny_run.checkpoint_root,
                                        tmp_path / "peft",
                                        alpha=conftest.ALPHA)
  with pytest.raises(adapter_lib.AdapterError, match="alpha"):
    _merge(tiny_run, out, adapter=peft_dir, alpha=2 * conftest.ALPHA)
  _assert_no_output(out)


def test_adapter_from_another_model_size(tiny_run, tmp_path):
  config = tiny_models.tiny_config(embed_dim=conftest.EMBED_DIM,
                                   hidden_dim=192)
  other = hf_writer.write_hf_checkpoint(tiny_models.build_model(config),
                                        tmp_path / "other")
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="different model size"):
    _merge(tiny_run, out, base=other)
  _assert_no_output(out)


def test_unknown_adapter_key(tiny_run, tmp_path):
  flat = conftest.lora_params(tiny_run.lora_model)
  flat["layers.0.attn.gate_einsum.w_lora_a"] = np.zeros((96, 4), np.float32)
  flat["layers.0.attn.gate_einsum.w_lora_b"] = np.zeros((4, 96), np.float32)
  root = str(tmp_path / "ckpt")
  conftest.write_tunix_checkpoint(flat, root)
  with pytest.raises(ValueError, match="layers.0.attn.gate_einsum"):
    _merge(tiny_run, str(tmp_path / "out"), adapter=root)


def test_kv_adapter_on_kv_shared_layer_is_refused(tiny_run, tmp_path):
  flat = conftest.lora_params(tiny_run.lora_model)
  flat["layers.4.attn.kv_einsum.w_lora_a"] = flat[
      "layers.1.attn.kv_einsum.w_lora_a"]
  flat["layers.4.attn.kv_einsum.w_lora_b"] = flat[
      "layers.1.attn.kv_einsum.w_lora_b"]
  root = str(tmp_path / "ckpt")
  conftest.write_tunix_checkpoint(flat, root)
  with pytest.raises(ValueError, match="KV-shared"):
    _merge(tiny_run, str(tmp_path / "out"), adapter=root)


def test_existing_output(tiny_run, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("old")
  args = ["merge", "--base", tiny_run.base_dir, "--adapter",
          tiny_run.checkpoint_root, "--out", str(out), "--alpha", "8",
          "--quiet"]
  assert cli.main(args) == commands.EXIT_ERROR
  assert "--force" in capsys.readouterr().err
  assert (out / "keep.txt").exists()
  assert cli.main(args + ["--force"]) == commands.EXIT_OK
  assert not (out / "keep.txt").exists()
  assert os.path.exists(out / safetensors_io.INDEX_NAME)


def test_disk_full_midway(tiny_run, tmp_path, monkeypatch):
  calls = []
  original = safetensors_io.copy_range

  def failing_copy(*args, **kwargs):
    calls.append(1)
    if len(calls) == 5:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return original(*args, **kwargs)

  monkeypatch.setattr(safetensors_io, "copy_range", failing_copy)
  out = str(tmp_path / "out")
  with pytest.raises(merging.MergeError, match="No space left on device"):
    _merge(tiny_run, out, shard_size="300KB")
  assert len(calls) == 5
  _assert_no_output(out)


_KILLED_CHILD = """
import sys, time
from gemma4_jax import cli
from gemma4_jax.export import safetensors_io
original = safetensors_io.copy_range
def stalled_copy(*args, **kwargs):
  original(*args, **kwargs)
  open(sys.argv[1], "w").close()
  time.sleep(600)
safetensors_io.copy_range = stalled_copy
sys.exit(cli.main(sys.argv[2:]))
"""


def test_killed_process_leaves_no_complete_output(tiny_run, tmp_path):
  out = str(tmp_path / "out")
  flag = str(tmp_path / "copying")
  args = ["merge", "--base", tiny_run.base_dir, "--adapter",
          tiny_run.checkpoint_root, "--out", out, "--alpha", "8", "--quiet",
          "--shard-size", "300KB"]
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, flag, *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 240
    while not os.path.exists(flag):
      assert proc.poll() is None, proc.stderr.read().decode()
      assert time.monotonic() < deadline, "child never started copying"
      time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(out)
  partial = [f for f in os.listdir(tmp_path) if f.startswith(".out.partial")]
  assert len(partial) == 1
  assert safetensors_io.INDEX_NAME not in os.listdir(tmp_path / partial[0])
  # A rerun is not confused by the leftover.
  assert cli.main(args) == commands.EXIT_OK
  assert os.path.exists(os.path.join(out, safetensors_io.INDEX_NAME))
