"""Load benchmark of the HTTP service: throughput and latency with continuous batching on and off.

Starts the real server (`python -m samdiffsr serve`) on loopback once per mode, waits for /readyz,
then for each concurrency level sends a fixed number of requests from that many client threads
(closed loop: each thread sends its next request when the previous one is answered) and reports
requests/s, output megapixels/s, p50/p95/p99 latency, errors, and the mean tiles per denoiser call
read from the server's /metrics. Prints a Markdown table with an environment header and the exact
command line.

    python bench/load_bench.py --quick                          # smoke run, a few seconds
    python bench/load_bench.py                                  # default run, a few minutes on 2 cores
    python bench/load_bench.py --checkpoint checkpoints/default --concurrency 1,4,16 --requests 64

This is a benchmark, not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from model.checkpoint import save_random_checkpoint
from model.config import PRESETS
from service.testing import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "corpus-hr" / "val"
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "default"

# Values of options left unset: (default run, --quick).
PROFILES: dict[str, tuple[object, object]] = {
    "concurrency": ("1,2,4,8", "1,2"),
    "requests": (12, 4),
    "steps": (4, 2),
    "sizes": ("32x32,56x32", "16x16,28x16"),
    "tile_size": (32, 16),
    "tile_overlap": (8, 4),
    "max_tiles_per_batch": (4, 4),
    "preset": ("small", "tiny"),
}


@dataclass
class Result:
    """One request as the client saw it."""

    latency_s: float
    status: int  # 0: transport error
    out_pixels: int = 0
    error: str = ""


@dataclass
class LevelStats:
    mode: str
    concurrency: int
    results: list[Result]
    wall_s: float
    metrics_delta: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        if not (w.isdigit() and h.isdigit()) or int(w) < 1 or int(h) < 1:
            raise argparse.ArgumentTypeError(f"bad size {part!r}: expected WxH, e.g. 32x32")
        sizes.append((int(w), int(h)))
    return sizes


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("values must be at least 1")
    return values


def make_images(images_dir: Path, sizes: list[tuple[int, int]],
                fmt: str = "png") -> tuple[list[tuple[str, bytes]], str]:
    """(file name, bytes) of centre crops (PNG, or JPEG at quality 90) of every size from every *.png in
    `images_dir` (sizes alternate, so that every concurrency level gets a mix); a synthetic pattern for a size no
    image is large enough for."""
    paths = sorted(images_dir.glob("*.png")) if images_dir.is_dir() else []
    out = []
    for path in paths:
        img = Image.open(path).convert("RGB")
        for w, h in sizes:
            if img.width >= w and img.height >= h:
                x, y = (img.width - w) // 2, (img.height - h) // 2
                out.append((f"{path.stem}-{w}x{h}.{fmt}", _encode(img.crop((x, y, x + w, y + h)), fmt)))
    for w, h in sizes:
        if not any(n.endswith(f"-{w}x{h}.{fmt}") for n, _ in out):
            yy, xx = np.mgrid[0:h, 0:w]
            arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx ^ yy) & 255], -1)
            out.append((f"synthetic-{w}x{h}.{fmt}", _encode(Image.fromarray(arr.astype(np.uint8)), fmt)))
    where = (f"centre crops of {', '.join(p.name for p in paths)} in {images_dir}" if paths
             else f"synthetic patterns: {images_dir} has no *.png")
    return out, where


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


def random_checkpoint(out: Path, preset: str) -> Path:
    """A randomly initialised model of `preset` in our checkpoint format (seed 0)."""
    return save_random_checkpoint(out / preset, PRESETS[preset], f"{preset}-random",
                                  provenance={"source": "bench/load_bench.py, random weights"})


# ----------------------------------------------------------------------------- the server


def scrape(url: str) -> dict[str, float]:
    """The metrics the table uses, summed over their labels."""
    wanted = {"samdiffsr_batch_tiles_sum", "samdiffsr_batch_tiles_count",
              "samdiffsr_denoiser_call_duration_seconds_sum", "samdiffsr_queue_wait_seconds_sum",
              "samdiffsr_queue_wait_seconds_count"}
    out = dict.fromkeys(wanted, 0.0)
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name in wanted:
                out[s.name] += s.value
    return out


# ----------------------------------------------------------------------------- load


def run_level(url: str, images: list[tuple[str, bytes]], concurrency: int, n_requests: int, steps: int,
              timeout_s: float) -> tuple[list[Result], float]:
    """`n_requests` requests from `concurrency` threads, closed loop. Returns results and wall time."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=url, timeout=timeout_s, limits=limits) as client:

        def one(i: int) -> Result:
            name, data = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                r = client.post("/v1/upscale", files={"image": (name, data, f"image/{Path(name).suffix[1:]}")},
                                params={"steps": steps, "seed": i})
            except httpx.HTTPError as e:
                return Result(time.perf_counter() - t0, 0, error=type(e).__name__)
            latency = time.perf_counter() - t0
            if r.status_code != 200:
                code = r.json().get("error", {}).get("code", "") if r.headers.get("content-type", "").startswith(
                    "application/json") else ""
                return Result(latency, r.status_code, error=code or str(r.status_code))
            w, _, h = r.headers.get("x-image-size", "0x0").partition("x")
            return Result(latency, 200, out_pixels=int(w) * int(h))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="client") as pool:
            results = list(pool.map(one, range(n_requests)))
        return results, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bench_mode(mode: str, checkpoint: Path, args: argparse.Namespace, images: list[tuple[str, bytes]],
               workdir: Path, info: dict) -> list[LevelStats]:
    env = {
        "SAMDIFFSR_CONTINUOUS_BATCHING": "true" if mode == "on" else "false",
        "SAMDIFFSR_DEVICE": args.device,
        "SAMDIFFSR_BACKEND": args.backend,
        "SAMDIFFSR_TILE_OVERLAP": str(args.tile_overlap),
        "SAMDIFFSR_MAX_BATCH_WAIT_MS": str(args.max_batch_wait_ms),
        "SAMDIFFSR_REPRODUCIBLE": "true" if args.reproducible else "false",
        "SAMDIFFSR_MAX_QUEUE": str(max(32, max(args.concurrency))),
        "SAMDIFFSR_REQUEST_TIMEOUT_S": str(args.timeout),
        "SAMDIFFSR_DRAIN_TIMEOUT_S": "5",
        "SAMDIFFSR_LOG_LEVEL": "warning",
    }
    if args.torch_threads:
        env["SAMDIFFSR_TORCH_THREADS"] = str(args.torch_threads)
    if args.tile_size:  # 0: each model's own (its checkpoint's extras.default_tile)
        env["SAMDIFFSR_TILE_SIZE"] = str(args.tile_size)
    if args.max_tiles_per_batch:  # 0: the service sizes it (model/sizing.py)
        env["SAMDIFFSR_MAX_TILES_PER_BATCH"] = str(args.max_tiles_per_batch)
    server = ServerProcess(checkpoint, env, workdir / f"server-{mode}.log", cwd=ROOT)
    try:
        server.wait_ready(args.ready_timeout)
        if "model" not in info:
            info["model"] = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"][0]
        # Warm-up, not counted: every distinct input once.
        warm, _ = run_level(server.url, images, 1, len(images), args.steps, args.timeout)
        bad = [r for r in warm if r.status != 200]
        if bad:
            raise RuntimeError(f"warm-up request failed ({bad[0].status} {bad[0].error}):\n{server.log_tail()}")
        levels = []
        for c in args.concurrency:
            before = scrape(server.url)
            results, wall = run_level(server.url, images, c, args.requests, args.steps, args.timeout)
            after = scrape(server.url)
            delta = {k: after[k] - before[k] for k in after}
            levels.append(LevelStats(mode, c, results, wall, delta))
            print(f"  mode {mode}, concurrency {c}: {len(results)} requests in {wall:.1f} s", file=sys.stderr,
                  flush=True)
        return levels
    finally:
        server.stop()


# ----------------------------------------------------------------------------- report


def environment(args: argparse.Namespace, info: dict, checkpoint_desc: str, images_desc: str) -> list[str]:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (uncommitted changes)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = info.get("model", {})
    load = info.get("loadavg")
    lines = [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; commit {commit}",
        f"- machine: {cpu}, {os.cpu_count()} CPUs; {platform.platform()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        f"- load average (1/5/15 min) before the run: {' / '.join(f'{v:.2f}' for v in load) if load else 'n/a'}",
        f"- model: {model.get('name', '?')} ({checkpoint_desc}), backend {model.get('backend', '?')} on "
        f"{model.get('device', '?')}",
        f"- per request: {args.steps} {model.get('default_sampler', 'ddim')} steps; inputs: "
        f"{', '.join(f'{w}x{h}' for w, h in args.sizes)} px ({images_desc}), multipart {args.input_format.upper()}, "
        "PNG output",
        f"- tile {args.tile_size or model.get('tile_size', '?')} px (overlap {args.tile_overlap}), at most "
        f"{model.get('max_tiles_per_batch', '?')} tiles per "
        f"denoiser call ({'set' if args.max_tiles_per_batch else 'chosen by the service'}), precision "
        f"{model.get('precision', '?')}, max batch wait {args.max_batch_wait_ms:g} ms, reproducible "
        f"{'on (calls padded to the full batch)' if args.reproducible else 'off'}, torch threads "
        f"{args.torch_threads or 'default'}",
        f"- {args.requests} requests per concurrency level (closed loop, after one warm-up request per input); "
        "latency is client-side, tiles/call from samdiffsr_batch_tiles (padding not counted)",
    ]
    return lines


def table(levels: list[LevelStats]) -> list[str]:
    head = ("| batching | concurrency | requests | errors | wall s | req/s | out Mpx/s | p50 s | p95 s | p99 s "
            "| tiles/call | denoiser calls | mean call ms | mean queue wait s |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for lv in levels:
        ok = [r for r in lv.results if r.status == 200]
        errors: dict[str, int] = {}
        for r in lv.results:
            if r.status != 200:
                errors[r.error] = errors.get(r.error, 0) + 1
        lat = [r.latency_s for r in ok]
        d = lv.metrics_delta
        calls = d.get("samdiffsr_batch_tiles_count", 0.0)
        qn = d.get("samdiffsr_queue_wait_seconds_count", 0.0)
        err_text = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) if errors else "0"
        rows.append(
            f"| {lv.mode} | {lv.concurrency} | {len(lv.results)} | {err_text} | {lv.wall_s:.1f} "
            f"| {len(ok) / lv.wall_s:.2f} | {sum(r.out_pixels for r in ok) / 1e6 / lv.wall_s:.3f} "
            f"| {percentile(lat, 50):.2f} | {percentile(lat, 95):.2f} | {percentile(lat, 99):.2f} "
            f"| {d.get('samdiffsr_batch_tiles_sum', 0.0) / calls if calls else float('nan'):.2f} | {calls:.0f} "
            f"| {1000 * d.get('samdiffsr_denoiser_call_duration_seconds_sum', 0.0) / calls if calls else 0:.0f} "
            f"| {d.get('samdiffsr_queue_wait_seconds_sum', 0.0) / qn if qn else float('nan'):.2f} |")
    return rows


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: checkpoints/default when it "
                   "exists, else a random-weight model of --preset; --quick: always the random model)")
    p.add_argument("--preset", choices=["tiny", "small", "paper"], help="model preset of the random checkpoint "
                   f"(default {PROFILES['preset'][0]}, --quick {PROFILES['preset'][1]})")
    p.add_argument("--concurrency", type=parse_ints, help="client concurrency levels, e.g. 1,2,4,8")
    p.add_argument("--requests", type=int, help="requests per concurrency level")
    p.add_argument("--steps", type=int, help="sampling steps per request")
    p.add_argument("--sizes", type=parse_sizes, help="input sizes WxH (LR pixels), e.g. 32x32,56x32")
    p.add_argument("--modes", default="on,off", help="continuous batching modes to run: on, off or on,off")
    p.add_argument("--tile-size", type=int, help="SAMDIFFSR_TILE_SIZE (0: each model's own)")
    p.add_argument("--input-format", choices=["png", "jpeg"], default="png",
                   help="how the inputs are uploaded (jpeg: quality 90; default png)")
    p.add_argument("--tile-overlap", type=int, help="SAMDIFFSR_TILE_OVERLAP")
    p.add_argument("--max-tiles-per-batch", type=int, help="SAMDIFFSR_MAX_TILES_PER_BATCH (0: the service's choice)")
    p.add_argument("--max-batch-wait-ms", type=float, default=5.0, help="SAMDIFFSR_MAX_BATCH_WAIT_MS")
    p.add_argument("--reproducible", action=argparse.BooleanOptionalAction, default=True,
                   help="SAMDIFFSR_REPRODUCIBLE (pad denoiser calls to the full batch)")
    p.add_argument("--torch-threads", type=int, help="SAMDIFFSR_TORCH_THREADS (default: torch's)")
    p.add_argument("--device", default="cpu", help="SAMDIFFSR_DEVICE")
    p.add_argument("--backend", default="torch", choices=["torch", "torchscript", "onnx"], help="SAMDIFFSR_BACKEND")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="directory of *.png to cut inputs from")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    p.add_argument("--quick", action="store_true", help="smoke run of a few seconds (tiny random model, "
                   "concurrency 1,2, 4 requests each)")
    args = p.parse_args(argv)
    for name, (normal, quick) in PROFILES.items():
        if getattr(args, name) is None:
            value = quick if args.quick else normal
            if name == "concurrency":
                value = parse_ints(str(value))
            elif name == "sizes":
                value = parse_sizes(str(value))
            setattr(args, name, value)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("on", "off") for m in args.modes):
        p.error("--modes takes on, off or on,off")
    if args.requests < 1 or args.steps < 1:
        p.error("--requests and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", os.path.relpath(__file__, Path.cwd()), *(sys.argv[1:] if argv is None
                                                                              else argv)])
    info: dict = {"loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="samdiffsr-load-bench-")))
        if args.checkpoint is not None:
            checkpoint, desc = args.checkpoint.resolve(), str(args.checkpoint)
        elif not args.quick and DEFAULT_CHECKPOINT.is_dir():
            checkpoint, desc = DEFAULT_CHECKPOINT, "checkpoints/default"
        else:
            checkpoint, desc = random_checkpoint(workdir, args.preset), f"random {args.preset} weights, seed 0"
        images, images_desc = make_images(args.images, args.sizes, args.input_format)
        levels: list[LevelStats] = []
        try:
            for mode in args.modes:
                print(f"continuous batching {mode}: starting the server", file=sys.stderr, flush=True)
                levels += bench_mode(mode, checkpoint, args, images, workdir, info)
        except (RuntimeError, TimeoutError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print("## Load benchmark\n")
    print(f"```\n{command}\n```\n")
    print("\n".join(environment(args, info, desc, images_desc)))
    print()
    print("\n".join(table(levels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
