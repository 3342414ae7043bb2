"""Export the encoder and the denoiser step to TorchScript and ONNX (dynamic batch and size).

An export directory holds `encoder.{ts.pt,onnx}`, `denoiser.{ts.pt,onnx}` and `export.json`,
which records the checkpoint's config and the hash of the weights it was made from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path

import torch

from model.checkpoint import CheckpointInfo
from model.network import Denoiser, Encoder, SinusoidalPosEmb, SRDiffNet

EXPORT_VERSION = 3  # 2: the encoder also returns the x4 image; 3: the TorchScript denoiser runs on any device
FILES = {
    "torchscript": ("encoder.ts.pt", "denoiser.ts.pt"),
    "onnx": ("encoder.onnx", "denoiser.onnx"),
}


def weights_digest(net: SRDiffNet) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _examples(net: SRDiffNet, batch: int = 2, lr: int = 16) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    cfg = net.cfg
    lr = max(lr, cfg.lr_multiple * 2)
    img_lr = torch.rand(batch, 3, lr, lr) * 2 - 1
    with torch.no_grad():
        cond, _ = net.encode(img_lr)
    x = torch.randn(batch, 3, lr * cfg.scale, lr * cfg.scale)
    t = torch.arange(batch, dtype=torch.long)
    return img_lr, (x, t, cond)


def _traceable(net: SRDiffNet) -> SRDiffNet:
    """A copy of `net` whose time embeddings are scripted: a trace records the device of the tensors a module
    makes (the embedding's frequencies) as a constant, so a denoiser traced on the CPU would fail on a GPU."""
    net = copy.deepcopy(net)
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, SinusoidalPosEmb):
                setattr(module, name, torch.jit.script(child))
    return net


def export_torchscript(net: SRDiffNet, out_dir: Path) -> tuple[Path, Path]:
    img_lr, step = _examples(net)
    net = _traceable(net)
    enc_path, den_path = (out_dir / f for f in FILES["torchscript"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(Encoder(net).eval(), img_lr), str(enc_path))
        torch.jit.save(torch.jit.trace(Denoiser(net).eval(), step), str(den_path))
    return enc_path, den_path


def export_onnx(net: SRDiffNet, out_dir: Path, opset: int = 17) -> tuple[Path, Path]:
    img_lr, step = _examples(net)
    enc_path, den_path = (out_dir / f for f in FILES["onnx"])
    image_axes = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder(net).eval(), (img_lr,), str(enc_path), dynamo=False, opset_version=opset,
            input_names=["img_lr"], output_names=["cond", "sr"],
            dynamic_axes={"img_lr": image_axes, "cond": image_axes, "sr": image_axes},
        )
        torch.onnx.export(
            Denoiser(net).eval(), step, str(den_path), dynamo=False, opset_version=opset,
            input_names=["x", "t", "cond"], output_names=["out"],
            dynamic_axes={"x": image_axes, "t": {0: "batch"}, "cond": image_axes, "out": image_axes},
        )
    return enc_path, den_path


def export(net: SRDiffNet, info: CheckpointInfo, out_dir: str | Path,
           formats: tuple[str, ...] = ("torchscript", "onnx")) -> Path:
    """Write the requested formats and `export.json` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = net.to("cpu").eval()
    for fmt in formats:
        if fmt == "torchscript":
            export_torchscript(net, out)
        elif fmt == "onnx":
            export_onnx(net, out)
        else:
            raise ValueError(f"unknown export format {fmt!r} (torchscript, onnx)")
    meta_path = out / "export.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    digest = weights_digest(net)
    if meta.get("weights_digest") != digest:
        meta = {"formats": []}
    meta.update({
        "export_version": EXPORT_VERSION,
        "weights_digest": digest,
        "checkpoint": info.to_json(),
        "formats": sorted(set(meta.get("formats", [])) | set(formats)),
        "torch": torch.__version__,
    })
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return out


def is_current(out_dir: str | Path, net: SRDiffNet, fmt: str) -> bool:
    """True if `out_dir` holds an export of `fmt` made from exactly these weights."""
    meta_path = Path(out_dir) / "export.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    return (meta.get("export_version") == EXPORT_VERSION and fmt in meta.get("formats", [])
            and meta.get("weights_digest") == weights_digest(net)
            and all((Path(out_dir) / f).exists() for f in FILES[fmt]))
