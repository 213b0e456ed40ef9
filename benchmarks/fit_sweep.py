"""Per-chip HBM of the E2B LoRA step against sequence length, per mode.

Runs `gemma4_jax.fit` (the whole 35-layer step compiled for abstract TPU
chips by XLA:TPU on this machine; no TPU needed, libtpu is) for each remat
setting and sequence length asked, stock and patched, and writes one JSON
file with every result and, with `--plot`, a PNG of per-chip HBM against
sequence length with one line per mode (matplotlib, the `plot` extra).

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
import pathlib
import sys

from gemma4_jax import fit

GIB = 2**30


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
      report = fit.fit(config, modes=modes)
      for mode, result in report.to_json().items():
        rows.append({**result, "line": _line(mode, remat)})
        print(f"{_line(mode, remat):28} {args.batch} x {seq_len:6}: "
              f"{_cell(result)}", file=sys.stderr)
  return rows


def _line(mode: str, remat: str) -> str:
  who = "stock Tunix" if mode == "stock" else "patched"
  return f"{who}, remat {fit.mode_remat(mode, remat)}"


def _cell(result: dict) -> str:
  if result["fits"] is None:
    return "error"
  gib = result["total_bytes"] / GIB
  if result["fits"]:
    return f"{gib:.2f}"
  compiled = result["pallas_kernels"] is not None
  return f"{'' if compiled else '≥ '}{gib:.2f} (does not fit)"


def table(rows: list[dict]) -> str:
  """A markdown table: one row per batch x tokens, one column per line;
  cells are per-chip GiB, "(does not fit)" past the usable HBM."""
  lines = list(dict.fromkeys(r["line"] for r in rows))
  points = sorted({(r["batch"], r["seq_len"]) for r in rows})
  cells = {(r["line"], r["batch"], r["seq_len"]): r for r in rows}
  out = ["| batch x tokens | " + " | ".join(lines) + " |",
         "|---" * (len(lines) + 1) + "|"]
  for batch, seq_len in points:
    row = [f"{batch} x {seq_len}"]
    for line in lines:
      result = cells.get((line, batch, seq_len))
      row.append("—" if result is None else _cell(result))
    out.append("| " + " | ".join(row) + " |")
  return "\n".join(out)


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  figure, axes = pyplot.subplots(figsize=(8, 5))
  for line in dict.fromkeys(r["line"] for r in rows):
    points = sorted((r["seq_len"], r["total_bytes"] / GIB, r["fits"])
                    for r in rows if r["line"] == line and r["total_bytes"])
    drawn = axes.plot([p[0] for p in points], [p[1] for p in points],
                      marker="o", label=line)[0]
    for seq_len, gib, fits in points:
      if not fits:
        axes.plot([seq_len], [gib], marker="o", markerfacecolor="white",
                  color=drawn.get_color())
  hbm = max((r["hbm_bytes"] for r in rows), default=16 * GIB) / GIB
  axes.axhline(hbm, color="black", linestyle="--", linewidth=1,
               label=f"HBM per chip ({hbm:.0f} GiB)")
  axes.set_xscale("log", base=2)
  axes.set_yscale("log", base=2)
  axes.xaxis.set_major_formatter(
      matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1024:g}k"))
  axes.yaxis.set_major_formatter(
      matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
  axes.set_xlabel("tokens per sequence")
  axes.set_ylabel("per-chip HBM needed, GiB (XLA:TPU)")
  axes.set_title(title)
  axes.legend(fontsize=8)
  axes.grid(True, which="both", alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=120)


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
    print(table(rows))
    if args.plot:
      batches = sorted({r["batch"] for r in rows})
      plot(rows, args.plot, f"Gemma 4 {args.model.upper()} LoRA step on "
           f"{args.topology}, batch {', '.join(map(str, batches))}")
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
    plot(rows, args.plot, f"Gemma 4 {args.model.upper()} LoRA step on "
         f"{args.topology}, batch {args.batch}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
