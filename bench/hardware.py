"""What the machine can do, measured in the benchmark's own run: a plain matmul's GFLOP/s as the yardstick."""

from __future__ import annotations

import time

import torch


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """GFLOP/s of an n x n matmul in `dtype` on `device` (one warm-up, then `repeats` timed)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def cpu_summary() -> str:
    """The CPU's model name, whether it has AVX-512 and bf16, and what torch uses of it.

    torch's kernels can be held below the CPU (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`: how an
    AVX2-only machine is imitated on a newer one); the line then says so, and `auto` precision is fp32 there.
    """
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    avx512 = "AVX-512" if "avx512f" in flags else "no AVX-512"
    bf16 = "bf16" if {"avx512_bf16", "amx_bf16"} & flags else "no bf16"
    kernels = torch.backends.cpu.get_cpu_capability()
    onednn_bf16 = "oneDNN bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no oneDNN bf16"
    return f"{name} ({avx512}, {bf16}; torch runs {kernels} kernels, {onednn_bf16})"
