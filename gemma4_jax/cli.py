"""The `gemma4-jax` console script."""

from __future__ import annotations

import argparse
import sys
import traceback


def build_parser() -> argparse.ArgumentParser:
  """The parser of every command, each with its `func`."""
  parser = argparse.ArgumentParser(
      prog="gemma4-jax",
      description="Kernels, Tunix patches and LoRA export for Gemma 4 in JAX.")
  commands = parser.add_subparsers(dest="command", required=True,
                                   metavar="COMMAND")
  _add_demo(commands)
  from gemma4_jax.export import commands as export_commands  # pylint: disable=g-import-not-at-top
  export_commands.register(commands)
  _add_perplexity(commands)
  from gemma4_jax import generate as generate_command  # pylint: disable=g-import-not-at-top
  generate_command.register(commands)
  _add_fit(commands)
  _add_doctor(commands)
  return parser


def _add_demo(commands) -> None:
  demo = commands.add_parser(
      "demo", help="the fine-tuning journey on a small Gemma 4: stock vs "
      "patched LoRA training, merge, perplexity, generation",
      description="Builds a small Gemma 4 (real 262144-token vocab, random "
      "weights) as a Hugging Face checkpoint, LoRA-trains it with Tunix's "
      "PeftTrainer on turn-format pairs stock and patched (losses, step "
      "times, compiled memory), saves the adapter as a Tunix checkpoint, "
      "merges it into the checkpoint, checks the merged logits against the "
      "LoRA model's, compares held-out perplexity and greedy completions "
      "base vs merged, and ends with a summary table.")
  demo.add_argument("--steps", type=int, default=8,
                    help="training steps per run (default 8)")
  demo.add_argument("--seq-len", type=int, default=32,
                    help="tokens per row (default 32)")
  demo.add_argument("--batch-size", type=int, default=4,
                    help="rows per batch (default 4)")
  demo.set_defaults(func=_run_demo)


def _add_perplexity(commands) -> None:
  perplexity = commands.add_parser(
      "perplexity", help="token-level NLL/perplexity of a checkpoint on JSONL",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Mean NLL and perplexity of a Hugging Face Gemma 4 "
      "checkpoint (loaded with Tunix's\nsafetensors loader) on a JSONL "
      "dataset, optionally base and adapted side by side.\n\n"
      "What is computed: Gemma 4 softcaps its final logits, so its "
      "next-token\ndistribution is p = softmax(c * tanh(h @ E^T / c)) with "
      "c = final_logit_softcapping\n(30): the distribution it samples from "
      "at temperature 1. mean NLL = average\nover scored tokens of -log "
      "p(actual next token); perplexity = exp(mean NLL).\nThe raw, uncapped "
      "logits are never used. Scored tokens: all but the first of\na 'text' "
      "line; only the completion tokens of a 'prompt'/'completion' line.\n"
      "Lines are tokenized with the checkpoint's own tokenizer.json. The "
      "[T, V] logits\nare never held: the LM head runs fused into the loss "
      "and --top-k streams vocab\nchunks.")
  add_checkpoint_args(perplexity, adapter_help=(
      "LoRA adapter (Tunix checkpoint or PEFT directory): also report the "
      "adapted model, merged into the base as `gemma4-jax merge` does"))
  perplexity.add_argument("--data", required=True,
                          help="JSONL: one {\"text\": ...} or {\"prompt\": "
                          "..., \"completion\": ...} object per line")
  perplexity.add_argument("--top-k", type=int, metavar="K",
                          help="also print the K most likely next tokens and "
                          "their probabilities (under the softcap) at every "
                          "position of the --inspect examples")
  perplexity.add_argument("--inspect", type=int, nargs="+", default=None,
                          metavar="I",
                          help="0-based example indices for --top-k "
                          "(default: 0); only with --top-k")
  perplexity.add_argument("--dtype", choices=["float32", "bfloat16"],
                          default="float32",
                          help="parameter and compute dtype (default "
                          "float32)")
  perplexity.add_argument("--chat", action="store_true",
                          help="score prompt/completion lines in Gemma 4's "
                          "turn format, as the fine-tune trained on them "
                          "(see `generate --chat`); the completion's closing "
                          "<turn|> is scored too")
  perplexity.add_argument("--batch-size", type=int, default=8,
                          help="examples per batch (default 8); with several "
                          "devices, split over an ('fsdp', 'tp') mesh")
  perplexity.add_argument("--no-progress", action="store_true",
                          help="no progress bar")
  perplexity.set_defaults(func=_run_perplexity)


def add_checkpoint_args(parser, *, adapter_help: str) -> None:
  """The checkpoint and its optional adapter, as `perplexity` and `generate`
  take them."""
  parser.add_argument("checkpoint",
                      help="Hugging Face Gemma 4 checkpoint directory "
                      "(safetensors, config.json, tokenizer.json)")
  parser.add_argument("--adapter", help=adapter_help)
  parser.add_argument("--alpha", type=float,
                      help="LoRA alpha, for a Tunix checkpoint that does not "
                      "record it")


def _add_fit(commands) -> None:
  fit = commands.add_parser(
      "fit", help="does a Gemma 4 LoRA fine-tune fit on a TPU? (per-chip HBM, "
      "stock vs patched)",
      description="Compiles the Gemma 4 LoRA training step (Tunix model, "
      "qwix LoRA, AdamW, Tunix's default SFT loss and shardings) for "
      "abstract TPU chips with XLA:TPU on this machine (needs libtpu, no "
      "TPU) and reports per-chip HBM, stock Tunix vs gemma4_jax.patches. "
      "A 35-layer E2B compile takes minutes on a small CPU: progress goes "
      "to stderr; results are cached by program.")
  fit.add_argument("--model", default="e2b",
                   choices=["e2b", "e4b", "12b", "31b", "26b-a4b"],
                   help="Gemma 4 preset (default e2b)")
  fit.add_argument("--topology", default="v5e:2x2",
                   help="TPU topology: v5e:2x2 (default, a v5litepod-4), "
                   "v5e:4x4, v6e:2x2, v5p:2x2x1, ...")
  fit.add_argument("--batch", type=int, default=4,
                   help="rows per step (default 4)")
  fit.add_argument("--seq-len", type=int, default=1024,
                   help="tokens per row (default 1024)")
  fit.add_argument("--num-layers", type=int, metavar="N",
                   help="keep the first N layers for a quick compile "
                   "(default: all)")
  fit.add_argument("--lora-rank", type=int, default=16,
                   help="LoRA rank; alpha is twice it (default 16)")
  # fit.REMAT, spelled out: importing fit here would load JAX for --help.
  fit.add_argument("--remat", default="none", choices=[
      "none", "block", "decoder", "full", "minimal", "attention", "offload"],
                   help="none, block, decoder: Tunix's RematConfig in both "
                   "modes; full, minimal, attention, offload: that policy of "
                   "patches.apply(remat=...) for the patched step and "
                   "Tunix's decoder remat for the stock one (default none)")
  fit.add_argument("--mode", choices=["stock", "patched", "both"],
                   default="both", help="what to compile (default both)")
  fit.add_argument("--implementation",
                   choices=["pallas_tpu", "xla", "reference"],
                   help="passed to patches.apply (default: Pallas on TPU)")
  fit.add_argument("--buffers", type=int, default=0, metavar="N",
                   help="also print the N largest buffers live at the peak "
                   "of each step's temporaries (estimated from the compiled "
                   "schedule; up to 20)")
  fit.add_argument("--search", action="store_true",
                   help="find the longest sequence that fits at --batch "
                   "(doubling from --seq-len, then bisecting to a multiple "
                   "of 1024)")
  fit.add_argument("--json", action="store_true",
                   help="print one JSON object {stock: ..., patched: ...}")
  fit.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the result cache "
                   "($GEMMA4_JAX_CACHE or ~/.cache/gemma4-jax)")
  fit.set_defaults(func=_run_fit)


def _add_doctor(commands) -> None:
  doctor = commands.add_parser(
      "doctor", help="what runs here: devices, versions, patches, kernels")
  doctor.set_defaults(func=_run_doctor)


def _run_demo(args) -> int:
  from gemma4_jax import demo  # pylint: disable=g-import-not-at-top
  return demo.main(steps=args.steps, seq_len=args.seq_len,
                   batch_size=args.batch_size)


def _run_perplexity(args) -> int:
  from gemma4_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from gemma4_jax import perplexity  # pylint: disable=g-import-not-at-top
  try:
    perplexity.run(args.checkpoint, args.data, adapter=args.adapter,
                   alpha=args.alpha, top_k_count=args.top_k,
                   inspect=args.inspect, dtype=args.dtype,
                   progress=False if args.no_progress else None,
                   chat=args.chat, batch_size=args.batch_size,
                   mesh=mesh_lib.default_mesh())
  except (ValueError, FileNotFoundError) as e:
    print(f"gemma4-jax perplexity: error: {e}", file=sys.stderr)
    return 2
  return 0


def _run_fit(args) -> int:
  from gemma4_jax import fit  # pylint: disable=g-import-not-at-top
  return fit.main(args)


def _run_doctor(args) -> int:
  del args
  from gemma4_jax import doctor  # pylint: disable=g-import-not-at-top
  return doctor.main()


# Exceptions that mean "the input is wrong" (or the machine is: a missing
# file, a full disk, a missing libtpu): one line, no traceback. Every other
# exception is a bug in gemma4-jax (AttributeError, KeyError, IndexError,
# TypeError, ...) and keeps its traceback.
INPUT_ERRORS = (ValueError, OSError, RuntimeError)
EXIT_INPUT_ERROR = 2
EXIT_BUG = 70  # EX_SOFTWARE
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
  """Runs one command; returns its exit code.

  Bad input ends in one line on stderr, `gemma4-jax COMMAND: error: ...`,
  and exit status 2 (argparse's own errors exit 2 too); an internal error
  prints its traceback and a line saying it is a bug (status 70).
  """
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except KeyboardInterrupt:
    print(f"gemma4-jax {args.command}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  except INPUT_ERRORS as e:
    print(f"gemma4-jax {args.command}: error: {_one_line(e)}",
          file=sys.stderr)
    return EXIT_INPUT_ERROR
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    print(f"gemma4-jax {args.command}: internal error: this is a bug in "
          "gemma4-jax, not in your input; please report it with the "
          "traceback above", file=sys.stderr)
    return EXIT_BUG


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return text or type(error).__name__


if __name__ == "__main__":
  sys.exit(main())
