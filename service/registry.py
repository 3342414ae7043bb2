"""The models a service serves, by id: their cards, and which one a request gets.

Where they come from is `model.repository.sources` (`SAMDIFFSR_MODELS`, else `SAMDIFFSR_CHECKPOINT`, else every
checkpoint in `SAMDIFFSR_MODELS_DIR`).

The default (`SAMDIFFSR_DEFAULT_MODEL`) is `auto`: per request, the rule of `model.choice` (shared with
`samdiffsr upscale`): a model trained on real-world degradations for a lossy upload (JPEG, lossy WebP), else a
clean one sized for this replica's device (a checkpoint's `extras.device`, `model.upscale.sized_for`), else the
model with id `default`, else the first. It can also be one id. Loading is all or
nothing: a bad source stops the start-up with a message that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from model.attribution import builds_on, notice
from model.choice import AUTO, degradation_of, is_lossy, pick_auto
from model.config import ModelConfig
from model.network import SRDiffNet
from model.repository import ModelSource, RegistryError, check_source
from model.runtime import Runtime
from model.sizing import Sizing
from model.upscale import Upscaler, default_sampler, default_steps, sized_for
from service.errors import ServiceError

__all__ = ["AUTO", "Registry", "ServedModel", "UnknownModel", "is_lossy", "load_models", "pick_auto", "serve_model"]


class UnknownModel(ServiceError):
    status, code, kind = 404, "unknown_model", "unknown_model"


# ---------------------------------------------------------------------------------------------------
# Served models


@dataclass
class ServedModel:
    """One loaded model and how it is served."""

    id: str
    runtime: Runtime
    upscaler: Upscaler
    sizing: Sizing
    steps: int
    sampler: str
    parameters: int

    @property
    def weight_bytes(self) -> int:
        """The weights' memory in float32 (what the memory budget sets aside for the model)."""
        return self.parameters * 4

    @property
    def degradation(self) -> str:
        """What its training inputs were: `bicubic` (clean) or `real` (JPEG, noise, blur)."""
        return degradation_of(self.runtime.info.training)

    @property
    def fits_device(self) -> bool:
        """Sized for the device it runs on (a GPU model on a CUDA replica)."""
        return sized_for(self.runtime.config) == self.runtime.device.type

    def card(self) -> dict[str, Any]:
        """The public card: what it is, what it was trained on, how it is served."""
        info, cfg = self.runtime.info, self.runtime.config
        tr = info.training
        summary = info.card.get("summary") or (  # its id names it: no internal name here
            f"x{cfg.scale}, trained on {tr.get('images', '?')} photos with {self.degradation} degradations"
            if tr else f"x{cfg.scale}")
        return {
            "id": self.id, "name": info.name, "summary": summary, "degradation": self.degradation,
            "scale": cfg.scale, "parameters": self.parameters, "training": tr,
            "validation": info.card.get("validation", {}),
            "default_steps": self.steps, "default_sampler": self.sampler, "max_steps": cfg.timesteps,
            "backend": self.runtime.backend, "device": str(self.runtime.device), "sized_for": sized_for(cfg),
            "precision": getattr(self.runtime, "precision", "fp32"), "max_tiles_per_batch": self.upscaler.max_batch,
            "provenance": info.provenance,
            **({"builds_on": builds_on(cfg), "notice": notice(cfg)} if cfg.pretrained else {}),
        }


def serve_model(model_id: str, runtime: Runtime, sizing: Sizing, tile: int, overlap: int, grow: float,
                steps: int | None, batch: int) -> ServedModel:
    """A loaded runtime with its upscaler (`batch` tiles per call) and defaults (`steps` overrides the
    checkpoint's default)."""
    cfg = runtime.config
    chosen = default_steps(cfg) if steps is None else steps
    if not 0 <= chosen <= cfg.timesteps:
        raise RegistryError(f"model {model_id!r}: SAMDIFFSR_DEFAULT_STEPS={chosen} is outside 0..{cfg.timesteps} "
                            "(the checkpoint's timesteps)")
    if overlap * 2 > tile:
        raise RegistryError(f"model {model_id!r}: SAMDIFFSR_TILE_OVERLAP ({overlap}) must be at most half of its "
                            f"tile size ({tile})")
    upscaler = Upscaler(runtime, tile, overlap, batch, fit=True, grow=grow)
    return ServedModel(model_id, runtime, upscaler, sizing, chosen, default_sampler(cfg), parameter_count(cfg))


def parameter_count(cfg: ModelConfig) -> int:
    """The network's parameters, counted on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        return sum(p.numel() for p in SRDiffNet(cfg).parameters())


def check_default(default: str | None, ids: list[str]) -> str:
    """The default model's id (or auto): the one asked for, else `default` if served, else the first."""
    if default is None:
        return "default" if "default" in ids else ids[0]
    if default != AUTO and default not in ids:
        raise RegistryError(f"SAMDIFFSR_DEFAULT_MODEL={default!r} is not a served model; the models are "
                            f"{', '.join(ids)} (or {AUTO})")
    return default


@dataclass
class Registry:
    """The served models by id, in order, and the default (`auto` or an id)."""

    models: dict[str, ServedModel] = field(default_factory=dict)
    default: str = ""

    def __post_init__(self) -> None:
        if self.models:
            self.default = check_default(self.default or None, list(self.models))

    @property
    def ids(self) -> list[str]:
        return list(self.models)

    def get(self, model_id: str) -> ServedModel:
        """The served model `model_id` (GET /v1/models/{id}); UnknownModel (404) listing the served ids, where `auto`
        is none: it is a choice made per upload (`choose`), not a model with a card."""
        try:
            return self.models[model_id]
        except KeyError:
            ids = ", ".join(self.models)
            if model_id == AUTO:
                raise UnknownModel(f"{AUTO!r} is not a model but a choice made per upload (a real-world model for "
                                   f"JPEG and lossy WebP uploads, else a clean one): use it as a request's "
                                   f"`model`; the models are: {ids}") from None
            raise UnknownModel(f"unknown model {model_id!r}; the models are: {ids}") from None

    def choose(self, requested: str | None, lossy: bool) -> ServedModel:
        """The model for a request: the one it names, else the default; `auto` by the upload's kind. An unknown name
        is UnknownModel (404) listing what a request may name: the ids and `auto`."""
        name = requested or self.default
        if name == AUTO:
            return pick_auto(list(self.models.values()), lossy)
        if name not in self.models:
            raise UnknownModel(f"unknown model {name!r}; the models are: {', '.join([*self.models, AUTO])}")
        return self.models[name]


def load_models(srcs: list[ModelSource], backend: str, device: str, threads: int | None,
                precision: str) -> dict[str, Runtime]:
    """Load every source, or none: RegistryError naming the first one that fails."""
    from model.runtime import load_runtime

    out: dict[str, Runtime] = {}
    for src in srcs:
        check_source(src)
        try:
            out[src.id] = load_runtime(src.path, backend, device, threads=threads, precision=precision)
        except (OSError, ValueError, RuntimeError) as e:
            raise RegistryError(f"model {src.id!r}: cannot load {src.path} (backend {backend}, device {device}): "
                                f"{e}") from e
    return out
