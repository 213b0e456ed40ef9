"""Per-chip HBM of the E2B LoRA step against sequence length, per mode.

Runs `gemma4_jax.fit` (the whole 35-layer step compiled for abstract TPU
chips by XLA:TPU on this machine; no TPU needed, libtpu is) for each remat
setting and sequence length asked, stock and patched, and writes one JSON
file with every result and, with `--plot`, a PNG of per-chip HBM against
sequence length with one line per mode (`report.plot_fit`; matplotlib, the
`plot` extra). `benchmarks/report.py` turns these files into RESULTS.md's
tables and the README's.

A mode's line ends where its step stops fitting: XLA:TPU refuses to compile
a program over the chip's HBM and names what it would need, which is
plotted as a hollow marker. Results are cached by `fit` (keyed by the lowered
program), so a rerun only compiles what is new. Each 35-layer compile takes
3-10 minutes on 2 CPU cores.

  python benchmarks/fit_sweep.py --batch 1 --seq-lens 8192 16384 32768 \\
      --remat full offload --out benchmarks/results/fit_e2b_v5e_b1.json
  python benchmarks/fit_sweep.py --table-only \\
      --out benchmarks/results/fit_e2b_v5e_b1.json \\
      --plot benchmarks/results/fit_e2b_v5e_b1.png
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # pylint: disable=g-import-not-at-top,wrong-import-position

from gemma4_jax import fit  # pylint: disable=g-import-not-at-top,wrong-import-position


def sweep(args) -> list[dict]:
  rows = []
  for remat in args.remat:
    for seq_len in args.seq_lens:
      config = fit.FitConfig(model=args.model, topology=args.topology,
                             batch=args.batch, seq_len=seq_len,
                             num_layers=args.num_layers, remat=remat)
      # Stock's remat is Tunix's own: "full"/"minimal"/"attention"/"offload"
      # compile the same stock step as "decoder", so it runs once.
      modes = ("patched",) if (remat in fit.POLICY_REMAT and
                               "decoder" in args.remat) else fit.MODES
      found = fit.fit(config, modes=modes)
      for mode, result in found.to_json().items():
        rows.append({**result, "line": _line(mode, remat)})
        print(f"{_line(mode, remat):28} {args.batch} x {seq_len:6}: "
              f"{report.fit_cell(result)}", file=sys.stderr)
  return rows


def _line(mode: str, remat: str) -> str:
  who = "stock Tunix" if mode == "stock" else "patched"
  return f"{who}, remat {fit.mode_remat(mode, remat)}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="e2b")
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--num-layers", type=int)
  parser.add_argument("--seq-lens", type=int, nargs="+",
                      default=[4096, 8192, 16384, 32768])
  parser.add_argument("--remat", nargs="+", default=["decoder", "full"],
                      choices=fit.REMAT)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--plot", type=pathlib.Path)
  parser.add_argument("--table-only", action="store_true",
                      help="compile nothing: print --out's results as a "
                      "markdown table (and --plot them)")
  args = parser.parse_args(argv)
  if args.table_only:
    rows = json.loads(args.out.read_text())
    print(report.fit_table(rows))
    if args.plot:
      report.plot_fit(rows, args.plot, f"Gemma 4 {args.model.upper()} LoRA step on "
           f"{args.topology}")
    return 0
  rows = sweep(args)
  if args.out.exists():   # keep the points of earlier sweeps
    old = json.loads(args.out.read_text())
    seen = {(r["line"], r["batch"], r["seq_len"]) for r in rows}
    rows = [r for r in old if (r["line"], r["batch"], r["seq_len"])
            not in seen] + rows
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(rows, indent=1))
  if args.plot:
    report.plot_fit(rows, args.plot, f"Gemma 4 {args.model.upper()} LoRA step on "
         f"{args.topology}, batch {args.batch}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
