"""The batching worker alone, on the real tiny runtime (small tiles, few steps)."""

from __future__ import annotations

import time
from concurrent.futures import wait
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.checkpoint import save_random_checkpoint
from model.config import PRESETS
from model.imaging import decode_image
from model.inputs import lr_inputs
from model.runtime import load_runtime
from model.upscale import Upscaler
from service import pipeline
from service.batcher import Batcher, SchedulerConfig
from service.errors import Cancelled, DeadlineExceeded, OutOfMemory, QueueFull, ShuttingDown, WorkerError
from service.metrics import Metrics
from service.submission import Submission

TILE = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors on a shared 2-core machine: one intra-op thread is much faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runtime(tiny_checkpoint):
    return load_runtime(tiny_checkpoint, "torch", "cpu")


@pytest.fixture(scope="module")
def image(photo):
    img = decode_image(photo)
    return replace(img, rgb=np.ascontiguousarray(img.rgb[40:70, 60:100]))  # 30 x 40 -> 9 tiles of 16


def tiles(n: int, value: float | None = None, seed: int = 0) -> torch.Tensor:
    if value is not None:
        return torch.full((n, 3, TILE, TILE), value)
    return torch.rand((n, 3, TILE, TILE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def up(lr: torch.Tensor) -> torch.Tensor:
    """Bicubic up(LR) tiles, as `Upscaler.prepare` makes them."""
    return lr_inputs((lr + 1) / 2, PRESETS["tiny"])[1]


def with_up(lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lr, up(lr)


def started(job: Submission, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while job.calls == 0 and not job.future.done():
        assert time.monotonic() < end, "job did not start"
        time.sleep(0.002)


class make_batcher:
    def __init__(self, runtime, **kw) -> None:
        self.metrics = Metrics()
        self.b = Batcher(runtime, SchedulerConfig(**{"max_batch_tiles": 4, "max_wait_s": 0.0, **kw}), self.metrics)

    def __enter__(self) -> Batcher:
        self.b.start()
        return self.b

    def __exit__(self, *exc: object) -> None:
        self.b.stop()


def metric(m: Metrics, name: str, labels: dict | None = None) -> float:
    """The sum of `name`'s samples whose labels include `labels` (e.g. over every model)."""
    want = set((labels or {}).items())
    return sum(s.value for fam in m.registry.collect() for s in fam.samples
               if s.name == name and want <= set(s.labels.items()))


def test_matches_upscaler(runtime, image):
    """prepare -> batcher -> finish gives what model.upscale.Upscaler gives (same seeds per tile)."""
    up = Upscaler(runtime, tile=TILE, overlap=4, max_batch=4)
    prep = pipeline.prepare(up, image)
    assert len(prep.grid) == 9
    with make_batcher(runtime) as b:
        sr = b.submit(prep.lr_tiles, prep.up_tiles, steps=3, seed=11).future.result(60)
    out = pipeline.finish(up, prep, sr)
    ref = up.upscale(image, steps=3, seed=11)
    assert out.rgb.shape == (120, 160, 3)
    np.testing.assert_allclose(out.rgb, ref.rgb, atol=1e-4)


@pytest.mark.parametrize("base", ["bicubic", "rrdb"])
def test_image_tiles_match_upscaler_and_skip_unused_up(base, image, tmp_path):
    """Tiles made on demand and blended into the canvas give the Upscaler's pixels; bicubic up(LR) is made
    only for a model whose residual base is bicubic."""
    cfg = replace(PRESETS["tiny"], residual_base=base, prediction="sample")
    rt = load_runtime(save_random_checkpoint(tmp_path / base, cfg, "tiny-" + base), "torch", "cpu")
    up = Upscaler(rt, tile=TILE, overlap=4, max_batch=4)
    prep = pipeline.prepare(up, image)
    tiles = prep.tiles()
    assert (tiles.inputs([0, 1])[1] is None) == (base == "rrdb")
    assert (up.prepare(image.rgb)[2] is None) == (base == "rrdb")
    assert prep.up_tiles.shape == (9, 3, 4 * TILE, 4 * TILE)  # the bicubic comparison still has it
    with make_batcher(rt) as b:
        canvas = b.submit_tiles(tiles, steps=2, seed=5).future.result(60)
    ref = np.round(up.upscale(image, steps=2, seed=5).rgb * 255)
    assert np.abs(canvas.pixels.astype(float) - ref).max() <= 1


def test_zero_steps_is_the_encoder_output_without_denoiser_calls(runtime, image):
    """steps=0 (the fidelity mode): the job completes after encoding, with no denoiser call."""
    up = Upscaler(runtime, tile=TILE, overlap=4, max_batch=4)
    prep = pipeline.prepare(up, image)
    with make_batcher(runtime) as b:
        job = b.submit(prep.lr_tiles, prep.up_tiles, steps=0)
        sr = job.future.result(60)
        assert job.calls == 0 and metric(b.metrics, "samdiffsr_batch_tiles_count") == 0
    out = pipeline.finish(up, prep, sr)
    np.testing.assert_allclose(out.rgb, up.upscale(image, steps=0).rgb, atol=1e-5)


@pytest.mark.parametrize("batch, chunk", [(4, 1), (16, 2)])  # encoder calls of 1 tile; of 2, padded
def test_same_seed_identical_alone_and_under_load(runtime, batch, chunk):
    """Reproducible mode: bit-identical residuals whatever the job was batched with."""
    lr = tiles(5, seed=1)
    with make_batcher(runtime, reproducible=True, max_batch_tiles=batch) as b:
        assert b.scheduler.encode_chunk() == chunk
        alone = b.submit(lr, up(lr), steps=4, seed=7).future.result(60)
        others = [b.submit(*with_up(tiles(n, seed=10 + n)), steps=s, seed=n, sampler="ddpm")
                  for n, s in ((3, 5), (1, 2), (6, 3))]
        loaded = b.submit(lr, up(lr), steps=4, seed=7)
        more = b.submit(*with_up(tiles(2, seed=3)), steps=6, seed=1)
        wait([j.future for j in [*others, loaded, more]], timeout=120)
        assert loaded.shared_calls > 0  # it really was batched with other jobs
        assert torch.equal(loaded.future.result(), alone)
        # A different seed gives a different result.
        other_seed = b.submit(lr, up(lr), steps=4, seed=8).future.result(60)
        assert not torch.equal(other_seed, alone)


def test_late_request_joins_running_batch_and_finishes_first(runtime):
    with make_batcher(runtime) as b:
        big = b.submit(*with_up(tiles(12)), steps=8, seed=0)
        started(big)
        small = b.submit(*with_up(tiles(1)), steps=2, seed=0)
        small.future.result(60)
        assert not big.future.done(), "the small request waited for the big one"
        assert small.calls == 2  # stepped in every call from its arrival on (fair share)
        assert small.shared_calls == 2  # ... in calls shared with the big request
        big.future.result(60)
    assert metric(b.metrics, "samdiffsr_batch_tiles_count") == big.calls + small.calls - small.shared_calls
    assert metric(b.metrics, "samdiffsr_tiles_in_flight") == 0


def test_one_request_at_a_time_when_continuous_batching_is_off(runtime):
    with make_batcher(runtime, continuous=False) as b:
        big = b.submit(*with_up(tiles(6)), steps=3, seed=0)
        started(big)
        small = b.submit(*with_up(tiles(1)), steps=2, seed=0)
        small.future.result(60)
        assert big.future.done()
        assert small.shared_calls == 0 and big.shared_calls == 0
        assert big.calls == 2 * 3  # 6 tiles in batches of 4: two rounds of 3 steps


def test_large_request_does_not_starve_small_ones(runtime):
    with make_batcher(runtime, max_batch_tiles=4, max_active_tiles=8) as b:
        big = b.submit(*with_up(tiles(40)), steps=3, seed=0)
        started(big)
        smalls = [b.submit(*with_up(tiles(1, seed=i)), steps=3, seed=i) for i in range(3)]
        for s in smalls:
            s.future.result(60)
            assert s.calls <= 3 + 2  # at most a couple of calls without it, never the big job's 30
        assert not big.future.done()
        big.future.result(120)


def test_cancel_and_deadline_drop_jobs(runtime):
    with make_batcher(runtime) as b:
        job = b.submit(*with_up(tiles(8)), steps=50, seed=0)
        started(job)
        job.cancel("client disconnected")
        with pytest.raises(Cancelled, match="client disconnected"):
            job.future.result(30)
        late = b.submit(*with_up(tiles(2)), steps=50, seed=0, deadline=time.monotonic() + 0.05)
        with pytest.raises(DeadlineExceeded):
            late.future.result(30)
        ok = b.submit(*with_up(tiles(1)), steps=2, seed=0).future.result(30)  # the worker goes on
        assert ok.shape == (1, 3, 4 * TILE, 4 * TILE)
    assert metric(b.metrics, "samdiffsr_tiles_in_flight") == 0
    assert metric(b.metrics, "samdiffsr_queue_depth") == 0


def test_queue_limit_and_shutdown(runtime):
    with make_batcher(runtime, max_queue=1, retry_after_s=3) as b:
        first = b.submit(*with_up(tiles(4)), steps=30, seed=0)
        with pytest.raises(QueueFull) as err:
            b.submit(*with_up(tiles(1)), steps=2)
        assert err.value.headers["Retry-After"] == "3"
        assert not b.drain(timeout=0.01)  # still running; no longer accepting
        with pytest.raises(ShuttingDown):
            b.submit(*with_up(tiles(1)), steps=2)
    with pytest.raises(ShuttingDown):  # stop() fails what is unfinished
        first.future.result(10)


def test_drain_waits_for_jobs_in_flight(runtime):
    with make_batcher(runtime) as b:
        job = b.submit(*with_up(tiles(2)), steps=3, seed=0)
        assert b.drain(timeout=60)
        assert job.future.result(0).shape[0] == 2


class FaultyRuntime:
    """The real runtime with injected faults: OOM above a batch size, errors on marked inputs."""

    def __init__(self, rt, oom_above: int | None = None) -> None:
        self.rt, self.oom_above = rt, oom_above
        self.batch_sizes: list[int] = []
        self.config, self.schedule, self.info = rt.config, rt.schedule, rt.info
        self.backend, self.device = rt.backend, rt.device

    def encode(self, img_lr):
        if (img_lr > 1.5).any():
            raise ValueError("encoder fault")
        return self.rt.encode(img_lr)

    def encode_image(self, img_lr):
        if (img_lr > 1.5).any():
            raise ValueError("encoder fault")
        return self.rt.encode_image(img_lr)

    def denoise(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if torch.isnan(cond).any():
            raise RuntimeError("denoiser fault")
        return self.rt.denoise(x, t, cond)


def test_out_of_memory_halves_the_batch_and_retries(runtime):
    faulty = FaultyRuntime(runtime, oom_above=2)
    lr = tiles(4, seed=2)
    with make_batcher(faulty, reproducible=False) as b:
        out = b.submit(lr, up(lr), steps=3, seed=5).future.result(60)
        assert b.batch_limit == 2
    assert metric(b.metrics, "samdiffsr_errors_total", {"kind": "oom"}) == 1
    assert faulty.batch_sizes[0] == 4 and max(faulty.batch_sizes[1:]) == 2
    with make_batcher(runtime, reproducible=False) as b:
        ref = b.submit(lr, up(lr), steps=3, seed=5).future.result(60)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)  # batch-size rounding only

    with make_batcher(FaultyRuntime(runtime, oom_above=0)) as b:  # even one tile does not fit
        with pytest.raises(OutOfMemory):
            b.submit(*with_up(tiles(1)), steps=2).future.result(60)
        assert b.alive


def test_worker_errors_fail_only_the_affected_requests(runtime):
    faulty = FaultyRuntime(runtime)
    with make_batcher(faulty) as b:
        good = b.submit(*with_up(tiles(3)), steps=3, seed=0)
        bad_encode = b.submit(*with_up(tiles(1, value=2.0)), steps=3)
        nan = tiles(2)
        nan[1, 0, 0, 0] = float("nan")  # poisons its condition: the denoiser raises on it
        bad_denoise = b.submit(nan, up(nan), steps=3)
        with pytest.raises(WorkerError, match="encoder fault"):
            bad_encode.future.result(60)
        with pytest.raises(WorkerError, match="denoiser fault"):
            bad_denoise.future.result(60)
        assert good.future.result(60).shape[0] == 3
        assert b.submit(*with_up(tiles(1)), steps=2).future.result(60).shape[0] == 1
