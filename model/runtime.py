"""One runtime interface over three backends: eager torch, TorchScript and ONNX Runtime.

A runtime does two things: `encode` (LR image -> projected condition and the encoder's x4 image,
once per image) and `denoise` (x_t, t, condition -> the prediction, once per step). Everything else (sampling,
tiling, batching) is backend-independent and lives elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from model.checkpoint import CheckpointInfo
from model.config import ModelConfig
from model.diffusion import Schedule, make_schedule
from model.export import FILES, export, is_current, weights_digest
from model.loading import load_any
from model.network import SRDiffNet

log = logging.getLogger(__name__)
BACKENDS = ("torch", "torchscript", "onnx")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What `precision="auto"` picks per device type: reduced precision only where it was measured to cost at most
# 0.05 dB PSNR-Y on corpus-hr/val and to be faster (README, "Serving efficiency"): 0.02 dB on a CPU and on an
# H200, where the denoiser ran 1.31x fp32's speed. bf16 on a CPU only where oneDNN has native bf16 (AVX512-BF16
# or AMX); elsewhere it is emulated and slower.
AUTO_PRECISION = {"cpu": "bf16", "cuda": "bf16"}


class Runtime(Protocol):
    backend: str
    device: torch.device
    precision: str
    info: CheckpointInfo
    schedule: Schedule

    @property
    def config(self) -> ModelConfig: ...

    def encode(self, img_lr: Tensor) -> tuple[Tensor, Tensor]: ...

    def encode_image(self, img_lr: Tensor) -> Tensor: ...

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor: ...


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev


class _Base:
    backend = "base"
    precision = "fp32"  # the network's compute precision (encoder and denoiser); outputs are float32

    def __init__(self, info: CheckpointInfo, device: torch.device) -> None:
        self.info = info
        self.device = device
        self.schedule = make_schedule(info.config.timesteps, info.config.beta_s).to(device)

    def _autocast(self) -> AbstractContextManager:
        """Autocast to the runtime's precision (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    @property
    def config(self) -> ModelConfig:
        return self.info.config

    def encode(self, img_lr: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def encode_image(self, img_lr: Tensor) -> Tensor:
        """The encoder's x4 image (`steps=0`); an exported encoder makes the U-Net's condition with it."""
        return self.encode(img_lr)[1]


class TorchRuntime(_Base):
    backend = "torch"

    def __init__(self, net: SRDiffNet, info: CheckpointInfo, device: torch.device,
                 precision: str = "fp32", channels_last: bool = True) -> None:
        super().__init__(info, device)
        # channels_last is the layout oneDNN's and cuDNN's fast convolutions want: on 2 CPU cores the encoder runs
        # 1.5x and a denoiser call 1.3x faster than in the default layout (same results to 1e-5). `net` is
        # converted in place (layout, and dtype for bf16); `channels_last=False` leaves its layout alone (a network
        # being trained).
        # bf16 holds the weights themselves in bf16 (the network has no normalisation layers): autocast would
        # cast every weight again in every call, and a denoiser call is 1.34x faster without (2 CPU cores,
        # 64-px tile; same outputs). fp16 runs under autocast, which keeps overflow-prone ops in fp32.
        self.channels_last = channels_last
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        fmt = torch.channels_last if channels_last else torch.preserve_format
        self.net = net.to(device, self.dtype, memory_format=fmt)
        self.net.eval()
        self.precision = precision

    def _autocast(self) -> AbstractContextManager:
        return contextlib.nullcontext() if self.precision == "bf16" else super()._autocast()

    def _input(self, x: Tensor) -> Tensor:
        x = x.to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def encode(self, img_lr: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast():
            cond, sr = self.net.encode(self._input(img_lr))
        return cond.float().contiguous(), sr.float().contiguous()

    @torch.inference_mode()
    def encode_image(self, img_lr: Tensor) -> Tensor:
        """The encoder's x4 image alone, without the U-Net's condition (`steps=0`)."""
        with self._autocast():
            sr = self.net.encode_image(self._input(img_lr))
        return sr.float().contiguous()

    @torch.inference_mode()
    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        with self._autocast():
            out = self.net.denoise(self._input(x), t.to(self.device), self._input(cond))
        return out.float().contiguous()


class TorchScriptRuntime(_Base):
    backend = "torchscript"

    def __init__(self, export_dir: Path, info: CheckpointInfo, device: torch.device) -> None:
        super().__init__(info, device)
        enc, den = (export_dir / f for f in FILES["torchscript"])
        self.encoder = torch.jit.load(str(enc), map_location=device).eval()
        self.denoiser = torch.jit.load(str(den), map_location=device).eval()

    @torch.inference_mode()
    def encode(self, img_lr: Tensor) -> tuple[Tensor, Tensor]:
        cond, sr = self.encoder(img_lr.to(self.device))
        return cond, sr

    @torch.inference_mode()
    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.denoiser(x.to(self.device), t.to(self.device), cond.to(self.device))


def onnx_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if device.type == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *wanted]
    return [p for p in wanted if p in available]


class OnnxRuntime(_Base):
    backend = "onnx"

    def __init__(self, export_dir: Path, info: CheckpointInfo, device: torch.device,
                 threads: int | None = None) -> None:
        super().__init__(info, device)
        import onnxruntime as ort

        enc, den = (export_dir / f for f in FILES["onnx"])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        providers = onnx_providers(device)
        self.encoder = self._session(ort, enc, opts, providers)
        self.denoiser = self._session(ort, den, opts, providers)
        self.providers = self.denoiser.get_providers()

    @staticmethod
    def _session(ort, path: Path, opts, providers: list[str]):
        # A provider listed as available can still fail to start (e.g. TensorRT libraries missing).
        for i in range(len(providers)):
            try:
                return ort.InferenceSession(str(path), opts, providers=providers[i:])
            except Exception as e:  # onnxruntime raises its own exception types
                if i == len(providers) - 1:
                    raise
                log.warning("ONNX Runtime provider %s unavailable (%s); falling back", providers[i], e)
        raise RuntimeError("no ONNX Runtime provider")

    def _run(self, session, feeds: dict[str, np.ndarray]) -> list[Tensor]:
        return [torch.from_numpy(out).to(self.device) for out in session.run(None, feeds)]

    def encode(self, img_lr: Tensor) -> tuple[Tensor, Tensor]:
        cond, sr = self._run(self.encoder, {"img_lr": _np(img_lr, np.float32)})
        return cond, sr

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self._run(self.denoiser, {"x": _np(x, np.float32), "t": _np(t, np.int64),
                                         "cond": _np(cond, np.float32)})[0]


def _np(t: Tensor, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu").numpy().astype(dtype, copy=False))


def default_export_dir(net: SRDiffNet) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "samdiffsr" / "exports"
    return base / weights_digest(net)


def resolve_precision(precision: str, device: torch.device, backend: str = "torch") -> str:
    """`auto` -> the measured default for the device (`AUTO_PRECISION`); checks the backend supports it."""
    if precision == "auto":
        precision = AUTO_PRECISION.get(device.type, "fp32") if backend == "torch" else "fp32"
        if precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            precision = "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from auto, {', '.join(PRECISIONS)}")
    if precision != "fp32" and backend != "torch":
        # Traced TorchScript fails under autocast (a double constant meets bf16) and the ONNX export is fp32.
        raise ValueError(f"precision {precision} needs the torch backend ({backend} runs fp32 only)")
    return precision


def load_runtime(checkpoint: str | Path, backend: str = "torch", device: str = "auto",
                 export_dir: str | Path | None = None, threads: int | None = None,
                 precision: str = "fp32") -> Runtime:
    """Load a checkpoint and wrap it in the requested backend (exporting it first if needed).

    `threads` sets ONNX Runtime's intra-op threads (torch's are process-wide: `torch.set_num_threads`).
    `precision` (`fp32`, `bf16`, `fp16` or `auto`) is the network's compute precision (bf16: the weights in bf16;
    fp16: autocast); outputs are float32 whatever it is.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev, backend)
    net, info = load_any(checkpoint, "cpu")
    if backend == "torch":
        return TorchRuntime(net, info, dev, precision)
    out = Path(export_dir) if export_dir is not None else default_export_dir(net)
    if not is_current(out, net, backend):
        log.info("exporting %s to %s", backend, out)
        export(net, info, out, (backend,))
    if backend == "torchscript":
        return TorchScriptRuntime(out, info, dev)
    return OnnxRuntime(out, info, dev, threads)
