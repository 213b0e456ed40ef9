"""What `gemma4-jax fit` compiles: a Gemma 4 LoRA training step, abstractly.

Presets: `model_config("e2b")` is Tunix's own `ModelConfig.gemma4_e2b()` in
bfloat16; the 12B preset, which google-tunix 0.1.7 does not ship, restates Tunix main's
`ModelConfig.gemma4_12b()` when the installed Tunix lacks it.

`model_config(name, num_layers=N)` keeps the first N layers of the preset's
attention pattern and keeps KV sharing valid: Tunix shares the KV of the last
two unshared layers, which must be a local then a global layer, so the
unshared prefix is rounded up to whole pattern periods (each period ends in a
global layer) in the preset's proportion; when that leaves no layer to share,
the shortened model shares none.

`AbstractStep` builds the model, its qwix LoRA and its optimizer with
`nnx.eval_shape` (no weights are allocated), places them on a mesh with the
shardings Tunix declares, and lowers `PeftTrainer`'s training step for it,
stock or inside `gemma4_jax.patches.applied()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from tunix.models.gemma4 import model as gemma4_lib
from tunix.sft import peft_trainer

from gemma4_jax import mesh as mesh_lib
from gemma4_jax import tiny_models

# CLI name -> Tunix `ModelConfig` classmethod.
PRESETS = {
    "e2b": "gemma4_e2b",
    "e4b": "gemma4_e4b",
    "12b": "gemma4_12b",
    "31b": "gemma4_31b",
    "26b-a4b": "gemma4_26b_a4b",
}


def _gemma4_12b() -> gemma4_lib.ModelConfig:
  """Tunix main's `ModelConfig.gemma4_12b()` (absent from google-tunix 0.1.7)."""
  return gemma4_lib.ModelConfig(
      num_layers=48, num_embed=262144, embed_dim=3840, hidden_dim=3840 * 4,
      num_heads=16, head_dim=256, num_kv_heads=8, num_global_kv_heads=1,
      sliding_window_size=1024, k_eq_v_global=True,
      attention_pattern=gemma4_lib.GEMMA4_ATTENTION_PATTERN)


def model_config(name: str, *, num_layers: int | None = None,
           dtype=jnp.bfloat16) -> gemma4_lib.ModelConfig:
  """The Tunix `ModelConfig` of preset `name` (a key of `PRESETS`).

  Args:
    name: "e2b", "e4b", "12b", "31b" or "26b-a4b".
    num_layers: keep only this many layers (1 to the preset's count); KV
      sharing is kept valid as the module docstring says. None: all.
    dtype: parameter and activation dtype.

  Raises:
    ValueError: unknown `name`, or `num_layers` out of range.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(PRESETS)}")
  factory = getattr(gemma4_lib.ModelConfig, PRESETS[name], None)
  preset = factory() if factory is not None else _gemma4_12b()
  preset = dataclasses.replace(preset, param_dtype=dtype, dtype=dtype,
                               remat_config=gemma4_lib.RematConfig.NONE)
  if num_layers is None or num_layers == preset.num_layers:
    return preset
  if not 1 <= num_layers <= preset.num_layers:
    raise ValueError(f"num_layers must be in 1..{preset.num_layers} for "
                     f"{name}, got {num_layers}")
  return dataclasses.replace(
      preset, num_layers=num_layers,
      frac_shared_layers=_shared_fraction(preset, num_layers))


def unshared_layers(config: gemma4_lib.ModelConfig) -> int:
  """How many leading layers compute their own KV (Tunix's formula)."""
  n = config.num_layers
  return int(n - config.frac_shared_layers * n)


def _shared_fraction(preset: gemma4_lib.ModelConfig, num_layers: int) -> float:
  if not preset.frac_shared_layers:
    return 0.0
  period = len(preset.attention_pattern
               or gemma4_lib.GEMMA4_ATTENTION_PATTERN)
  share = unshared_layers(preset) / preset.num_layers
  unshared = max(1, math.ceil(share * num_layers / period)) * period
  if unshared >= num_layers:
    return 0.0
  fraction = (num_layers - unshared) / num_layers
  # Tunix truncates num_layers * (1 - fraction); keep the float on the right
  # side of the integer.
  while int(num_layers - fraction * num_layers) != unshared:
    fraction -= 1e-12
  return fraction


class AbstractStep:
  """A Gemma 4 with qwix LoRA and AdamW, abstract, on `mesh`; lowers its
  training step.

  `config` is a `gemma4_jax.fit.FitConfig`; `say` reports progress.
  """

  def __init__(self, config, mesh: jax.sharding.Mesh, *,
               say: Callable[[str], None] = lambda message: None):
    self.config = config
    self.mesh = mesh
    self.model_config = model_config(config.model,
                                     num_layers=config.num_layers)
    self.num_layers = self.model_config.num_layers
    start = time.perf_counter()
    say(f"building {config.model.upper()} ({self.num_layers} layers) with "
        f"LoRA rank {config.lora_rank} and AdamW, abstractly")
    model, optimizer = _build(self.model_config, config.lora_rank, mesh)
    if config.remat != "none":
      # A patches policy replaces Tunix's DECODER remat in the patched step;
      # the stock step keeps Tunix's own.
      _set_remat(model, config.remat if config.remat in ("block", "decoder")
                 else "decoder")
    self._graphdef, frozen, trainable = nnx.split(
        (model, optimizer), _FROZEN, ...)
    self._frozen = _placed(frozen, mesh)
    self._trainable = _placed(trainable, mesh)
    lora = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    if not lora:
      raise RuntimeError("qwix created no LoRA params: no module matched "
                         f"{LORA_MODULE_PATH!r}")
    self.lora_tensors = len(lora)
    self.lora_params = sum(math.prod(x.shape) for x in lora)
    say(f"built in {time.perf_counter() - start:.0f} s: "
        f"{self.lora_params / 1e6:.1f}M LoRA params in "
        f"{self.lora_tensors} tensors")

  def inputs(self, seq_len: int) -> dict:
    """Token and mask `ShapeDtypeStruct`s, batch over 'fsdp' as Tunix's
    `shard_input` does (replicated when the batch does not divide)."""
    batch = self.config.batch
    spec = (jax.sharding.PartitionSpec(mesh_lib.FSDP)
            if batch % self.mesh.shape[mesh_lib.FSDP] == 0
            else jax.sharding.PartitionSpec())
    sharding = jax.sharding.NamedSharding(self.mesh, spec)
    return {"input_tokens": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                                                 sharding=sharding),
            "input_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_,
                                               sharding=sharding)}

  def arguments(self, seq_len: int) -> tuple:
    """`(frozen, trainable, inputs)` as sharded `ShapeDtypeStruct`s: what
    the lowered step takes (benchmarks/run_tpu.py fills them on a TPU)."""
    return self._frozen, self._trainable, self.inputs(seq_len)

  def argument_sizes(self, seq_len: int) -> dict:
    """Per-chip bytes of the step's arguments from shapes and shardings:
    frozen weights, LoRA + optimizer state, inputs."""
    return {"weights": per_chip_bytes(self._frozen),
            "trainable": per_chip_bytes(self._trainable),
            "inputs": per_chip_bytes(self.inputs(seq_len))}

  def lower(self, mode: str, seq_len: int) -> jax.stages.Lowered:
    """The jitted step lowered for the mesh, stock or patched."""
    # keep_unused: the KV-sharing layers' unused kv_einsum weights still sit
    # in HBM; kept as arguments, XLA counts them.
    step = jax.jit(_train_step(self._graphdef), donate_argnums=1,
                   keep_unused=True)
    with contextlib.ExitStack() as stack:
      stack.enter_context(tunix_shard_constrains_on_cpu())
      if mode == "patched":
        from gemma4_jax import patches  # pylint: disable=g-import-not-at-top
        policy = self.config.remat
        # libtpu read `LIBTPU_INIT_ARGS` when the topology was made, so
        # `fit` passes the option `apply()` sets to the compile itself
        # (`fit._compiler_options`) instead of changing the variable here.
        stack.enter_context(patches.applied(
            implementation=self.config.implementation, share_layer_code=False,
            remat=policy if policy in patches.tunix_remat.POLICIES else None))
      stack.enter_context(_in_mesh(self.mesh))
      return step.lower(self._frozen, self._trainable, self.inputs(seq_len))


LORA_MODULE_PATH = "|".join(f".*{name}" for name in (
    "q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj",
    "down_proj"))
LEARNING_RATE = 1e-4
# Everything but the LoRA params and the optimizer state.
_FROZEN = nnx.Not(nnx.Any(nnx.LoRAParam, nnx.optimizer.OptState))


def _build(model_config, rank: int, mesh):
  def build():
    model = gemma4_lib.Gemma4(model_config, rngs=nnx.Rngs(0))
    provider = qwix.LoraProvider(module_path=LORA_MODULE_PATH, rank=rank,
                                 alpha=2.0 * rank)
    model = qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(1),
                                     **model.get_model_input())
    optimizer = nnx.Optimizer(model, optax.adamw(LEARNING_RATE),
                              wrt=nnx.LoRAParam)
    return model, optimizer

  with _in_mesh(mesh):
    return nnx.eval_shape(build)


def _set_remat(model, remat: str) -> None:
  """Remat on a built model: qwix creates no LoRA params when the model is
  built with remat on ("Cannot find rngs in the current module" later)."""
  if not hasattr(gemma4_lib, "RematConfig"):
    raise ValueError("the installed Tunix has no RematConfig; use remat none")
  value = gemma4_lib.RematConfig[remat.upper()]
  for _, module in model.iter_modules():
    if isinstance(getattr(module, "config", None), gemma4_lib.ModelConfig):
      module.config.remat_config = value


def _placed(state, mesh):
  """`ShapeDtypeStruct`s of `state` with the shardings its variables name.

  A mesh axis that does not divide its dimension is dropped (that dimension
  is replicated), as `jax.device_put` would refuse it: 12B's single global
  KV head under tp=2.
  """
  def place(x, spec):
    spec = tuple(spec) + (None,) * (len(x.shape) - len(spec))
    kept = tuple(
        axes if size % math.prod(
            mesh.shape[a] for a in ((axes,) if isinstance(axes, str)
                                    else axes or ())) == 0 else None
        for size, axes in zip(x.shape, spec))
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=jax.sharding.NamedSharding(
                                    mesh, jax.sharding.PartitionSpec(*kept)))

  return jax.tree.map(place, state, nnx.get_partition_spec(state))


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of sharded `ShapeDtypeStruct`s (the largest shard
  when shards differ)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape)
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def _train_step(graphdef):
  """`PeftTrainer._train_step` on split state (LoRA, google-tunix 0.1.7)."""

  def loss_fn(model, input_tokens, input_mask, positions, attention_mask):
    return tiny_models.sft_loss(model, input_tokens, input_mask, positions,
                                attention_mask)

  def step(frozen, trainable, inputs):
    model, optimizer = nnx.merge(graphdef, frozen, trainable)
    model_inputs = tiny_models.model_inputs(peft_trainer.TrainingInput(
        input_tokens=inputs["input_tokens"], input_mask=inputs["input_mask"]))
    grad_fn = nnx.value_and_grad(loss_fn,
                                 argnums=nnx.DiffState(0, nnx.LoRAParam))
    loss, grads = grad_fn(model, **model_inputs)
    grad_norm = optax.global_norm(grads)
    optimizer.update(model, grads)
    _, _, trainable = nnx.split((model, optimizer), _FROZEN, ...)
    return loss, grad_norm, trainable

  return step


@contextlib.contextmanager
def _in_mesh(mesh):
  """The mesh both ways Tunix code reads it: `jax.set_mesh` and the legacy
  `with mesh:` that Tunix's `shard()` looks up."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with mesh, jax.set_mesh(mesh):
      yield


@contextlib.contextmanager
def tunix_shard_constrains_on_cpu():
  """Tunix's `shard()` without its "devices()[0] is a CPU" early return,
  so a trace on a CPU host gets the activation constraints a TPU host gets.
  Enter before patching: the attention patch takes `shard` when applied.
  """
  original = gemma4_lib.shard

  def shard(x, s, eager=False):
    mesh = mesh_lib.legacy_context()
    if mesh is None:
      return jnp.asarray(x)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
    if eager:
      return jax.device_put(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)

  gemma4_lib.shard = shard
  try:
    yield
  finally:
    gemma4_lib.shard = original
