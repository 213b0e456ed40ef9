"""`ops.attention`: implementation selection (the rules of `implementations`,
shown on attention) and validation at the boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import implementations
from gemma4_jax import ops


def _qkv(b=2, t=5, n=4, k=1, h=8, s=None, dtype=jnp.float32):
  s = t if s is None else s
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (b, t, n, h), dtype),
          jax.random.normal(keys[1], (b, s, k, h), dtype),
          jax.random.normal(keys[2], (b, s, k, h), dtype))


def test_default_is_decided_by_the_platform_lowered_for(monkeypatch):
  assert implementations.resolve("attention", None, ("pallas_tpu", "xla")) == (
      implementations.BY_PLATFORM)
  # interpret=True runs the kernel on any platform.
  assert implementations.resolve("attention", None, ("pallas_tpu", "xla"),
                                 interpret=True) == "pallas_tpu"
  monkeypatch.setenv(implementations.ENV_VAR, "reference")
  assert implementations.resolve("attention", None,
                                 ("xla", "reference")) == "reference"
  monkeypatch.setenv(implementations.ENV_VAR, "triton")
  with pytest.raises(ValueError, match=r"unknown \$GEMMA4_JAX_IMPLEMENTATION "
                     "'triton'"):
    ops.attention(*_qkv())


def test_default_on_cpu_runs_the_xla_version():
  q, k, v = _qkv(t=9, s=12)
  default = jax.jit(lambda *a: ops.attention(*a, sliding_window=4))
  assert "tpu_custom_call" not in default.lower(q, k, v).as_text()
  np.testing.assert_array_equal(
      default(q, k, v), ops.attention(q, k, v, sliding_window=4,
                                      implementation="xla"))


def test_unknown_implementation_is_a_value_error():
  with pytest.raises(ValueError, match="unknown implementation 'flash'"):
    ops.attention(*_qkv(), implementation="flash")


@pytest.mark.parametrize("jit", [False, True])
def test_forced_pallas_off_tpu_raises_naming_the_op(jit):
  # Naming an implementation that cannot run never falls back silently.
  run = lambda q, k, v: ops.attention(q, k, v, implementation="pallas_tpu")
  with pytest.raises(RuntimeError, match="attention: implementation "
                     "'pallas_tpu' can only be lowered for TPU.*interpret=True"):
    (jax.jit(run) if jit else run)(*_qkv())
  # Its gradient is traced (the error comes when lowering, not before).
  grad = jax.grad(lambda q, k, v: run(q, k, v).sum())
  with pytest.raises(RuntimeError, match="can only be lowered for TPU"):
    jax.jit(grad)(*_qkv())
  assert ops.AVAILABLE["attention"][0] == "pallas_tpu"


def test_implementations_agree_under_jit():
  q, k, v = _qkv(t=9, s=12)
  mask = jnp.asarray(np.random.default_rng(0).random((2, 9, 12)) > 0.2)
  f = jax.jit(lambda *a: ops.attention(*a, mask=mask, sliding_window=4,
                                       implementation="xla"))
  g = jax.jit(lambda *a: ops.attention(*a, mask=mask, sliding_window=4,
                                       implementation="reference"))
  np.testing.assert_allclose(f(q, k, v), g(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_args, error, message", [
    (lambda: (_qkv()[0][0], *_qkv()[1:]), ValueError, r"q must be 4-D"),
    (lambda: (_qkv()[0], _qkv()[1][..., 0], _qkv()[2]), ValueError,
     r"k must be 4-D"),
    (lambda: (_qkv()[0].astype(jnp.int32), *_qkv()[1:]), TypeError,
     "q must be floating"),
    (lambda: (*_qkv()[:2], _qkv(s=6)[2]), ValueError,
     "k and v must have the same shape"),
    (lambda: (_qkv()[0].astype(jnp.bfloat16), *_qkv()[1:]), TypeError,
     "share a dtype"),
    (lambda: (_qkv()[0], *_qkv(b=3)[1:]), ValueError, "batch"),
    (lambda: (_qkv()[0], *_qkv(h=16)[1:]), ValueError, "head_dim H=8"),
    (lambda: (_qkv(n=4)[0], *_qkv(k=3)[1:]), ValueError,
     "multiple of kv heads K=3"),
])
def test_bad_tensors(make_args, error, message):
  with pytest.raises(error, match=message):
    ops.attention(*make_args())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(sliding_window=0), ValueError, "sliding_window"),
    (dict(sliding_window=2.5), ValueError, "sliding_window"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(scale=jnp.float32(1.0)), TypeError, "scale"),
    (dict(mask=jnp.ones((2, 5, 6), bool)), ValueError, r"\(2, 5, 6\)"),
    (dict(mask=jnp.ones((5, 5), jnp.float32)), TypeError, "boolean"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), ValueError,
     r"\(2, 5\)"),
])
def test_bad_options(kwargs, error, message):
  with pytest.raises(error, match=message):
    ops.attention(*_qkv(), **kwargs)
