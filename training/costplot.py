"""Quality against cost: PSNR-Y gain over bicubic (from `samdiffsr eval`) against network GFLOP per output MP and
whole-process seconds per output MP (from `bench/efficiency_bench.py --csv`), one point per model and step count.

    python -m training.costplot runs/efficiency.csv hr-rrdb=runs/ablation/hr-rrdb/eval ... \\
        --reference "efficient SR (issue 24)=1.8:3.7:2.25:2.35" --out docs/model-card/quality-cost.png

A `--reference NAME=S_LO:S_HI:GAIN_LO:GAIN_HI` is drawn as a box on the seconds panel: figures measured elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def read_gains(eval_dir: Path) -> dict[int, float]:
    """Mean PSNR-Y gain over bicubic by step count, from an eval's `eval.json`."""
    mean = json.loads((eval_dir / "eval.json").read_text())["mean"]
    bicubic = mean["bicubic"]["psnr_y"]
    return {int(k.split("=")[1]): v["psnr_y"] - bicubic for k, v in mean.items() if k.startswith("steps=")}


def plot(bench_csv: Path, evals: dict[str, Path], out: Path, references: dict[str, tuple[float, ...]],
         title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with bench_csv.open() as f:
        cost = {r["label"]: r for r in csv.DictReader(f)}
    missing = set(evals) - set(cost)
    if missing:
        raise ValueError(f"{bench_csv} has no row for {', '.join(sorted(missing))}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    for (name, s_lo, s_hi, g_lo, g_hi) in ((n, *r) for n, r in references.items()):
        axes[1].add_patch(plt.Rectangle((s_lo, g_lo), s_hi - s_lo, g_hi - g_lo, alpha=0.25, color="grey"))
        axes[1].annotate(name, (s_lo, g_hi), textcoords="offset points", xytext=(0, 4), fontsize=8)
    for i, (label, eval_dir) in enumerate(evals.items()):
        gains, row = read_gains(eval_dir), cost[label]
        steps = int(row["steps"])
        if steps not in gains:
            raise ValueError(f"{eval_dir}: no steps={steps} column (the steps {label} was timed at)")
        for ax, key in zip(axes, ("gflop_per_mp", "whole_s_per_mp"), strict=True):
            x = float(row[key])
            ax.plot([x], [gains[steps]], "o", color=f"C{i}", label=f"{label} ({steps} step)" if ax is axes[0] else None)
            if 0 in gains and steps != 0:
                ax.plot([x], [gains[0]], "o", mfc="none", color=f"C{i}")
                ax.plot([x, x], [gains[0], gains[steps]], ":", color=f"C{i}", linewidth=0.8)
    axes[0].set_xlabel("network GFLOP per output MP, as served (tiles and overlap included)")
    axes[1].set_xlabel("whole-process `samdiffsr upscale` s per output MP")
    axes[0].set_ylabel("PSNR-Y gain over bicubic (dB)")
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="filled: default steps; hollow: steps=0", title_fontsize=8)
    fig.suptitle(title or "quality against cost")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def parse_reference(text: str) -> tuple[str, tuple[float, ...]]:
    name, sep, numbers = text.rpartition("=")
    values = tuple(float(v) for v in numbers.split(":"))
    if not sep or len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected NAME=S_LO:S_HI:GAIN_LO:GAIN_HI, got {text!r}")
    return name, values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_csv", type=Path, help="bench/efficiency_bench.py --csv output")
    p.add_argument("evals", nargs="+", metavar="LABEL=EVAL_DIR", help="an eval output folder per bench label")
    p.add_argument("--reference", action="append", type=parse_reference, default=[],
                   help="NAME=S_LO:S_HI:GAIN_LO:GAIN_HI, a box of figures measured elsewhere (repeatable)")
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    evals = dict((label, Path(d)) for label, _, d in (e.partition("=") for e in args.evals))
    print(plot(args.bench_csv, evals, args.out, dict(args.reference), args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
