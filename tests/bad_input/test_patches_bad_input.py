"""Bad input to `gemma4_jax.patches`: refused by name, and nothing patched."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gemma4_jax import implementations
from gemma4_jax import patches
from gemma4_jax.host_table import HostTable
from gemma4_jax.patches import tunix_ple


def _nothing_patched():
  return not any(row.patched for row in patches.status().targets)


@pytest.fixture(autouse=True)
def _unpatched():
  patches.revert()
  yield
  patches.revert()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(attention="yes"), TypeError, "attention must be a bool"),
    (dict(attention=1), TypeError, "attention must be a bool"),
    (dict(lora=None), TypeError, "lora must be a bool"),
    (dict(loss=0), TypeError, "loss must be a bool"),
    (dict(ple="hostx"), ValueError, "ple must be True, False or 'host'"),
    (dict(ple=None), ValueError, "ple must be True, False or 'host'"),
    (dict(ple=1), ValueError, "ple must be True, False or 'host'"),
    (dict(interpret="yes"), TypeError, "interpret must be a bool"),
    (dict(share_layer_code=None), TypeError,
     "share_layer_code must be a bool"),
    (dict(implementation="bogus"), ValueError,
     "unknown implementation 'bogus'"),
    (dict(implementation="Pallas"), ValueError, "unknown implementation"),
    (dict(implementation=3), TypeError, "implementation must be a str"),
    (dict(implementation=("xla",)), TypeError, "implementation must be a str"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_apply(kwargs, error, match):
  libtpu_args = os.environ.get(patches.tpu_compiler.ENV)
  with pytest.raises(error, match=match):
    patches.apply(**kwargs)
  assert _nothing_patched()
  assert os.environ.get(patches.tpu_compiler.ENV) == libtpu_args


def test_apply_leaves_earlier_patches_alone():
  patches.apply(attention=True, ple=False, lora=False, loss=False,
                implementation="xla")
  before = [row.patched for row in patches.status().targets]
  with pytest.raises(TypeError, match="loss must be a bool"):
    patches.apply(loss="no")
  assert [row.patched for row in patches.status().targets] == before


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(attention="no"), TypeError, "attention must be a bool"),
    (dict(implementation="fast"), ValueError, "unknown implementation"),
])
def test_applied(kwargs, error, match):
  with pytest.raises(error, match=match):
    with patches.applied(**kwargs):
      pytest.fail("the block must not run")
  assert _nothing_patched()


def test_environment_variable(monkeypatch):
  monkeypatch.setenv(implementations.ENV_VAR, "turbo")
  with pytest.raises(ValueError, match=r"\$GEMMA4_JAX_IMPLEMENTATION 'turbo'"):
    patches.apply()
  assert _nothing_patched()


def test_offload_table_without_ple():
  with pytest.raises(ValueError, match="no per-layer embedding table"):
    tunix_ple.offload_table(object())


def test_offload_table_of_the_wrong_type():
  with pytest.raises(TypeError, match="table must be a HostTable"):
    tunix_ple.offload_table(object(), table=np.zeros((4, 2, 3), np.float32))


def test_host_table_rank():
  with pytest.raises(ValueError, match=r"HostTable: expected a \[V, L, P\]"):
    HostTable(np.zeros(4, np.float32))


def test_host_table_missing_tensor(files):
  shard = os.path.join(files.base_dir, "model-00001-of-00002.safetensors")
  with pytest.raises(KeyError, match="no tensor 'nope'"):
    HostTable.from_safetensors(shard, "nope")
