"""Import of checkpoints written by the original SAM-DiffSR / SRDiff training code.

Layout: `{"state_dict": {"model": {...}}, "global_step": N}` where the inner state dict holds
`denoise_fn.*` (U-Net), `rrdb.*` (encoder) and schedule buffers, sometimes with a `module.`
prefix and extra entries (optimizer states) that are ignored. The configuration is inferred
from the tensor shapes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.checkpoint import CheckpointError, CheckpointInfo
from model.config import ModelConfig
from model.diffusion import make_schedule
from model.network import SRDiffNet

_UNSUPPORTED = {
    "denoise_fn.up_proj.": "up_input=True (an LR-upsampling input projection)",
    "denoise_fn.mid_attn.": "use_attn=True (mid-block attention)",
}


def _find_state_dict(obj: Any) -> dict[str, Tensor]:
    """Find the model state dict inside an original checkpoint object."""
    candidates = [obj]
    if isinstance(obj, dict):
        sd = obj.get("state_dict")
        if isinstance(sd, dict):
            candidates.insert(0, sd.get("model", sd))
        if isinstance(obj.get("model"), dict):
            candidates.insert(0, obj["model"])
    for cand in candidates:
        if isinstance(cand, dict):
            tensors = {k: v for k, v in cand.items() if isinstance(k, str) and isinstance(v, Tensor)}
            if any(k.removeprefix("module.").startswith(("rrdb.", "denoise_fn.")) for k in tensors):
                return tensors
    raise CheckpointError("not a SAM-DiffSR/SRDiff checkpoint: no 'rrdb.*' / 'denoise_fn.*' weights found")


def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.startswith(("rrdb.", "denoise_fn.")) or "." not in k:
            out[k] = v
    return out


def infer_config(state: dict[str, Tensor]) -> ModelConfig:
    """Infer network sizes from the shapes of an (unprefixed) original state dict."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"not a SAM-DiffSR/SRDiff checkpoint: missing {key!r}")
        return tuple(state[key].shape)

    for prefix, what in _UNSUPPORTED.items():
        if any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"unsupported original configuration: {what}")
    if any(k.endswith(("weight_g", "weight_v")) for k in state):
        raise CheckpointError("unsupported original configuration: use_wn=True (weight norm); "
                              "remove weight norm before importing")

    nf = shape("rrdb.conv_first.weight")[0]
    gc = shape("rrdb.RRDB_trunk.0.RDB1.conv1.weight")[0]
    nb = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"rrdb\.RRDB_trunk\.(\d+)\.", k)))
    num_up = sum(1 for k in state if re.fullmatch(r"rrdb\.upconv\d+\.weight", k))
    cin, hidden, kernel, _ = shape("denoise_fn.cond_proj.weight")
    scale = kernel // 2
    if 2**num_up != scale:
        raise CheckpointError(f"inconsistent scale: {num_up} RRDB upsampling convs but a x{scale} projection")
    n_levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"denoise_fn\.downs\.(\d+)\.", k)))
    mults = []
    for i in range(n_levels):
        out_ch = shape(f"denoise_fn.downs.{i}.0.block1.block.1.weight")[0]
        if out_ch % hidden:
            raise CheckpointError(f"level {i} width {out_ch} is not a multiple of hidden size {hidden}")
        mults.append(out_ch // hidden)
    timesteps = shape("betas")[0] if "betas" in state else 100
    cfg = ModelConfig(scale=scale, rrdb_num_block=nb, rrdb_num_feat=nf, rrdb_growth=gc, hidden_size=hidden,
                      dim_mults=tuple(mults), timesteps=timesteps, lr_up_divisor=256.0)
    if cfg.cond_channels != cin:
        raise CheckpointError(f"condition projection takes {cin} channels; {nb} RRDB blocks of {nf} "
                              f"features give {cfg.cond_channels}")
    return cfg


def convert_state(state: dict[str, Tensor]) -> tuple[SRDiffNet, ModelConfig]:
    state = _strip(state)
    cfg = infer_config(state)
    if "betas" in state:
        ours = make_schedule(cfg.timesteps, cfg.beta_s).betas
        if not torch.allclose(state["betas"].float(), ours, atol=1e-6):
            raise CheckpointError("the checkpoint's beta schedule is not the cosine schedule (s=0.008)")
    net = SRDiffNet(cfg)
    weights = {k: v for k, v in state.items() if k.startswith(("rrdb.", "denoise_fn."))}
    try:
        missing, unexpected = net.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = str(e).splitlines()[-1].strip()
        raise CheckpointError(f"weights do not fit the inferred configuration: {detail}") from e
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the inferred configuration: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return net.eval(), cfg


def import_upstream_checkpoint(path: str | Path) -> tuple[SRDiffNet, CheckpointInfo]:
    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"{p}: not a loadable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    net, cfg = convert_state(_find_state_dict(obj))
    step = obj.get("global_step") if isinstance(obj, dict) else None
    info = CheckpointInfo(
        config=cfg,
        name=p.stem,
        provenance={"source": "upstream", "file": p.name, "global_step": _plain(step)},
        training={},
    )
    return net, info


def _plain(v: Any) -> Any:
    if isinstance(v, Tensor | np.generic):
        return v.item()
    return v
