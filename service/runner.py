"""The model runner: turns the tiles a `StepPlan` names into outputs, and nothing else.

It owns the runtimes (one per served model) and the work done with them: encoding admitted tiles (in chunks,
padded with zero tiles where the plan asks, so that a call's batch size never depends on its company),
advancing tracks with one denoiser call per plan, checking that every call returns one result per input, and
isolating failures: an accelerator out-of-memory error is reported for the scheduler to halve its batch limit,
any other error in a shared call is retried submission by submission so that only the faulty ones fail.
What to run and when is the scheduler's (`service.scheduler`); the loop that asks it is the engine's
(`service.batcher`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from model.runtime import Runtime
from model.sampler import Track, start_tracks, step_tracks, track_images
from service.errors import WorkerError
from service.metrics import Metrics
from service.scheduler import Item, StepPlan, StepResult
from service.submission import Submission

log = logging.getLogger(__name__)

_ORT_OOM = re.compile(r"Failed to allocate memory|out of memory|BFCArena|smaller than requested bytes",
                      re.IGNORECASE)

CallTimer = Callable[[str, float, int], None]  # (model, seconds, tiles) of each successful denoiser call


def is_out_of_memory(err: BaseException) -> bool:
    """torch's accelerator OOM, or an ONNX Runtime allocation failure."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return type(err).__module__.startswith("onnxruntime") and bool(_ORT_OOM.search(str(err)))


class ModelRunner:
    """Encoder and denoiser calls for the engine's plans (the worker thread only)."""

    def __init__(self, runtimes: Mapping[str, Runtime], metrics: Metrics, on_call: CallTimer) -> None:
        self.runtimes = dict(runtimes)
        self.metrics = metrics
        self.on_call = on_call
        self._padding: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        """Encode what `plan` admits, then advance what it steps in one denoiser call."""
        result = StepResult()
        by_group: dict[tuple, list[tuple[Submission, list[int]]]] = defaultdict(list)
        for sub, idx in plan.encode:
            by_group[sub.group].append((sub, idx))  # type: ignore[arg-type]
        for group in by_group.values():
            self._encode(group, plan.encode_chunk, plan.pad_encode, result)
        items = [(sub, i) for sub, i in plan.step if i in sub.tracks]  # type: ignore[attr-defined]
        if items:  # an encode may have failed
            self._step(items, plan.pad_to, result)
        return result

    # ------------------------------------------------------------------ the encoder

    def _encode(self, group: list[tuple[Submission, list[int]]], chunk: int, pad: bool, result: StepResult) -> None:
        """Encode the admitted tiles of `group` (submissions of one model and tile shape) together, `chunk` tiles
        per call, so that many submissions admitting a few tiles each still make full calls; where every one of
        them asks for `steps=0`, only the encoder's image is made. A failure that is not out-of-memory is retried
        submission by submission, so only the faulty ones fail."""
        rt = self.runtimes[group[0][0].model]
        image_only = all(sub.steps == 0 for sub, _ in group)
        try:
            inputs = [sub.tiles.inputs(idx) for sub, idx in group]
            lr = torch.cat([tiles for tiles, _ in inputs])
            parts = [self._encode_call(rt, lr[s:s + chunk], chunk if pad else 0, image_only)
                     for s in range(0, len(lr), chunk)]
            sr = torch.cat([r for _, r in parts])
            cond = None if image_only else torch.cat([c for c, _ in parts if c is not None])
            _check_count("encoder", len(lr), sr, *([] if cond is None else [cond]))
        except Exception as e:
            if is_out_of_memory(e):
                self._out_of_memory()
                result.encode_oom.extend(group)
            elif len(group) > 1:
                for one in group:
                    self._encode([one], chunk, pad, result)
            else:
                sub = group[0][0]
                log.error("encoder failed for request %s: %r", sub.request_id, e)
                result.failed.append((sub, WorkerError(f"encoder failed: {type(e).__name__}: {e}")))
            return
        start = 0
        for (sub, idx), (_, up) in zip(group, inputs, strict=True):
            own = slice(start, start + len(idx))
            start += len(idx)
            if sub.steps == 0:  # the encoder's image is the answer
                for i, img in zip(idx, sr[own], strict=True):
                    sub.put(i, img)
            else:
                assert cond is not None
                sub.tracks.update(zip(idx, start_tracks(rt.config, cond[own], sr[own], up, idx, sub.steps,
                                                        sub.sampler, sub.eta, sub.seed), strict=True))
            result.encoded.append((sub, idx))

    @staticmethod
    def _encode_call(rt: Runtime, lr: Tensor, pad_to: int, image_only: bool) -> tuple[Tensor | None, Tensor]:
        """The runtime's encoder (its image alone where `image_only`), padded with zero tiles to `pad_to` samples
        (0: not padded)."""
        n = lr.shape[0]
        if n < pad_to:
            lr = torch.cat([lr, lr.new_zeros((pad_to - n, *lr.shape[1:]))])
        if image_only:
            return None, rt.encode_image(lr)[:n]
        cond, sr = rt.encode(lr)
        return cond[:n], sr[:n]

    # ------------------------------------------------------------------ the denoiser

    def _step(self, items: list[Item], pad_to: int | None, result: StepResult) -> None:
        model = items[0][0].model
        tracks = [sub.tracks[i] for sub, i in items]  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        try:
            self._call(model, tracks, pad_to)
        except Exception as e:
            if is_out_of_memory(e):
                self._out_of_memory()
                result.step_oom = len(items)
            else:
                self._isolate(items, pad_to, e, result)
            return
        self.on_call(model, time.perf_counter() - t0, len(items))
        self._advanced(items, result)

    def _call(self, model: str, tracks: list[Track], pad_to: int | None) -> None:
        rt = self.runtimes[model]
        step_tracks(lambda x, t, c: self._denoise(rt, x, t, c, pad_to), rt.schedule, tracks, rt.config.prediction)

    def _denoise(self, rt: Runtime, x: Tensor, t: Tensor, cond: Tensor, pad_to: int | None) -> Tensor:
        """The runtime's denoiser, padded to `pad_to` samples; checks one output per input."""
        n = x.shape[0]
        if pad_to is None or n >= pad_to:
            out = rt.denoise(x, t, cond)
        else:
            key = (pad_to - n, tuple(x.shape[1:]), tuple(cond.shape[1:]), x.device, x.dtype, id(rt))
            if key not in self._padding:
                self._padding.clear()
                self._padding[key] = (x.new_zeros((pad_to - n, *x.shape[1:])), t.new_zeros((pad_to - n,)),
                                      cond.new_zeros((pad_to - n, *cond.shape[1:])))
            px, pt, pc = self._padding[key]
            out = rt.denoise(torch.cat([x, px]), torch.cat([t, pt]), torch.cat([cond, pc]))[:n]
        _check_count("denoiser", n, out)
        return out

    def _advanced(self, items: list[Item], result: StepResult) -> None:
        """One successful call advanced `items`: count the steps, hand finished tiles to their submissions."""
        result.calls.append(items)
        for sub, _ in items:
            sub.steps_done += 1  # type: ignore[attr-defined]
        done = [(sub, i) for sub, i in items if sub.tracks[i].done]  # type: ignore[attr-defined]
        if not done:
            return
        cfg = self.runtimes[items[0][0].model].config
        images = track_images([sub.tracks.pop(i) for sub, i in done], cfg, cpu=False)  # type: ignore
        for (sub, i), img in zip(done, images, strict=True):
            sub.put(i, img)  # type: ignore[attr-defined]

    def _isolate(self, items: list[Item], pad_to: int | None, err: Exception, result: StepResult) -> None:
        """A non-OOM error in a shared call: retry each submission alone so only the faulty ones fail."""
        by_sub: dict[Any, list[Item]] = defaultdict(list)
        for item in items:
            by_sub[item[0]].append(item)
        if len(by_sub) == 1:
            sub = items[0][0]
            log.error("denoiser failed for request %s: %r", sub.request_id, err)
            result.failed.append((sub, WorkerError(f"denoiser failed: {type(err).__name__}: {err}")))
            return
        for sub, own in by_sub.items():
            try:
                self._call(sub.model, [sub.tracks[i] for _, i in own], pad_to)
            except Exception as e:
                log.error("denoiser failed for request %s: %r", sub.request_id, e)
                result.failed.append((sub, WorkerError(f"denoiser failed: {type(e).__name__}: {e}")))
                continue
            self._advanced(own, result)

    def _out_of_memory(self) -> None:
        self.metrics.error("oom")
        self._padding.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("out of accelerator memory")


def _check_count(what: str, n: int, *outputs: Tensor) -> None:
    """Every model call returns one result per input (a wrong count would mix up requests)."""
    for out in outputs:
        if out.shape[0] != n:
            raise RuntimeError(f"{what} returned {out.shape[0]} results for {n} inputs")
