"""Training in windows: a run that goes on, a few minutes at a time, on machines lent for minutes (a GPU).

A window resumes from the last window's exported folder (`import_state`), trains until its time is up
(`run.max_minutes`), and after every checkpoint (`run.checkpoint_minutes`) exports into a folder that is copied
back (`Exporter`): the exact state (sharded with `run.state_shard_mb` where the transfer limits a file's
size), the served weights, the metrics and this window's figures (`window.json`: steps per second, patches
per second, the share of time the loop waited for data, and on CUDA the GPU's busy time and peak memory).
The state loads on any device, so the next window may run on a GPU or on the CPU. The command:

    samdiffsr train diffusion --config configs/large.yaml --out runs/large --minutes 12 \\
        --resume-from PREV --export OUT

The exported folder is two levels deep at most: `state/`, `checkpoint/`, `metrics.csv`, `window.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.runtime import resolve_device
from training.state import atomic_dir, commit_dir, state_files

if TYPE_CHECKING:
    from training.train import Trainer

log = logging.getLogger(__name__)


def saved_step(state_dir: Path) -> int:
    """The step of a training state directory, -1 where there is none."""
    meta = state_dir / "state.json"
    return int(json.loads(meta.read_text())["step"]) if meta.exists() else -1


def import_state(prev: Path, run_dir: Path) -> bool:
    """Copy a previous window's exported state (and its metrics) into `run_dir`, unless the run directory is as
    far already; True when copied."""
    src, dst = prev / "state", run_dir / "state"
    src_step, dst_step = saved_step(src), saved_step(dst)
    if src_step < 0:
        raise FileNotFoundError(f"no training state in {src} (a window's --export folder has state/state.json)")
    if src_step <= dst_step:
        log.info("%s is at step %d, not behind %s (step %d): resuming from it", dst, dst_step, src, src_step)
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir(dst)
    for f in [src / "state.json", *state_files(src)]:
        shutil.copy2(f, tmp / f.name)
    commit_dir(tmp, dst)
    if (prev / "metrics.csv").exists():
        shutil.copy2(prev / "metrics.csv", run_dir / "metrics.csv")
    log.info("resuming from %s at step %d", src, src_step)
    return True


class GpuBusy:
    """The GPU's busy time: `torch.cuda.utilization` (NVML) sampled in a thread; None where it cannot be read
    (the CPU, no NVML)."""

    def __init__(self, device: torch.device, every_s: float = 0.5) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type == "cuda":
            try:
                torch.cuda.utilization(device)
            except Exception as e:  # pynvml missing, NVML unavailable (its own errors): no reading, no failure
                log.warning("GPU utilisation cannot be read (%s): window.json will not have it", e)
                return
            self._thread = threading.Thread(target=self._run, args=(device, every_s), daemon=True)
            self._thread.start()

    def _run(self, device: torch.device, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(float(torch.cuda.utilization(device)))

    @property
    def percent(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class Exporter:
    """`train(..., on_save=Exporter(...))`: after every save, the run's state, weights, metrics and this window's
    figures copied into `out` (replaced whole, so that a copy taken at any moment is consistent per folder)."""

    def __init__(self, out: Path, start_step: int, device: str = "auto", max_state_mib: float = 0) -> None:
        self.out, self.start_step, self.max_state_mib = out, start_step, max_state_mib
        self.t0 = time.monotonic()
        self.busy = GpuBusy(resolve_device(device))
        out.mkdir(parents=True, exist_ok=True)

    def __call__(self, trainer: Trainer) -> None:
        names = ["checkpoint"]
        state_mib = folder_mib(trainer.out / "state")
        if self.max_state_mib and state_mib > self.max_state_mib:
            log.warning("the training state (%.0f MiB) is over --export-max-state-mib (%.0f): exporting the weights "
                        "only, from which a next window starts afresh (run.init), not exactly", state_mib,
                        self.max_state_mib)
        else:
            names.append("state")
        for name in names:
            tmp = atomic_dir(self.out / name)
            for f in (trainer.out / name).iterdir():
                shutil.copy2(f, tmp / f.name)
            commit_dir(tmp, self.out / name)
        if trainer.runlog.path.exists():
            shutil.copy2(trainer.runlog.path, self.out / "metrics.csv")
        figures = self.figures(trainer, state_mib)
        (self.out / "window.json").write_text(json.dumps(figures, indent=2) + "\n")
        log.info("window: step %d, %.2f steps/s, data wait %.0f%%, GPU busy %s%%", figures["step"],
                 figures["steps_per_s"], 100 * figures["data_wait_share"], figures["gpu_busy_percent"])

    def figures(self, trainer: Trainer, state_mib: float) -> dict[str, Any]:
        """This window's figures so far (`state_mib`: the size of the run's training state)."""
        wall = max(time.monotonic() - self.t0, 1e-9)
        steps = trainer.step - self.start_step
        batch = trainer.cfg.data.batch_size * trainer.d.world
        dev = trainer.device
        return {
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
            "start_step": self.start_step, "step": trainer.step, "wall_s": round(wall, 1),
            "steps_per_s": round(steps / wall, 3), "patches_per_s": round(steps * batch / wall, 1),
            "batch_size": batch, "hr_patch": trainer.cfg.data.hr_patch, "bf16": trainer.amp,
            "channels_last": trainer.cfg.optim.channels_last, "workers": trainer.cfg.data.workers,
            "data_wait_share": round(trainer.data_wait_s / wall, 3),
            "gpu_busy_percent": self.busy.percent,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda"
            else None,
            "state_mib": round(state_mib, 1),
            "state_exported": (self.out / "state").exists(),
        }

    def close(self) -> None:
        self.busy.close()


def folder_mib(folder: Path) -> float:
    """The size of a folder's files (not its subfolders'), in MiB."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20


def check_transfer(out: Path, max_files: int, max_file_mib: float) -> list[str]:
    """What in `out` breaks a transfer's limits (files, size per file): one line each, none when it fits."""
    sizes = {f: f.stat().st_size / 2**20 for f in out.rglob("*") if f.is_file()}
    problems = [f"{f.relative_to(out)}: {mib:.1f} MiB > {max_file_mib} MiB" for f, mib in sizes.items()
                if mib > max_file_mib]
    if len(sizes) > max_files:
        problems.append(f"{len(sizes)} files > {max_files}")
    return problems
