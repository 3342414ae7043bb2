"""Service settings, read from `SAMDIFFSR_*` environment variables (pydantic-settings).

Every field is one environment variable: `tile_size` <- `SAMDIFFSR_TILE_SIZE`, and so on.
Invalid values fail at start-up with a message that names the variable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "SAMDIFFSR_"


class Settings(BaseSettings):
    """Everything the server can be configured with. Passed explicitly; never a global."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- models (service/registry.py)
    models: str | None = Field(None, description="The models to serve, as ID=DIR pairs separated by commas "
                               "(e.g. default=checkpoints/default,real=checkpoints/real); wins over the two below.")
    checkpoint: Path | None = Field(None, description="Serve this one checkpoint directory (or original .ckpt "
                                    "file), its id the directory's name; wins over models_dir.")
    models_dir: Path = Field(Path("checkpoints"), description="Serve every checkpoint directory in this folder, "
                             "each by its directory's name (when neither SAMDIFFSR_MODELS nor SAMDIFFSR_CHECKPOINT "
                             "is set).")
    default_model: str | None = Field("auto", description="The model of requests that name none: an id, or auto "
                                      "(a model trained on real-world degradations for JPEG and lossy WebP uploads; "
                                      "else the first model sized for this replica's device, e.g. a GPU model on "
                                      "a CUDA replica; else the model with id 'default'; else the first); unset: "
                                      "that model.")
    backend: Literal["torch", "torchscript", "onnx"] = Field("torch", description="Inference backend.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="The network's compute "
                                                               "precision (torch backend); auto: the measured "
                                                               "default for the device (model/runtime.py).")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    default_steps: int | None = Field(None, ge=0, description="Default sampling steps "
                                      "(default: the checkpoint's extras['default_steps'], else 20).")
    # --- tiling and batching
    tile_size: int | None = Field(None, ge=8, le=1024, description="LR tile size in pixels (output tiles are 4x); "
                                  "default: each model's own (extras['default_tile'] in its config.json, else 64).")
    tile_overlap: int = Field(8, ge=0, description="LR overlap between neighbouring tiles.")
    snug_tiles: bool | None = Field(None, description="Size each image's tiles to it (up to 1.25 x tile_size) so "
                                    "that it needs fewer tiles and less overlap; tiles of different sizes do not "
                                    "share a denoiser call. Default: on where a call takes one tile anyway (the "
                                    "CPU's batch for tiles of 64 px and more), off where calls batch tiles.")
    max_tiles_per_batch: int | None = Field(None, ge=1, le=1024, description="Most tiles in one denoiser call "
                                            "(default: what suits the device, model/sizing.py).")
    max_active_tiles: int | None = Field(None, ge=1, description="Most tiles being sampled at once "
                                         "(encoded, in memory); default 2 x max_tiles_per_batch.")
    max_batch_wait_ms: float = Field(5.0, ge=0, le=10_000, description="How long an idle worker waits "
                                     "for more requests before its first step.")
    continuous_batching: bool = Field(True, description="Step-level batching across requests; false runs "
                                      "one request at a time (its own tiles still batched).")
    reproducible: bool = Field(True, description="Pad every denoiser call to the batch size so "
                               "a request's output does not depend on what it was batched with.")
    # --- limits
    max_queue: int = Field(32, ge=1, description="Most requests accepted at once (waiting or being "
                           "sampled); beyond it: 503 with Retry-After.")
    retry_after_s: int = Field(2, ge=1, description="Retry-After value sent with 503 responses.")
    request_timeout_s: float = Field(300.0, gt=0, description="Deadline of one request (504 after it).")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM: how long in-flight requests may "
                                   "take to finish before the server exits anyway.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest request body.")
    max_pixels: int = Field(2048 * 2048, ge=1, description="Largest input image, in pixels.")
    max_request_work: int = Field(4096, ge=1, description="Most tile-steps (tiles x max(steps, 1)) one "
                                  "request may take, estimated from the image header; beyond it: 413.")
    memory_budget_mb: int = Field(1536, ge=16, description="Memory (MiB) the requests in progress may take "
                                  "together, estimated from their image headers: a request that can never fit "
                                  "gets 413, one that does not fit now 503 queue_full.")
    admission_wait_s: float = Field(30.0, ge=0, description="How long a request that does not fit in the memory "
                                    "budget next to the requests in progress waits for room, in arrival order "
                                    "(at most max_queue wait), before 503 queue_full.")
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="Largest request head (request line and "
                                  "headers); beyond it: 431 and the connection is closed.")
    header_timeout_s: float = Field(10.0, gt=0, description="How long a client may take to send a request's head "
                                    "(request line and headers), from the connection's start or the previous "
                                    "response (at most request_timeout_s); after it the connection is closed "
                                    "(408 if part of it came).")
    # --- asynchronous jobs (POST /v1/jobs); held in memory: a restarted replica loses them
    job_timeout_s: float = Field(3600.0, gt=0, description="Deadline of one job, from its submission.")
    job_ttl_s: float = Field(3600.0, gt=0, description="How long a finished job and its result are kept.")
    job_store_max_bytes: int = Field(512 * 1024 * 1024, ge=1, description="Most bytes of job results kept "
                                     "at once; beyond it the oldest finished jobs expire first.")
    # --- access and logs
    auth_token: SecretStr | None = Field(None, description="If set, /v1/* requires "
                                         "'Authorization: Bearer <token>'.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text (control characters "
                                                "escaped) or one JSON object per line.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    host: str = Field("127.0.0.1", description="Address to listen on (the image listens on 0.0.0.0).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads of torch and ONNX Runtime "
                                      "(default: theirs, one per core).")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("default_model")
    @classmethod
    def _default_model(cls, v: str | None) -> str | None:
        return v if v and v.strip() else None  # SAMDIFFSR_DEFAULT_MODEL="" means unset

    @field_validator("auth_token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            return None  # SAMDIFFSR_AUTH_TOKEN="" means auth off
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.tile_size is not None and self.tile_size % 2:
            raise ValueError(f"SAMDIFFSR_TILE_SIZE must be even, got {self.tile_size}")
        if self.tile_size is not None and self.tile_overlap * 2 > self.tile_size:
            raise ValueError(f"SAMDIFFSR_TILE_OVERLAP ({self.tile_overlap}) must be at most half of "
                             f"SAMDIFFSR_TILE_SIZE ({self.tile_size})")
        if (self.max_active_tiles is not None and self.max_tiles_per_batch is not None
                and self.max_active_tiles < self.max_tiles_per_batch):
            raise ValueError("SAMDIFFSR_MAX_ACTIVE_TILES must be at least SAMDIFFSR_MAX_TILES_PER_BATCH")
        return self

    def active_tiles(self, batch: int) -> int:
        """The active set for a chosen batch size (`max_active_tiles`, else 2 x batch)."""
        return self.max_active_tiles or 2 * batch


def describe_error(err: ValidationError) -> str:
    """A ValidationError of Settings as lines naming the environment variables."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        name = f"{ENV_PREFIX}{loc.upper()}" if loc else "settings"
        value = e.get("input")
        shown = "" if loc == "auth_token" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{name}: {e['msg']}{shown}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (e.g. from the command line)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
