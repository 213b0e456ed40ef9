"""Remat of each Gemma 4 decoder layer under a named policy.

Tunix's `RematConfig.DECODER` wraps each `DecoderLayer` in `nnx.remat` (0.1.7)
or `jax.checkpoint` (Tunix main) with no policy: the backward pass keeps each
layer's input and recomputes the rest. `apply(remat=<policy>)` replaces
`DecoderLayer.__call__` with the same wrapping under one of these policies,
whatever the model's `remat_config` says (Tunix's `BLOCK` remat inside the
attention and MLP, if set, still applies inside):

- "full": keep only each layer's input; recompute everything else (what
  Tunix's `DECODER` does, and the least HBM).
- "minimal": also keep matmul outputs without batch dimensions
  (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`): projections
  are not recomputed; elementwise work and attention are.
- "attention": also keep what `gemma4_jax.ops.attention` names
  (`ATTENTION_OUTPUT` and `ATTENTION_LOGSUMEXP`, see `ops`): the flash
  forward kernel does not run a second time in the backward pass.
- "offload": as "full", with each layer's input moved to host memory
  (`pinned_host`) in the forward pass and back in the backward pass.
  Measured on v5e compiles of E2B: XLA:TPU does move them, but with
  Tunix's layers as an unrolled Python loop its scheduler starts copying
  them back at the start of the backward pass, so the peak does not drop
  (1 x 131072 tokens: 17.48 against 17.51 GiB of temporaries for "full").

Each layer's input is named `DECODER_LAYER_INPUT` (`checkpoint_name`) so a
policy can refer to it. On CPU every policy computes the same loss and
gradients as no remat (tests/patches/test_patch_remat.py).
"""

from __future__ import annotations

import importlib
import inspect

from flax import nnx
import jax
from jax.ad_checkpoint import checkpoint_name

from gemma4_jax import ops
from gemma4_jax.patches import _framework

DECODER_LAYER_INPUT = "decoder_layer_input"
POLICIES = ("full", "minimal", "attention", "offload")

SPEC = _framework.PatchSpec(
    feature="remat", distribution="google-tunix",
    attribute="DecoderLayer.__call__",
    layouts=(_framework.Layout(
        # DecoderLayer stays in model.py in both layouts.
        name="google-tunix 0.1.7 and Tunix main",
        module="tunix.models.gemma4.model", known_versions=("0.1.7",),
        where="tunix.models.gemma4.model.DecoderLayer.block",
        requirements=(_framework.Requirement(None, "DecoderLayer.block"),)),),
    stock="the model's RematConfig for whole decoder layers (Tunix's "
    "BLOCK remat inside attention and MLP, if set, still applies)")


def targets() -> tuple[_framework.Target, ...]:
  """`SPEC` in the installed Tunix, replaced by the rematted call below."""
  return SPEC.targets(_make_call)


# Tunix's decoder-layer remat, restated under a named policy.


def policy(name: str):
  """The `jax.checkpoint` policy called `name` (one of `POLICIES`)."""
  policies = jax.checkpoint_policies
  if name == "full":
    return policies.nothing_saveable
  if name == "minimal":
    return policies.dots_with_no_batch_dims_saveable
  if name == "attention":
    return policies.save_only_these_names(ops.ATTENTION_OUTPUT,
                                          ops.ATTENTION_LOGSUMEXP)
  if name == "offload":
    return policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[DECODER_LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host")
  raise ValueError(f"remat must be None or one of {', '.join(POLICIES)}, "
                   f"got {name!r}")


def _make_call(original, options: _framework.OpOptions,
               layout: _framework.Layout):
  name = options.remat
  chosen = policy(name)
  layer_class = importlib.import_module(layout.module).DecoderLayer
  block_signature = inspect.signature(layer_class.block)

  def block(self, x, *args):
    # The name is on the layer's input inside the checkpoint: what "offload"
    # moves to host (the checkpoint's own argument would stay in HBM).
    return type(self).block(self, checkpoint_name(x, DECODER_LAYER_INPUT),
                            *args)

  rematted = nnx.remat(block, policy=chosen, graph_updates=False)

  def __call__(self, *args, **kwargs):
    # Positional, in block's order: nnx.remat passes keyword arguments
    # through its trace as constants.
    bound = block_signature.bind(self, *args, **kwargs)
    bound.apply_defaults()
    return rematted(*bound.args)

  return _framework.wraps(
      original, __call__,
      note=f"Gemma 4 DecoderLayer, patched by gemma4_jax.patches: each "
      f"layer rematerialized under the {name!r} policy.")
