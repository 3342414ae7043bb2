"""Admission by cost: a request's work and memory, estimated from the image header before decoding.

`estimate` reads only the header (size, mode) and plans the tiles the request would get. A request
that could never fit (more work than `max_request_work` tile-steps, or more memory than the whole
budget, or more time than its deadline even on an idle server) is refused with 413 and a message saying the
limit and how to get under it; one that only today's load would make late gets 503 with Retry-After. `MemoryBudget`
counts the estimated bytes of the requests admitted and not yet finished; a request that does not fit
next to them gets 503 queue_full with Retry-After.
"""

from __future__ import annotations

import asyncio
import io
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from PIL import Image

from model.config import ModelConfig
from model.imaging import INPUT_FORMATS, ImageTooLargeError, check_frames
from model.upscale import Upscaler
from service.errors import Cancelled, ImageTooLarge, QueueFull

MB = 1024 * 1024
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # decoded with 16 bits a sample (`model.imaging.DecodedImage`)


@dataclass(frozen=True)
class Cost:
    width: int
    height: int
    tiles: int  # every member's of a self-ensemble
    steps: int
    memory: int  # bytes
    ensemble: int = 1
    gray: bool = False
    alpha: bool = False
    wide: bool = False  # 16 bits a sample: a grey one without alpha stays 16-bit in a PNG

    @property
    def work(self) -> int:
        """Tile-steps: every tile is encoded once and stepped `steps` times."""
        return self.tiles * max(1, self.steps)

    def result_bytes(self, scale: int, fmt: str = "png") -> int:
        """The output's uncompressed size in `fmt`, as `service.pipeline` writes it: grey or RGB, plus alpha except
        in JPEG, 16 bits a sample for a 16-bit grey image without alpha in PNG, else 8."""
        channels = (1 if self.gray else 3) + (1 if self.alpha and fmt != "jpeg" else 0)
        sample = 2 if self.wide and self.gray and not self.alpha and fmt == "png" else 1
        return self.width * self.height * scale * scale * channels * sample


def probe(data: bytes, max_pixels: int | None = None) -> tuple[int, int, str, bool] | None:
    """(width, height, mode, has_alpha) from the header alone, for the formats decoding accepts; None if Pillow
    cannot tell. An icon holding an image over `max_pixels` raises ImageTooLargeError first (Pillow decodes an
    icon's largest frame to open it), a truncated icon directory ImageDecodeError. Blocking: call it off the event
    loop."""
    check_frames(data, max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as img:
            alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
            return img.width, img.height, img.mode, alpha
    except Exception:
        return None  # decoding reports it properly


def estimate(upscaler: Upscaler, data: bytes, steps: int, ensemble: int = 1,
             max_pixels: int | None = None) -> Cost | None:
    """The request's tiles and peak bytes (upload, decoded image, canvas, encoding, active tiles); a self-ensemble
    of `ensemble` members has that many times the tiles, canvases and float rows. A header over `max_pixels` is
    ImageTooLargeError at once (planning the tiles of a 150-megapixel claim took 8 s)."""
    head = probe(data, max_pixels)
    if head is None:
        return None
    w, h, mode, alpha = head
    if max_pixels is not None and w * h > max_pixels:  # before planning: a plan's work grows with the claimed size
        raise ImageTooLargeError(f"image is {w}x{h} = {w * h:,} pixels; the limit (SAMDIFFSR_MAX_PIXELS) is "
                                 f"{max_pixels:,}")
    cfg = upscaler.runtime.config
    s = cfg.scale
    # EXIF may turn the image: plan both ways, count the larger.
    grids = [upscaler.plan(h, w), upscaler.plan(w, h)]
    grid = max(grids, key=len)
    gray = mode in GRAY_MODES
    lr_px, hr_px = w * h, w * h * s * s
    th, tw = grid.tile_shape
    memory = (
        len(data)
        + lr_px * (12 + 4 + (4 if alpha else 0))  # float RGB, Pillow's decoded copy, alpha
        + hr_px * (ensemble * (2 if gray else 3) + (1 if gray else 4) + (2 if gray else 3))  # canvases, copy, output
        + (hr_px * 4 * 3 * 2 if ensemble > 1 else 0)  # their float sum and one member's float copy
        + (hr_px * 5 if alpha else 0)  # upscaled alpha, float then 8-bit
        + ensemble * 3 * th * s * grid.padded_width * s * 16  # float rows being blended
        + min(len(grid) * ensemble, upscaler.max_batch * 2) * active_tile_bytes(cfg, th, tw)
    )
    return Cost(w, h, len(grid) * ensemble, steps, memory, ensemble, gray, alpha, mode in WIDE_MODES)


def active_tile_bytes(cfg: ModelConfig, th: int, tw: int) -> int:
    """One LR tile in flight: four float32 RGB images at the output size (the track's x, its base, up(LR), the
    result) and the condition the encoder returns for it (`ModelConfig.cond_shape`: at the output size for the
    original U-Net, 16 times smaller for the LR-space one)."""
    c, h, w = cfg.cond_shape(th, tw)
    return 4 * (4 * 3 * th * tw * cfg.scale**2 + c * h * w)


def check_limits(cost: Cost, max_work: int, budget_bytes: int) -> None:
    """413 for a request that can never fit, saying the limit and how to get under it: work, then memory (the
    pixel limit, the one a user knows, `estimate` has checked from the header before planning)."""
    if cost.work > max_work:
        fewer = max_work // cost.tiles - (1 if max_work // cost.tiles >= 1 else 0)
        steps_hint = f"use steps <= {fewer}, or " if fewer >= 1 and cost.steps > fewer else ""
        if cost.ensemble > 1:
            steps_hint = f"use a smaller ensemble (this one has {cost.ensemble} members), or " + steps_hint
        px = int(cost.width * cost.height * max_work / cost.work)
        raise ImageTooLarge(
            f"this request needs {cost.tiles:,} tiles x {max(1, cost.steps)} steps = {cost.work:,} tile-steps; the "
            f"limit (SAMDIFFSR_MAX_REQUEST_WORK) is {max_work:,}: {steps_hint}send a smaller image (about "
            f"{px:,} pixels or fewer at these steps)")
    if cost.memory > budget_bytes:
        px = int(cost.width * cost.height * budget_bytes / cost.memory)
        raise ImageTooLarge(
            f"this {cost.width}x{cost.height} image needs about {cost.memory / MB:,.0f} MiB to upscale; the limit "
            f"(SAMDIFFSR_MEMORY_BUDGET_MB) is {budget_bytes / MB:,.0f} MiB: send an image of about {px:,} pixels "
            "or fewer")


def check_time(cost: Cost, pace: Pace, left_s: float, backlog_s: float = 0.0, retry_after_s: int = 1,
               job_timeout_s: float | None = None) -> None:
    """Refuse a request that would miss its deadline, by its tile-steps at the model's pace (`Pace`):

    - 413 when even an idle server could not make it (its work at the best pace seen): no retry helps; the message
      points to the jobs API where its longer deadline (`job_timeout_s`, None: not offered) would do;
    - 503 with Retry-After when only today's load is the cause: the work queued ahead (`backlog_s`) or a slower
      recent pace (other work on the machine). Retry-After: the seconds until the backlog has drained enough."""
    idle = cost.work * pace.idle_s
    if idle > left_s:
        jobs = (f", or the jobs API (POST /v1/jobs, whose deadline SAMDIFFSR_JOB_TIMEOUT_S is {job_timeout_s:,.0f} s)"
                if job_timeout_s is not None and idle <= job_timeout_s else "")
        raise ImageTooLarge(f"this request needs {cost.work:,} tile-steps, at least {idle:,.1f} s even with this "
                            f"server idle, and its deadline (SAMDIFFSR_REQUEST_TIMEOUT_S) leaves {left_s:,.1f} s: use "
                            f"fewer steps or a smaller image{jobs}")
    loaded = cost.work * pace.recent_s + backlog_s
    if loaded > left_s:
        wait = max(retry_after_s, math.ceil(loaded - left_s))
        raise QueueFull(f"the server is busy: with the work queued ahead ({backlog_s:,.1f} s) this request would "
                        f"take about {loaded:,.1f} s, and its deadline leaves {left_s:,.1f} s; retry in {wait} s",
                        retry_after_s=wait)


@dataclass(frozen=True)
class Pace:
    """Seconds per tile-step of a model: the best seen since start (an idle server's), and the best of the recent
    denoiser calls (today's)."""

    idle_s: float
    recent_s: float


def check_result_size(cost: Cost, scale: int, max_bytes: int, fmt: str = "png") -> None:
    """413 when the output's uncompressed pixels in `fmt` (`Cost.result_bytes`: its channels and bytes a sample) are
    more than `max_bytes`, the job store's size (SAMDIFFSR_JOB_STORE_MAX_BYTES): such a result would most likely not
    fit, so the job is refused before any work instead of failing after it."""
    raw = cost.result_bytes(scale, fmt)
    if raw > max_bytes:
        raise ImageTooLarge(f"this {cost.width}x{cost.height} image's result is {raw:,} bytes uncompressed; the job "
                            f"store keeps results up to {max_bytes:,} bytes (SAMDIFFSR_JOB_STORE_MAX_BYTES): use "
                            "POST /v1/upscale, or a smaller image")


class MemoryBudget:
    """The server-wide memory budget: estimated bytes of admitted, unfinished requests, and a line of requests
    waiting for room.

    The rule (`grant`): requests are admitted in arrival order. One that fits next to the requests in progress
    (or finds none in progress) is admitted when every request that came before it was; nobody overtakes the
    head of the line, so a large request that fits alone waits only for the requests already admitted to finish,
    instead of losing every race to a stream of small ones. At most `max_waiting` requests wait."""

    def __init__(self, limit_bytes: int, retry_after_s: int = 2, max_waiting: int = 32) -> None:
        self.limit = limit_bytes
        self.retry_after_s = retry_after_s
        self.max_waiting = max_waiting
        self.used = 0
        self._line: list[Ticket] = []
        self._lock = threading.Lock()

    def _full(self, nbytes: int) -> QueueFull:
        return QueueFull(f"the server's memory budget is taken by the requests in progress ({self.used / MB:,.0f} "
                         f"of {self.limit / MB:,.0f} MiB, {len(self._line)} waiting); retry later",
                         retry_after_s=self.retry_after_s)

    def acquire(self, nbytes: int) -> Reservation:
        """Reserve `nbytes` now, or QueueFull (503) when they do not fit or others are waiting."""
        ticket = self.enqueue(nbytes)
        try:
            granted = self.grant(ticket)
            if granted is None:
                with self._lock:
                    raise self._full(nbytes)
            return granted
        finally:
            self.leave(ticket)

    async def acquire_waiting(self, nbytes: int, wait_s: float, poll_s: float = 0.02,
                              gone: Callable[[], Awaitable[bool]] | None = None) -> Reservation:
        """Reserve `nbytes`, waiting in line up to `wait_s` seconds for room; then QueueFull (503). `gone` (e.g. a
        request's `is_disconnected`) is asked at every poll: once it says the client has gone, the request leaves
        the line at once with Cancelled (499), so nobody behind it waits for it."""
        ticket = self.enqueue(nbytes)
        deadline = time.monotonic() + wait_s
        try:
            while (granted := self.grant(ticket)) is None:
                if gone is not None and await gone():
                    raise Cancelled("the client disconnected while waiting for room in the memory budget")
                if time.monotonic() >= deadline:
                    with self._lock:
                        raise self._full(nbytes)
                await asyncio.sleep(poll_s)
            return granted
        finally:
            self.leave(ticket)

    def enqueue(self, nbytes: int) -> Ticket:
        """Join the line; QueueFull when `max_waiting` requests already wait."""
        with self._lock:
            if len(self._line) >= self.max_waiting:
                raise self._full(nbytes)
            ticket = Ticket(nbytes)
            self._line.append(ticket)
            return ticket

    def grant(self, ticket: Ticket) -> Reservation | None:
        """The reservation if `ticket` heads the line and fits (see the class doc); else None."""
        with self._lock:
            if not self._line or self._line[0] is not ticket:
                return None
            if self.used and self.used + ticket.nbytes > self.limit:
                return None
            self._line.pop(0)
            self.used += ticket.nbytes
        return Reservation(self, ticket.nbytes)

    def leave(self, ticket: Ticket) -> None:
        """Leave the line (a no-op once granted)."""
        with self._lock:
            if ticket in self._line:
                self._line.remove(ticket)

    @property
    def waiting(self) -> int:
        return len(self._line)


@dataclass(eq=False)
class Ticket:
    """A place in the budget's line."""

    nbytes: int


class Reservation:
    """Bytes held in a MemoryBudget until `release` (idempotent)."""

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self.budget, self.nbytes = budget, nbytes
        self._held = True

    def release(self, *_: object) -> None:
        with self.budget._lock:
            if self._held:
                self._held = False
                self.budget.used -= self.nbytes
