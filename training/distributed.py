"""Devices and processes: single process or torchrun/DDP, bf16 support, resumable sampling, per-step RNG."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> Dist:
    """Join the process group that torchrun describes (env WORLD_SIZE > 1); otherwise single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


T = TypeVar("T")


def main_first(d: Dist, make: Callable[[], T]) -> T:
    """`make()` on rank 0 first (it fills a cache: decoded images, a teacher's images), then on the other ranks,
    which read what it wrote."""
    result: T | None = None
    for turn in ((0,) if not d.enabled else (0, 1)):
        if (turn == 0) == d.main:
            result = make()
        if d.enabled:
            dist.barrier()
    assert result is not None
    return result


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays on `device`: CUDA, or a CPU with native bf16 (AVX-512 BF16 / AMX)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    return dev


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch (exact resume)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator for the timesteps and noise of one training step of one process."""
    state = np.random.SeedSequence([seed, step, rank, 0x5D1F]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


def own_process_group(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker leaves the trainer's process group, so that SIGINT/SIGTERM sent to
    the group (Ctrl-C, `timeout`, job schedulers) reach the trainer alone, which checkpoints and then shuts its
    workers down. The loader can still terminate a worker, and a worker whose trainer died exits by itself."""
    os.setpgid(0, 0)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints and returns at the next step boundary."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        log.warning("received signal %d: checkpointing and stopping", signum)
        self.set = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
