"""Soak benchmark of the HTTP service (not a CI test): a bounded run at about twice the server's capacity.

Starts `python -m samdiffsr serve` on loopback, measures its capacity (requests/s of one closed-loop
client), then for `--minutes` keeps about twice that many requests in flight from client threads, mixing
valid images of many sizes (small, medium and large classes), malformed uploads, stalled uploads (headers,
part of the body, then nothing), uploads cancelled midway and half-sent request heads. It prints requests
sent, answers by status, how many of each size class were admitted, lost requests (no answer), unexpected 5xx,
and the server's RSS at start, peak and end, and in the first and last minute. It fails (exit 1) on a lost
request, an unexpected 5xx or a size class never admitted.

    python bench/soak.py --minutes 4                     # tiny random model, tile 16
    python bench/soak.py --minutes 10 --memory-budget-mb 16   # a low budget: large images must still get in
    python bench/soak.py --checkpoint checkpoints/default --minutes 10 --tile-size 32
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import save_random_checkpoint  # noqa: E402
from model.config import PRESETS  # noqa: E402
from service.testing import free_port, wait_ready  # noqa: E402

EXPECTED_5XX = {503, 504}  # queue_full, shutting_down and deadline answers under overload are not failures


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


SIZES = [(8, 8), (16, 12), (33, 20), (48, 48), (64, 40), (1, 300), (120, 4), (80, 80), (96, 96), (128, 64)]


def size_class(w: int, h: int) -> str:
    return "small" if w * h <= 16 * 16 else "medium" if w * h <= 64 * 64 else "large"


def image_bytes(rng: random.Random, photo: Image.Image) -> tuple[bytes, str]:
    w, h = rng.choice(SIZES)
    x, y = rng.randrange(0, photo.width - w + 1), rng.randrange(0, photo.height - h + 1)
    img = photo.crop((x, y, x + w, y + h))
    if rng.random() < 0.2:
        img = img.convert("RGBA")
    buf = io.BytesIO()
    img.save(buf, format=rng.choice(["PNG", "JPEG"]) if img.mode == "RGB" else "PNG")
    return buf.getvalue(), size_class(w, h)


class Soak:
    def __init__(self, url: str, photo: Image.Image, seed: int) -> None:
        self.url, self.photo = url, photo
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.sent = 0
        self.answers: Counter[str] = Counter()
        self.lost: list[str] = []
        self.unexpected: list[str] = []

    def record(self, kind: str, status: int | None, detail: str = "") -> None:
        with self.lock:
            self.sent += 1
            if status is None:
                self.lost.append(f"{kind}: {detail}")
                return
            self.answers[f"{kind} {status}"] += 1
            if status >= 500 and status not in EXPECTED_5XX:
                self.unexpected.append(f"{kind} {status}: {detail[:200]}")

    def one(self, client: httpx.Client, kind: str) -> None:
        with self.lock:
            rng = random.Random(self.rng.random())
        if kind in ("stalled", "cancelled", "slow-head"):
            self.raw(kind, rng)
            return
        if kind == "valid":
            data, cls = image_bytes(rng, self.photo)
            kind = f"valid {cls}"
        else:
            data = rng.choice([b"not an image", b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(200)),
                               b""])
        try:
            r = client.post("/v1/upscale", files={"image": ("a", data, "image/png")},
                            params={"steps": rng.choice([0, 1, 2, 4])})
            self.record(kind, r.status_code, r.text if r.status_code >= 400 else "")
        except httpx.HTTPError as e:
            self.record(kind, None, repr(e))

    def raw(self, kind: str, rng: random.Random) -> None:
        """A body that stops after its first bytes: left hanging (stalled) or closed (cancelled)."""
        head = (b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n\x89PNG\r\n\x1a\n")
        if kind == "slow-head":  # the head itself never ends
            head = b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\nX-Slow: 1"
        try:
            with socket.create_connection((self.host, self.port), timeout=60) as s:
                s.sendall(head)
                if kind == "cancelled":
                    time.sleep(rng.random() * 0.2)
                    self.record(kind, 499)  # nobody reads the answer; the server counts it
                    return
                answer = s.recv(4096)
            status = int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else None
            self.record(kind, status, answer[:200].decode("latin-1"))
        except OSError as e:
            self.record(kind, None, repr(e))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="default: a random tiny model")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--tile-size", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-budget-mb", type=int, help="SAMDIFFSR_MEMORY_BUDGET_MB (default: the service's)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="soak-")
    ckpt = args.checkpoint or str(save_random_checkpoint(Path(tmp) / "tiny", PRESETS["tiny"], "tiny-random"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMDIFFSR_")}
    env.update(SAMDIFFSR_TILE_SIZE=str(args.tile_size), SAMDIFFSR_TILE_OVERLAP=str(args.tile_size // 4),
               SAMDIFFSR_MAX_TILES_PER_BATCH="4", SAMDIFFSR_DEFAULT_STEPS="2", SAMDIFFSR_DEVICE="cpu",
               SAMDIFFSR_REQUEST_TIMEOUT_S=str(args.request_timeout), SAMDIFFSR_LOG_LEVEL="error",
               SAMDIFFSR_MAX_QUEUE="16", SAMDIFFSR_MAX_PIXELS=str(256 * 256))
    if args.memory_budget_mb:
        env["SAMDIFFSR_MEMORY_BUDGET_MB"] = str(args.memory_budget_mb)
    cmd = [sys.executable, "-m", "samdiffsr", "serve", "--checkpoint", ckpt, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    photo = Image.open(ROOT.parent / "shared/data/corpus-hr/val/skimage-chelsea.png").convert("RGB")
    try:
        wait_ready(url, 120)
        soak = Soak(url, photo, args.seed)
        with httpx.Client(base_url=url, timeout=60) as c:  # capacity: one closed-loop client, valid images
            t0, n = time.monotonic(), 0
            while time.monotonic() - t0 < 15:
                soak.one(c, "valid")
                n += 1
        capacity = n / (time.monotonic() - t0)
        soak = Soak(url, photo, args.seed)
        clients = max(2, round(2 * capacity * args.request_timeout / 4))  # ~2x capacity offered, open-ish loop
        interval = 1 / (2 * capacity)
        rss_start = rss_mb(proc.pid)[0]
        samples: list[tuple[float, float]] = []
        stop = time.monotonic() + args.minutes * 60
        kinds = ["valid"] * 6 + ["malformed", "stalled", "cancelled", "slow-head"]

        def client_loop(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            with httpx.Client(base_url=url, timeout=60) as c:
                while time.monotonic() < stop:
                    soak.one(c, rng.choice(kinds))
                    time.sleep(rng.random() * interval * clients)

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        begin = time.monotonic()
        while any(t.is_alive() for t in threads):
            samples.append((time.monotonic() - begin, rss_mb(proc.pid)[0]))
            time.sleep(1)
        end_rss, peak = rss_mb(proc.pid)
        first = max(r for t, r in samples if t <= 60)
        last = max(r for t, r in samples if t >= samples[-1][0] - 60)
        print(f"command: {shlex.join([sys.executable, *sys.argv])}")
        print(f"server: {shlex.join(cmd[1:])}, tile {args.tile_size}, request timeout {args.request_timeout:g} s, "
              f"memory budget {args.memory_budget_mb or 'default'} MB")
        print(f"capacity (1 closed-loop client, valid images): {capacity:.2f} req/s; offered ~2x with {clients} "
              f"clients for {args.minutes:g} min")
        print(f"requests sent: {soak.sent}")
        print("answered by kind and status: " + ", ".join(f"{k}: {v}" for k, v in sorted(soak.answers.items())))
        admitted = {c: soak.answers[f"valid {c} 200"] for c in ("small", "medium", "large")}
        print("admitted (200) by size class: " + ", ".join(f"{c}: {n}" for c, n in admitted.items()))
        print(f"lost (no answer): {len(soak.lost)}" + (f" e.g. {soak.lost[:3]}" if soak.lost else ""))
        print(f"unexpected 5xx: {len(soak.unexpected)}" + (f" e.g. {soak.unexpected[:3]}" if soak.unexpected else ""))
        print(f"RSS MB: start {rss_start:.0f}, peak {peak:.0f}, end {end_rss:.0f}; max in first minute {first:.0f}, "
              f"in last minute {last:.0f} ({(last - first) / first * 100:+.1f}%)")
        return 0 if not soak.lost and not soak.unexpected and all(admitted.values()) else 1
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    sys.exit(main())
