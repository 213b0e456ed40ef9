"""Benchmark JSON -> the generated tables of RESULTS.md / README and PNG plots.

Reads what the benchmarks wrote under `benchmarks/results/`:

- `fit_e2b_v5e_b*.json` (`benchmarks/fit_sweep.py`): the whole E2B LoRA
  step compiled for v5e:2x2, per mode and sequence length;
- `tpu_v5e.json` if present, else `tpu_dry_run.json`
  (`benchmarks/run_tpu.py`): each op's HBM temporaries compiled for one v5e
  chip, stock / our XLA version / the TPU default, per sequence length (and,
  from a TPU run, times against the v5e roofline and the step);

and rewrites only the blocks between `<!-- BEGIN GENERATED: name -->` and
`<!-- END GENERATED: name -->` in `benchmarks/RESULTS.md` and `README.md`
(hand-written prose around them is left alone), and writes the plots:

  results/fit_e2b_v5e.png        per-chip HBM of the E2B step vs tokens
  results/op_memory_v5e.png      attention and loss HBM vs tokens

  python benchmarks/report.py            # tables and plots
  python benchmarks/report.py --check    # exit 1 if a block is stale

Plotting needs matplotlib (`pip install 'gemma4-jax[plot]'`); `--no-plots`
regenerates the tables without it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
README = HERE.parent / "README.md"
GIB, MIB = 2**30, 2**20
FIT_PLOT = "fit_e2b_v5e.png"
OP_PLOT = "op_memory_v5e.png"


def _pyplot():
  """matplotlib's pyplot, headless; a clear error without the extra."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("plotting needs matplotlib: pip install "
                     "'gemma4-jax[plot]' (or pass --no-plots)") from None
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  return pyplot, ticker


# The whole E2B step (fit_sweep.py's rows).
def fit_cell(result: dict) -> str:
  if result["fits"] is None:
    return "error"
  gib = result["total_bytes"] / GIB
  if result["fits"]:
    return f"{gib:.2f}"
  # XLA named its temporaries only ("HLO temporaries (x) exceeds"): fit
  # added the arguments, and the code is unknown, so it is a lower bound.
  lower_bound = (result["pallas_kernels"] is None
                 and result["temp_bytes"] is not None)
  return f"{'≥ ' if lower_bound else ''}{gib:.2f} (does not fit)"


def _latest(rows: list[dict]) -> list[dict]:
  """One row per (line, batch, seq_len): the last one written."""
  return list({(r["line"], r["batch"], r["seq_len"]): r for r in rows}
              .values())


def fit_table(rows: list[dict]) -> str:
  """Markdown: one row per batch x tokens, one column per line; cells are
  per-chip GiB, "(does not fit)" past the usable HBM."""
  rows = _latest(rows)
  lines = list(dict.fromkeys(r["line"] for r in rows))
  points = sorted({(r["batch"], r["seq_len"]) for r in rows})
  cells = {(r["line"], r["batch"], r["seq_len"]): r for r in rows}
  out = ["| batch x tokens | " + " | ".join(lines) + " |",
         "|---" * (len(lines) + 1) + "|"]
  for batch, seq_len in points:
    row = [f"{batch} x {seq_len}"]
    for line in lines:
      result = cells.get((line, batch, seq_len))
      row.append("—" if result is None else fit_cell(result))
    out.append("| " + " | ".join(row) + " |")
  return "\n".join(out)


def longest_fitting(rows: list[dict]) -> dict:
  """(line, batch) -> (longest sequence that fits, shortest that does not
  among those compiled)."""
  best = {}
  for r in _latest(rows):
    key = (r["line"], r["batch"])
    fits, fails = best.get(key, (None, None))
    if r["fits"]:
      fits = max(fits or 0, r["seq_len"])
    elif r["fits"] is False:
      fails = min(fails or r["seq_len"], r["seq_len"])
    best[key] = (fits, fails)
  return best


def longest_table(rows: list[dict]) -> str:
  out = ["| mode | batch | longest that fits | shortest compiled that does "
         "not |", "|---|---|---|---|"]
  for (line, batch), (fits, fails) in sorted(longest_fitting(rows).items(),
                                             key=lambda kv: (kv[0][1],
                                                             kv[0][0])):
    out.append(f"| {line} | {batch} | {fits or 'none of those compiled'} | "
               f"{fails or '—'} |")
  return "\n".join(out)


def plot_fit(rows: list[dict], path: pathlib.Path, title: str) -> None:
  """Per-chip HBM against tokens per sequence, one line per mode and batch;
  a hollow marker where the step does not fit."""
  pyplot, ticker = _pyplot()
  rows = _latest(rows)
  figure, axes = pyplot.subplots(figsize=(8, 5))
  batches = sorted({r["batch"] for r in rows})
  for line in dict.fromkeys(r["line"] for r in rows):
    for batch in batches:
      points = sorted((r["seq_len"], r["total_bytes"] / GIB, r["fits"])
                      for r in rows if r["line"] == line and
                      r["batch"] == batch and r["total_bytes"])
      if not points:
        continue
      label = line if len(batches) == 1 else f"{line}, batch {batch}"
      drawn = axes.plot([p[0] for p in points], [p[1] for p in points],
                        marker="o", label=label,
                        linestyle="-" if batch == batches[0] else "--")[0]
      for seq_len, gib, fits in points:
        if not fits:
          axes.plot([seq_len], [gib], marker="o", markerfacecolor="white",
                    color=drawn.get_color())
  hbm = max((r["hbm_bytes"] for r in rows), default=16 * GIB) / GIB
  axes.axhline(hbm, color="black", linestyle=":", linewidth=1,
               label=f"HBM per chip ({hbm:.0f} GiB)")
  axes.set_xscale("log", base=2)
  axes.set_yscale("log", base=2)
  axes.xaxis.set_major_formatter(
      ticker.FuncFormatter(lambda x, _: f"{x / 1024:g}k"))
  axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
  axes.set_xlabel("tokens per sequence")
  axes.set_ylabel("per-chip HBM needed, GiB (XLA:TPU)")
  axes.set_title(title)
  axes.legend(fontsize=8)
  axes.grid(True, which="both", alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)


# Single ops (run_tpu.py's memory rows).
IMPLEMENTATION_LABEL = {"stock": "stock", "xla": "our XLA version",
                        "default": "TPU default"}


def op_table(memory: list[dict]) -> str:
  """MiB of HBM temporaries per op case and sequence length."""
  seq_lens = sorted({m["seq_len"] for m in memory})
  out = ["| op | case | implementation | " + " | ".join(
      f"T={t}" for t in seq_lens) + " |", "|---" * (3 + len(seq_lens)) + "|"]
  cells = {(m["op"], m["case"], m["implementation"], m["seq_len"]): m
           for m in memory}
  for op, case, impl in dict.fromkeys((m["op"], m["case"],
                                       m["implementation"]) for m in memory):
    runs = next(m["runs"] for m in memory if (m["op"], m["case"],
                                              m["implementation"]) ==
                (op, case, impl))
    label = IMPLEMENTATION_LABEL[impl] + (f" ({runs})" if impl == "default"
                                          else "")
    row = [f"`{op}`", case, label]
    for t in seq_lens:
      m = cells.get((op, case, impl, t))
      row.append("—" if m is None else f"{m['temp_bytes'] / MIB:.1f}"
                 if m.get("fits", True) else
                 f"≥ {m['temp_bytes'] / MIB:.0f} (out of HBM)")
    out.append("| " + " | ".join(row) + " |")
  return "\n".join(out)


def plot_ops(memory: list[dict], path: pathlib.Path) -> None:
  """HBM temporaries against sequence length, stock vs patched, one panel
  per attention layer kind and one for the loss."""
  pyplot, ticker = _pyplot()
  panels = list(dict.fromkeys((m["op"], m["case"]) for m in memory
                              if m["op"] != "lora_matmul"))
  figure, axes = pyplot.subplots(1, len(panels),
                                 figsize=(4.2 * len(panels), 4.2))
  for ax, (op, case) in zip(getattr(axes, "flat", [axes]), panels):
    for impl, style in (("stock", "o-"), ("xla", "s--"), ("default", "^-")):
      # 0 MiB (everything in VMEM) is drawn at the 0.1 MiB floor.
      points = sorted((m["tokens"], max(m["temp_bytes"] / MIB, 0.1))
                      for m in memory if (m["op"], m["case"],
                                          m["implementation"]) ==
                      (op, case, impl))
      ax.plot([p[0] for p in points], [p[1] for p in points], style,
              label=IMPLEMENTATION_LABEL[impl])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_formatter(
        ticker.FuncFormatter(lambda x, _: f"{x / 1024:g}k"))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_ylim(bottom=0.08)
    ax.set_title(f"{op}\n{case}", fontsize=9)
    ax.set_xlabel("tokens (batch x sequence)")
    ax.grid(True, which="both", alpha=0.3)
  first = axes.flat[0] if hasattr(axes, "flat") else axes
  first.set_ylabel("HBM temporaries, MiB (one v5e chip, fwd+bwd; "
                   "0 at 0.1)")
  first.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)


def timing_table(timing: list[dict]) -> str:
  out = ["| op | case | T | implementation | ms | TFLOP/s | of 197 TFLOP/s "
         "| of roofline |", "|---" * 8 + "|"]
  for t in timing:
    if "error" in t:
      out.append(f"| `{t['op']}` | {t['case']} | {t['seq_len']} | "
                 f"{t['implementation']} | did not run: {t['error']} | | | |")
      continue
    out.append(f"| `{t['op']}` | {t['case']} | {t['seq_len']} | "
               f"{t['implementation']} | {t['seconds'] * 1e3:.3f} | "
               f"{t['tflops']:.1f} | {t['peak_fraction']:.1%} | "
               f"{t['roofline_fraction']:.1%} |")
  return "\n".join(out)


def headline(fit_rows: list[dict], memory: list[dict]) -> str:
  """README's compiled-for-TPU headline rows."""
  out = ["| what (compiled by XLA:TPU for v5e, per chip) | patched | stock "
         "Tunix |", "|---|---|---|"]
  best = longest_fitting(fit_rows)
  for batch in sorted({b for _, b in best}):
    stock = [v[0] for (line, b), v in best.items()
             if b == batch and line.startswith("stock")]
    patched = {line: v[0] for (line, b), v in best.items()
               if b == batch and line.startswith("patched")}
    if not stock or not any(patched.values()):
      continue
    line, fits = max(patched.items(), key=lambda kv: kv[1] or 0)
    out.append(f"| E2B LoRA step on v5e:2x2, longest sequence that fits at "
               f"batch {batch} | {fits} tokens ({line}) | "
               f"{stock[0] or 'none of those compiled'} tokens |")
  largest = max((m["seq_len"] for m in memory), default=None)
  for op, case in dict.fromkeys((m["op"], m["case"]) for m in memory):
    cells = {m["implementation"]: m for m in memory
             if (m["op"], m["case"], m["seq_len"]) == (op, case, largest)}
    if {"stock", "default"} <= set(cells):
      m = cells["default"]
      out.append(
          f"| `{op}` {case}, fwd+bwd HBM temporaries at {m['tokens']} "
          f"tokens | {m['temp_bytes'] / MIB:.1f} MiB ({m['runs']}) | "
          + (f"{cells['stock']['temp_bytes'] / MIB:.1f} MiB |"
             if cells["stock"].get("fits", True) else
             f"≥ {cells['stock']['temp_bytes'] / MIB:.0f} MiB (over one "
             "chip's HBM) |"))
  return "\n".join(out)


def replace_block(text: str, name: str, body: str, *, where: str) -> str:
  """`text` with the generated block `name` holding `body`."""
  pattern = re.compile(rf"(<!-- BEGIN GENERATED: {re.escape(name)} [^>]*-->"
                       rf"\n).*?(\n<!-- END GENERATED: {re.escape(name)} -->)",
                       re.S)
  if not pattern.search(text):
    raise SystemExit(f"{where}: no generated block {name!r} (mark it with "
                     f"<!-- BEGIN GENERATED: {name} (benchmarks/report.py) "
                     f"--> ... <!-- END GENERATED: {name} -->)")
  return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def _load(path: pathlib.Path):
  return json.loads(path.read_text()) if path.exists() else None


def generate(results_dir: pathlib.Path = RESULTS_DIR) -> dict[str, str]:
  """Block name -> markdown, from the JSON files in `results_dir`."""
  b1 = _load(results_dir / "fit_e2b_v5e_b1.json") or []
  b4 = _load(results_dir / "fit_e2b_v5e_b4.json") or []
  tpu = (_load(results_dir / "tpu_v5e.json") or
         _load(results_dir / "tpu_dry_run.json") or {})
  memory = tpu.get("memory", [])
  blocks = {"fit-b1": fit_table(b1), "fit-b4": fit_table(b4),
            "fit-longest": longest_table(b1 + b4),
            "op-memory": op_table(memory),
            "headline": headline(b1 + b4, memory),
            "long-context": fit_table(b1 + b4)}
  if tpu.get("timing"):
    blocks["op-timing"] = timing_table(tpu["timing"])
  return blocks


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", type=pathlib.Path, default=RESULTS_DIR)
  parser.add_argument("--no-plots", action="store_true")
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if a block is stale")
  args = parser.parse_args(argv)
  blocks = generate(args.results)
  stale = []
  for path in (RESULTS_MD, README):
    text = path.read_text()
    new = text
    for name, body in blocks.items():
      if f"BEGIN GENERATED: {name} " in text:
        new = replace_block(new, name, body, where=str(path))
    if new != text:
      stale.append(path.name)
      if not args.check:
        path.write_text(new)
  if args.check:
    print("stale: " + ", ".join(stale) if stale else "up to date")
    return 1 if stale else 0
  if not args.no_plots:
    fit_rows = [r for name in ("fit_e2b_v5e_b1.json", "fit_e2b_v5e_b4.json")
                for r in (_load(args.results / name) or [])]
    if fit_rows:
      plot_fit(fit_rows, args.results / FIT_PLOT,
               "Gemma 4 E2B LoRA step on v5e:2x2 (v5litepod-4)")
    tpu = (_load(args.results / "tpu_v5e.json") or
           _load(args.results / "tpu_dry_run.json") or {})
    if tpu.get("memory"):
      plot_ops(tpu["memory"], args.results / OP_PLOT)
  print(f"regenerated {', '.join(stale) or 'nothing (up to date)'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
