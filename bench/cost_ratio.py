"""Cost ratios against a baseline, measured in blocks so that their spread shows: each model's in-process seconds
per output MP on a photo crop (as `quality_cost_bench.py` times them: as served, the models taking turns), the
median of `--repeats` runs per block, and each model's ratio to the first in every block.

    python bench/cost_ratio.py rfdn=runs/pre2/rfdn default=checkpoints/default --blocks 4 --repeats 7

To imitate a CPU without AVX-512 on one that has it, hold torch's kernels and oneDNN to AVX2:
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/cost_ratio.py ...` (the first line printed names the
kernels torch ran). Only timings: the quality is `quality_cost_bench.py`'s.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from hardware import cpu_summary  # bench/hardware.py, beside this script
from quality_cost_bench import TIMED, median_s_per_mp, parse_spec, prepare, timing_photo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="LABEL=PATH[:STEPS[:ENSEMBLE]]; the first is the baseline")
    p.add_argument("--blocks", type=int, default=4, help="blocks of timed runs (default 4)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per model in each block (default 7)")
    p.add_argument("--size", type=int, default=384, help="side of the LR photo crop timed (default 384)")
    p.add_argument("--precision", default="auto", help="fp32, bf16 or auto (default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_spec(s) for s in args.models]
    photo = timing_photo(args.size)
    print(f"{cpu_summary()}; {torch.get_num_threads()} threads; precision {args.precision}; "
          f"timed on a {photo.shape[1]}x{photo.shape[0]} crop of {TIMED}\n")

    models = prepare(specs, photo, args.precision)
    blocks = [median_s_per_mp(models, photo, args.repeats) for _ in range(args.blocks)]
    base = specs[0].label
    print("| block | " + " | ".join(f"{s.label} s/MP" for s in specs) + " | "
          + " | ".join(f"{s.label} / {base}" for s in specs[1:]) + " |")
    print("| ---: |" + " ---: |" * (2 * len(specs) - 1))
    for i, secs in enumerate(blocks, 1):
        print(f"| {i} | " + " | ".join(f"{s:.3f}" for s in secs) + " | "
              + " | ".join(f"{s / secs[0]:.3f}x" for s in secs[1:]) + " |")
    for j, spec in enumerate(specs[1:], 1):
        ratios = [secs[j] / secs[0] for secs in blocks]
        print(f"\n{spec.label} / {base}: median {statistics.median(ratios):.3f}x, "
              f"range {min(ratios):.3f}-{max(ratios):.3f}x over {len(blocks)} blocks of {args.repeats} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
