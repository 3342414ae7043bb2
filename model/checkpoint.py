"""Our checkpoint format: a directory with `model.safetensors` (weights) and `config.json` (and a `NOTICE` where
the weights derive from pretrained networks of others).

`config.json` holds the model configuration (network sizes, scale, schedule, input conventions),
a name, provenance and training information. Loading never unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.attribution import NOTICE, notice
from model.config import ModelConfig
from model.network import SRDiffNet

FORMAT = "samdiffsr-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A file or directory that is not a loadable checkpoint."""


@dataclass
class CheckpointInfo:
    config: ModelConfig
    name: str = "samdiffsr"
    provenance: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    # What a user reads about the model (the service's /v1/models): `summary` (one line), `validation` (figures).
    card: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "model": self.config.to_dict(),
            "provenance": self.provenance,
            "training": self.training,
            **({"card": self.card} if self.card else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckpointInfo:
        if d.get("format") != FORMAT:
            raise CheckpointError(f"config.json is not a {FORMAT} config (format={d.get('format')!r})")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format version {d['format_version']} is newer than "
                                  f"this code understands ({FORMAT_VERSION})")
        try:
            config = ModelConfig.from_dict(d["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"invalid model config in checkpoint: {e}") from e
        return cls(config=config, name=d.get("name", "samdiffsr"), provenance=d.get("provenance", {}),
                   training=d.get("training", {}), card=d.get("card", {}))


STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_checkpoint(path: str | Path, net: SRDiffNet, info: CheckpointInfo, dtype: str = "fp32") -> Path:
    """The network's weights (floating-point ones stored as `dtype`: fp32, fp16 or bf16) and its config.

    The storage precision is not the compute precision: loading casts the weights to the network's (fp32), so a
    checkpoint stored in fp16 is half the size and computes as its fp32 weights rounded to fp16 do."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    store = STORAGE_DTYPES[dtype]
    state = {k: (v.to(store) if v.is_floating_point() else v).detach().to("cpu").contiguous()
             for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / CONFIG).write_text(json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n")
    if text := notice(info.config):  # weights derived from pretrained networks carry their licences
        (out / NOTICE).write_text(text)
    return out


def save_random_checkpoint(path: str | Path, cfg: ModelConfig, name: str, seed: int = 0,
                           provenance: dict[str, Any] | None = None) -> Path:
    """A network of `cfg` with random weights (torch seed `seed`) in our format: for tests and benchmarks."""
    torch.manual_seed(seed)
    return save_checkpoint(path, SRDiffNet(cfg), CheckpointInfo(config=cfg, name=name, provenance=provenance or {}))


def read_info(path: str | Path) -> CheckpointInfo:
    cfg_path = Path(path) / CONFIG
    try:
        return CheckpointInfo.from_json(json.loads(cfg_path.read_text()))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no {CONFIG}; not a checkpoint directory") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {e}") from e


def load_checkpoint_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[SRDiffNet, CheckpointInfo]:
    """Load a checkpoint directory of our format (`model.loading.load_any` also takes original `.ckpt` files)."""
    p = Path(path)
    info = read_info(p)
    net = SRDiffNet(info.config)
    try:
        state = load_file(str(p / WEIGHTS))
    except FileNotFoundError as e:
        raise CheckpointError(f"{p}: no {WEIGHTS}") from e
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{p / WEIGHTS}: unreadable safetensors file: {e}") from e
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{p}: weights do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return net.to(device).eval(), info
