"""`POST /v1/upscale`: an image in, the image at 4x out, in one request."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from model.imaging import MEDIA_TYPES
from service import deps, intake, results
from service.errors import openapi_errors
from service.intake import Door

router = APIRouter(tags=["upscale"])


@router.post(
    "/v1/upscale", response_class=Response, openapi_extra=intake.upscale_openapi(query=True),
    responses={200: {"content": {m: {} for m in MEDIA_TYPES.values()}, "description": (
        "The image at exactly 4x. Headers: Content-Disposition (a file name: the upload's stem + _x4), "
        "X-Request-Id, X-Model (the model that answered), X-Seed (the seed "
        "used), X-Steps, X-Sampler, X-Tiles, X-Image-Size (WxH), X-Denoiser-Calls / X-Shared-Calls "
        "(denoiser calls that advanced this request / also advanced others), Server-Timing (decode, queue, "
        "sample, encode, total, in ms).")},
        **openapi_errors(400, 401, 404, 408, 413, 415, 422, 500, 503, 504)},
)
async def upscale(request: Request, door: Annotated[Door, Depends(deps.door)]) -> Response:
    """Upscale an image x4: multipart field `image` (`curl -F image=@photo.jpg`) or the raw image as
    the body (`Content-Type: image/...`). Any mode Pillow reads: grayscale, RGBA (alpha kept),
    palette, 16-bit, EXIF-rotated; the output keeps the mode where the format allows."""
    accepted = await intake.accept(door, request, None, door.settings.request_timeout_s)  # form over query
    assert door.engine is not None
    sr = await results.wait_result(accepted, request.is_disconnected, door.engine.cancel)
    t_sampled = time.perf_counter()
    out, body = await run_in_threadpool(results.render, accepted, sr, door.metrics)
    t_end = time.perf_counter()
    p, sub = accepted.params, accepted.submission
    headers = results.result_headers(p, sub.n_tiles, (out.width, out.height),
                                     results.result_filename(p.upload_name, p.fmt))
    headers |= {"X-Denoiser-Calls": str(sub.calls), "X-Shared-Calls": str(sub.shared_calls),
                "Server-Timing": results.server_timing(accepted, t_sampled, t_end)}
    return Response(body, media_type=MEDIA_TYPES[p.fmt], headers=headers)
