"""`apply(share_layer_code=True)`: XLA:TPU's deduplicated calls through
`LIBTPU_INIT_ARGS`, put back by `revert()` and `applied()`, the user's own
value left alone, and libtpu really reading it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gemma4_jax import patches
from gemma4_jax import testing
from gemma4_jax.patches import tpu_compiler

ENV = tpu_compiler.ENV
ARG = f"--{tpu_compiler.FLAG}=true"
NO_TPU = testing.libtpu_missing()


def _apply(**kwargs):
  return patches.apply(attention=True, ple=False, lora=False, loss=False,
                       mask=False, **kwargs)


@pytest.mark.parametrize("before", [None, "--xla_tpu_other_flag=1"])
def test_apply_adds_the_flag_and_revert_puts_back(monkeypatch, before):
  if before is None:
    monkeypatch.delenv(ENV, raising=False)
  else:
    monkeypatch.setenv(ENV, before)
  report = _apply()
  assert os.environ[ENV].split() == [*(before or "").split(), ARG]
  assert ARG in report.tpu_compiler and ARG in str(report)
  assert tpu_compiler.compiler_options() == {tpu_compiler.FLAG: True}
  _apply()  # idempotent: added once
  assert os.environ[ENV].split().count(ARG) == 1
  patches.revert()
  assert os.environ.get(ENV) == before


def test_share_layer_code_false_puts_back(monkeypatch):
  monkeypatch.delenv(ENV, raising=False)
  _apply()
  report = _apply(share_layer_code=False)
  assert ENV not in os.environ
  assert report.tpu_compiler == "share_layer_code=False"


@pytest.mark.parametrize("value", ["true", "false"])
def test_the_users_value_wins(monkeypatch, value):
  mine = f"--{tpu_compiler.FLAG}={value} --xla_tpu_other_flag=1"
  monkeypatch.setenv(ENV, mine)
  report = _apply()
  assert os.environ[ENV] == mine
  assert "left as the user set it" in report.tpu_compiler
  # `fit` compiles what the user's libtpu was started with.
  assert tpu_compiler.compiler_options() == {}
  patches.revert()
  assert os.environ[ENV] == mine


def test_applied_restores_the_state_before(monkeypatch):
  monkeypatch.delenv(ENV, raising=False)
  _apply()
  with patches.applied(attention=True, ple=False, lora=False, loss=False,
                       share_layer_code=False):
    assert ENV not in os.environ
  assert os.environ[ENV] == ARG
  patches.revert()
  assert ENV not in os.environ


def test_too_late_once_the_tpu_backend_started(monkeypatch):
  # No TPU here to start a backend on: the check itself is what is replaced.
  monkeypatch.delenv(ENV, raising=False)
  monkeypatch.setattr(tpu_compiler, "_tpu_backend_started", lambda: True)
  with pytest.warns(UserWarning, match="TPU backend started before apply"):
    report = _apply()
  assert ENV not in os.environ
  assert report.tpu_compiler.startswith("not set")


def test_a_started_cpu_backend_is_not_too_late(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  jax.numpy.zeros(1).block_until_ready()  # the CPU backend is up
  monkeypatch.delenv(ENV, raising=False)
  _apply()
  assert os.environ[ENV] == ARG


# Twelve identical layers, forward and backward, on one abstract v5e chip:
# what is shared shows in the generated code within seconds of compiling.
_PROGRAM = textwrap.dedent("""
    import json, os, sys
    from gemma4_jax import patches, testing
    from gemma4_jax.patches import tpu_compiler
    import jax, jax.numpy as jnp

    report = patches.apply(attention=True, ple=False, lora=False,
                           loss=False, mask=False)
    assert os.environ[tpu_compiler.ENV].endswith("=true"), report

    def loss(weights, x):
      for w_in, w_out in weights:
        h = jax.nn.gelu(x @ w_in)
        x = x + h @ w_out
      return jnp.sum(x.astype(jnp.float32))

    def weight(shape):
      return testing.tpu_struct(shape, jnp.bfloat16)

    lowered = jax.jit(jax.grad(loss)).lower(
        [(weight((512, 1024)), weight((1024, 512))) for _ in range(12)],
        weight((256, 512)))
    code = {}
    for name, options in [("default", None),
                          ("on", {tpu_compiler.FLAG: True}),
                          ("off", {tpu_compiler.FLAG: False})]:
      compiled = testing.compile_optimized(lowered, options)
      code[name] = compiled.memory_analysis().generated_code_size_in_bytes
    print(json.dumps(code))
""")


@pytest.mark.skipif(NO_TPU is not None, reason=str(NO_TPU))
def test_libtpu_started_after_apply_shares_layer_code():
  env = {k: v for k, v in os.environ.items() if k != ENV}
  env["JAX_PLATFORMS"] = "cpu"
  done = subprocess.run([sys.executable, "-c", _PROGRAM], env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  code = json.loads(done.stdout.strip().splitlines()[-1])
  # The default is what apply() set: the layers' code once, not twelve times.
  assert code["default"] == code["on"]
  assert code["on"] * 3 < code["off"], code
