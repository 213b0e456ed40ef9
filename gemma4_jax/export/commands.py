"""`gemma4-jax merge` and `gemma4-jax export-adapter`.

`gemma4_jax.cli.main` (the console script) calls `register(subparsers)`;
each command's `func` takes the parsed arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def register(subparsers) -> None:
  """Adds the `merge` and `export-adapter` subcommands."""
  merge = subparsers.add_parser(
      "merge", help="merge a LoRA adapter into a Hugging Face checkpoint",
      description=(
          "Streams a Hugging Face Gemma 4 safetensors checkpoint to a new "
          "directory with a LoRA adapter (Tunix checkpoint or PEFT dir) "
          "merged in; only the changed weights pass through memory."))
  merge.add_argument("--base", required=True,
                     help="Hugging Face safetensors directory")
  merge.add_argument("--adapter", required=True,
                     help="Tunix checkpoint (root or step dir) or PEFT dir")
  merge.add_argument("--out", required=True, help="output directory")
  merge.add_argument("--force", action="store_true",
                     help="replace an existing output directory")
  merge.add_argument("--shard-size", default="5GB",
                     help="maximum size of one output file (default 5GB)")
  merge.add_argument("--untie", action="store_true",
                     help="write an adapter on the tied embedding to a new "
                     "lm_head.weight and set tie_word_embeddings false")
  _add_rank_alpha(merge)
  merge.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip re-reading the output and the numeric probe")
  merge.add_argument("--quiet", action="store_true",
                     help="no progress bar")
  merge.set_defaults(func=run_merge)

  export = subparsers.add_parser(
      "export-adapter", help="write a LoRA adapter in PEFT format",
      description=(
          "Converts a Tunix LoRA checkpoint into a PEFT adapter "
          "(adapter_model.safetensors + adapter_config.json)."))
  export.add_argument("--adapter", required=True,
                      help="Tunix checkpoint (root or step dir) or PEFT dir")
  export.add_argument("--out", required=True, help="output directory")
  export.add_argument("--base", default=None,
                      help="base checkpoint to take module names from and "
                      "check shapes against")
  export.add_argument("--force", action="store_true",
                      help="replace an existing output directory")
  _add_rank_alpha(export)
  export.set_defaults(func=run_export_adapter)


def _add_rank_alpha(parser) -> None:
  parser.add_argument("--rank", type=int, default=None,
                      help="LoRA rank (checked against the adapter)")
  parser.add_argument("--alpha", type=float, default=None,
                      help="LoRA alpha; required when the adapter does not "
                      "record it (Tunix checkpoints)")


@contextlib.contextmanager
def _sigterm_as_interrupt():
  """SIGTERM unwinds like Ctrl-C, so partial output is removed."""
  def handler(signum, frame):
    del signum, frame
    raise KeyboardInterrupt
  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _run(name: str, body) -> int:
  try:
    with _sigterm_as_interrupt():
      body()
  except KeyboardInterrupt:
    print(f"gemma4-jax {name}: interrupted; partial output removed",
          file=sys.stderr)
    return EXIT_INTERRUPTED
  except (ValueError, OSError, RuntimeError) as e:
    message = " ".join(str(e).split())  # one line, whatever the cause
    print(f"gemma4-jax {name}: error: {message}", file=sys.stderr)
    return EXIT_ERROR
  return EXIT_OK


def run_merge(args: argparse.Namespace) -> int:
  from gemma4_jax.export import merging  # pylint: disable=g-import-not-at-top

  def body():
    summary = merging.merge(
        args.base, args.adapter, args.out, force=args.force,
        shard_size=args.shard_size, untie=args.untie, rank=args.rank,
        alpha=args.alpha, verify_output=args.verify,
        progress=not args.quiet)
    print(f"merged: {summary}")
  return _run("merge", body)


def run_export_adapter(args: argparse.Namespace) -> int:
  from gemma4_jax.export import peft_export  # pylint: disable=g-import-not-at-top

  def body():
    out = peft_export.export_adapter(
        args.adapter, args.out, base_dir=args.base, rank=args.rank,
        alpha=args.alpha, force=args.force)
    print(f"exported PEFT adapter -> {out}")
  return _run("export-adapter", body)
