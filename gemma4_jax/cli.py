"""The `gemma4-jax` console script."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="gemma4-jax",
      description="Kernels, Tunix patches and LoRA export for Gemma 4 in JAX.")
  commands = parser.add_subparsers(dest="command", required=True,
                                   metavar="COMMAND")

  demo = commands.add_parser(
      "demo", help="train a small Gemma 4 with LoRA, stock vs patched",
      description="Builds a small Gemma 4 (real 262144-token vocab, random "
      "weights), puts qwix LoRA on it, trains a few Tunix PeftTrainer steps "
      "stock and patched, and prints losses, step times and compiled memory.")
  demo.add_argument("--steps", type=int, default=8,
                    help="training steps per run (default 8)")
  demo.add_argument("--seq-len", type=int, default=64,
                    help="tokens per row (default 64)")
  demo.add_argument("--batch-size", type=int, default=4,
                    help="rows per batch (default 4)")
  demo.set_defaults(func=_run_demo)

  from gemma4_jax.export import commands as export_commands  # pylint: disable=g-import-not-at-top
  export_commands.register(commands)

  doctor = commands.add_parser(
      "doctor", help="what runs here: devices, versions, patches, kernels")
  doctor.set_defaults(func=_run_doctor)
  return parser


def _run_demo(args) -> int:
  from gemma4_jax import demo  # pylint: disable=g-import-not-at-top
  return demo.main(steps=args.steps, seq_len=args.seq_len,
                   batch_size=args.batch_size)


def _run_doctor(args) -> int:
  del args
  from gemma4_jax import doctor  # pylint: disable=g-import-not-at-top
  return doctor.main()


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
