"""The public PLE ops: their argument checks, and the combine after a
projection of the caller's own equal to the whole op."""

import jax.numpy as jnp
import pytest

import ple_cases
from gemma4_jax import ops, testing


def _good():
  p = ple_cases.problem(0, batch=2, seq_len=5, vocab=11, num_layers=3,
                        per_layer_dim=4)
  return dict(p, num_layers=3, per_layer_dim=4)


@pytest.mark.parametrize("change, error, match", [
    (dict(tokens=jnp.zeros((2, 5), jnp.float32)), TypeError,
     "tokens must be an integer"),
    (dict(tokens=jnp.zeros((10,), jnp.int32)), ValueError,
     r"tokens must be \[B, T\]"),
    (dict(per_layer_table=jnp.ones((11, 13))), ValueError, "per_layer_table"),
    (dict(per_layer_table=jnp.ones((11,))), ValueError, "per_layer_table"),
    (dict(per_layer_table=jnp.ones((11, 3, 4, 1))), ValueError,
     "per_layer_table"),
    (dict(per_layer_table=jnp.ones((11, 4, 3))), ValueError,
     "does not match"),
    (dict(embeddings=jnp.ones((2, 4, 8))), ValueError, "disagree"),
    (dict(model_projection=jnp.ones((8, 4, 3))), ValueError,
     "model_projection"),
    (dict(projection_norm_scale=jnp.ones((3,))), ValueError,
     "projection_norm_scale"),
    (dict(per_layer_dim=0), ValueError, "per_layer_dim"),
    (dict(implementation="cuda"), ValueError, "unknown implementation"),
    (dict(implementation="pallas_tpu"), RuntimeError, "interpret=True"),
])
def test_bad_inputs_raise(change, error, match):
  with pytest.raises(error, match=match):
    ops.per_layer_inputs(**{**_good(), **change})


def test_combine_after_own_projection_equals_whole_op():
  p = ple_cases.problem(5, batch=2, seq_len=3, vocab=7, num_layers=3,
                        per_layer_dim=4)
  dims = dict(num_layers=3, per_layer_dim=4)
  whole = ops.per_layer_inputs(**p, **dims, implementation="xla")
  w = p["model_projection"] * 8 ** -0.5
  projected = jnp.einsum("btd,dlp->btlp", p["embeddings"], w)
  rows = ops.ple_lookup(p["per_layer_table"], p["tokens"], **dims,
                        implementation="xla")
  combined = ops.combine_per_layer_inputs(projected, rows,
                                          p["projection_norm_scale"])
  testing.assert_close(combined, whole, name="combine")


@pytest.mark.parametrize("change, error, match", [
    (dict(projected=jnp.ones((2, 3, 12))), ValueError, r"\[B, T, L, P\]"),
    (dict(rows=jnp.ones((2, 3, 3, 5))), ValueError, "rows must have"),
    (dict(rows=jnp.ones((2, 3, 3, 4), jnp.int32)), TypeError, "rows"),
    (dict(projection_norm_scale=jnp.ones((3,))), ValueError,
     "projection_norm_scale"),
])
def test_combine_bad_inputs_raise(change, error, match):
  good = dict(projected=jnp.ones((2, 3, 3, 4)), rows=jnp.ones((2, 3, 3, 4)),
              projection_norm_scale=jnp.ones((4,)))
  with pytest.raises(error, match=match):
    ops.combine_per_layer_inputs(**{**good, **change})
