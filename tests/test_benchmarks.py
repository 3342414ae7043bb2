"""The service benchmarks still run end to end (a real server on loopback, a tiny random model): their numbers
are taken on demand, so a refactor must not leave them broken until then. Nothing here is timed."""

from __future__ import annotations

import csv
import json
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


def test_efficiency_bench_compares_a_revision_with_a_directory_and_feeds_the_cost_plot(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = _bench("efficiency_bench.py", "checkpoints/default@HEAD", f"tiny={tiny_checkpoint}", "--size", "32",
                 "--repeats", "1", "--threads", "1", "--csv", str(tmp_path / "cost.csv"))
    rows = [line for line in out.splitlines() if line.startswith(("| checkpoints/default@HEAD |", "| tiny |"))]
    assert len(rows) == 2 and rows[0].endswith("| 1.000 |"), out
    assert "same-run fp32 matmul" in out, out

    for label, steps, gains in (("checkpoints/default@HEAD", 1, (30.0, 31.0)), ("tiny", 20, (20.0, 19.5))):
        (tmp_path / label).mkdir(parents=True)
        mean = {"bicubic": {"psnr_y": 28.0}, "steps=0": {"psnr_y": gains[0]}, f"steps={steps}": {"psnr_y": gains[1]}}
        (tmp_path / label / "eval.json").write_text(json.dumps({"mean": mean}))
    png = tmp_path / "plot.png"
    proc = subprocess.run([sys.executable, "-m", "training.costplot", str(tmp_path / "cost.csv"),
                           f"checkpoints/default@HEAD={tmp_path / 'checkpoints/default@HEAD'}",
                           f"tiny={tmp_path / 'tiny'}", "--reference", "peers=1.8:3.7:2.25:2.35", "--out", str(png)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_size_bench_times_candidates_against_the_baseline(tiny_checkpoint: Path) -> None:
    out = _bench("gpu_size_bench.py", "--device", "cpu", "--size", "32", "--repeats", "1", "--budget", "1000",
                 "--baseline", str(tiny_checkpoint), "--candidates", "a=2:8:4:8,b=2:8:4:16")
    rows = [line for line in out.splitlines() if line.startswith(("| a |", "| b |"))]
    assert len(rows) == 4, out  # each candidate in the timing table and in the size table
    assert "| b | 0.48 M |" in out, out
    assert "largest within 1000.0 s/MP on cpu: b" in out, out


def test_png_bench_compares_the_writers() -> None:
    out = _bench("png_bench.py", "--size", "64", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith(("| photo 64x64 |", "| graphic 64x64 |"))]
    assert len(rows) == 2 and all(r.endswith("x |") for r in rows), out


def test_tiling_bench_prints_fixed_and_snug_rows(tiny_checkpoint: Path) -> None:
    out = _bench("tiling_bench.py", str(tiny_checkpoint), "--tiles", "16", "--overlap", "4", "--images", "2",
                 "--sides", "20,40", "--steps", "1")
    rows = [line for line in out.splitlines() if line.startswith("| 16 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["fixed", "snug"] and rows[0].endswith("| 1.00 |"), out


def test_quality_cost_bench_prints_quality_and_cost_side_by_side(tiny_checkpoint: Path, photo: Path,
                                                                 tmp_path: Path) -> None:
    val = tmp_path / "val"
    val.mkdir()
    from PIL import Image

    Image.open(photo).convert("RGB").crop((0, 0, 64, 48)).save(val / "a.png")
    out = _bench("quality_cost_bench.py", f"base={tiny_checkpoint}:0", f"ens={tiny_checkpoint}:0:2", "--val", str(val),
                 "--degradations", "bicubic,jpeg75", "--size", "24", "--repeats", "1", "--threads", "1",
                 "--csv", str(tmp_path / "q.csv"), "--plot", str(tmp_path / "q.png"))
    rows = [line for line in out.splitlines() if line.startswith(("| base |", "| ens |"))]
    assert len(rows) == 2 and rows[0].endswith("| 1.00x |"), out
    assert "| ens | 0 | 2 |" in rows[1] and "AVX-512" in out, out
    with (tmp_path / "q.csv").open() as f:
        assert {"label", "s_per_mp", "bicubic_psnr_y", "jpeg75_gain"} <= set(next(csv.reader(f)))
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_ratio_prints_each_block_and_the_spread(tiny_checkpoint: Path) -> None:
    out = _bench("cost_ratio.py", f"base={tiny_checkpoint}:0", f"ens={tiny_checkpoint}:0:2", "--blocks", "2",
                 "--repeats", "1", "--size", "24", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all(r.endswith("x |") for r in rows), out
    assert "ens / base: median " in out and "over 2 blocks of 1 runs" in out, out
