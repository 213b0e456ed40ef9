"""`gemma4-jax demo`: the whole fine-tuning journey on a small Gemma 4.

A real Tunix Gemma 4 (E2B's structure: local and global layers with head
dims 64/128, MQA, per-layer embeddings, KV sharing, the real 262144-token
vocab) with random weights, written as a Hugging Face checkpoint with a
Gemma 4-style tokenizer. Then, as a user would on a TPU with E2B:

1. LoRA fine-tuning with Tunix's `PeftTrainer` on prompt/completion pairs
   in Gemma 4's turn format (loss on the completions), once as Tunix ships
   and once under `gemma4_jax.patches`: losses, step times, memory.
2. The patched run's adapter saved as a Tunix (orbax) checkpoint, merged
   into the Hugging Face checkpoint with `gemma4_jax.export.merge`.
3. The merged checkpoint loaded with Tunix: its logits against the LoRA
   model's.
4. Perplexity on held-out pairs, base vs merged (lower after fine-tuning).
5. Greedy completions of held-out prompts, base vs merged.

The task: "w{s}" -> "w{s+1} ... w{s+n}" (counting up, n varies per row)
for starts among the first 64 words, so a few steps already teach the
adapter which of the 262144 tokens the answers use and that they end with
`<turn|>`.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from gemma4_jax import chat
from gemma4_jax import finetune
from gemma4_jax import generate
from gemma4_jax import patches
from gemma4_jax import perplexity
from gemma4_jax import testing
from gemma4_jax import tiny_models
from gemma4_jax import tiny_tokenizer
from gemma4_jax import validation
from gemma4_jax.export import hf_writer
from gemma4_jax.export import merging

VOCAB_SIZE = 262144
# embed_dim 160: Tunix's safetensors loader cannot tell a K/V weight's axes
# apart when embed_dim equals a head dim (64 or 128 here).
CONFIG = dict(vocab_size=VOCAB_SIZE, embed_dim=160, hidden_dim=256,
              num_heads=8, head_dim=64, global_head_dim=128, num_kv_heads=1,
              sliding_window=16, per_layer_input_dim=16, num_layers=6)
LORA_RANK, LORA_ALPHA, LEARNING_RATE = 8, 16.0, 2e-2
TASK_STARTS = range(10, 74)
HELD_OUT = 8
NUM_SAMPLES = 3
MAX_NEW_TOKENS = 10


def _say(message: str) -> None:
  print(message, flush=True)


class _Stage:
  """Prints what is happening and how long it took; keeps the time."""

  timings: list[tuple[str, float]] = []

  def __init__(self, label: str):
    self.label = label

  def __enter__(self):
    self.start = time.perf_counter()
    print(f"  {self.label} ...", end="", flush=True)
    return self

  def __exit__(self, *exc):
    seconds = time.perf_counter() - self.start
    _Stage.timings.append((self.label, seconds))
    print(f" {seconds:.1f}s", flush=True)


def compiled_temp_bytes(model, batch, model_inputs_fn) -> int:
  """Temporary bytes XLA allocates for one LoRA loss-and-gradient step.

  The computation the trainer jits, minus the optimizer: Tunix's default SFT
  loss, differentiated with respect to the LoRA parameters only.
  """
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  inputs = model_inputs_fn(batch)

  def loss(lora, rest, inputs):
    return tiny_models.sft_loss(nnx.merge(graphdef, lora, rest), **inputs)

  compiled = jax.jit(jax.value_and_grad(loss)).lower(lora, rest,
                                                     inputs).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _pairs(starts, rng, max_count):
  return [{"prompt": tiny_tokenizer.word(s), "completion": " ".join(
      tiny_tokenizer.word(s + i)
      for i in range(1, int(rng.integers(max_count // 2, max_count)) + 1))}
          for s in starts]


def _train(label, base, batches, steps, model_inputs_fn, checkpoint_dir=None):
  _say(f"{label}:")
  with _Stage("qwix LoRA on a copy of the base model"):
    model = tiny_models.apply_lora(nnx.clone(base), rank=LORA_RANK,
                                   alpha=LORA_ALPHA, seed=None)
  with _Stage("compile loss+grad for memory analysis"):
    temp = compiled_temp_bytes(model, batches[0], model_inputs_fn)
  with _Stage(f"train {steps} PeftTrainer steps (the first compiles)"):
    run = tiny_models.train(
        model, batches, learning_rate=LEARNING_RATE,
        checkpoint_dir=checkpoint_dir, model_inputs_fn=model_inputs_fn,
        on_step=lambda i: print(f" {i}", end="", flush=True))
  return model, run, temp


def main(*, steps: int = 8, seq_len: int = 32, batch_size: int = 4,
         workdir: str | None = None) -> int:
  """Runs the demo; returns a process exit code."""
  validation.check_int("steps (--steps)", steps, minimum=2)  # 1st compiles
  # A turn-format prompt is 7 tokens; the completion needs a few more.
  validation.check_int("seq_len (--seq-len)", seq_len, minimum=12)
  validation.check_int("batch_size (--batch-size)", batch_size, minimum=1)
  started = time.perf_counter()
  _Stage.timings = []
  with tempfile.TemporaryDirectory(prefix="gemma4_jax_demo_") as tmp:
    code = _journey(steps, seq_len, batch_size, workdir or tmp)
  _say(f"\ntotal {time.perf_counter() - started:.0f}s")
  return code


def _journey(steps, seq_len, batch_size, workdir) -> int:
  _say(f"gemma4-jax demo on {jax.default_backend()} "
       f"({jax.device_count()} device(s)): Gemma 4 with "
       f"{CONFIG['num_layers']} layers, vocab {VOCAB_SIZE}, LoRA rank "
       f"{LORA_RANK}; {steps} steps of {batch_size}x{seq_len} tokens in the "
       f"turn format (right-padded rows, loss on completions); work in "
       f"{workdir}")
  base_dir = os.path.join(workdir, "base")
  base, tokenizer_path = _base_checkpoint(base_dir)
  tokenizer = perplexity.load_tokenizer(base_dir)
  pad_id = chat.pad_id(tokenizer)
  train_records, held_out, batches = _task(tokenizer, pad_id, steps=steps,
                                           seq_len=seq_len,
                                           batch_size=batch_size)
  model_inputs_fn = finetune.model_inputs_fn(pad_id)
  _say(f"  data: {len(train_records)} training pairs, {len(held_out)} held "
       f"out, e.g. {train_records[0]} ({os.path.basename(tokenizer_path)}: "
       f"Gemma 4's special tokens)")

  _, stock, stock_temp = _train("stock Tunix", base, batches, steps,
                                model_inputs_fn)
  checkpoints = os.path.join(workdir, "checkpoints")
  with patches.applied() as report:
    lora_model, patched, patched_temp = _train(
        "patched (gemma4_jax.patches: "
        f"{', '.join(report.patched) or 'nothing'})",
        base, batches, steps, model_inputs_fn, checkpoint_dir=checkpoints)
  _print_training(stock, patched, stock_temp, patched_temp)

  merged, logit_error, logit_bound = _merge_and_compare(
      base_dir, checkpoints, os.path.join(workdir, "merged"), steps,
      lora_model, model_inputs_fn, batches[0])
  logits_agree = logit_error <= logit_bound
  _say(f"  max |merged - LoRA| = {logit_error:.2e} (bound {logit_bound:.2e}):"
       f" {'agree' if logits_agree else 'DIFFER'}")

  base_ppl, merged_ppl = _held_out_perplexity(base, merged, held_out,
                                              tokenizer)
  _print_samples(base, merged, held_out, tokenizer, base_dir, pad_id)

  agree = abs(stock.losses[0] - patched.losses[0]) <= 1e-5 * abs(
      stock.losses[0])
  learned = all(run.losses[-1] < run.losses[0] for run in (stock, patched))
  lower = merged_ppl < base_ppl
  _print_summary(agree, learned, logits_agree, lower, stock, patched,
                 base_ppl, merged_ppl, logit_error)
  return 0 if agree and learned and logits_agree and lower else 1


def _base_checkpoint(base_dir):
  """The random-weight Gemma 4, written to `base_dir` as a Hugging Face
  checkpoint with a `tokenizer.json`; returns it and the tokenizer's path."""
  _say("base model:")
  with _Stage("build the Gemma 4 (random weights)"):
    base = tiny_models.build_model(tiny_models.tiny_config(**CONFIG), seed=0)
  with _Stage("write it as a Hugging Face checkpoint + tokenizer.json"):
    hf_writer.write_hf_checkpoint(base, base_dir)
    tokenizer_path = tiny_tokenizer.write(base_dir, VOCAB_SIZE)
  return base, tokenizer_path


def _task(tokenizer, pad_id, *, steps, seq_len, batch_size):
  """The counting task: training pairs, held-out pairs, training batches."""
  rng = np.random.default_rng(0)
  starts = rng.permutation(np.asarray(TASK_STARTS))
  max_count = seq_len - 8  # 7 prompt tokens, then the count and <turn|>
  train_records = _pairs(starts[HELD_OUT:], rng, max_count)
  held_out = _pairs(starts[:HELD_OUT], rng, max_count)
  examples, _ = finetune.encode(train_records, tokenizer, seq_len)
  batches = finetune.batches(examples, batch_size=batch_size,
                             seq_len=seq_len, pad_id=pad_id, steps=steps)
  return train_records, held_out, batches


def _merge_and_compare(base_dir, checkpoints, merged_dir, steps, lora_model,
                       model_inputs_fn, batch):
  """Merges the adapter into the base checkpoint, loads the result with
  Tunix and compares its logits with the LoRA model's.

  Returns:
    `(merged model, max |merged - LoRA| logit, the bound it must meet)`.
  """
  _say("\nthe adapter, merged and checked:")
  with _Stage(f"merge the step-{steps} Tunix checkpoint into the Hugging "
              "Face one (host)"):
    merging.merge(base_dir, checkpoints, merged_dir, alpha=LORA_ALPHA,
                  progress=False)
  with _Stage("load the merged checkpoint with Tunix"):
    merged = perplexity.load_model(merged_dir)
  with _Stage("logits: merged model vs LoRA model"):
    inputs = model_inputs_fn(batch)
    logits = nnx.jit(lambda model, x: model(
        x["input_tokens"], x["positions"], None, x["attention_mask"])[0])
    expected = np.asarray(logits(lora_model, inputs), np.float64)
    actual = np.asarray(logits(merged, inputs), np.float64)
    # Merging reassociates x @ W + s (x @ A) @ B as x @ (W + s B A), a
    # float32 rounding change. The yardstick is this model's own float32
    # noise on this machine: the LoRA model with every weight moved by one
    # ulp (testing.assert_model_close's rule: 8x that, plus a few ulps).
    noisy = np.asarray(logits(tiny_models.ulp_perturbed(lora_model, seed=0),
                              inputs), np.float64)
    logit_bound = (testing.MODEL_ERROR_MULTIPLE *
                   np.abs(noisy - expected).max() +
                   testing.MODEL_ERROR_FLOOR_ULPS * np.finfo(np.float32).eps *
                   np.abs(expected).max())
    logit_error = float(np.abs(actual - expected).max())
  return merged, logit_error, logit_bound


def _held_out_perplexity(base, merged, held_out, tokenizer):
  """Perplexity of the held-out pairs, base and merged."""
  _say("\nheld-out evaluation (turn format, completions and <turn|> scored):")
  eval_examples = perplexity.tokenize(held_out, tokenizer, chat=True)
  results = {}
  for name, model in (("base", base), ("merged", merged)):
    with _Stage(f"perplexity, {name}"):
      results[name] = perplexity.perplexity(model, eval_examples,
                                            progress=False)
  base_ppl = results["base"].perplexity
  merged_ppl = results["merged"].perplexity
  _say(f"  perplexity: base {base_ppl:.1f}, merged {merged_ppl:.1f} "
       f"(vocab {VOCAB_SIZE}; {results['base'].num_tokens} tokens)")
  return base_ppl, merged_ppl


def _print_samples(base, merged, held_out, tokenizer, base_dir, pad_id):
  """Greedy completions of the first held-out prompts, base and merged."""
  prompts = [chat.encode_prompt(tokenizer, r["prompt"], chat=True)
             for r in held_out[:NUM_SAMPLES]]
  stops = chat.stop_token_ids(tokenizer, base_dir)
  samples = {}
  for name, model in (("base", base), ("merged", merged)):
    with _Stage(f"generate {NUM_SAMPLES} greedy completions, {name}"):
      samples[name] = generate.generate(model, prompts,
                                        max_new_tokens=MAX_NEW_TOKENS,
                                        stop_ids=stops, pad_id=pad_id)
  for i, record in enumerate(held_out[:NUM_SAMPLES]):
    _say(f"  prompt {record['prompt']!r} (trained answers count up: "
         f"{record['completion'][:30]!r}...)")
    for name in ("base", "merged"):
      c = samples[name][i]
      text = tokenizer.decode(c.tokens.tolist())
      _say(f"    {name:>6}: {text!r}{' <turn|>' if c.stopped else ''}")


def _print_training(stock, patched, stock_temp, patched_temp):
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


def _print_summary(agree, learned, logits_agree, lower, stock, patched,
                   base_ppl, merged_ppl, logit_error):
  # Step 1 runs both paths on identical weights, so its losses must agree to
  # float32 rounding. Later steps need not: Adam divides each gradient by its
  # own running scale, so rounding-level differences in near-zero gradient
  # entries become full-size updates and the trajectories drift apart.
  yes = lambda ok: "yes" if ok else "NO"
  checks = [
      ("step-1 losses agree, stock vs patched", yes(agree),
       f"|diff| {abs(stock.losses[0] - patched.losses[0]):.1e}"),
      ("both runs learn", yes(learned),
       f"stock {stock.losses[0]:.3f} -> {stock.losses[-1]:.3f}, patched "
       f"{patched.losses[0]:.3f} -> {patched.losses[-1]:.3f} "
       f"(ln V = {math.log(VOCAB_SIZE):.2f})"),
      ("merged logits = LoRA model's", yes(logits_agree),
       f"max |diff| {logit_error:.1e}"),
      ("held-out perplexity lower after merge", yes(lower),
       f"{base_ppl:.1f} -> {merged_ppl:.1f}"),
  ]
  _say("\nsummary")
  _say(f"  {'stage':<68} {'time':>7}")
  for label, seconds in _Stage.timings:
    _say(f"  {label[:68]:<68} {seconds:>6.1f}s")
  _say(f"\n  {'check':<40} {'ok':<4} detail")
  for name, ok, detail in checks:
    _say(f"  {name:<40} {ok:<4} {detail}")


if __name__ == "__main__":
  sys.exit(main())
