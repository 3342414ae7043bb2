"""The served models: `GET /v1/models` (every card, and what a request gets by default) and one model's card."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from service import deps
from service.errors import openapi_errors
from service.registry import AUTO, Registry, ServedModel
from service.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelCard(BaseModel):
    """One served model: what it is, what it was trained on, and how it is served."""

    id: str = Field(description="What `model` takes on POST /v1/upscale and /v1/jobs.")
    default: bool = Field(description="Requests that name no model get this one (with the default auto: those "
                          "whose image is not lossy).")
    name: str
    summary: str = Field(description="One line: what the model is for.")
    degradation: str = Field(description="Its training inputs: bicubic (clean downscales) or real (JPEG, noise, "
                             "blur and resizing, as photos from the web and phones have).")
    scale: int
    parameters: int
    training: dict[str, Any] = Field(description="Training data and recipe, as the checkpoint records them.")
    validation: dict[str, Any] = Field(description="Validation figures recorded with the checkpoint, if any.")
    backend: str
    device: str
    sized_for: str | None = Field(description="The device type the model was sized for (its checkpoint's "
                                  "extras.device: cpu or cuda), null where it names none. With the default auto, "
                                  "a clean upload gets the first model sized for the replica's device.")
    default_steps: int
    default_sampler: str
    max_steps: int
    tile_size: int
    tile_overlap: int
    snug_tiles: bool = Field(description="Each image's tiles sized to it (up to 1.25 x tile_size; "
                             "SAMDIFFSR_SNUG_TILES, by default on where a call takes one tile).")
    max_tiles_per_batch: int
    precision: str
    continuous_batching: bool
    reproducible: bool
    ready: bool
    provenance: dict[str, Any]
    builds_on: list[dict[str, Any]] | None = Field(None, description="The pretrained networks whose published "
                                                   "weights the model is derived from: paper, weights, licence.")
    notice: str | None = Field(None, description="Their attribution and licence texts (the checkpoint's NOTICE).")


class AutoChoice(BaseModel):
    """Which model `model=auto` gives an upload, by its kind."""

    lossy: str = Field(description="The id of the model a JPEG or lossy WebP upload gets.")
    other: str = Field(description="The id of the model any other upload gets.")


class ModelList(BaseModel):
    default: str = Field(description="The model of requests that name none: an id, or auto (a real-world model "
                         "for JPEG and lossy WebP uploads, otherwise a model sized for this replica's device "
                         "(a GPU model on a GPU) or else the default model).")
    auto: AutoChoice = Field(description="What `model=auto` picks on this server, by the upload's kind.")
    models: list[ModelCard]


Served = Annotated[Registry, Depends(deps.registry)]


def card(registry: Registry, m: ServedModel, settings: Settings, ready: bool) -> ModelCard:
    """A served model's card, with how this server serves it."""
    default = registry.choose(None, lossy=False).id == m.id
    return ModelCard(**m.card(), default=default, tile_size=m.upscaler.tile, tile_overlap=settings.tile_overlap,
                     snug_tiles=m.upscaler.grow > 1, continuous_batching=settings.continuous_batching,
                     reproducible=settings.reproducible, ready=ready)


@router.get("", response_model=ModelList, responses=openapi_errors(401, 503))
async def models(registry: Served, settings: Annotated[Settings, Depends(deps.settings)],
                 ready: Annotated[bool, Depends(deps.ready)]) -> ModelList:
    """The served models, with their cards, and which one a request gets by default."""
    auto = AutoChoice(lossy=registry.choose(AUTO, lossy=True).id, other=registry.choose(AUTO, lossy=False).id)
    return ModelList(default=registry.default, auto=auto,
                     models=[card(registry, m, settings, ready) for m in registry.models.values()])


@router.get("/{model_id}", response_model=ModelCard, responses=openapi_errors(401, 404, 503))
async def model_card(model_id: str, registry: Served, settings: Annotated[Settings, Depends(deps.settings)],
                     ready: Annotated[bool, Depends(deps.ready)]) -> ModelCard:
    """One model's card."""
    return card(registry, registry.get(model_id), settings, ready)
