"""`gemma4-jax demo`: LoRA fine-tuning of a small Gemma 4, stock vs patched.

A real Tunix Gemma 4 (E2B's structure: local and global layers with head
dims 64/128, MQA, per-layer embeddings, KV sharing, the real 262144-token
vocab) with random weights, real qwix LoRA, real `PeftTrainer` steps on a
synthetic task, once as Tunix ships and once under `gemma4_jax.patches`.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import jax
from flax import nnx
from tunix.sft import peft_trainer

from gemma4_jax import patches
from gemma4_jax import tiny_models
from gemma4_jax import validation

VOCAB_SIZE = 262144
CONFIG = dict(vocab_size=VOCAB_SIZE, embed_dim=128, hidden_dim=256,
              num_heads=8, head_dim=64, global_head_dim=128, num_kv_heads=1,
              sliding_window=16, per_layer_input_dim=16, num_layers=6)
LORA_RANK, LORA_ALPHA, LEARNING_RATE = 8, 16.0, 2e-2
# The synthetic task counts upwards through the first TASK_TOKENS ids; the
# adapter first learns to favour them over the rest of the 262144 vocab.
TASK_TOKENS = 64


def _say(message: str) -> None:
  print(message, flush=True)


class _Stage:
  """Prints what is happening and how long it took."""

  def __init__(self, label: str):
    self.label = label

  def __enter__(self):
    self.start = time.perf_counter()
    print(f"  {self.label} ...", end="", flush=True)
    return self

  def __exit__(self, *exc):
    print(f" {time.perf_counter() - self.start:.1f}s", flush=True)


def compiled_temp_bytes(model, batch) -> int:
  """Temporary bytes XLA allocates for one LoRA loss-and-gradient step.

  The computation the trainer jits, minus the optimizer: Tunix's default SFT
  loss, differentiated with respect to the LoRA parameters only.
  """
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  inputs = tiny_models.model_inputs(batch)

  def loss(lora, rest, inputs):
    return peft_trainer._default_loss_fn(  # pylint: disable=protected-access
        nnx.merge(graphdef, lora, rest), **inputs)

  compiled = jax.jit(jax.value_and_grad(loss)).lower(lora, rest,
                                                     inputs).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _run(label: str, batches, steps: int) -> tuple[tiny_models.TrainingRun, int]:
  _say(f"{label}:")
  with _Stage("build Gemma 4 + qwix LoRA"):
    model = tiny_models.build_model(tiny_models.tiny_config(**CONFIG), seed=0)
    model = tiny_models.apply_lora(model, rank=LORA_RANK, alpha=LORA_ALPHA,
                                   seed=0)
  with _Stage("compile loss+grad for memory analysis"):
    temp = compiled_temp_bytes(model, batches[0])
  with _Stage(f"train {steps} PeftTrainer steps (the first compiles)"):
    run = tiny_models.train(
        model, batches, learning_rate=LEARNING_RATE,
        on_step=lambda i: print(f" {i}", end="", flush=True))
  return run, temp


def main(*, steps: int = 8, seq_len: int = 64, batch_size: int = 4) -> int:
  """Runs the demo; returns a process exit code."""
  validation.check_int("steps (--steps)", steps, minimum=2)  # 1st compiles
  validation.check_int("seq_len (--seq-len)", seq_len, minimum=2)
  validation.check_int("batch_size (--batch-size)", batch_size, minimum=1)
  _say(f"gemma4-jax demo on {jax.default_backend()} "
       f"({jax.device_count()} device(s)): Gemma 4 with "
       f"{CONFIG['num_layers']} layers, vocab {VOCAB_SIZE}, LoRA rank "
       f"{LORA_RANK}; {steps} steps of {batch_size}x{seq_len} tokens "
       "(right-padded rows)")
  batches = tiny_models.synthetic_batches(
      steps, batch_size=batch_size, seq_len=seq_len, vocab_size=TASK_TOKENS,
      padding="right", seed=0)
  stock, stock_temp = _run("stock Tunix", batches, steps)
  with patches.applied() as report:
    patched, patched_temp = _run(
        "patched (gemma4_jax.patches: "
        f"{', '.join(report.patched) or 'nothing'})",
        batches, steps)

  _say("")
  _say(f"{'step':>4}  {'loss stock':>11}  {'loss patched':>12}  "
       f"{'|diff|':>9}")
  for i, (a, b) in enumerate(zip(stock.losses, patched.losses), 1):
    _say(f"{i:>4}  {a:>11.5f}  {b:>12.5f}  {abs(a - b):>9.2e}")
  _say("")
  rows = [("step time, median after compile (s)",
           statistics.median(stock.step_seconds[1:]),
           statistics.median(patched.step_seconds[1:]), "{:.3f}"),
          ("first step incl. compile (s)", stock.step_seconds[0],
           patched.step_seconds[0], "{:.1f}"),
          ("compiled temp memory, loss+grad (MiB)", stock_temp / 2**20,
           patched_temp / 2**20, "{:.1f}")]
  _say(f"{'':40}  {'stock':>9}  {'patched':>9}")
  for name, a, b, fmt in rows:
    _say(f"{name:40}  {fmt.format(a):>9}  {fmt.format(b):>9}")
  # Step 1 runs both paths on identical weights, so its losses must agree to
  # float32 rounding. Later steps need not: Adam divides each gradient by its
  # own running scale, so rounding-level differences in near-zero gradient
  # entries become full-size updates and the trajectories drift apart.
  first_diff = abs(stock.losses[0] - patched.losses[0])
  agree = first_diff <= 1e-5 * abs(stock.losses[0])
  learned = all(run.losses[-1] < run.losses[0] for run in (stock, patched))
  _say("")
  _say(f"step 1 (identical weights) losses agree: "
       f"{'yes' if agree else 'NO'} (|diff| {first_diff:.1e})")
  _say(f"both runs learn: {'yes' if learned else 'NO'} (stock "
       f"{stock.losses[0]:.3f} -> {stock.losses[-1]:.3f}, patched "
       f"{patched.losses[0]:.3f} -> {patched.losses[-1]:.3f}; "
       f"ln(vocab) = {math.log(VOCAB_SIZE):.3f})")
  return 0 if agree and learned else 1


if __name__ == "__main__":
  sys.exit(main())
