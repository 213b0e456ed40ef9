"""Tunix's causal padding mask without its `[B, T, T]` array.

Replaces `tunix.sft.utils.make_causal_attn_mask`, which the usual
`gen_model_input_fn` (Tunix's examples, its `peft_main` CLI, this package's
`tiny_models.model_inputs`) calls inside the jitted training step. Stock, it
builds a dense boolean `[B, T, T]`: 1 GiB at batch 1 x 32768 tokens, plus an
int8 copy of it on TPU for whatever attention reads it, and it lives through
the whole step (every layer reads it, forward and backward).

Patched, a boolean `[B, T]` input mask gives a `masks.CausalPaddingMask`
holding only that `[B, T]`. The attention patch reads it as causal plus a key
mask (`ops.attention` applies both in tiles); anything else that reads it as
an array gets the dense mask Tunix would have built. Other input dtypes or
ranks go to Tunix's own function (which refuses what it refuses).

This feature needs the attention patch: `apply(mask=True, attention=False)`
leaves the mask stock. Code that imported the function by name before
`apply()` (`from tunix.sft.utils import make_causal_attn_mask`, as
`tunix.rl.common` does) keeps the original.
"""

from __future__ import annotations

import jax.numpy as jnp

from gemma4_jax import masks
from gemma4_jax.patches import _framework

SPEC = _framework.PatchSpec(
    feature="mask", distribution="google-tunix",
    attribute="make_causal_attn_mask",
    layouts=(_framework.Layout(
        name="google-tunix 0.1.7 and Tunix main", module="tunix.sft.utils",
        parameters=("input_mask",), known_versions=("0.1.7",)),),
    note="a [B, T] causal padding mask stands for the [B, T, T] array",
    stock="input masks other than boolean [B, T] go to Tunix's function; "
    "code that imported make_causal_attn_mask by name before apply() "
    "(tunix.rl.common) keeps the original")


def targets() -> tuple[_framework.Target, ...]:
  """`SPEC` in the installed Tunix, replaced by the function below."""
  return SPEC.targets(_make_causal_attn_mask)


# Tunix's mask function, restated for a boolean [B, T] input mask.


def _make_causal_attn_mask(original, options: _framework.OpOptions,
                           layout: _framework.Layout):
  del options, layout  # the mask is the same whatever implementation runs

  def make_causal_attn_mask(input_mask):
    dtype = getattr(input_mask, "dtype", None)
    if (dtype is None or jnp.dtype(dtype) != jnp.bool_
        or len(getattr(input_mask, "shape", ())) != 2):
      return original(input_mask)
    return masks.CausalPaddingMask(input_mask)

  return _framework.wraps(
      original, make_causal_attn_mask,
      note="Tunix's make_causal_attn_mask, patched by gemma4_jax.patches: "
      "returns a gemma4_jax.masks.CausalPaddingMask ([B, T] key mask plus "
      "causality) that the patched attention reads without a [B, T, T] "
      "array; read as an array, it is the dense mask.")
