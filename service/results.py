"""An accepted upscale's answer: waiting for the engine, rendering the image, naming it and its headers.

Shared by `POST /v1/upscale` (which waits while the client is connected) and the jobs API (whose store renders
a finished job's image): one renderer, one file name, one set of result headers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

from torch import Tensor

from model.imaging import DecodedImage, encode_image
from service import pipeline
from service.errors import Cancelled, DeadlineExceeded
from service.intake import Accepted, Resolved
from service.metrics import Metrics
from service.submission import Submission

Cancel = Callable[[Submission, str], None]


async def wait_result(accepted: Accepted, disconnected: Callable[[], Awaitable[bool]],
                      cancel: Cancel) -> Tensor | pipeline.Canvas:
    """The engine's answer to `accepted`; the submission is cancelled if the client disconnects, the deadline
    passes or the waiting handler ends otherwise."""
    sub = accepted.submission
    fut = asyncio.wrap_future(sub.future)
    try:
        while True:
            left = accepted.deadline - time.monotonic()
            if left <= 0:
                cancel(sub, "deadline passed")
                raise DeadlineExceeded("the request's deadline passed before it finished")
            done, _ = await asyncio.wait({fut}, timeout=min(0.2, left))
            if done:
                return fut.result()
            if await disconnected():
                cancel(sub, "client disconnected")
                raise Cancelled("the client disconnected")
    except BaseException:
        cancel(sub, "request handler ended")  # a no-op once the submission is finished
        raise
    finally:
        fut.cancel()  # no-op when done; else nobody is left to read its result


def render(accepted: Accepted, result: Tensor | pipeline.Canvas,
           metrics: Metrics) -> tuple[DecodedImage | pipeline.Canvas, bytes]:
    """The engine's answer (the image's canvas, or SR tiles) -> the upscaled image (`.width`, `.height`) and its
    encoded bytes (blocking: run it in a thread)."""
    p = accepted.params
    out: DecodedImage | pipeline.Canvas
    if isinstance(result, pipeline.Canvas):
        out, body = result, pipeline.encode_canvas(result, accepted.prep.image, p.fmt, p.quality)
    else:
        out = pipeline.finish(p.model.upscaler, accepted.prep, result)
        body = encode_image(out, p.fmt, p.quality)
    metrics.images.labels(model=p.model.id).inc()
    metrics.output_megapixels.labels(model=p.model.id).inc(out.width * out.height / 1e6)
    return out, body


def render_bicubic(accepted: Accepted) -> bytes:
    """The plain bicubic x4 of the input (the model's starting point), encoded as the result is."""
    p, prep = accepted.params, accepted.prep
    return encode_image(pipeline.finish(p.model.upscaler, prep, prep.up_tiles), p.fmt, p.quality)


def result_filename(upload_name: str | None, fmt: str, fallback: str = "image") -> str:
    """The result's file name: the upload's stem (letters, digits, '.', '_', '-' kept) + `_x4` + the format's
    extension (`photo.jpg` -> `photo_x4.png`); `fallback` where the upload had no usable name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", (upload_name or "").rsplit("/", 1)[-1].rsplit("\\", 1)[-1])
    stem = stem.rsplit(".", 1)[0].strip("._")[:100] or fallback
    return f"{stem}_x4.{'jpg' if fmt == 'jpeg' else fmt}"


def result_headers(p: Resolved, tiles: int, size: tuple[int, int], filename: str) -> dict[str, str]:
    """The headers of a result image: how it was made, its size, and its file name (shown in place)."""
    return {"X-Model": p.model.id, "X-Seed": str(p.seed), "X-Steps": str(p.steps), "X-Sampler": p.sampler,
            "X-Ensemble": str(p.ensemble), "X-Tiles": str(tiles), "X-Image-Size": f"{size[0]}x{size[1]}",
            "Content-Disposition": f'inline; filename="{filename}"'}


def server_timing(accepted: Accepted, t_sampled: float, t_end: float) -> str:
    """The Server-Timing header of a synchronous upscale: decode, queue, sample, encode and total, in ms."""
    sub = accepted.submission
    queue_s = (sub.started or sub.submitted) - sub.submitted
    timing = {"decode": accepted.t_decoded - accepted.t_start, "queue": queue_s,
              "sample": t_sampled - accepted.t_decoded - queue_s, "encode": t_end - t_sampled,
              "total": t_end - accepted.t_start}
    return ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in timing.items())
