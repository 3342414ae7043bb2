"""The service benchmarks still run end to end (a real server on loopback, a tiny random model): their numbers
are taken on demand, so a refactor must not leave them broken until then. Nothing here is timed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_load_bench_quick_prints_both_modes() -> None:
    out = _bench("load_bench.py", "--quick")
    rows = [line for line in out.splitlines() if line.startswith(("| on |", "| off |"))]
    assert {r.split("|")[1].strip() for r in rows} == {"on", "off"}, out


def test_interference_bench_prints_the_ratio(tiny_checkpoint: Path) -> None:
    out = _bench("interference_bench.py", "--checkpoint", str(tiny_checkpoint), "--small", "16", "--large", "96",
                 "--steps", "4", "--repeats", "2", "--env", "SAMDIFFSR_TILE_SIZE=16",
                 "--env", "SAMDIFFSR_MAX_TILES_PER_BATCH=1")
    assert "| idle server | 2 |" in out and "p95 ratio (beside / idle)" in out, out


def test_worker_bench_splits_the_time(tiny_checkpoint: Path, photo: Path) -> None:
    out = _bench("worker_bench.py", "--checkpoint", str(tiny_checkpoint), "--photo", str(photo), "--n", "3",
                 "--size", "40", "--tile", "16", "--batch", "64", "--repro", "0")
    assert "in 1 encoder and 1 denoiser calls" in out, out  # 3 images x 16 tiles: one call for all three
    assert "| Canvas.add (blend in) |" in out, out


def test_efficiency_bench_compares_a_revision_with_a_directory(tiny_checkpoint: Path) -> None:
    out = _bench("efficiency_bench.py", "checkpoints/default@HEAD", str(tiny_checkpoint), "--size", "32",
                 "--repeats", "1", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith("| checkpoints/default@HEAD |")
            or line.startswith(f"| {tiny_checkpoint} |")]
    assert len(rows) == 2 and rows[0].endswith("| 1.000 |"), out
    assert "same-run fp32 matmul" in out, out
