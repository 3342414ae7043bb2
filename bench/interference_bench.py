"""Latency of a small request while a large image is in flight, against the same request on an idle server.

Starts the real server (`samdiffsr serve`, as `bench/load_bench.py` does) with the service's own defaults
(batch size chosen by `model/sizing.py`, precision `auto`), then

1. sends `--repeats` small requests one after another on the idle server (after a warm-up), and
2. sends one large request and, while it is in flight, small requests one after another,

and prints the small requests' p50/p95 latency in both cases and their ratio.

    python bench/interference_bench.py                                # 64x64 small, 192x192 large, default steps
    python bench/interference_bench.py --small 64 --large 256 --steps 4 --env SAMDIFFSR_MAX_TILES_PER_BATCH=8

Timings mean nothing while anything else runs on the machine.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from load_bench import DEFAULT_CHECKPOINT, DEFAULT_IMAGES, ROOT, make_images, percentile  # beside this script

from service.testing import ServerProcess


def post(client: httpx.Client, png: bytes, steps: int | None, seed: int) -> float:
    t0 = time.perf_counter()
    params = {"seed": seed} if steps is None else {"steps": steps, "seed": seed}
    r = client.post("/v1/upscale", files={"image": ("in.png", png, "image/png")}, params=params)
    r.raise_for_status()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--small", type=int, default=64, help="LR side of the small request (default: 64)")
    p.add_argument("--large", type=int, default=192, help="LR side of the large request (default: 192)")
    p.add_argument("--steps", type=int, default=None, help="denoiser steps (default: the service's default)")
    p.add_argument("--repeats", type=int, default=5, help="small requests on the idle server")
    p.add_argument("--env", action="append", default=[], help="extra SAMDIFFSR_*=value settings")
    args = p.parse_args(argv)
    env = {"SAMDIFFSR_LOG_LEVEL": "warning", "SAMDIFFSR_REQUEST_TIMEOUT_S": "900"}
    env.update(kv.split("=", 1) for kv in args.env)
    images, _ = make_images(args.images, [(args.small, args.small), (args.large, args.large)])
    small = next(d for n, d in images if n.endswith(f"-{args.small}x{args.small}.png"))
    large = next(d for n, d in images if n.endswith(f"-{args.large}x{args.large}.png"))
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(args.checkpoint, env, Path(tmp) / "server.log", cwd=ROOT)
        try:
            server.wait_ready(300)
            model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"][0]
            with httpx.Client(base_url=server.url, timeout=900) as client:
                post(client, small, args.steps, 0)  # warm-up
                idle = [post(client, small, args.steps, i) for i in range(args.repeats)]
                big: list[float] = []

                def send_large() -> None:
                    with httpx.Client(base_url=server.url, timeout=900) as other:
                        big.append(post(other, large, args.steps, 1))

                worker = threading.Thread(target=send_large)
                worker.start()
                time.sleep(0.5)
                loaded = []
                while worker.is_alive():
                    t = post(client, small, args.steps, 100 + len(loaded))
                    if worker.is_alive():  # only requests that ran entirely beside the large one
                        loaded.append(t)
                worker.join()
        finally:
            server.stop()
    print(f"```\npython bench/interference_bench.py {shlex.join(sys.argv[1:] if argv is None else argv)}\n```\n")
    steps = model["default_steps"] if args.steps is None else args.steps
    print(f"Model {model['name']}, {model['backend']} {model.get('precision', '?')} on {model['device']}, tile "
          f"{model['tile_size']} px, {model['max_tiles_per_batch']} tiles per call, {steps} steps; small "
          f"{args.small}x{args.small} LR, large {args.large}x{args.large} LR ({big[0]:.1f} s).\n")
    print("| small request | n | p50 s | p95 s |")
    print("| --- | ---: | ---: | ---: |")
    for name, xs in (("idle server", idle), ("beside the large one", loaded)):
        print(f"| {name} | {len(xs)} | {percentile(xs, 50):.2f} | {percentile(xs, 95):.2f} |")
    if not loaded:
        print("\nNo small request ran entirely beside the large one: make the large one larger (--large).")
        return 1
    print(f"\np95 ratio (beside / idle): **{percentile(loaded, 95) / percentile(idle, 95):.2f}x**")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
