"""Bad input to every `gemma4-jax` command, run in this process.

Every case must end in a non-zero exit and one line on stderr that names
the flag, file or field, without a traceback; merge and export cases also
check that nothing was written or left behind and that an existing output
is untouched. `perplexity` cases must fail before a model is loaded
(`load_model` is replaced by a guard that fails the test if reached).
One case runs in a subprocess: orbax's background-thread noise on a
damaged checkpoint only shows in a fresh process, as a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from gemma4_jax import cli
from gemma4_jax import perplexity
from gemma4_jax.export import safetensors_io
from tests.bad_input import conftest

SHARD = safetensors_io.shard_file_names(2)[0]
MARKER = "an earlier output"


def run(capsys, *argv):
  """`gemma4-jax ARGV` in this process: (exit code, stdout, stderr)."""
  try:
    code = cli.main([str(a) for a in argv])
  except SystemExit as e:  # argparse
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def assert_refused(code, err, match, *, usage=False):
  assert code not in (0, None), err
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  if not usage:  # argparse prints its usage first
    assert len(lines) == 1, err
  assert pytest.importorskip("re").search(match, lines[-1]), (match, err)


def assert_nothing_left(out_dir, *, existing=False):
  parent, name = os.path.split(out_dir)
  leftovers = [f for f in os.listdir(parent) if f.startswith(f".{name}.")]
  assert not leftovers, leftovers
  if existing:
    with open(os.path.join(out_dir, "marker")) as f:
      assert f.read() == MARKER
    assert os.listdir(out_dir) == ["marker"]
  else:
    assert not os.path.exists(out_dir)


# Edits of copied inputs. Each takes the copied directory.
def _edit_json(name, change):
  def edit(directory):
    path = os.path.join(directory, name)
    with open(path) as f:
      value = json.load(f)
    with open(path, "w") as f:
      json.dump(change(value), f)
  return edit


def _write(name, text):
  def edit(directory):
    with open(os.path.join(directory, name), "wb") as f:
      f.write(text if isinstance(text, bytes) else text.encode())
  return edit


def _set(key, value, inner=None):
  def change(obj):
    target = obj[inner] if inner else obj
    target[key] = value
    return obj
  return change


def _header_entry(change):
  """Rewrites the first tensor's header entry of shard 1 (data kept)."""
  def edit(directory):
    path = os.path.join(directory, SHARD)
    with open(path, "rb") as f:
      (length,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(length))
      data = f.read()
    name = next(k for k in header if k != "__metadata__")
    header[name] = change(header[name])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
      f.write(struct.pack("<Q", len(raw)) + raw + data)
  return edit


def _truncate(directory):
  path = os.path.join(directory, SHARD)
  os.truncate(path, os.path.getsize(path) - 10)


def _second_file(directory):
  os.remove(os.path.join(directory, safetensors_io.INDEX_NAME))


BASE_EDITS = [
    ("config-list", _write("config.json", "[1, 2]"),
     r"config.json: expected a JSON object, got a list"),
    ("config-not-json", _write("config.json", "{oops"),
     r"config.json is not valid JSON"),
    ("config-tie-str", _edit_json("config.json",
                                  _set("tie_word_embeddings", "yes")),
     r"field 'tie_word_embeddings' must be true or false"),
    ("config-text-list", _edit_json("config.json", _set("text_config", [])),
     r"text_config: expected a JSON object"),
    ("config-layers-str", _edit_json("config.json", _set(
        "num_hidden_layers", "3", "text_config")),
     r"field 'num_hidden_layers' must be an integer"),
    ("config-shared-negative", _edit_json("config.json", _set(
        "num_kv_shared_layers", -1, "text_config")),
     r"field 'num_kv_shared_layers' must be >= 0"),
    ("index-list", _write(safetensors_io.INDEX_NAME, "[]"),
     r"index.json: not a safetensors index"),
    ("index-map-list", _edit_json(safetensors_io.INDEX_NAME,
                                  _set("weight_map", [])),
     r"not a safetensors index: expected an object with a 'weight_map'"),
    ("index-file-int", _edit_json(safetensors_io.INDEX_NAME, lambda i: (
        i["weight_map"].update({next(iter(i["weight_map"])): 5}) or i)),
     r"weight_map\[.*\] must be a file name"),
    ("index-file-escape", _edit_json(safetensors_io.INDEX_NAME, lambda i: (
        i["weight_map"].update({next(iter(i["weight_map"])):
                                "../x.safetensors"}) or i)),
     r"weight_map\[.*\] must be a file name"),
    ("index-not-json", _write(safetensors_io.INDEX_NAME, b"\xff{"),
     r"index.json: not valid JSON"),
    ("header-negative-dim", _header_entry(lambda e: e | {"shape": [-4, 2]}),
     r"field 'shape' must be a list of non-negative integers, got \[-4, 2\]"),
    ("header-float-dim", _header_entry(lambda e: e | {"shape": [2.5]}),
     r"field 'shape' must be a list of non-negative integers"),
    ("header-str-dim", _header_entry(lambda e: e | {"shape": ["4"]}),
     r"field 'shape' must be a list of non-negative integers"),
    ("header-bool-dim", _header_entry(lambda e: e | {"shape": [True]}),
     r"field 'shape' must be a list of non-negative integers"),
    ("header-offsets", _header_entry(lambda e: e | {"data_offsets": [0]}),
     r"field 'data_offsets' must be \[begin, end\]"),
    ("header-entry-list", _header_entry(lambda e: [e]),
     r"header entry .*: expected an object, got list"),
    ("header-missing-dtype", _header_entry(
        lambda e: {k: v for k, v in e.items() if k != "dtype"}),
     r"missing field\(s\) \['dtype'\]"),
    ("header-dtype", _header_entry(lambda e: e | {"dtype": "Q4"}),
     r"unknown dtype 'Q4'"),
    ("truncated", _truncate, r"truncated or corrupt"),
    ("two-files-no-index", _second_file,
     r"base: .* has 2 .safetensors files and no"),
]


def _copy(src, tmp_path, name, edit=None):
  directory = shutil.copytree(src, tmp_path / name)
  if edit is not None:
    edit(str(directory))
  return str(directory)


@pytest.mark.parametrize("name, edit, match", BASE_EDITS,
                         ids=[row[0] for row in BASE_EDITS])
def test_merge_bad_base(files, tmp_path, capsys, name, edit, match):
  del name
  base = _copy(files.base_dir, tmp_path, "base", edit)
  out = tmp_path / "out"
  code, _, err = run(capsys, "merge", "--base", base, "--adapter",
                     files.peft_dir, "--out", out, "--quiet")
  assert_refused(code, err, match)
  assert_nothing_left(str(out))


@pytest.mark.parametrize("name, edit, match", BASE_EDITS[:6] + BASE_EDITS[11:13],
                         ids=[row[0] for row in BASE_EDITS[:6] +
                              BASE_EDITS[11:13]])
def test_export_adapter_bad_base(files, tmp_path, capsys, name, edit, match):
  del name
  base = _copy(files.base_dir, tmp_path, "base", edit)
  out = tmp_path / "out"
  code, _, err = run(capsys, "export-adapter", "--adapter", files.peft_dir,
                     "--out", out, "--base", base)
  assert_refused(code, err, match)
  assert_nothing_left(str(out))


PEFT_EDITS = [
    ("config-list", _write("adapter_config.json", "[]"),
     r"adapter_config.json: expected a JSON object, got list"),
    ("config-not-json", _write("adapter_config.json", "{"),
     r"adapter_config.json is not valid JSON"),
    ("alpha-negative", _edit_json("adapter_config.json",
                                  _set("lora_alpha", -8)),
     r"field 'lora_alpha' must be a positive number .*got -8"),
    ("alpha-zero", _edit_json("adapter_config.json", _set("lora_alpha", 0)),
     r"field 'lora_alpha' must be a positive number"),
    ("alpha-str", _edit_json("adapter_config.json", _set("lora_alpha", "8")),
     r"field 'lora_alpha' must be a positive number .*got '8'"),
    ("alpha-nan", _edit_json("adapter_config.json",
                             _set("lora_alpha", float("nan"))),
     r"field 'lora_alpha' must be a positive number .*got nan"),
    ("alpha-bool", _edit_json("adapter_config.json", _set("lora_alpha", True)),
     r"field 'lora_alpha' must be a positive number"),
    ("rank-str", _edit_json("adapter_config.json", _set("r", "four")),
     r"field 'r' must be a positive integer"),
    ("rank-zero", _edit_json("adapter_config.json", _set("r", 0)),
     r"field 'r' must be a positive integer"),
    ("rank-float", _edit_json("adapter_config.json", _set("r", 2.5)),
     r"field 'r' must be a positive integer"),
    ("rslora-str", _edit_json("adapter_config.json",
                              _set("use_rslora", "yes")),
     r"field 'use_rslora' must be true or false"),
    ("dora", _edit_json("adapter_config.json", _set("use_dora", True)),
     r"use_dora=true is not supported"),
    ("peft-type", _edit_json("adapter_config.json",
                             _set("peft_type", "IA3")),
     r"peft_type 'IA3' is not LORA"),
    ("no-weights", lambda d: os.remove(os.path.join(d,
                                                    "adapter_model.safetensors")),
     r"adapter_model.safetensors is missing"),
    ("rank-mismatch", _edit_json("adapter_config.json", _set("r", 8)),
     r"rank: .* records 8 but its tensors have 4"),
]


@pytest.mark.parametrize("command", ["merge", "export-adapter"])
@pytest.mark.parametrize("name, edit, match", PEFT_EDITS,
                         ids=[row[0] for row in PEFT_EDITS])
def test_bad_peft_adapter(files, tmp_path, capsys, command, name, edit,
                          match):
  del name
  adapter = _copy(files.peft_dir, tmp_path, "peft", edit)
  out = tmp_path / "out"
  argv = ["--adapter", adapter, "--out", out]
  if command == "merge":
    argv += ["--base", files.base_dir, "--quiet"]
  code, _, err = run(capsys, command, *argv)
  assert_refused(code, err, match)
  assert_nothing_left(str(out))


def _metadata(text):
  def edit(root):
    with open(os.path.join(root, "1", "_CHECKPOINT_METADATA"), "w") as f:
      f.write(text)
  return edit


TUNIX_EDITS = [
    ("alpha-negative", _metadata('{"custom_metadata": {"lora_alpha": -8}}'),
     r"_CHECKPOINT_METADATA custom_metadata: field 'lora_alpha' must be a "
     r"positive number .*got -8"),
    ("alpha-zero", _metadata('{"custom_metadata": {"lora_alpha": 0}}'),
     r"field 'lora_alpha' must be a positive number"),
    ("alpha-str", _metadata('{"custom_metadata": {"alpha": "eight"}}'),
     r"field 'alpha' must be a positive number"),
    ("rank-str", _metadata('{"custom_metadata": {"lora_rank": "4"}}'),
     r"field 'lora_rank' must be a positive integer"),
    ("not-json", _metadata("{garbage"),
     r"_CHECKPOINT_METADATA is not valid JSON"),
    ("custom-list", _metadata('{"custom_metadata": [1]}'),
     r"field 'custom_metadata' must be an object"),
    ("metadata-list", _metadata("[]"),
     r"_CHECKPOINT_METADATA: expected a JSON object"),
]


@pytest.mark.parametrize("command", ["merge", "export-adapter"])
@pytest.mark.parametrize("name, edit, match", TUNIX_EDITS,
                         ids=[row[0] for row in TUNIX_EDITS])
def test_bad_tunix_metadata(files, tmp_path, capsys, command, name, edit,
                            match):
  del name
  adapter = _copy(files.tunix_root, tmp_path, "tunix", edit)
  out = tmp_path / "out"
  argv = ["--adapter", adapter, "--out", out]
  if command == "merge":
    argv += ["--base", files.base_dir, "--quiet"]
  code, _, err = run(capsys, command, *argv)
  assert_refused(code, err, match)
  assert_nothing_left(str(out))


FLAGS = [
    ("alpha-nan", ["--alpha", "nan"], r"alpha \(--alpha\): expected a "
     r"positive number, got nan"),
    ("alpha-inf", ["--alpha", "inf"], r"alpha \(--alpha\)"),
    ("alpha-zero", ["--alpha", "0"], r"alpha \(--alpha\)"),
    ("alpha-negative", ["--alpha=-8"], r"alpha \(--alpha\)"),
    ("alpha-text", ["--alpha", "eight"], r"argument --alpha: invalid float"),
    ("rank-zero", ["--rank", "0"], r"rank \(--rank\): expected a positive"),
    ("rank-negative", ["--rank=-4"], r"rank \(--rank\)"),
    ("rank-float", ["--rank", "4.0"], r"argument --rank: invalid int"),
    ("rank-mismatch", ["--rank", "5", "--alpha", "8"],
     r"rank: given 5 but .* has rank 4 in the tensor shapes"),
    ("tunix-without-alpha", [], r"alpha: the Tunix checkpoint .* does not "
     r"record the LoRA alpha; pass --alpha"),
]


@pytest.mark.parametrize("command", ["merge", "export-adapter"])
@pytest.mark.parametrize("name, flags, match", FLAGS,
                         ids=[row[0] for row in FLAGS])
def test_bad_flags(files, tmp_path, capsys, command, name, flags, match):
  out = tmp_path / "out"
  argv = [command, "--adapter", files.tunix_root, "--out", out, *flags]
  if command == "merge":
    argv += ["--base", files.base_dir, "--quiet"]
  code, _, err = run(capsys, *argv)
  assert_refused(code, err, match, usage=name in ("alpha-text", "rank-float"))
  assert_nothing_left(str(out))


@pytest.mark.parametrize("size", ["nan", "inf", "0", "-1GB", "5XB", "0.1B",
                                  "GB", ""])
def test_merge_shard_size(files, tmp_path, capsys, size):
  out = tmp_path / "out"
  code, _, err = run(capsys, "merge", "--base", files.base_dir, "--adapter",
                     files.peft_dir, "--out", out, "--quiet",
                     f"--shard-size={size}")
  assert_refused(code, err, r"shard_size \(--shard-size\): expected a size")
  assert_nothing_left(str(out))


def _paths(files, tmp_path):
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "empty").mkdir()
  return {"file": tmp_path / "a_file", "missing": tmp_path / "missing",
          "empty": tmp_path / "empty", "base": files.base_dir,
          "peft": files.peft_dir}


@pytest.mark.parametrize("base, adapter, match", [
    ("missing", "peft", r"base: .*missing' is not a directory"),
    ("file", "peft", r"base: .*a_file' is not a directory"),
    ("empty", "peft", r"base: .*empty' has 0 .safetensors files"),
    ("base", "missing", r"adapter: .*missing' is not a directory"),
    ("base", "file", r"adapter: .*a_file' is not a directory"),
    ("base", "empty", r"adapter: .*empty' is neither a PEFT directory"),
], ids=["base-missing", "base-file", "base-empty", "adapter-missing",
        "adapter-file", "adapter-empty"])
def test_merge_bad_paths(files, tmp_path, capsys, base, adapter, match):
  paths = _paths(files, tmp_path)
  out = tmp_path / "out"
  code, _, err = run(capsys, "merge", "--base", paths[base], "--adapter",
                     paths[adapter], "--out", out, "--quiet")
  assert_refused(code, err, match)
  assert_nothing_left(str(out))


@pytest.mark.parametrize("adapter, base, match", [
    ("missing", None, r"adapter: .*missing' is not a directory"),
    ("empty", None, r"is neither a PEFT directory"),
    ("peft", "missing", r"base \(--base\): .*missing' does not exist"),
    ("peft", "file", r"base \(--base\): .*a_file' is not a directory"),
], ids=["adapter-missing", "adapter-empty", "base-missing", "base-file"])
def test_export_adapter_bad_paths(files, tmp_path, capsys, adapter, base,
                                  match):
  paths = _paths(files, tmp_path)
  out = tmp_path / "out"
  argv = ["export-adapter", "--adapter", paths[adapter], "--out", out]
  if base:
    argv += ["--base", paths[base]]
  code, _, err = run(capsys, *argv)
  assert_refused(code, err, match)
  assert_nothing_left(str(out))


@pytest.mark.parametrize("command", ["merge", "export-adapter"])
def test_existing_output_is_untouched(files, tmp_path, capsys, command):
  out = tmp_path / "out"
  out.mkdir()
  (out / "marker").write_text(MARKER)
  argv = [command, "--adapter", files.peft_dir, "--out", out]
  if command == "merge":
    argv += ["--base", files.base_dir, "--quiet"]
  code, _, err = run(capsys, *argv)
  assert_refused(code, err, r"out: .* already exists; pass --force")
  assert_nothing_left(str(out), existing=True)


@pytest.mark.parametrize("command", ["merge", "export-adapter"])
def test_failed_force_leaves_the_old_output(files, tmp_path, capsys,
                                            command):
  out = tmp_path / "out"
  out.mkdir()
  (out / "marker").write_text(MARKER)
  argv = [command, "--adapter", files.peft_dir, "--out", out, "--force",
          "--alpha", "nan"]
  if command == "merge":
    argv += ["--base", files.base_dir, "--quiet"]
  code, _, err = run(capsys, *argv)
  assert_refused(code, err, r"alpha \(--alpha\)")
  assert_nothing_left(str(out), existing=True)


@pytest.mark.parametrize("where, match", [
    ("parent-missing", r"out: parent directory .* does not exist"),
    ("base-itself", r"out: .* would overwrite the base checkpoint"),
])
def test_merge_bad_out(files, tmp_path, capsys, where, match):
  base = _copy(files.base_dir, tmp_path, "base")
  before = sorted(os.listdir(base))
  out = tmp_path / "no" / "out" if where == "parent-missing" else base
  code, _, err = run(capsys, "merge", "--base", base, "--adapter",
                     files.peft_dir, "--out", out, "--quiet", "--force")
  assert_refused(code, err, match)
  assert sorted(os.listdir(base)) == before


def test_adapter_from_another_model_size(files, tmp_path, capsys):
  rng = np.random.default_rng(1)
  root = str(tmp_path / "tunix")
  conftest.write_tunix_checkpoint(
      {"layers.0.mlp.gate_proj.kernel_lora_a": rng.standard_normal((64, 4)),
       "layers.0.mlp.gate_proj.kernel_lora_b": rng.standard_normal((4, 128))},
      root)
  out = tmp_path / "out"
  code, _, err = run(capsys, "merge", "--base", files.base_dir, "--adapter",
                     root, "--out", out, "--alpha", "8", "--quiet")
  assert_refused(code, err, r"adapter/base shape mismatch for "
                 r".*layers.0.mlp.gate_proj.weight")
  assert_nothing_left(str(out))


def test_peft_adapter_of_rank_zero(files, tmp_path, capsys):
  adapter = tmp_path / "peft"
  adapter.mkdir()
  shutil.copy(os.path.join(files.peft_dir, "adapter_config.json"), adapter)
  module = "base_model.model.model.language_model.layers.0.mlp.gate_proj"
  safetensors_io.write_safetensors(
      str(adapter / "adapter_model.safetensors"),
      [(f"{module}.lora_A.weight", np.zeros((0, 96), np.float32)),
       (f"{module}.lora_B.weight", np.zeros((128, 0), np.float32))])
  _edit_json("adapter_config.json", lambda c: {k: v for k, v in c.items()
                                               if k != "r"})(str(adapter))
  out = tmp_path / "out"
  code, _, err = run(capsys, "merge", "--base", files.base_dir, "--adapter",
                     adapter, "--out", out, "--quiet")
  assert_refused(code, err, r"have rank 0 \(empty A and B\)")
  assert_nothing_left(str(out))


@pytest.mark.parametrize("command", ["merge", "export-adapter"])
def test_force_onto_a_file_leaves_nothing_behind(files, tmp_path, capsys,
                                                 command):
  out = tmp_path / "out"
  out.write_text("a file where the output goes")
  argv = [command, "--adapter", files.peft_dir, "--out", out, "--force"]
  if command == "merge":
    argv += ["--base", files.base_dir, "--quiet", "--no-verify"]
  code, _, err = run(capsys, *argv)
  assert code == 0, err
  assert os.path.isdir(out)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".out.")]


def test_damaged_orbax_checkpoint_is_one_line(files, tmp_path):
  """In a fresh process, as a user runs it: orbax's background threads
  report 'Event loop is closed' through the unraisable hook when a restore
  fails; none of it may reach stderr."""
  adapter = _copy(files.tunix_root, tmp_path, "tunix")
  data = os.path.join(adapter, "1", "model_params", "d")
  for name in os.listdir(data):
    with open(os.path.join(data, name), "r+b") as f:
      f.write(b"\x00garbage{" * 3)
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "gemma4_jax.cli", "merge", "--base",
       files.base_dir, "--adapter", adapter, "--out", str(out), "--alpha",
       "8", "--quiet"], capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "cannot restore the orbax checkpoint" in lines[0]
  assert len(lines[0]) < 600, lines[0]
  assert_nothing_left(str(out))


# perplexity: every case is refused before a model is loaded.
@pytest.fixture
def no_model(monkeypatch):
  def guard(*args, **kwargs):
    raise AssertionError("perplexity loaded a model for bad input")
  monkeypatch.setattr(perplexity, "load_model", guard)


def _jsonl(tmp_path, *lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  return path


def _checkpoint(files, tmp_path, edit=None):
  return _copy(files.base_dir, tmp_path, "checkpoint", edit)


def _big_tokenizer(directory):
  conftest.write_tokenizer(directory, 400)


def _bad_tokenizer(directory):
  _write("tokenizer.json", '{"model": 1}')(directory)


PERPLEXITY = [
    # (id, checkpoint edit, data lines (None: files.data), flags, match)
    ("ids-past-vocab", _big_tokenizer, [{"text": "w3 w300 w5"}], [],
     r"tokenizer.json gives token id 300 \(example 0\) but the model's "
     r"vocab_size is 256"),
    ("no-scored-text", None, [{"text": ""}], [], r"no scored tokens"),
    ("no-scored-completion", None, [{"prompt": "w3 w4", "completion": ""}],
     [], r"no scored tokens"),
    ("no-examples", None, [], [], r"data.jsonl: no examples"),
    ("inspect-without-top-k", None, None, ["--inspect", "0"],
     r"--inspect only selects examples for --top-k"),
    ("alpha-without-adapter", None, None, ["--alpha", "8"],
     r"--alpha is the alpha of --adapter"),
    ("top-k-zero", None, None, ["--top-k", "0"], r"--top-k must be >= 1"),
    ("top-k-negative", None, None, ["--top-k=-3"], r"--top-k must be >= 1"),
    ("top-k-past-vocab", None, None, ["--top-k", "1000"],
     r"--top-k: 1000 is more than the vocabulary \(256 tokens\)"),
    ("inspect-range", None, None, ["--top-k", "2", "--inspect", "5"],
     r"--inspect: examples \[5\] out of range \[0, 2\)"),
    ("inspect-negative", None, None, ["--top-k", "2", "--inspect", "-1"],
     r"--inspect: examples \[-1\] out of range"),
    ("inspect-one-token", None, [{"text": "w3 w4"}, {"text": ""}],
     ["--top-k", "2", "--inspect", "1"],
     r"--inspect: example\(s\) \[1\] have fewer than 2 tokens"),
    ("checkpoint-no-tokenizer", lambda d: os.remove(
        os.path.join(d, "tokenizer.json")), None, [],
     r"checkpoint: no tokenizer.json in"),
    ("checkpoint-bad-tokenizer", _bad_tokenizer, None, [],
     r"tokenizer.json is not a tokenizers file"),
    ("checkpoint-no-config", lambda d: os.remove(
        os.path.join(d, "config.json")), None, [],
     r"checkpoint: no config.json in"),
    ("config-no-layer-types", _edit_json("config.json", lambda c: (
        c["text_config"].pop("layer_types") and c)), None, [],
     r"config.json: text_config: missing field 'layer_types'"),
    ("config-list", _write("config.json", "[]"), None, [],
     r"config.json: expected a JSON object, got a list"),
    ("config-not-json", _write("config.json", "{"), None, [],
     r"config.json is not valid JSON"),
    ("config-vocab-str", _edit_json("config.json", _set(
        "vocab_size", "256", "text_config")), None, [],
     r"field 'vocab_size' must be a positive integer, got '256'"),
    ("config-layer-kind", _edit_json("config.json", lambda c: (
        c["text_config"]["layer_types"].__setitem__(0, "chunked") or c)),
     None, [], r"unknown layer_types \[\"'chunked'\"\]"),
    ("config-layer-count", _edit_json("config.json", lambda c: (
        c["text_config"]["layer_types"].pop() and c)), None, [],
     r"layer_types has 2 entries but num_hidden_layers is 3"),
    ("config-softcap-zero", _edit_json("config.json", _set(
        "final_logit_softcapping", 0, "text_config")), None, [],
     r"field 'final_logit_softcapping' must be a positive number"),
]


@pytest.mark.parametrize("name, edit, lines, flags, match", PERPLEXITY,
                         ids=[row[0] for row in PERPLEXITY])
def test_perplexity(files, tmp_path, capsys, no_model, name, edit, lines,
                    flags, match):
  del name, no_model
  checkpoint = (_checkpoint(files, tmp_path, edit) if edit is not None
                else files.base_dir)
  data = files.data if lines is None else _jsonl(tmp_path, *lines)
  code, _, err = run(capsys, "perplexity", checkpoint, "--data", data,
                     "--no-progress", *flags)
  assert_refused(code, err, match)


@pytest.mark.parametrize("name, data, match", [
    ("directory", "DIR", r"--data: .* is a directory, not a JSONL file"),
    ("missing", "MISSING", r"--data: .* does not exist"),
    ("not-utf8", b'{"text": "\xff\xfe"}\n', r"data.jsonl:1: not UTF-8 text"),
    ("binary", b"\x00\x01\x02\n", r"data.jsonl:1: not a JSON object"),
    ("list-line", b"[1]\n", r"data.jsonl:1: expected a JSON object, got list"),
    ("text-int", b'{"text": 3}\n', r"field 'text' must be a string"),
])
def test_perplexity_bad_data(files, tmp_path, capsys, no_model, name, data,
                             match):
  del name, no_model
  path = {"DIR": tmp_path, "MISSING": tmp_path / "missing.jsonl"}.get(data)
  if path is None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
  code, _, err = run(capsys, "perplexity", files.base_dir, "--data", path)
  assert_refused(code, err, match)


@pytest.mark.parametrize("name, flags, match", [
    ("adapter-missing", ["--adapter", "MISSING"],
     r"--adapter: .*missing' does not exist"),
    ("adapter-file", ["--adapter", "FILE"], r"--adapter: .* is not a "
     r"directory"),
    ("tunix-without-alpha", ["--adapter", "TUNIX"],
     r"alpha: the Tunix checkpoint .* does not record the LoRA alpha"),
    ("alpha-nan", ["--adapter", "TUNIX", "--alpha", "nan"],
     r"alpha \(--alpha\): expected a positive number, got nan"),
    ("alpha-negative", ["--adapter", "PEFT_NEGATIVE"],
     r"field 'lora_alpha' must be a positive number .*got -8"),
    ("other-model-size", ["--adapter", "OTHER_SIZE", "--alpha", "8"],
     r"adapter/base shape mismatch"),
    ("dtype", ["--dtype", "float16"], r"argument --dtype: invalid choice"),
    ("checkpoint-missing", ["CHECKPOINT_MISSING"],
     r"checkpoint: .*nowhere' does not exist"),
])
def test_perplexity_bad_adapter_and_flags(files, tmp_path, capsys, no_model,
                                          name, flags, match):
  del no_model
  (tmp_path / "a_file").write_text("x")
  peft = _copy(files.peft_dir, tmp_path, "peft",
               _edit_json("adapter_config.json", _set("lora_alpha", -8)))
  other = str(tmp_path / "other")
  conftest.write_tunix_checkpoint(
      {"layers.0.mlp.gate_proj.kernel_lora_a": np.ones((64, 4)),
       "layers.0.mlp.gate_proj.kernel_lora_b": np.ones((4, 128))}, other)
  names = {"MISSING": str(tmp_path / "missing"), "FILE": tmp_path / "a_file",
           "TUNIX": files.tunix_root, "PEFT_NEGATIVE": peft,
           "OTHER_SIZE": other}
  flags = [names.get(f, f) for f in flags]
  checkpoint = files.base_dir
  if flags[0] == "CHECKPOINT_MISSING":
    checkpoint, flags = str(tmp_path / "nowhere"), []
  code, _, err = run(capsys, "perplexity", checkpoint, "--data", files.data,
                     *flags)
  assert_refused(code, err, match, usage=name == "dtype")


# generate: every case is refused before the adapter is merged or a model
# loaded, with exit status 2.
@pytest.fixture
def no_generation(monkeypatch):
  def guard(*args, **kwargs):
    raise AssertionError("generate merged or loaded a model for bad input")
  monkeypatch.setattr(perplexity, "load_model", guard)
  monkeypatch.setattr(perplexity, "merged_checkpoint", guard)


GENERATE = [
    # (id, flags (PROMPT: --prompt w3 w4 added), match); names in capitals
    # are replaced by paths made in the test.
    ("max-new-tokens-zero", ["--max-new-tokens", "0"],
     r"--max-new-tokens must be >= 1, got 0"),
    ("max-new-tokens-negative", ["--max-new-tokens=-5"],
     r"--max-new-tokens must be >= 1"),
    ("max-new-tokens-text", ["--max-new-tokens", "many"],
     r"argument --max-new-tokens: invalid int value"),
    ("batch-size-zero", ["--batch-size", "0"],
     r"--batch-size must be >= 1, got 0"),
    ("batch-size-float", ["--batch-size", "2.5"],
     r"argument --batch-size: invalid int value"),
    ("seed-negative", ["--seed=-1"], r"--seed must be >= 0, got -1"),
    ("seed-past-32-bits", ["--seed", str(2**32 + 7)],
     r"--seed must be < 2\*\*32 .*would repeat seed 7"),
    ("seed-text", ["--seed", "abc"], r"argument --seed: invalid int value"),
    ("temperature-negative", ["--temperature=-0.5"],
     r"--temperature must be >= 0 \(0 for greedy\), got -0.5"),
    ("temperature-nan", ["--temperature", "nan"],
     r"--temperature must be a Python number \(finite; 0 for greedy"),
    ("temperature-inf", ["--temperature", "inf"],
     r"--temperature must be a Python number \(finite"),
    ("temperature-text", ["--temperature", "hot"],
     r"argument --temperature: invalid float value"),
    ("top-k-zero", ["--temperature", "1", "--top-k", "0"],
     r"--top-k must be >= 1, got 0"),
    ("top-k-past-vocab", ["--temperature", "1", "--top-k", "1000"],
     r"--top-k: 1000 is more than the vocabulary \(256 tokens\)"),
    ("top-k-float", ["--temperature", "1", "--top-k", "2.5"],
     r"argument --top-k: invalid int value"),
    ("top-p-zero", ["--temperature", "1", "--top-p", "0"],
     r"--top-p must be in \(0, 1\], got 0.0"),
    ("top-p-above-one", ["--temperature", "1", "--top-p", "1.5"],
     r"--top-p must be in \(0, 1\], got 1.5"),
    ("top-p-nan", ["--temperature", "1", "--top-p", "nan"],
     r"--top-p must be a Python number \(finite; in \(0, 1\]\)"),
    ("top-k-greedy", ["--top-k", "5"],
     r"--top-k/--top-p: greedy decoding \(--temperature 0\) would ignore"),
    ("top-p-greedy", ["--top-p", "0.9"],
     r"--top-k/--top-p: greedy decoding"),
    ("dtype", ["--dtype", "float16"], r"argument --dtype: invalid choice"),
    ("alpha-without-adapter", ["--alpha", "8"],
     r"--alpha is the alpha of --adapter; pass --adapter too"),
    ("alpha-nan", ["--adapter", "TUNIX", "--alpha", "nan"],
     r"alpha \(--alpha\): expected a positive number, got nan"),
    ("alpha-zero", ["--adapter", "TUNIX", "--alpha", "0"],
     r"alpha \(--alpha\): expected a positive number, got 0.0"),
    ("adapter-missing", ["--adapter", "MISSING"],
     r"--adapter: .*missing' does not exist"),
    ("adapter-file", ["--adapter", "FILE"], r"--adapter: .* is not a "
     r"directory"),
    ("tunix-without-alpha", ["--adapter", "TUNIX"],
     r"alpha: the Tunix checkpoint .* does not record the LoRA alpha"),
    ("adapter-other-model-size", ["--adapter", "OTHER_SIZE", "--alpha", "8"],
     r"adapter/base shape mismatch"),
    ("no-prompts", ["NO_PROMPT"], r"no prompts: give --prompt or --data"),
    ("data-missing", ["--data", "MISSING"],
     r"--data: .*missing' does not exist"),
    ("data-directory", ["--data", "DIR"],
     r"--data: .* is a directory, not a JSONL file"),
    ("data-not-utf8", ["--data", "NOT_UTF8"], r"data.jsonl:1: not UTF-8"),
    ("data-list-line", ["--data", "LIST_LINE"],
     r"data.jsonl:1: expected a JSON object, got list"),
    ("data-prompt-int", ["--data", "PROMPT_INT"],
     r"data.jsonl:1: expected a 'prompt' \(or 'text'\) string"),
    ("data-completion-int", ["--data", "COMPLETION_INT"],
     r"data.jsonl:1: field 'completion' must be a string, got int"),
    ("checkpoint-missing", ["CHECKPOINT_MISSING"],
     r"checkpoint: .*nowhere' does not exist"),
    ("checkpoint-no-tokenizer", ["NO_TOKENIZER"],
     r"checkpoint: no tokenizer.json in"),
    ("checkpoint-bad-config", ["BAD_CONFIG"],
     r"config.json: expected a JSON object, got a list"),
    ("ids-past-vocab", ["BIG_TOKENIZER", "--prompt", "w300"],
     r"tokenizer.json gives token id 300 \(prompt 1\) but the model's "
     r"vocab_size is 256"),
]


@pytest.mark.parametrize("name, flags, match", GENERATE,
                         ids=[row[0] for row in GENERATE])
def test_generate(files, tmp_path, capsys, no_generation, name, flags,
                  match):
  del no_generation
  (tmp_path / "a_file").write_text("x")
  other = str(tmp_path / "other")
  conftest.write_tunix_checkpoint(
      {"layers.0.mlp.gate_proj.kernel_lora_a": np.ones((64, 4)),
       "layers.0.mlp.gate_proj.kernel_lora_b": np.ones((4, 128))}, other)
  data = tmp_path / "data.jsonl"
  contents = {"NOT_UTF8": b'{"prompt": "\xff\xfe"}\n',
              "LIST_LINE": b"[1]\n", "PROMPT_INT": b'{"prompt": 3}\n',
              "COMPLETION_INT": b'{"prompt": "w3", "completion": 4}\n'}
  checkpoint, prompt = files.base_dir, ["--prompt", "w3 w4"]
  checkpoints = {
      "CHECKPOINT_MISSING": lambda: str(tmp_path / "nowhere"),
      "NO_TOKENIZER": lambda: _checkpoint(files, tmp_path, lambda d: os.remove(
          os.path.join(d, "tokenizer.json"))),
      "BAD_CONFIG": lambda: _checkpoint(files, tmp_path,
                                        _write("config.json", "[]")),
      "BIG_TOKENIZER": lambda: _checkpoint(files, tmp_path, _big_tokenizer)}
  if flags[0] in checkpoints:
    checkpoint, flags = checkpoints[flags[0]](), flags[1:]
  elif flags[0] == "NO_PROMPT":
    prompt, flags = [], []
  elif len(flags) == 2 and flags[1] in contents:
    data.write_bytes(contents[flags[1]])
  names = {"MISSING": str(tmp_path / "missing"), "FILE": tmp_path / "a_file",
           "TUNIX": files.tunix_root, "OTHER_SIZE": other, "DIR": tmp_path,
           **{key: data for key in contents}}
  flags = [names.get(f, f) for f in flags]
  code, _, err = run(capsys, "generate", checkpoint, *prompt, *flags)
  assert code == 2, err
  assert_refused(code, err, match, usage="argument --" in match)


@pytest.mark.parametrize("flags, match", [
    (["--steps", "1"], r"steps \(--steps\) must be >= 2"),
    (["--steps", "0"], r"steps \(--steps\) must be >= 2"),
    (["--steps=-3"], r"steps \(--steps\) must be >= 2"),
    (["--seq-len", "11"], r"seq_len \(--seq-len\) must be >= 12"),
    (["--batch-size", "0"], r"batch_size \(--batch-size\) must be >= 1"),
    (["--steps", "two"], r"argument --steps: invalid int value"),
    (["--batch-size", "1.5"], r"argument --batch-size: invalid int value"),
])
def test_demo(capsys, flags, match):
  code, _, err = run(capsys, "demo", *flags)
  assert_refused(code, err, match, usage="invalid" in match)


@pytest.mark.parametrize("flags, match", [
    (["--batch", "0"], r"batch must be >= 1, got 0"),
    (["--seq-len=-1"], r"seq-len must be >= 1"),
    (["--lora-rank", "0"], r"lora-rank must be >= 1"),
    (["--num-layers", "0"], r"num_layers must be in 1..35 for e2b, got 0"),
    (["--num-layers", "99"], r"num_layers must be in 1..35"),
    (["--model", "e9b"], r"argument --model: invalid choice"),
    (["--remat", "all"], r"argument --remat: invalid choice"),
    (["--mode", "fast"], r"argument --mode: invalid choice"),
    (["--implementation", "cuda"], r"argument --implementation: invalid"),
    (["--batch", "four"], r"argument --batch: invalid int value"),
])
def test_fit(capsys, flags, match):
  code, _, err = run(capsys, "fit", "--no-cache", *flags)
  assert_refused(code, err, match, usage="argument" in match)


def test_doctor_unknown_flag(capsys):
  code, _, err = run(capsys, "doctor", "--verbose")
  assert_refused(code, err, r"unrecognized arguments: --verbose", usage=True)


def test_doctor_bad_environment(capsys, monkeypatch):
  monkeypatch.setenv("GEMMA4_JAX_IMPLEMENTATION", "gpu")
  code, _, err = run(capsys, "doctor")
  assert_refused(code, err, r"doctor: error: .*unknown "
                 r"\$GEMMA4_JAX_IMPLEMENTATION 'gpu'")


@pytest.mark.parametrize("argv, match", [
    ([], r"the following arguments are required: COMMAND"),
    (["mergee"], r"invalid choice: 'mergee'"),
    (["merge"], r"the following arguments are required: --base, --adapter, "
     r"--out"),
    (["perplexity"], r"the following arguments are required: checkpoint, "
     r"--data"),
    (["export-adapter", "--out", "x"], r"required: --adapter"),
])
def test_usage_errors(capsys, argv, match):
  code, _, err = run(capsys, *argv)
  assert code == 2
  assert_refused(code, err, match, usage=True)


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
  """An internal error is not the user's fault: its traceback stays, with a
  line saying it is a bug (the fault is injected: no bug is known)."""
  from gemma4_jax import doctor  # pylint: disable=g-import-not-at-top

  def broken():
    return {}["missing key"]
  monkeypatch.setattr(doctor, "main", broken)
  code, _, err = run(capsys, "doctor")
  assert code == cli.EXIT_BUG
  assert "Traceback" in err and "KeyError: 'missing key'" in err
  assert err.strip().splitlines()[-1].startswith(
      "gemma4-jax doctor: internal error: this is a bug in gemma4-jax")
