"""Run-directory files written atomically: the exact training state (safetensors + JSON) for resuming."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from training.optim import EMA


def atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def shard(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Tensors split, in order, into groups of at most `max_bytes` each (a larger tensor is a group alone);
    `max_bytes` 0 keeps them in one group."""
    groups: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if max_bytes and groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = v
        size += n
    return groups


def state_files(path: Path) -> list[Path]:
    """The tensor files of a training state: `state.safetensors`, or its shards as `state.json` lists them."""
    meta = json.loads((path / "state.json").read_text())
    return [path / f for f in meta.get("files", ["state.safetensors"])]


def read_state_tensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """Every tensor of a training state directory, whichever way it was sharded."""
    out: dict[str, Tensor] = {}
    for f in state_files(path):
        out.update(load_file(str(f), device=device))
    return out


def save_training_state(path: Path, module: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
                        meta: dict, shard_bytes: int = 0) -> None:
    """Model/optimizer/EMA tensors to safetensors, everything else (step, epoch, groups) to JSON.

    `shard_bytes` > 0 splits the tensors into files of about that size (`state-00001-of-00003.safetensors`...):
    what a transfer with a per-file limit can carry (a GPU window's output folder, docs/training.md)."""
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in module.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(v)
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    tmp = atomic_dir(path)
    groups = shard({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, shard_bytes)
    names = ["state.safetensors"] if len(groups) == 1 else \
        [f"state-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups, strict=True):
        save_file(group, str(tmp / name))
    meta = {**meta, "param_groups": osd["param_groups"], "files": names}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    commit_dir(tmp, path)


def load_training_state(path: Path, module: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
                        device: torch.device) -> dict:
    """Restore what `save_training_state` wrote, onto `device` (whichever device it was saved from)."""
    meta = json.loads((path / "state.json").read_text())
    tensors = read_state_tensors(path, str(device))
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            # Adam keeps `step` on the CPU unless it runs fused/capturable.
            state.setdefault(int(pid), {})[name] = v.cpu() if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if ema is not None:
        for k in ema.shadow:
            ema.shadow[k].copy_(tensors[f"ema.{k}"])
    return meta


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
