"""Training throughput: the previous recipe against the current one, in the same run, on this machine.

For each recipe and stage, one optimiser step of the real objective (`training.objectives`) on random
batches of the recipe's shape: steps/s, samples/s, and the achieved GFLOP/s (convolutions and matmuls
counted by `torch.utils.flop_counter`, forward and backward), next to a plain 2048x2048 matmul's GFLOP/s
in fp32 and bf16 measured in the same run. Data loading is not included (it is cached and cheap).

    python bench/train_bench.py                 # a few minutes on 2 CPU cores
    python bench/train_bench.py --steps 5 --warmup 1

Recipes: `previous` is `configs/cpu-small.yaml` as it was trained (float32, contiguous tensors, noise
prediction); `current` is `configs/default.yaml` (bf16 autocast where the CPU computes bf16 natively,
channels_last, x0 prediction over the RRDB's output). Timings mean nothing while anything else runs.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hardware import matmul_gflops  # bench/hardware.py, beside this script
from torch.utils.flop_counter import FlopCounterMode

from model.diffusion import make_schedule
from model.network import SRDiffNet
from training.config import TrainConfig, load_config
from training.distributed import bf16_supported
from training.objectives import DiffusionObjective, RRDBObjective, trained_module

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    name: str
    config: Path
    overrides: tuple[str, ...]
    bf16: bool
    channels_last: bool


RECIPES = (
    Recipe("previous", ROOT / "configs" / "cpu-small.yaml", ("optim.amp=false", "optim.channels_last=false"),
           False, False),
    Recipe("current", ROOT / "configs" / "default.yaml", (), True, True),
)


def make_step(cfg: TrainConfig, stage: str, bf16: bool, channels_last: bool):
    """One optimiser step of `stage` on a fixed random batch of the recipe's shape."""
    mcfg = cfg.model.build()
    torch.manual_seed(0)
    net = SRDiffNet(mcfg)
    if stage == "diffusion":
        net.rrdb.requires_grad_(False)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    sched = make_schedule(mcfg.timesteps, mcfg.beta_s)
    objective = RRDBObjective(net) if stage == "rrdb" else DiffusionObjective(net, sched, cfg.diffusion.structure)
    module = trained_module(net, stage)  # type: ignore[arg-type]
    opt = torch.optim.Adam(module.parameters(), lr=cfg.optim.lr)
    b, hr, s = cfg.data.batch_size, cfg.data.hr_patch, mcfg.scale
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    img_lr = (torch.rand(b, 3, hr // s, hr // s) * 2 - 1).contiguous(memory_format=fmt)
    img_hr = (torch.rand(b, 3, hr, hr) * 2 - 1).contiguous(memory_format=fmt)
    img_up = img_hr.clone()
    spe = torch.rand(b, 1, hr, hr)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if stage == "rrdb":
                loss = objective(img_lr, img_hr)
            else:
                t = torch.randint(0, sched.num_timesteps, (b,))
                loss = objective(img_lr, img_up, img_hr, spe, t, torch.randn(b, 3, hr, hr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, b


def bench(step, warmup: int, steps: int) -> tuple[float, float]:
    """(steps per second, FLOP per step)."""
    for _ in range(warmup):
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0), float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per recipe and stage (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--stages", default="rrdb,diffusion", help="comma-separated: rrdb, diffusion")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_bf16 = bf16_supported(torch.device("cpu"))
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, native bf16: {cpu_bf16}\n")
    mm32, mm16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print("| recipe | stage | batch x HR patch | precision | steps/s | samples/s | GFLOP/step | GFLOP/s "
          "| of fp32 matmul | of bf16 matmul |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    results: dict[tuple[str, str], float] = {}
    for stage in args.stages.split(","):
        for r in RECIPES:
            cfg = load_config(r.config, list(r.overrides))
            bf16 = r.bf16 and cpu_bf16
            step, batch = make_step(cfg, stage, bf16, r.channels_last)
            sps, flops = bench(step, args.warmup, args.steps)
            gflops = sps * flops / 1e9
            results[(r.name, stage)] = sps * batch
            prec = ("bf16 autocast" if bf16 else "fp32") + (", channels_last" if r.channels_last else "")
            print(f"| {r.name} | {stage} | {batch} x {cfg.data.hr_patch} | {prec} | {sps:.2f} | {sps * batch:.1f} "
                  f"| {flops / 1e9:.2f} | {gflops:.1f} | {gflops / mm32:.0%} | {gflops / mm16:.0%} |")
    print(f"\nSame run: fp32 matmul {mm32:.1f} GFLOP/s, bf16 matmul {mm16:.1f} GFLOP/s (2048x2048).")
    for stage in args.stages.split(","):
        if ("previous", stage) in results:
            ratio = results[("current", stage)] / results[("previous", stage)]
            print(f"{stage}: current/previous samples per second = {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
