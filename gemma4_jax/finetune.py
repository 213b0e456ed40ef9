"""Fine-tune Gemma 4 with LoRA on prompt/completion pairs, then use it.

A script to run as it is and to copy and adapt:

    python -m gemma4_jax.finetune --base gemma-4-e2b/ --train train.jsonl \\
        --eval eval.jsonl --out run/ --steps 500 --batch-size 8 --seq-len 512

1. Loads a Hugging Face Gemma 4 checkpoint with Tunix's loader, on an
   `('fsdp', 'tp')` mesh when there are several devices (a v5litepod-4:
   fsdp=4, rows and weights split over the chips).
2. `gemma4_jax.patches.apply()`: attention, PLE, LoRA and the loss on
   gemma4_jax's ops (the report says what runs where).
3. qwix LoRA on the attention and MLP projections.
4. Tunix's `PeftTrainer` on JSONL lines `{"prompt": ..., "completion": ...}`
   in Gemma 4's turn format (`gemma4_jax.chat`); the loss is on the
   completion tokens and the closing `<turn|>` only (Tunix's convention:
   `input_mask` is the loss mask, the attention mask comes from the padding).
   Orbax checkpoints of the LoRA weights go to `OUT/checkpoints/<step>`.
5. Merges the newest checkpoint into `OUT/merged` (a Hugging Face
   checkpoint, on the host: `gemma4_jax.export.merge`), reports perplexity
   base vs fine-tuned on the eval data in the same turn format, and prints
   a few greedy completions of both.

Examples longer than `--seq-len` are dropped (and counted), not truncated:
a truncated completion would lose its `<turn|>` and teach the model not to
stop.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

# The projections `gemma4-jax fit` also puts LoRA on.
LORA_MODULE_PATH = "|".join(f".*{name}" for name in (
    "q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj",
    "down_proj"))


@dataclasses.dataclass(frozen=True)
class Options:
  base: str
  train: str
  out: str
  eval: str | None = None
  steps: int = 100
  batch_size: int = 8
  seq_len: int = 512
  lora_rank: int = 16
  lora_alpha: float = 32.0
  learning_rate: float = 1e-4
  save_every: int | None = None
  dtype: str = "float32"
  patch: bool = True
  num_samples: int = 3
  max_new_tokens: int = 64
  seed: int = 0


def read_pairs(path: str | os.PathLike) -> list[dict]:
  """`{"prompt", "completion"}` JSONL records (`text` lines are refused: a
  fine-tune in the turn format needs both parts)."""
  from gemma4_jax import perplexity  # pylint: disable=g-import-not-at-top
  records = perplexity.read_dataset(path)
  bad = [i for i, r in enumerate(records) if "text" in r]
  if bad:
    raise ValueError(f"{os.fspath(path)}: records {bad[:5]} have 'text'; "
                     "expected 'prompt' and 'completion'")
  return records


def encode(records: Sequence[dict], tokenizer, seq_len: int):
  """Turn-format `(tokens, completion_mask)` pairs that fit `seq_len`, and
  how many records did not."""
  from gemma4_jax import chat  # pylint: disable=g-import-not-at-top
  examples = [chat.encode_example(tokenizer, r["prompt"], r["completion"],
                                  chat=True) for r in records]
  kept = [e for e in examples if len(e[0]) <= seq_len]
  return kept, len(examples) - len(kept)


def batches(examples, *, batch_size: int, seq_len: int, pad_id: int,
            steps: int, seed: int = 0):
  """`steps` Tunix `TrainingInput`s of `[batch_size, seq_len]`: examples
  right-padded with `pad_id`, `input_mask` True on completion tokens; epochs
  reshuffled with `seed`. Rows beyond the data are pure padding."""
  from tunix.sft import peft_trainer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  order = []
  out = []
  for _ in range(steps):
    tokens = np.full((batch_size, seq_len), pad_id, np.int32)
    mask = np.zeros((batch_size, seq_len), bool)
    for row in range(min(batch_size, len(examples))):
      if not order:
        order = list(rng.permutation(len(examples)))
      ids, completion = examples[order.pop()]
      tokens[row, :len(ids)], mask[row, :len(ids)] = ids, completion
    out.append(peft_trainer.TrainingInput(input_tokens=tokens,
                                          input_mask=mask))
  return out


def model_inputs_fn(pad_id: int):
  """Tunix's `gen_model_input_fn` for these batches: `input_mask` is the
  loss mask, so positions and the causal attention mask come from the
  padding (`tokens != pad_id`), as in Tunix's own examples."""
  from tunix.sft import utils as sft_utils  # pylint: disable=g-import-not-at-top

  def model_inputs(batch):
    present = batch.input_tokens != pad_id
    return {"input_tokens": batch.input_tokens,
            "input_mask": batch.input_mask,
            "positions": sft_utils.build_positions_from_mask(present),
            "attention_mask": sft_utils.make_causal_attn_mask(present)}
  return model_inputs


def add_lora(model, *, rank: int, alpha: float, mesh=None,
             module_path: str = LORA_MODULE_PATH):
  """qwix LoRA on `model`, its state sharded like the model's on `mesh`."""
  import jax  # pylint: disable=g-import-not-at-top
  import qwix  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  provider = qwix.LoraProvider(module_path=module_path, rank=rank,
                               alpha=alpha)
  with _in_mesh(mesh):
    model = qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(0),
                                     **model.get_model_input())
    if mesh is not None:
      state = nnx.state(model)
      nnx.update(model, jax.lax.with_sharding_constraint(
          state, nnx.get_partition_spec(state)))
  return model


def make_trainer(model, options: Options, *, pad_id: int, mesh=None,
                 checkpoint_dir: str | None = None):
  """A `PeftTrainer` (AdamW on the LoRA weights) with orbax checkpoints."""
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from tunix.sft import peft_trainer  # pylint: disable=g-import-not-at-top
  del mesh  # the trainer reads the mesh the training runs under
  checkpointing = None
  if checkpoint_dir is not None:
    checkpointing = ocp.CheckpointManagerOptions(
        save_interval_steps=options.save_every or options.steps,
        max_to_keep=2)
  config = peft_trainer.TrainingConfig(
      eval_every_n_steps=max(1, options.steps // 4),
      max_steps=options.steps, checkpoint_root_directory=checkpoint_dir,
      checkpointing_options=checkpointing, pbar_description=None)
  trainer = peft_trainer.PeftTrainer(
      model, optax.adamw(options.learning_rate), config)
  return trainer.with_gen_model_input_fn(model_inputs_fn(pad_id))


def _in_mesh(mesh):
  """The mesh both ways Tunix reads it: `jax.set_mesh` and the legacy
  `with mesh:` its `shard()` and `PeftTrainer` look up."""
  import jax  # pylint: disable=g-import-not-at-top
  stack = contextlib.ExitStack()
  if mesh is not None:
    stack.enter_context(mesh)
    stack.enter_context(jax.set_mesh(mesh))
  return stack


def _say(message: str) -> None:
  print(message, flush=True)


def run(options: Options) -> dict:
  """The whole script; returns what it reported (for tests and the demo)."""
  from gemma4_jax import chat  # pylint: disable=g-import-not-at-top
  from gemma4_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from gemma4_jax import patches  # pylint: disable=g-import-not-at-top
  from gemma4_jax import perplexity  # pylint: disable=g-import-not-at-top
  from gemma4_jax.export import merging  # pylint: disable=g-import-not-at-top

  started = time.perf_counter()
  # Patched before the first JAX computation: on TPU, apply() sets a libtpu
  # option that is read when the backend starts (`patches.tpu_compiler`).
  with (patches.applied() if options.patch
        else contextlib.nullcontext()) as report:
    mesh = mesh_lib.default_mesh()
    if mesh is not None and options.batch_size % mesh.shape[mesh_lib.FSDP]:
      raise ValueError(f"batch_size: {options.batch_size} rows do not split "
                       f"over fsdp={mesh.shape[mesh_lib.FSDP]} devices")
    tokenizer = perplexity.load_tokenizer(options.base)
    pad_id = chat.pad_id(tokenizer)
    train, dropped, eval_records = _read_data(options, tokenizer)

    _say(f"load {options.base} ({options.dtype}) on "
         f"{'one device' if mesh is None else dict(mesh.shape)}")
    model = perplexity.load_model(options.base, dtype=options.dtype, mesh=mesh)
    if report is not None:
      _say(str(report))
    model = add_lora(model, rank=options.lora_rank, alpha=options.lora_alpha,
                     mesh=mesh)
    checkpoints = os.path.join(options.out, "checkpoints")
    losses = _train(model, options, train, eval_records, tokenizer,
                    pad_id=pad_id, mesh=mesh, checkpoints=checkpoints)
  _say(f"train loss: {losses[0]:.4f} (step 1) -> {losses[-1]:.4f} "
       f"(step {len(losses)})")

  merged = os.path.join(options.out, "merged")
  summary = merging.merge(options.base, checkpoints, merged,
                          alpha=options.lora_alpha, force=True,
                          progress=False)
  _say(f"merged into {merged}: {summary}")

  result = {"losses": losses, "checkpoints": checkpoints, "merged": merged,
            "dropped": dropped}
  if eval_records:
    result.update(_evaluate(options, eval_records, checkpoints=checkpoints,
                            merged=merged, mesh=mesh))
  _say(f"done in {time.perf_counter() - started:.0f}s")
  return result


def _read_data(options: Options, tokenizer):
  """The encoded training examples, how many were too long, and the eval
  records."""
  train, dropped = encode(read_pairs(options.train), tokenizer,
                          options.seq_len)
  if not train:
    raise ValueError(f"{options.train}: no example fits --seq-len "
                     f"{options.seq_len}")
  eval_records = read_pairs(options.eval) if options.eval else []
  _say(f"data: {len(train)} training examples ({dropped} longer than "
       f"{options.seq_len} tokens dropped), {len(eval_records)} eval")
  return train, dropped, eval_records


def _train(model, options: Options, train, eval_records, tokenizer, *,
           pad_id: int, mesh, checkpoints: str) -> list[float]:
  """`PeftTrainer` on the training batches (eval loss on the eval data);
  returns the training losses."""
  trainer = make_trainer(model, options, pad_id=pad_id, mesh=mesh,
                         checkpoint_dir=checkpoints)
  train_batches = batches(train, batch_size=options.batch_size,
                          seq_len=options.seq_len, pad_id=pad_id,
                          steps=options.steps, seed=options.seed)
  eval_examples, _ = encode(eval_records, tokenizer, options.seq_len)
  eval_batches = (batches(eval_examples, batch_size=options.batch_size,
                          seq_len=options.seq_len, pad_id=pad_id,
                          steps=-(-len(eval_examples) // options.batch_size))
                  if eval_examples else None)
  _say(f"train: {options.steps} PeftTrainer steps of {options.batch_size} x "
       f"{options.seq_len} tokens, LoRA rank {options.lora_rank} alpha "
       f"{options.lora_alpha}, checkpoints in {checkpoints}")
  # Only the legacy `with mesh:`: under `jax.set_mesh` Tunix 0.1.7's
  # `_shard_optimizer` fails on the optimizer's unsharded step counter.
  with mesh if mesh is not None else contextlib.nullcontext():
    trainer.train(train_batches, eval_batches)
  losses = [float(x) for x in np.asarray(
      trainer.metrics_logger.get_metric_history("", "loss", "train"))]
  trainer.close()
  return losses


def _evaluate(options: Options, eval_records, *, checkpoints: str,
              merged: str, mesh) -> dict:
  """Perplexity base vs fine-tuned on the eval data, and greedy completions
  of its first prompts by both (printed)."""
  from gemma4_jax import generate  # pylint: disable=g-import-not-at-top
  from gemma4_jax import perplexity  # pylint: disable=g-import-not-at-top
  ppl = perplexity.run(options.base, options.eval, adapter=checkpoints,
                       alpha=options.lora_alpha, dtype=options.dtype,
                       chat=True, mesh=mesh, progress=False,
                       batch_size=options.batch_size)
  result = {"perplexity": {name: ppl[name].perplexity
                           for name in ("base", "adapted")},
            "samples": {}}
  prompts = [r["prompt"] for r in eval_records[:options.num_samples]]
  for name, directory in (("base", options.base), ("fine-tuned", merged)):
    _say(f"\n{name} ({directory}), greedy:")
    result["samples"][name] = generate.run(
        directory, prompts=prompts, chat=True, dtype=options.dtype,
        max_new_tokens=options.max_new_tokens, mesh=mesh,
        batch_size=options.batch_size, progress=False)
  return result


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m gemma4_jax.finetune",
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--base", required=True,
                      help="Hugging Face Gemma 4 checkpoint directory")
  parser.add_argument("--train", required=True,
                      help="JSONL of {\"prompt\", \"completion\"} lines")
  parser.add_argument("--eval", help="JSONL for eval loss, perplexity and "
                      "samples (same format)")
  parser.add_argument("--out", required=True,
                      help="run directory: checkpoints/, merged/")
  defaults = Options(base="", train="", out="")
  for name in ("steps", "batch_size", "seq_len", "lora_rank", "lora_alpha",
               "learning_rate", "save_every", "num_samples",
               "max_new_tokens", "seed"):
    value = getattr(defaults, name)
    kind = float if isinstance(value, float) else int
    parser.add_argument(f"--{name.replace('_', '-')}", type=kind,
                        default=value, help=f"default {value}")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                      default=defaults.dtype)
  parser.add_argument("--no-patches", action="store_true",
                      help="train on stock Tunix (for comparison)")
  args = vars(parser.parse_args(argv))
  args["patch"] = not args.pop("no_patches")
  try:
    result = run(Options(**args))
  except (ValueError, FileNotFoundError) as e:
    print(f"finetune: error: {e}", file=sys.stderr)
    return 2
  if "perplexity" in result:
    print(json.dumps({"perplexity": result["perplexity"],
                      "final_loss": result["losses"][-1]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
