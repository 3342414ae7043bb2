"""Two-stage training: RRDB pretraining (L1), then the diffusion denoiser with the RRDB frozen.

Stage 2 is SAM-DiffSR's: the noise of each training patch is modulated by its SPE map
(`model.diffusion.modulate_noise`) and the loss is L1(e', denoiser(x_t, t, cond)); with
`diffusion.structure = false` it is plain SRDiff (for ablations).

Runs on one device or many (`torchrun`, DistributedDataParallel; `data.batch_size` is per process).
Everything random is a pure function of (seed, step, rank) or (seed, epoch, index), so a resumed run
is identical to an uninterrupted one. Outputs, under the run directory:

- `checkpoint/`: the served weights in our format (EMA weights when EMA is enabled);
- `state/`: exact training state (`state.safetensors` for tensors, `state.json` for the rest);
- `metrics.csv`, `tb/` (TensorBoard), `curves.png` (loss and validation PSNR), `train.log`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from model.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.diffusion import Schedule, img2res, make_schedule, modulate_noise, q_sample, training_target
from model.network import SRDiffNet
from model.runtime import TorchRuntime
from model.upscale import Upscaler
from training.config import TrainConfig
from training.data import PatchDataset, model_inputs, prepare_images, val_pairs
from training.evaluate import bicubic_upscale
from training.metrics import psnr_y, quantize8

log = logging.getLogger(__name__)

Stage = Literal["rrdb", "diffusion"]
CSV_FIELDS = ("step", "epoch", "loss", "lr", "val_psnr_y", "elapsed_s")


# ----------------------------------------------------------------------------- objectives


class RRDBObjective(nn.Module):
    """Stage 1: L1 between the RRDB's x4 image and HR."""

    def __init__(self, net: SRDiffNet) -> None:
        super().__init__()
        self.rrdb = net.rrdb

    def forward(self, img_lr: Tensor, img_hr: Tensor) -> Tensor:
        out, _ = self.rrdb(img_lr)
        return F.l1_loss(out.float(), img_hr)


class DiffusionObjective(nn.Module):
    """Stage 2: L1(target, denoiser(x_t, t, cond)), x_t noised with e' (the structure-modulated noise).

    The target follows `ModelConfig.prediction`: e' itself (the paper's), v, or the clean residual x0;
    the residual is taken over `ModelConfig.residual_base` (bicubic up(LR) or the frozen RRDB's x4 output).
    """

    def __init__(self, net: SRDiffNet, sched: Schedule, structure: bool) -> None:
        super().__init__()
        self.net, self.sched, self.structure = net, sched, structure

    def forward(self, img_lr: Tensor, img_lr_up: Tensor, img_hr: Tensor, spe: Tensor, t: Tensor,
                noise: Tensor) -> Tensor:
        cfg = self.net.cfg
        # The frozen encoder runs in float32 even under autocast: its x4 output may be the residual's base,
        # which bfloat16 would round to about 1/256.
        with torch.no_grad(), torch.autocast(img_lr.device.type, enabled=False):
            sr, feats = self.net.rrdb(img_lr.float())
        cond = self.net.denoise_fn.project_cond(feats)
        base = sr if cfg.residual_base == "rrdb" else img_lr_up
        x0 = img2res(img_hr, base, cfg.res_rescale)
        if self.structure:
            noise = modulate_noise(self.sched, noise, t, spe)
        x_t = q_sample(self.sched, x0, t, noise)
        target = training_target(self.sched, cfg.prediction, x0, noise, t)
        return F.l1_loss(self.net.denoise(x_t, t, cond).float(), target)


def trained_module(net: SRDiffNet, stage: Stage) -> nn.Module:
    return net.rrdb if stage == "rrdb" else net.denoise_fn


# ----------------------------------------------------------------------------- EMA, LR schedule


class EMA:
    """Exponential moving average of a module's parameters (kept in float32 on the same device)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, p in module.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into `module`."""
        saved = {k: p.detach().clone() for k, p in module.named_parameters()}
        with torch.no_grad():
            for k, p in module.named_parameters():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in module.named_parameters():
                    p.copy_(saved[k])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Step decay as in the original: lr * gamma ** (step // decay_every)."""
    return cfg.optim.lr * cfg.optim.gamma ** (step // cfg.optim.decay_every)


# ----------------------------------------------------------------------------- distributed helpers


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> Dist:
    """Join the process group that torchrun describes (env WORLD_SIZE > 1); otherwise single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays on `device`: CUDA, or a CPU with native bf16 (AVX-512 BF16 / AMX)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    return dev


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch (exact resume)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator for the timesteps and noise of one training step of one process."""
    state = np.random.SeedSequence([seed, step, rank, 0x5D1F]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


# ----------------------------------------------------------------------------- state files


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
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
    tmp = _atomic_dir(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    meta = {**meta, "param_groups": osd["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _commit_dir(tmp, path)


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


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- validation


def bicubic_psnr(pairs: list[tuple[str, Tensor, Tensor]], scale: int) -> float:
    """Mean PSNR-Y of MATLAB-bicubic upscaling over the validation crops."""
    return float(np.mean([psnr_y(quantize8(bicubic_upscale(lr01.permute(1, 2, 0).numpy(), scale)),
                                 hr01.permute(1, 2, 0).numpy(), scale) for _, hr01, lr01 in pairs]))


@torch.no_grad()
def validate(net: SRDiffNet, stage: Stage, pairs: list[tuple[str, Tensor, Tensor]], steps: int,
             device: torch.device) -> float:
    """Mean PSNR-Y over validation crops, each upscaled whole by `model.upscale.Upscaler`: the encoder's own
    output (stage 1, or `steps=0`), else DDIM (eta=0) with `steps` steps."""
    runtime = TorchRuntime(net, CheckpointInfo(config=net.cfg), device)
    upscaler = Upscaler(runtime, tile=0)
    scores = []
    for _, hr01, lr01 in pairs:
        sr01 = upscaler.upscale_rgb(lr01.permute(1, 2, 0).numpy(), 0 if stage == "rrdb" else steps, "ddim")
        scores.append(psnr_y(quantize8(sr01), hr01.permute(1, 2, 0).numpy(), net.cfg.scale))
    net.train()
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """CSV + TensorBoard (rank 0 only). On resume, rows after the resumed step are dropped."""

    def __init__(self, out: Path, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        rows = []
        if start_step > 0 and self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is optional
            log.warning("tensorboard is not installed; writing metrics.csv only")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})
        if self.tb is not None:
            for k in ("loss", "lr", "val_psnr_y"):
                if row.get(k) not in (None, ""):
                    self.tb.add_scalar(f"train/{k}" if k != "val_psnr_y" else "val/psnr_y", row[k], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(csv_path: Path, png_path: Path, title: str = "") -> Path:
    """Loss (and validation PSNR-Y, when logged) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    loss = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_psnr_y"])) for r in rows if r["val_psnr_y"]]
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(11 if val else 6, 4), squeeze=False)
    ax = axes[0][0]
    if loss:
        ax.plot(*zip(*loss, strict=True), lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (L1)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if val:
        ax2 = axes[0][1]
        ax2.plot(*zip(*val, strict=True), marker="o")
        ax2.set_xlabel("step")
        ax2.set_ylabel("validation PSNR-Y (dB)")
        ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------- the loop


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints and returns at the next step boundary."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        log.warning("received signal %d: checkpointing and stopping", signum)
        self.set = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_model(cfg: TrainConfig, stage: Stage, seed: int) -> SRDiffNet:
    mcfg: ModelConfig = cfg.model.build()
    torch.manual_seed(seed)
    net = SRDiffNet(mcfg)
    if stage == "diffusion":
        src = cfg.diffusion.rrdb_checkpoint
        if src is None:
            raise ValueError("stage 2 needs diffusion.rrdb_checkpoint (a stage-1 checkpoint)")
        pre, info = load_checkpoint(src)
        a, b = info.config, mcfg
        keys = ("scale", "rrdb_num_block", "rrdb_num_feat", "rrdb_growth")
        if any(getattr(a, k) != getattr(b, k) for k in keys):
            raise ValueError(f"{src}: its RRDB ({[getattr(a, k) for k in keys]}) does not match this "
                             f"config's ({[getattr(b, k) for k in keys]})")
        net.rrdb.load_state_dict(pre.rrdb.state_dict())
        net.rrdb.requires_grad_(False)
    return net


def train(cfg: TrainConfig, stage: Stage, out_dir: str | Path, resume: bool = True,
          progress: bool = True) -> Path:
    """Train one stage into `out_dir`; returns the checkpoint directory (written by rank 0)."""
    d = init_distributed(cfg.run.device)
    device = pick_device(cfg.run.device, d)
    if cfg.run.threads and device.type == "cpu":
        torch.set_num_threads(cfg.run.threads)
    out = Path(out_dir)
    state_dir, ckpt_dir = out / "state", out / "checkpoint"
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"stage": stage, **cfg.model_dump(mode="json")},
                                                    indent=2) + "\n")
    mcfg = cfg.model.build()
    seed = cfg.run.seed

    net = build_model(cfg, stage, seed).to(device)
    if cfg.optim.channels_last:
        net = net.to(memory_format=torch.channels_last)
    module = trained_module(net, stage)
    sched = make_schedule(mcfg.timesteps, mcfg.beta_s).to(device)
    objective: nn.Module = RRDBObjective(net) if stage == "rrdb" else \
        DiffusionObjective(net, sched, cfg.diffusion.structure)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                           weight_decay=cfg.optim.weight_decay)
    ema = EMA(module, cfg.optim.ema) if cfg.optim.ema > 0 else None

    step, epoch, offset = 0, 0, 0
    if resume and (state_dir / "state.json").exists():
        saved = json.loads((state_dir / "state.json").read_text())
        if saved.get("stage") != stage:
            raise ValueError(f"{state_dir} holds a {saved.get('stage')!r} run, not {stage!r}")
        if "model" in saved and ModelConfig.from_dict(saved["model"]) != mcfg:
            raise ValueError(f"{state_dir} was trained with another model config; use --fresh or another --out")
        meta = load_training_state(state_dir, module, opt, ema, device)
        step, epoch, offset = meta["step"], meta["epoch"], meta["offset"]
        if d.main:
            log.info("resumed %s at step %d (epoch %d, batch %d)", state_dir, step, epoch, offset)
    if d.enabled:
        dist.barrier()

    # Data: rank 0 fills the cache first, the others then read it.
    dcfg = cfg.data
    spe_dir = dcfg.spe_dir if (stage == "diffusion" and cfg.diffusion.structure) else None
    if stage == "diffusion" and cfg.diffusion.structure and spe_dir is None:
        raise ValueError("structure-modulated training needs data.spe_dir (or use --no-structure)")
    images = None
    for turn in ((0,) if not d.enabled else (0, 1)):
        if (turn == 0) == d.main:
            images = prepare_images(dcfg.train_dir, dcfg.cache_dir, mcfg.scale, spe_dir, dcfg.missing_spe,
                                    min_hr=dcfg.hr_patch)
        if d.enabled:
            dist.barrier()
    assert images is not None
    dataset = PatchDataset(images, dcfg.hr_patch, mcfg.scale, dcfg.repeat, dcfg.augment, seed)
    sampler = ResumableSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed,
                               drop_last=True)
    batches_per_epoch = len(dataset) // d.world // dcfg.batch_size
    if batches_per_epoch < 1:
        raise ValueError(f"{len(dataset)} samples per epoch are fewer than one batch per process; "
                         "raise data.repeat")
    pairs = []
    if d.main and dcfg.val_dir is not None and cfg.val.every:
        pairs = val_pairs(dcfg.val_dir, dcfg.cache_dir, mcfg.scale, cfg.val.crop, cfg.val.max_images)
        if pairs:
            log.info("validation: %d crops, bicubic PSNR-Y %.3f dB (the baseline to beat)", len(pairs),
                     bicubic_psnr(pairs, mcfg.scale))

    train_model: nn.Module = objective
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    amp = cfg.optim.amp and bf16_supported(device)
    metrics = Metrics(out, step, d.main)
    if d.main:
        log.info("%s: %d training images, %d params trained, %d steps, device %s, %d process(es)",
                 stage, len(images), sum(p.numel() for p in module.parameters()), cfg.run.steps, device,
                 d.world)

    def save() -> None:
        if not d.main:
            return
        meta = {"stage": stage, "step": step, "epoch": epoch, "offset": offset, "seed": seed,
                "world_size": d.world, "model": mcfg.to_dict()}
        save_training_state(state_dir, module, opt, ema, meta)
        ctx = ema.applied(module) if ema is not None else contextlib.nullcontext()
        training = {"stage": stage, "steps": step, "structure": bool(stage == "diffusion"
                                                                      and cfg.diffusion.structure),
                    "ema": cfg.optim.ema, "data": str(dcfg.train_dir), "images": len(images),
                    "hr_patch": dcfg.hr_patch, "batch_size": dcfg.batch_size * d.world}
        info = CheckpointInfo(config=mcfg, name=cfg.name,
                              provenance={"source": "samdiffsr train", "git": _git_commit()},
                              training=training)
        with ctx:
            tmp = _atomic_dir(ckpt_dir)
            save_checkpoint(tmp, net, info)
            _commit_dir(tmp, ckpt_dir)

    bar = None
    if d.main and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.steps, initial=step, desc=f"train {stage}", dynamic_ncols=True,
                   mininterval=1.0 if os.isatty(2) else 30.0)
    t0 = time.monotonic()
    running: list[float] = []
    objective.train()
    stopping = False
    with _StopFlag() as stop:
        while step < cfg.run.steps:
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.start = offset * dcfg.batch_size
            loader = DataLoader(dataset, batch_size=dcfg.batch_size, sampler=sampler, drop_last=True,
                                num_workers=dcfg.workers, pin_memory=device.type == "cuda")
            for batch in loader:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg)
                img_lr, img_lr_up, img_hr = model_inputs(batch, mcfg, device)
                if cfg.optim.channels_last:
                    img_lr, img_lr_up, img_hr = (x.contiguous(memory_format=torch.channels_last)
                                                 for x in (img_lr, img_lr_up, img_hr))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    if stage == "rrdb":
                        loss = train_model(img_lr, img_hr)
                    else:
                        gen = step_generator(seed, step, d.rank, device)
                        t = torch.randint(0, sched.num_timesteps, (img_hr.shape[0],), device=device,
                                          generator=gen)
                        noise = torch.randn(img_hr.shape, device=device, generator=gen)
                        loss = train_model(img_lr, img_lr_up, img_hr, batch["spe"].to(device), t, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
                opt.step()
                if ema is not None:
                    ema.update(module)
                step += 1
                offset += 1
                if offset >= batches_per_epoch:
                    epoch, offset = epoch + 1, 0
                loss_v = loss.detach()
                if d.enabled:
                    dist.all_reduce(loss_v)
                    loss_v /= d.world
                running.append(float(loss_v))
                if not math.isfinite(running[-1]):
                    raise FloatingPointError(f"loss is {running[-1]} at step {step}")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{running[-1]:.4f}", refresh=False)
                row: dict = {}
                if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                    row = {"loss": float(np.mean(running)), "lr": lr_at(step - 1, cfg)}
                    running = []
                if pairs and (step % cfg.val.every == 0 or step == cfg.run.steps):
                    ctx = ema.applied(module) if ema is not None else contextlib.nullcontext()
                    with ctx:
                        row["val_psnr_y"] = validate(net, stage, pairs, cfg.val.steps, device)
                    log.info("step %d: validation PSNR-Y %.3f dB", step, row["val_psnr_y"])
                if row:
                    row.update(step=step, epoch=epoch, elapsed_s=round(time.monotonic() - t0, 1))
                    metrics.write(row)
                out_of_time = cfg.run.max_minutes > 0 and time.monotonic() - t0 > cfg.run.max_minutes * 60
                stopping = stop.set or out_of_time
                if d.enabled:
                    flag = torch.tensor([float(stopping)], device=device)
                    dist.all_reduce(flag)
                    stopping = bool(flag.item())
                if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps or stopping:
                    save()
                    if d.enabled:
                        dist.barrier()
                if stopping:
                    log.warning("stopped at step %d (%s); resume with the same command", step,
                                "time budget" if out_of_time else "signal")
                    break
                if step >= cfg.run.steps:
                    break
            if stopping or step >= cfg.run.steps:
                break
    if bar is not None:
        bar.close()
    metrics.close()
    if d.main and metrics.path.exists():
        plot_curves(metrics.path, out / "curves.png", f"{cfg.name}: {stage}")
    if d.enabled:
        dist.barrier()
    return ckpt_dir
