"""Models by name: where the checkpoints of a registry come from (the service's and `samdiffsr upscale --model`'s).

Sources, in order of precedence (`sources`):

1. explicit `ID=DIR` pairs (`SAMDIFFSR_MODELS`, `--model ID=DIR`): exactly those, in that order;
2. one checkpoint (`SAMDIFFSR_CHECKPOINT`, `--checkpoint DIR`): a registry of one, its id the directory's name;
3. a models directory (`SAMDIFFSR_MODELS_DIR`, default `checkpoints/`): every checkpoint directory in it, by name.

`samdiffsr upscale` looks in `default_models_dir()`: the variable, else `checkpoints/` here, else the shipped
`checkpoints/` of the source tree the package runs from (a clone installed with `make venv`), from any folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import CONFIG, CheckpointInfo, read_info

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODELS_DIR_ENV = "SAMDIFFSR_MODELS_DIR"
MODELS_DIR = Path("checkpoints")
RESERVED = ("auto",)  # the service's per-request choice (service/registry.py)


class RegistryError(ValueError):
    """A model source that cannot be served (the service refuses to start)."""


@dataclass(frozen=True)
class ModelSource:
    id: str
    path: Path


def parse_models(text: str) -> list[ModelSource]:
    """`id=dir[,id=dir...]` (SAMDIFFSR_MODELS; also one `--model` value)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        mid, sep, path = part.partition("=")
        if not sep or not mid.strip() or not path.strip():
            raise RegistryError(f"model {part!r} is not of the form ID=DIR")
        out.append(ModelSource(mid.strip(), Path(path.strip())))
    return out


def discover(models_dir: Path) -> list[ModelSource]:
    """Every checkpoint directory (one with a config.json) in `models_dir`, sorted by name."""
    if not models_dir.is_dir():
        raise RegistryError(f"models directory {models_dir} does not exist")
    return [ModelSource(d.name, d) for d in sorted(models_dir.iterdir()) if (d / CONFIG).is_file()]


def sources(models: str | None, checkpoint: Path | None, models_dir: Path) -> list[ModelSource]:
    """The sources by precedence (see the module doc), checked: at least one, ids valid and unique."""
    if models:
        found = parse_models(models)
    elif checkpoint is not None:
        found = [ModelSource(checkpoint.stem if checkpoint.is_file() else checkpoint.resolve().name, checkpoint)]
    else:
        found = discover(models_dir)
        if not found:
            raise RegistryError(f"no checkpoint directories (with a {CONFIG}) in {models_dir}")
    if not found:
        raise RegistryError("no models given (SAMDIFFSR_MODELS is empty)")
    seen: dict[str, Path] = {}
    for src in found:
        if not ID_PATTERN.fullmatch(src.id) or src.id in RESERVED:
            raise RegistryError(f"model id {src.id!r} ({src.path}) must be 1-64 letters, digits, '.', '_' or '-', "
                                f"starting with a letter or digit, and not {' or '.join(map(repr, RESERVED))}")
        if src.id in seen:
            raise RegistryError(f"two models with the id {src.id!r}: {seen[src.id]} and {src.path}")
        seen[src.id] = src.path
    return found


def check_source(src: ModelSource) -> CheckpointInfo | None:
    """Read a source's config (None for an original .ckpt file); RegistryError naming it if it is not one."""
    if src.path.is_file():
        return None
    if not src.path.is_dir():
        raise RegistryError(f"model {src.id!r}: {src.path} does not exist")
    try:
        return read_info(src.path)
    except (OSError, ValueError) as e:
        raise RegistryError(f"model {src.id!r}: {src.path} is not a checkpoint: {e}") from e


def shipped_models_dir() -> Path | None:
    """The `checkpoints/` folder of the source tree this package was imported from, if there is one (an editable
    install of a clone; a wheel ships no checkpoints)."""
    here = Path(__file__).resolve().parent.parent / MODELS_DIR
    return here if here.is_dir() else None


def default_models_dir(environ: dict[str, str] | None = None) -> Path:
    """Where models are found when no folder is named: SAMDIFFSR_MODELS_DIR; else `checkpoints/` in the working
    folder where it exists; else the shipped one (`shipped_models_dir`); else `checkpoints/` (missing)."""
    env = os.environ if environ is None else environ
    if env.get(MODELS_DIR_ENV):
        return Path(env[MODELS_DIR_ENV])
    if MODELS_DIR.is_dir():
        return MODELS_DIR
    return shipped_models_dir() or MODELS_DIR


def find(model_id: str, models_dir: Path) -> Path:
    """The checkpoint directory of `model_id` in `models_dir` (RegistryError listing the ids there if none)."""
    found = {src.id: src.path for src in discover(models_dir)}
    if model_id not in found:
        raise RegistryError(f"no model {model_id!r} in {models_dir}; the models there are: "
                            f"{', '.join(found) or 'none'}")
    return found[model_id]
