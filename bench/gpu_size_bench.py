"""How large can the GPU model be? Candidate SRDiff-shaped configurations (RRDB encoder + U-Net, `prediction:
sample`, `residual_base: rrdb`, one DDIM step), each timed as served with random weights (time does not depend on
them): whole-process `samdiffsr upscale` of a 512-px photo on `--device`, through `bench/efficiency_bench.py`,
against today's small model (the first row). Prints the table, each candidate's parameters and the size of its
weights in fp16 and of its exact training state, and the largest candidate within `--budget` seconds per output MP.

    python bench/gpu_size_bench.py --device cuda                  # on the GPU host (about 3 minutes on an H200)
    python bench/gpu_size_bench.py --device cpu --size 64 --candidates tiny=2:8:4:8   # a smoke run

A candidate is `NAME=BLOCKS:FEAT:GROWTH:HIDDEN` (RRDB blocks, RRDB width, RRDB growth, U-Net width; the U-Net's
multipliers are 1-2-4). The winner goes into `configs/large.yaml`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import tempfile
from pathlib import Path

import efficiency_bench  # bench/efficiency_bench.py, beside this script

from model.checkpoint import CheckpointInfo, save_checkpoint
from model.config import PRESETS, ModelConfig
from model.network import SRDiffNet

# Named by their millions of parameters; m8 is configs/large.yaml's provisional size.
CANDIDATES = "m5=8:48:24:32,m8=8:64:32:32,m11=8:64:32:48,m17=12:64:32:64,m26=23:64:32:64"


def candidate(spec: str) -> tuple[str, ModelConfig]:
    """`NAME=BLOCKS:FEAT:GROWTH:HIDDEN` -> (NAME, its config: today's default recipe at that size, sized for cuda)."""
    name, _, shape = spec.partition("=")
    blocks, feat, growth, hidden = (int(v) for v in shape.split(":"))
    cfg = dataclasses.replace(PRESETS["small"], rrdb_num_block=blocks, rrdb_num_feat=feat, rrdb_growth=growth,
                              hidden_size=hidden, dim_mults=(1, 2, 4), prediction="sample", residual_base="rrdb",
                              extras={"default_sampler": "ddim", "default_steps": 1, "device": "cuda"})
    return name, cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=1.5, help="whole-process seconds per output MP (default 1.5)")
    p.add_argument("--candidates", default=CANDIDATES, help=f"comma-separated (default {CANDIDATES})")
    p.add_argument("--baseline", default="checkpoints/default", help="the first row (default: today's model)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--csv", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        sizes: dict[str, tuple[int, int]] = {}
        specs = [f"baseline={args.baseline}"]
        for spec in args.candidates.split(","):
            name, cfg = candidate(spec)
            net = SRDiffNet(cfg)
            params = sum(t.numel() for t in net.parameters())
            path = save_checkpoint(tmp / name, net, CheckpointInfo(config=cfg, name=name), dtype="fp16")
            sizes[name] = (params, (path / "model.safetensors").stat().st_size)
            specs.append(f"{name}={path}")
        table = args.csv or tmp / "sizes.csv"
        efficiency_bench.main([*specs, "--device", args.device, "--size", str(args.size), "--repeats",
                               str(args.repeats), "--csv", str(table)])
        with table.open() as f:
            rows = {r["label"]: r for r in csv.DictReader(f)}

    print("\n| candidate | parameters | fp16 weights (MiB) | exact training state (MiB) | whole-process s / MP |")
    print("| --- | ---: | ---: | ---: | ---: |")
    fitting = []
    for name, (params, weight_bytes) in sizes.items():
        s_per_mp = float(rows[name]["whole_s_per_mp"])
        print(f"| {name} | {params / 1e6:.2f} M | {weight_bytes / 2**20:.1f} | {params * 16 / 2**20:.0f} "
              f"| {s_per_mp:.2f} |")
        if s_per_mp <= args.budget:
            fitting.append((params, name))
    best = max(fitting)[1] if fitting else None
    print(f"\nlargest within {args.budget} s/MP on {args.device}: {best or 'none'}")
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
