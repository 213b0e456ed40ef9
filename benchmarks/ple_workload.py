"""The PLE step that the CPU benchmark and the TPU script both measure.

One LoRA-style step of Tunix's `Embedder.encode_per_layer_input` (per-layer
inputs and the gradient w.r.t. the projection; the table frozen) on the
E2B config in bfloat16, whichever Tunix layout is installed, and the bytes
of the collectives in a compiled step's HLO.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma4_jax.patches import tunix_ple

_BYTES = {"bf16": 2, "f32": 4, "s32": 4, "f16": 2, "u32": 4, "pred": 1}
# A collective's result type (a shape or a tuple of shapes) and its op.
_COLLECTIVE = re.compile(
    r"= (\(?[\w\[\],{} ]+?\)?) (all-gather|all-reduce|reduce-scatter|"
    r"all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def embedder_module():
  """The installed Tunix module that defines the Gemma 4 `Embedder`."""
  return __import__(tunix_ple.detect_layout().module, fromlist=["Embedder"])


def e2b_config(**sizes):
  """Gemma 4 E2B's config in bfloat16, with `sizes` replaced."""
  config = embedder_module().ModelConfig.gemma4_e2b()
  return dataclasses.replace(config, dtype=jnp.bfloat16,
                             param_dtype=jnp.bfloat16, **sizes)


def split(embedder):
  """(graphdef, projection state, the rest): the projection is what a LoRA
  step differentiates; the table is frozen."""
  return nnx.split(embedder, nnx.PathContains("per_layer_model_projection"),
                   ...)


def step(graphdef):
  """Per-layer inputs and their gradient w.r.t. the projection."""
  def run(projection, rest, x, tokens):
    def loss(projection):
      out = nnx.merge(graphdef, projection, rest).encode_per_layer_input(
          x, tokens)
      return jnp.sum(out.astype(jnp.float32)), out
    (_, out), d_projection = jax.value_and_grad(loss, has_aux=True)(
        projection)
    return out, d_projection
  return run


def collective_bytes(hlo: str) -> tuple[int, dict[str, int]]:
  """Total result bytes of the collectives in compiled HLO, and per op."""
  total, per_op = 0, {}
  for result, op in _COLLECTIVE.findall(hlo):
    size = sum(int(np.prod([int(d) for d in dims.split(",") if d]))
               * _BYTES.get(dtype, 4) for dtype, dims in _SHAPE.findall(result))
    total += size
    per_op[op] = per_op.get(op, 0) + size
  return total, per_op
