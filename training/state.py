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


def save_training_state(path: Path, module: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
                        meta: dict) -> None:
    """Model/optimizer/EMA tensors to safetensors, everything else (step, epoch, groups) to JSON."""
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in module.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(v)
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    tmp = atomic_dir(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    meta = {**meta, "param_groups": osd["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    commit_dir(tmp, path)


def load_training_state(path: Path, module: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
                        device: torch.device) -> dict:
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"), device=str(device))
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
