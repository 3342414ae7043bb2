"""PSNR-Y against denoiser steps, one line per degradation, from `samdiffsr eval --degradation all`'s CSV; the
bicubic baseline of each degradation as a dashed line of its colour.

    python -m training.evalplot runs/eval/real/degradations.csv --title real --out docs/model-card/real-steps.png
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def plot(csv_path: Path, out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    baseline: dict[str, float] = {}
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            if row["steps"] == "":
                baseline[row["degradation"]] = float(row["psnr_y"])
            else:
                curves[row["degradation"]].append((int(row["steps"]), float(row["psnr_y"])))
    if not curves:
        raise ValueError(f"{csv_path} has no step columns")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (name, points) in enumerate(curves.items()):
        points.sort()
        color = f"C{i}"
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=name)
        if name in baseline:
            ax.axhline(baseline[name], color=color, linestyle="--", linewidth=0.8)
    steps = sorted({p[0] for pts in curves.values() for p in pts})
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("denoiser steps (0: the encoder's output)")
    ax.set_ylabel("PSNR-Y (dB), whole validation photos")
    ax.set_title(f"{title}: PSNR-Y against steps (dashed: bicubic of the same input)" if title else
                 "PSNR-Y against steps (dashed: bicubic of the same input)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, help="degradations.csv of `samdiffsr eval --degradation all --out DIR`")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    print(f"wrote {plot(args.csv, args.out, args.title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
