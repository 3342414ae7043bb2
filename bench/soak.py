"""Soak benchmark of the HTTP service (not a CI test): a bounded run at about twice the server's capacity.

Starts `python -m samdiffsr serve` on loopback, measures its capacity (requests/s of one closed-loop
client), then for `--minutes` keeps about twice that many requests in flight from client threads, mixing
valid images of many sizes (small, medium and large classes) over every served model and `auto`, malformed
uploads, stalled uploads (headers, part of the body, then nothing), uploads cancelled midway and half-sent
request heads, and the hostile clients of round three (issue 32): truncated files (icon directories cut short,
images of every kind cut anywhere) raw and multipart on /v1/upscale and /v1/jobs, waiters that hang up once their
whole upload is sent (in the memory budget's line under a low budget), and paths with Unicode line breaks or a
trailing slash under a foreign Host. It prints requests sent, answers by status, how many of each size class and
model were admitted, lost requests (no answer), unexpected 5xx, redirects, forged lines in the server's text log,
and the server's RSS at start, peak and end, and in the first and last minute. It fails (exit 1) on a lost
request, an unexpected 5xx, a redirect, a forged log line or a size class never admitted.

    python bench/soak.py --minutes 4                     # tiny random model, tile 16
    python bench/soak.py --minutes 10 --memory-budget-mb 16   # a low budget: large images must still get in
    python bench/soak.py --checkpoint checkpoints/default --minutes 10 --tile-size 32
    python bench/soak.py --models-dir checkpoints --minutes 10 --memory-budget-mb 64   # all shipped models
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shlex
import socket
import struct
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
# Paths whose decoded form holds a character some reader splits lines on (NEL, U+2028, U+2029, VT, FF, 0x1c).
UNICODE_BREAKS = ["%C2%85", "%E2%80%A8", "%E2%80%A9", "%0B", "%0C", "%1C", "%0D%0A"]


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


def truncated_bytes(rng: random.Random, photo: Image.Image) -> tuple[bytes, str]:
    """A truncated icon directory (ICO or CUR), or an image of some kind cut anywhere; and a content type."""
    if rng.random() < 0.4:
        head = struct.pack("<HHH", 0, rng.choice([1, 2]), rng.randint(1, 3))
        return head + bytes(rng.randrange(256) for _ in range(rng.randrange(16))), "image/x-icon"
    fmt = rng.choice(["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "TGA", "PPM"])
    buf = io.BytesIO()
    photo.crop((0, 0, 40, 30)).save(buf, format=fmt)
    data = buf.getvalue()
    return data[:rng.randrange(len(data))], rng.choice(["image/png", "application/octet-stream", "image/x-icon"])


class Soak:
    def __init__(self, url: str, photo: Image.Image, seed: int, models: list[str] | None = None) -> None:
        self.url, self.photo = url, photo
        self.models = models or []
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.sent = 0
        self.answers: Counter[str] = Counter()
        self.lost: list[str] = []
        self.unexpected: list[str] = []
        self.redirects: list[str] = []

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
        if kind in ("stalled", "cancelled", "slow-head", "hung-up"):
            self.raw(kind, rng)
            return
        if kind == "unicode-path":
            self.path(client, rng)
            return
        params: dict[str, object] = {"steps": rng.choice([0, 1, 2, 4])}
        if kind == "valid":
            data, cls = image_bytes(rng, self.photo)
            if self.models:
                params["model"] = rng.choice([*self.models, "auto"])
                kind = f"valid {cls} {params['model']}"
            else:
                kind = f"valid {cls}"
        elif kind == "truncated":
            data, ctype = truncated_bytes(rng, self.photo)
            path = rng.choice(["/v1/upscale", "/v1/jobs"])
            try:
                if rng.random() < 0.5:
                    r = client.post(path, content=data, headers={"content-type": ctype}, params=params)
                else:
                    r = client.post(path, files={"image": ("a", data, ctype)}, params=params)
                self.record(kind, r.status_code, r.text)
            except httpx.HTTPError as e:
                self.record(kind, None, repr(e))
            return
        else:
            data = rng.choice([b"not an image", b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(200)),
                               b""])
        try:
            r = client.post("/v1/upscale", files={"image": ("a", data, "image/png")}, params=params)
            self.record(kind, r.status_code, r.text if r.status_code >= 400 else "")
        except httpx.HTTPError as e:
            self.record(kind, None, repr(e))

    def path(self, client: httpx.Client, rng: random.Random) -> None:
        """A path with a line break in it (the log must not split), or a route with a trailing slash under a
        foreign Host (a JSON 404, never a redirect to that host)."""
        kind = "unicode-path"
        if rng.random() < 0.7:
            target = f"/v1/models/x{rng.choice(UNICODE_BREAKS)}FORGED-{rng.randrange(10**6)}"
            headers = {}
        else:
            kind = "trailing-slash"
            target = rng.choice(["/v1/models/default/", "/v1/upscale/", "/v1/jobs/", "/healthz/", "/v1/models/"])
            headers = {"host": "evil.example"}
        try:
            method = "POST" if target in ("/v1/upscale/", "/v1/jobs/") else "GET"
            r = client.request(method, target, headers=headers, follow_redirects=False)
            if 300 <= r.status_code < 400:
                with self.lock:
                    self.redirects.append(f"{target} -> {r.headers.get('location')}")
            self.record(kind, r.status_code, r.text)
        except httpx.HTTPError as e:
            self.record(kind, None, repr(e))

    def raw(self, kind: str, rng: random.Random) -> None:
        """A body that stops after its first bytes: left hanging (stalled) or closed (cancelled)."""
        head = (b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n\x89PNG\r\n\x1a\n")
        if kind == "slow-head":  # the head itself never ends
            head = b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\nX-Slow: 1"
        elif kind == "hung-up":  # the whole upload, then gone before the answer (in line, or in the batch)
            data, _ = image_bytes(rng, self.photo)
            head = (b"POST /v1/upscale?steps=2 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(data)) + data
        try:
            with socket.create_connection((self.host, self.port), timeout=60) as s:
                s.sendall(head)
                if kind == "hung-up":
                    time.sleep(rng.random())
                    self.record(kind, 499)  # nobody reads the answer
                    return
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
    ap.add_argument("--models-dir", help="serve every checkpoint in this folder instead (e.g. checkpoints: default, "
                    "fast, real); valid requests name each model and auto in turn")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--tile-size", type=int, default=16, help="0: each model's own")
    ap.add_argument("--request-timeout", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-budget-mb", type=int, help="SAMDIFFSR_MEMORY_BUDGET_MB (default: the service's)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="soak-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMDIFFSR_")}
    env.update(SAMDIFFSR_MAX_TILES_PER_BATCH="4", SAMDIFFSR_DEFAULT_STEPS="2", SAMDIFFSR_DEVICE="cpu",
               SAMDIFFSR_REQUEST_TIMEOUT_S=str(args.request_timeout), SAMDIFFSR_LOG_LEVEL="info",
               SAMDIFFSR_LOG_FORMAT="text", SAMDIFFSR_MAX_QUEUE="16", SAMDIFFSR_MAX_PIXELS=str(256 * 256))
    if args.tile_size:
        env.update(SAMDIFFSR_TILE_SIZE=str(args.tile_size), SAMDIFFSR_TILE_OVERLAP=str(args.tile_size // 4))
    if args.memory_budget_mb:
        env["SAMDIFFSR_MEMORY_BUDGET_MB"] = str(args.memory_budget_mb)
    if args.models_dir:
        source = ["--models-dir", args.models_dir]
    else:
        source = ["--checkpoint", args.checkpoint or str(save_random_checkpoint(Path(tmp) / "tiny", PRESETS["tiny"],
                                                                               "tiny-random"))]
    cmd = [sys.executable, "-m", "samdiffsr", "serve", *source, "--port", str(port)]
    log_path = Path(tmp) / "server.log"  # the text log, read back for forged lines
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    photo = Image.open(ROOT.parent / "shared/data/corpus-hr/val/skimage-chelsea.png").convert("RGB")
    try:
        wait_ready(url, 300)
        models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["models"]] if args.models_dir else None
        soak = Soak(url, photo, args.seed, models)
        with httpx.Client(base_url=url, timeout=60) as c:  # capacity: one closed-loop client, valid images
            t0, n = time.monotonic(), 0
            while time.monotonic() - t0 < 15:
                soak.one(c, "valid")
                n += 1
        capacity = n / (time.monotonic() - t0)
        soak = Soak(url, photo, args.seed, models)
        clients = max(2, round(2 * capacity * args.request_timeout / 4))  # ~2x capacity offered, open-ish loop
        interval = 1 / (2 * capacity)
        rss_start = rss_mb(proc.pid)[0]
        samples: list[tuple[float, float]] = []
        stop = time.monotonic() + args.minutes * 60
        kinds = ["valid"] * 8 + ["malformed", "stalled", "cancelled", "slow-head", "truncated", "truncated",
                                 "hung-up", "hung-up", "unicode-path"]

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
        metrics = httpx.get(f"{url}/metrics").text
        served_5xx: Counter[str] = Counter()
        for line in metrics.splitlines():
            if line.startswith("samdiffsr_requests_total{") and 'route="/v1/' in line and 'status="5' in line:
                served_5xx[line.split('status="')[1][:3]] += int(float(line.split()[-1]))
        first = max(r for t, r in samples if t <= 60)
        last = max(r for t, r in samples if t >= samples[-1][0] - 60)
        print(f"command: {shlex.join([sys.executable, *sys.argv])}")
        print(f"server: {shlex.join(cmd[1:])}, tile {args.tile_size}, request timeout {args.request_timeout:g} s, "
              f"memory budget {args.memory_budget_mb or 'default'} MB")
        print(f"capacity (1 closed-loop client, valid images): {capacity:.2f} req/s; offered ~2x with {clients} "
              f"clients for {args.minutes:g} min")
        print(f"requests sent: {soak.sent}")
        print("answered by kind and status: " + ", ".join(f"{k}: {v}" for k, v in sorted(soak.answers.items())))
        admitted = {c: sum(n for k, n in soak.answers.items() if k.startswith(f"valid {c} ") and k.endswith(" 200"))
                    for c in ("small", "medium", "large")}
        print("admitted (200) by size class: " + ", ".join(f"{c}: {n}" for c, n in admitted.items()))
        if models:
            by_model = {m: sum(n for k, n in soak.answers.items() if k.startswith("valid ") and k.endswith(f" {m} 200"))
                        for m in [*models, "auto"]}
            print("admitted (200) by model: " + ", ".join(f"{m}: {n}" for m, n in by_model.items()))
        print(f"lost (no answer): {len(soak.lost)}" + (f" e.g. {soak.lost[:3]}" if soak.lost else ""))
        print(f"unexpected 5xx: {len(soak.unexpected)}" + (f" e.g. {soak.unexpected[:3]}" if soak.unexpected else ""))
        print("5xx the server counted on /v1/* (samdiffsr_requests_total): " + (", ".join(
            f"{k}: {v}" for k, v in sorted(served_5xx.items())) or "none"))
        print(f"redirects: {len(soak.redirects)}" + (f" e.g. {soak.redirects[:3]}" if soak.redirects else ""))
        print(f"RSS MB: start {rss_start:.0f}, peak {peak:.0f}, end {end_rss:.0f}; max in first minute {first:.0f}, "
              f"in last minute {last:.0f} ({(last - first) / first * 100:+.1f}%)")
    finally:
        proc.terminate()
        proc.wait(60)
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()  # splits on every line break
    forged = [ln for ln in lines if ln.startswith("FORGED")]
    tracebacks = sum(ln.startswith("Traceback") for ln in lines)
    print(f"server log: {len(lines)} lines, {len(forged)} forged, {tracebacks} tracebacks")
    ok = not soak.lost and not soak.unexpected and not soak.redirects and not forged and not tracebacks
    return 0 if ok and all(admitted.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
