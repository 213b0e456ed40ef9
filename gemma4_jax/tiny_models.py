"""Test support: tiny but structurally faithful Gemma 4 models, LoRA and
training, on CPU.

Not part of the public API (no stability promise). Used by the tests, the
benchmarks and `gemma4-jax demo`; `gemma4-jax fit` takes Tunix's SFT loss
and model inputs from here (`sft_loss`, `model_inputs`). The models are
real Tunix `Gemma4` instances (local/global layers with different head
dims, MQA, per-layer embeddings, KV sharing), LoRA is real qwix LoRA, and
training is real Tunix `PeftTrainer` steps; only the sizes are small.
Depends on jax, numpy, flax, Tunix, qwix and optax (all in the package's
dependencies); orbax is imported only to write training checkpoints.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from tunix.models.gemma4 import model as gemma4_lib
from tunix.sft import hooks
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils

LOCAL = gemma4_lib.AttentionType.LOCAL_SLIDING
GLOBAL = gemma4_lib.AttentionType.GLOBAL

# Every einsum/linear qwix can put LoRA on in Gemma 4 except the tied
# embedding (whose decode is a plain `jnp.dot` that qwix only intercepts when
# the model is built under tracing).
LORA_MODULE_PATH = (
    ".*q_einsum|.*kv_einsum|.*attn_vec_einsum|.*gate_proj|.*up_proj|"
    ".*down_proj|.*per_layer_input_gate|.*per_layer_projection|"
    ".*per_layer_model_projection")

Padding = Literal["none", "right", "left"]


def tiny_config(*, num_layers: int = 6, vocab_size: int = 256,
                embed_dim: int = 64, hidden_dim: int = 128,
                num_heads: int = 4, head_dim: int = 32,
                global_head_dim: int = 64, num_kv_heads: int = 1,
                sliding_window: int = 8, per_layer_input_dim: int = 16,
                frac_shared_layers: float = 0.5,
                dtype=jnp.float32, param_dtype=jnp.float32,
                use_flash_attention: bool = False,
                **overrides) -> gemma4_lib.ModelConfig:
  """A Gemma 4 config with E2B's structure at toy sizes.

  The default: 6 layers in the pattern local, local, global; the last half
  reuses the KV of layers 1 (local) and 2 (global), so both kinds of KV
  sharing run. Local layers use `head_dim`, global ones `global_head_dim`.
  """
  return gemma4_lib.ModelConfig(
      num_layers=num_layers, num_embed=vocab_size, embed_dim=embed_dim,
      hidden_dim=hidden_dim, num_heads=num_heads, head_dim=head_dim,
      num_kv_heads=num_kv_heads, sliding_window_size=sliding_window,
      per_layer_input_dim=per_layer_input_dim,
      global_key_size=global_head_dim,
      frac_shared_layers=frac_shared_layers,
      attention_pattern=(LOCAL, LOCAL, GLOBAL),
      param_dtype=param_dtype, dtype=dtype,
      use_flash_attention=use_flash_attention,
      # Flash attention and the sliding-window KV cache are exclusive in Tunix.
      use_sliding_window_kv_cache=not use_flash_attention,
      **overrides)


def build_model(config: gemma4_lib.ModelConfig, *, seed: int = 0,
                randomize_norms: bool = True) -> gemma4_lib.Gemma4:
  """A Tunix Gemma 4 with random weights.

  Tunix initializes the MLP to zeros and norms to ones; `randomize_norms`
  also draws those (and the MLP) at random so that every parameter shapes
  the output and a wrong mapping or kernel cannot hide.
  """
  model = gemma4_lib.Gemma4(config, rngs=nnx.Rngs(seed))
  if randomize_norms:
    key = jax.random.key(seed + 1)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(key, len(leaves))
    fresh = []
    for leaf_key, leaf in zip(keys, leaves):
      noise = jax.random.normal(leaf_key, leaf.shape, jnp.float32)
      if _is_all(leaf, 1.0):  # norm scales, skip_scale: around 1
        leaf = (1.0 + 0.1 * noise).astype(leaf.dtype)
      elif _is_all(leaf, 0.0):  # zero-initialized MLP kernels
        leaf = (noise * leaf.shape[0] ** -0.5).astype(leaf.dtype)
      fresh.append(leaf)
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, fresh))
  return model


def _is_all(x, value: float) -> bool:
  return bool(jnp.all(x == value))


def apply_lora(model: gemma4_lib.Gemma4, *, rank: int = 4,
               alpha: float = 8.0, module_path: str = LORA_MODULE_PATH,
               seed: int | None = 0) -> gemma4_lib.Gemma4:
  """Real qwix LoRA on `model` (eagerly built, so the tied embedding is left
  alone). qwix zero-initializes every `lora_b`; with `seed` set they are drawn
  at random so that the adapter changes the output and its gradients are not
  trivially zero.
  """
  provider = qwix.LoraProvider(module_path=module_path, rank=rank,
                               alpha=alpha)
  lora_model = qwix.apply_lora_to_model(
      model, provider, rngs=nnx.Rngs(0 if seed is None else seed),
      **model.get_model_input())
  if seed is not None:
    state = nnx.state(lora_model, nnx.LoRAParam)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(jax.random.key(seed), len(paths_leaves))
    fresh = []
    for leaf_key, (path, leaf) in zip(keys, paths_leaves):
      if "lora_b" in jax.tree_util.keystr(path):
        leaf = (0.1 * jax.random.normal(leaf_key, leaf.shape)).astype(
            leaf.dtype)
      fresh.append(leaf)
    nnx.update(lora_model, jax.tree_util.tree_unflatten(treedef, fresh))
  return lora_model


def float64_copy(model: gemma4_lib.Gemma4, *, alpha: float = 8.0,
                 module_path: str = LORA_MODULE_PATH) -> gemma4_lib.Gemma4:
  """`model` (with its qwix LoRA, if any) in float64, same weights.

  The float64 run is the yardstick for model-level comparisons
  (`gemma4_jax.testing.assert_model_close`). Call and run it inside
  `with jax.enable_x64(True):`, or float64 silently becomes float32.

  Args:
    model: a Tunix Gemma 4, optionally with qwix LoRA from `apply_lora`.
    alpha, module_path: what `apply_lora` was given (qwix keeps them in its
      provider, not in the model); the rank is read from the weights.
  """
  config = dataclasses.replace(model.config, dtype=jnp.float64,
                               param_dtype=jnp.float64)
  to64 = lambda state: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                                    state)
  graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: gemma4_lib.Gemma4(config, rngs=nnx.Rngs(0))))
  base = nnx.merge(graphdef, to64(nnx.state(
      model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
  lora = nnx.state(model, nnx.LoRAParam)
  paths_leaves = jax.tree_util.tree_flatten_with_path(lora)[0]
  if not paths_leaves:
    return base
  rank = next(leaf.shape[0] for path, leaf in paths_leaves
              if "lora_b" in jax.tree_util.keystr(path))
  copy = apply_lora(base, rank=rank, alpha=alpha, module_path=module_path,
                    seed=None)
  nnx.update(copy, to64(lora))
  return copy


def ulp_perturbed(model: gemma4_lib.Gemma4, *, seed: int) -> gemma4_lib.Gemma4:
  """A copy of `model` (LoRA included) with every floating weight moved by
  about one ulp, up or down at random.

  A stock run of it is another equally valid float32 answer: the float32
  noise yardstick of `testing.assert_model_close(..., perturbed=...)`.
  """
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def nudge(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    eps = jnp.finfo(x.dtype).eps
    signs = rng.choice(np.array([-1, 1], x.dtype), size=x.shape)
    return x * (1 + eps * signs).astype(x.dtype)

  return nnx.merge(graphdef, jax.tree.map(nudge, state))


def synthetic_batches(num_batches: int, *, batch_size: int, seq_len: int,
                      vocab_size: int, padding: Padding = "none",
                      seed: int = 0) -> list[peft_trainer.TrainingInput]:
  """Token batches of a learnable synthetic task: each row counts upwards
  modulo the vocab from a random start, so the loss falls within steps.

  `padding="right"`/`"left"` pads every other row by a random amount (mask
  False, token 0): the cases Tunix SFT (right) and RL (left) produce.
  """
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(num_batches):
    start = rng.integers(1, vocab_size, size=(batch_size, 1))
    tokens = (start + np.arange(seq_len)[None, :]) % vocab_size
    mask = np.ones((batch_size, seq_len), bool)
    if padding != "none":
      for row in range(1, batch_size, 2):
        pad = int(rng.integers(1, max(2, seq_len // 2)))
        if padding == "right":
          mask[row, seq_len - pad:] = False
        else:
          mask[row, :pad] = False
    tokens = np.where(mask, tokens, 0).astype(np.int32)
    batches.append(peft_trainer.TrainingInput(input_tokens=tokens,
                                              input_mask=mask))
  return batches


def sft_loss(model, input_tokens, input_mask, positions, attention_mask):
  """Tunix's default SFT loss (what `PeftTrainer` uses when given none) as a
  scalar: google-tunix 0.1.7 returns one, Tunix main a `LossOutput`."""
  loss = peft_trainer._default_loss_fn(  # pylint: disable=protected-access
      model, input_tokens, input_mask, positions, attention_mask)
  if hasattr(loss, "primary_loss"):
    return loss.primary_loss.compute()
  return loss


def model_inputs(batch: peft_trainer.TrainingInput) -> dict:
  """Tunix's usual `gen_model_input_fn`: positions from the mask (so left
  padding starts at position 0) and the causal padding mask `[B, T, T]`."""
  return {
      "input_tokens": batch.input_tokens,
      "input_mask": batch.input_mask,
      "positions": sft_utils.build_positions_from_mask(batch.input_mask),
      "attention_mask": sft_utils.make_causal_attn_mask(batch.input_mask),
  }


def make_trainer(model, *, max_steps: int, learning_rate: float = 1e-2,
                 checkpoint_dir: str | None = None,
                 save_interval_steps: int | None = None,
                 max_inflight_computations: int = 2,
                 model_inputs_fn: Callable = model_inputs,
                 ) -> peft_trainer.PeftTrainer:
  """A real `PeftTrainer` (LoRA params only when the model has LoRA);
  `model_inputs_fn` is its `gen_model_input_fn`."""
  options = None
  if checkpoint_dir is not None:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps or max_steps,
        max_to_keep=2)
  config = peft_trainer.TrainingConfig(
      eval_every_n_steps=10**9, max_steps=max_steps,
      checkpoint_root_directory=checkpoint_dir,
      checkpointing_options=options, pbar_description=None,
      max_inflight_computations=max_inflight_computations)
  trainer = peft_trainer.PeftTrainer(model, optax.adam(learning_rate), config)
  return trainer.with_gen_model_input_fn(model_inputs_fn)


@dataclasses.dataclass(frozen=True)
class TrainingRun:
  losses: tuple[float, ...]
  # Wall time of each step; the first includes compilation.
  step_seconds: tuple[float, ...]


class _StepClock(hooks.TrainingHooks):
  """Stamps each step start; with one computation in flight, consecutive
  stamps bracket exactly one step."""

  def __init__(self, on_step: Callable[[int], None] | None):
    self.stamps: list[float] = []
    self._on_step = on_step

  def on_train_start(self, train_ctx):
    del train_ctx

  def on_train_end(self, train_ctx):
    del train_ctx
    self.stamps.append(time.perf_counter())

  def on_train_step_start(self, train_ctx):
    del train_ctx
    self.stamps.append(time.perf_counter())
    if self._on_step is not None:
      self._on_step(len(self.stamps))

  def on_train_step_end(self, train_ctx, train_step, train_loss):
    del train_ctx, train_step, train_loss

  def on_eval_step_start(self, train_ctx):
    del train_ctx

  def on_eval_step_end(self, train_ctx, eval_loss):
    del train_ctx, eval_loss


def train(model, batches: Iterable[peft_trainer.TrainingInput], *,
          learning_rate: float = 1e-2,
          checkpoint_dir: str | None = None,
          on_step: Callable[[int], None] | None = None,
          model_inputs_fn: Callable = model_inputs) -> TrainingRun:
  """Runs one `PeftTrainer` step per batch; returns losses and step times.

  `on_step(i)` is called as step i (1-based) starts, for progress display.
  """
  batches = list(batches)
  trainer = make_trainer(model, max_steps=len(batches),
                         learning_rate=learning_rate,
                         checkpoint_dir=checkpoint_dir,
                         max_inflight_computations=1,
                         model_inputs_fn=model_inputs_fn)
  clock = _StepClock(on_step)
  trainer.with_training_hooks(clock)
  trainer.train(batches)
  losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
  trainer.close()
  stamps = clock.stamps
  return TrainingRun(
      losses=tuple(float(x) for x in np.asarray(losses)),
      step_seconds=tuple(b - a for a, b in zip(stamps, stamps[1:])))
