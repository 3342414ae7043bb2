"""Prometheus metrics of one service instance (its own CollectorRegistry, never the global one).

The names are an interface: deploy/'s Grafana dashboard and alert rules read them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, float("inf"))
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, float("inf"))


class Metrics:
    """All metrics of the service, registered in `self.registry`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        # `model` is the id of the model that answered (its X-Model header; "" when none did).
        self.requests = Counter("samdiffsr_requests", "HTTP requests handled.",
                                ["route", "method", "status", "model"], registry=r)
        self.request_duration = Histogram("samdiffsr_request_duration_seconds",
                                          "Time from request start to the end of the response.",
                                          ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("samdiffsr_queue_wait_seconds",
                                    "Time a request waited before its first tile started sampling.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("samdiffsr_queue_depth",
                                 "Requests accepted by the batcher and not yet started.", ["model"], registry=r)
        self.tiles_in_flight = Gauge("samdiffsr_tiles_in_flight",
                                     "Tiles being sampled (encoded, between first and last step).", registry=r)
        self.batch_tiles = Histogram("samdiffsr_batch_tiles", "Tiles per denoiser call (without padding).",
                                     ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.denoiser_call = Histogram("samdiffsr_denoiser_call_duration_seconds",
                                       "Duration of one batched denoiser call (one sampling step).",
                                       ["model"], buckets=CALL_BUCKETS, registry=r)
        self.images = Counter("samdiffsr_images", "Images upscaled successfully.", ["model"], registry=r)
        self.output_megapixels = Counter("samdiffsr_output_megapixels",
                                         "Megapixels of upscaled output produced.", ["model"], registry=r)
        self.errors = Counter("samdiffsr_errors", "Errors by kind.", ["kind"], registry=r)
        self.model_info = Gauge("samdiffsr_model_info", "The served models (value 1 each).",
                                ["model", "name", "backend", "device"], registry=r)
        self.gpu_memory = Gauge("samdiffsr_gpu_memory_bytes",
                                "Accelerator memory held by torch (0 on CPU).", ["kind"], registry=r)
        for kind in ("allocated", "reserved"):
            self.gpu_memory.labels(kind=kind).set(0)
        # Asynchronous jobs (service/jobs.py sets the gauges' functions).
        self.jobs = Gauge("samdiffsr_jobs", "Jobs held by the job store, by status.", ["status"], registry=r)
        self.jobs_finished = Counter("samdiffsr_jobs_finished", "Jobs that ended, by final status.", ["status"],
                                     registry=r)
        self.job_queue_wait = Histogram("samdiffsr_job_queue_wait_seconds", "Time from a job's submission "
                                        "to its first tile sampling.", buckets=LATENCY_BUCKETS, registry=r)
        self.job_store_bytes = Gauge("samdiffsr_job_store_bytes", "Bytes of job results held.", registry=r)

    def set_models(self, models: list[tuple[str, str, str, str]]) -> None:
        """The served models as (id, name, backend, device); their per-model series start at 0."""
        self.model_info.clear()
        for mid, name, backend, device in models:
            self.model_info.labels(model=mid, name=name, backend=backend, device=device).set(1)
            self.queue_depth.labels(model=mid)
            self.images.labels(model=mid)
            self.output_megapixels.labels(model=mid)

    def track_gpu_memory(self, device: str) -> None:
        """Report torch's CUDA memory of `device` at every scrape (stays 0 on CPU)."""
        if not device.startswith("cuda"):
            return
        import torch

        self.gpu_memory.labels(kind="allocated").set_function(lambda: torch.cuda.memory_allocated(device))
        self.gpu_memory.labels(kind="reserved").set_function(lambda: torch.cuda.memory_reserved(device))

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
