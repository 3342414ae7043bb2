"""Two-stage training: RRDB pretraining (L1), then the diffusion denoiser with the RRDB frozen.

Stage 2 is SAM-DiffSR's: the noise of each training patch is modulated by its SPE map
(`model.diffusion.modulate_noise`); the denoiser learns the model's prediction target (noise, v or the
clean residual; `training.objectives`). With `diffusion.structure = false` it is plain SRDiff (ablations).

Runs on one device or many (`torchrun`, DistributedDataParallel; `data.batch_size` is per process).
Everything random is a pure function of (seed, step, rank) or (seed, epoch, index), so a resumed run
is identical to an uninterrupted one. Outputs, under the run directory:

- `checkpoint/`: the served weights in our format (EMA weights when EMA is enabled);
- `state/`: exact training state (`state.safetensors` for tensors, or its shards with `run.state_shard_mb`;
  `state.json` for the rest), loadable on any device;
- `metrics.csv`, `tb/` (TensorBoard), `curves.png` (loss and validation PSNR), `train.log`.

`train()` is the recipe; `Trainer` holds the run's parts, one method per concern.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.checkpoint import CheckpointInfo, save_checkpoint
from model.config import ModelConfig
from model.diffusion import make_schedule, timestep_plan
from model.inputs import uses_up
from model.upscale import default_steps
from training.build import build_model, same_trained_network
from training.config import TrainConfig
from training.data import PatchDataset, model_inputs, prepare_images, val_pairs
from training.distributed import (
    ResumableSampler,
    StopFlag,
    bf16_supported,
    init_distributed,
    main_first,
    own_process_group,
    pick_device,
    step_generator,
)
from training.objectives import DiffusionObjective, RRDBObjective, Stage, draw_timesteps, param_groups, trained_module
from training.optim import EMA, lr_at
from training.runlog import RunLog, plot_curves
from training.state import atomic_dir, commit_dir, git_commit, load_training_state, save_training_state
from training.teacher import teacher_targets
from training.validation import bicubic_psnr, validate

log = logging.getLogger(__name__)


class Trainer:
    """One stage's run: network, objective, optimiser, EMA, data, validation crops, logs and state files.

    `net` is the network being trained (the served checkpoint is its weights); `trained` is the part of it that the
    optimiser, the EMA and the state files own; `objective` computes the loss over `net`, wrapped in
    DistributedDataParallel when the run is distributed.
    """

    def __init__(self, cfg: TrainConfig, stage: Stage, out_dir: str | Path, resume: bool = True,
                 progress: bool = True) -> None:
        self.cfg, self.stage = cfg, stage
        self.d = init_distributed(cfg.run.device)
        self.device = device = pick_device(cfg.run.device, self.d)
        if cfg.run.threads and device.type == "cpu":
            torch.set_num_threads(cfg.run.threads)
        self.out = Path(out_dir)
        self.mcfg = cfg.model.build()
        self.seed = cfg.run.seed
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps({"stage": stage, **cfg.model_dump(mode="json")},
                                                             indent=2) + "\n")
        self.net = build_model(cfg, stage, self.seed).to(device)
        if cfg.optim.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.tune_encoder = stage == "diffusion" and cfg.diffusion.tunes_encoder
        self.sched = make_schedule(self.mcfg.timesteps, self.mcfg.beta_s).to(device)
        self.plan_steps = cfg.diffusion.plan_steps or default_steps(self.mcfg)  # for diffusion.plan_prob
        self.plan = torch.tensor(timestep_plan(self.mcfg.timesteps, self.plan_steps), dtype=torch.long,
                                 device=device)
        if stage == "diffusion" and cfg.diffusion.plan_prob > 0 and not len(self.plan):
            raise ValueError("diffusion.plan_prob draws from the served plan, but the model serves 0 steps "
                             "(extras.default_steps): set diffusion.plan_steps")
        groups = param_groups(self.trained, self.net, cfg.diffusion.encoder_lr)
        self.lr_scales = [g["lr_scale"] for g in groups]  # the config's, also over a resumed state's
        self.opt = torch.optim.Adam(groups, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                    weight_decay=cfg.optim.weight_decay)
        self.ema = EMA(self.trained, cfg.optim.ema) if cfg.optim.ema > 0 else None
        self.amp = cfg.optim.amp and bf16_supported(device)
        self.step = self.epoch = self.offset = self.epoch_samples = 0
        if resume:
            self._resume()
        self._load_data()
        self.objective = self._objective()
        self.runlog = RunLog(self.out, self.step, self.d.main)
        self.running: list[float] = []
        self.t0 = self.saved_at = time.monotonic()
        self.data_wait_s = 0.0  # time the loop waited for the data loader (with CUDA: the GPU may be starved)
        self.save_now = False  # set by should_stop when run.checkpoint_minutes have passed since the last save
        self.bar = None
        if self.d.main and progress:
            self.bar = tqdm(total=cfg.run.steps, initial=self.step, desc=f"train {stage}", dynamic_ncols=True,
                            mininterval=1.0 if os.isatty(2) else 30.0)
        if self.d.main:
            log.info("%s: %d training images, %d params trained, %d steps, device %s, %d process(es), bf16 %s",
                     stage, len(self.images), sum(p.numel() for g in groups for p in g["params"]), cfg.run.steps,
                     device, self.d.world, self.amp)

    # ------------------------------------------------------------------------- set-up

    @property
    def trained(self) -> nn.Module:
        """What the optimiser, the EMA and the state files own: the encoder (stage 1), the denoiser (stage 2), or both
        (`diffusion.encoder_lr`)."""
        return trained_module(self.net, self.stage, self.tune_encoder)

    @property
    def state_dir(self) -> Path:
        return self.out / "state"

    def _objective(self) -> nn.Module:
        """The loss over `net`; distributed, in DistributedDataParallel, which takes rank 0's weights as it is built
        (hence after `_resume`) and averages the gradients in the backward pass."""
        cfg = self.cfg
        objective: nn.Module = RRDBObjective(self.net, cfg.optim.pixel_loss) if self.stage == "rrdb" else \
            DiffusionObjective(self.net, self.sched, cfg.diffusion.structure, self.tune_encoder,
                               cfg.diffusion.encoder_l1)
        if not self.d.enabled:
            return objective
        device = self.device
        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)

    def _resume(self) -> None:
        path = self.state_dir / "state.json"
        if not path.exists():
            return
        saved = json.loads(path.read_text())
        if saved.get("stage") != self.stage:
            raise ValueError(f"{self.state_dir} holds a {saved.get('stage')!r} run, not {self.stage!r}")
        if "model" in saved and not same_trained_network(ModelConfig.from_dict(saved["model"]), self.mcfg, self.stage):
            raise ValueError(f"{self.state_dir} was trained with another model config; use --fresh or another --out")
        if saved.get("tune_encoder", False) != self.tune_encoder:
            how = "tuned" if saved.get("tune_encoder") else "frozen"
            raise ValueError(f"{self.state_dir} was trained with the encoder {how} (diffusion.encoder_lr); to switch, "
                             "start another --out with run.init set to its checkpoint")
        meta = load_training_state(self.state_dir, self.trained, self.opt, self.ema, self.device)
        for g, scale in zip(self.opt.param_groups, self.lr_scales, strict=True):
            g["lr_scale"] = scale
        self.step, self.epoch, self.offset = meta["step"], meta["epoch"], meta["offset"]
        # Where in the epoch, in samples: the batch size or the number of processes may change on resume.
        per_step = meta.get("batch_size", self.cfg.data.batch_size) * meta.get("world_size", self.d.world)
        self.epoch_samples = self.offset * per_step
        if self.d.main:
            log.info("resumed %s at step %d (epoch %d, batch %d)", self.state_dir, self.step, self.epoch, self.offset)
        if self.d.enabled:
            dist.barrier()

    def _load_data(self) -> None:
        """Training patches (rank 0 fills the cache first, the others then read it) and validation crops."""
        cfg, dcfg, stage, d = self.cfg, self.cfg.data, self.stage, self.d
        structure = stage == "diffusion" and cfg.diffusion.structure
        if structure and dcfg.spe_dir is None:
            raise ValueError("structure-modulated training needs data.spe_dir (or use --no-structure)")
        spe_dir = dcfg.spe_dir if structure else None
        self.images = main_first(d, lambda: prepare_images(dcfg.train_dir, dcfg.cache_dir, self.mcfg.scale, spe_dir,
                                                           dcfg.missing_spe, min_hr=dcfg.hr_patch))
        real = dcfg.degradation.real if dcfg.degradation.kind == "real" else None
        teachers, teacher = None, dcfg.teacher
        if teacher is not None:
            teachers = main_first(d, lambda: teacher_targets(self.images, teacher.checkpoint, teacher.steps,
                                                             teacher.ensemble, teacher.tile, teacher.precision,
                                                             cfg.run.device))
        self.dataset = PatchDataset(self.images, dcfg.hr_patch, self.mcfg.scale, dcfg.repeat, dcfg.augment,
                                    self.seed, real, teachers, teacher.weight if teacher else 0.0)
        self.sampler = ResumableSampler(self.dataset, num_replicas=d.world, rank=d.rank, shuffle=True,
                                        seed=self.seed, drop_last=True)
        self.batches_per_epoch = len(self.dataset) // d.world // dcfg.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"{len(self.dataset)} samples per epoch are fewer than one batch per process; "
                             "raise data.repeat")
        offset = -(-self.epoch_samples // (dcfg.batch_size * d.world))  # the first batch not yet trained on
        if offset != self.offset or offset >= self.batches_per_epoch:
            if offset >= self.batches_per_epoch:
                self.epoch, offset = self.epoch + 1, 0
            if d.main:
                log.info("batch size, processes or data changed since the saved state: going on at batch %d of "
                         "epoch %d", offset, self.epoch)
        self.offset = offset
        self.pairs = []
        if d.main and dcfg.val_dir is not None and cfg.val.every:
            self.pairs = val_pairs(dcfg.val_dir, dcfg.cache_dir, self.mcfg.scale, cfg.val.crop, cfg.val.max_images,
                                   cfg.val.degradation)
            if self.pairs:
                log.info("validation: %d crops, bicubic PSNR-Y %.3f dB (the baseline to beat)", len(self.pairs),
                         bicubic_psnr(self.pairs, self.mcfg.scale))

    # ------------------------------------------------------------------------- one concern each

    def batches(self) -> Iterator[dict[str, Tensor]]:
        """Training batches from the current (epoch, offset) on, until `run.steps`."""
        dcfg = self.cfg.data
        while self.step < self.cfg.run.steps:
            self.dataset.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch)
            self.sampler.start = self.offset * dcfg.batch_size
            loader = DataLoader(self.dataset, batch_size=dcfg.batch_size, sampler=self.sampler, drop_last=True,
                                num_workers=dcfg.workers, pin_memory=self.device.type == "cuda",
                                worker_init_fn=own_process_group if dcfg.workers else None)
            batches = iter(loader)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                self.data_wait_s += time.perf_counter() - t0
                if batch is None:
                    break
                yield batch
                if self.step >= self.cfg.run.steps:
                    return

    def set_lr(self) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.cfg) * g.get("lr_scale", 1.0)

    def optimize(self, batch: dict[str, Tensor]) -> float:
        """One optimiser step on `batch`; returns the (all-reduced) loss."""
        cfg, device = self.cfg, self.device
        # Bicubic up(LR) is made only where it is the residual's base: nothing else reads it.
        with_up = self.stage == "diffusion" and uses_up(self.mcfg)
        img_lr, img_lr_up, img_hr = model_inputs(batch, self.mcfg, device, with_up)
        if cfg.optim.channels_last:
            img_lr, img_lr_up, img_hr = (x if x is None else x.contiguous(memory_format=torch.channels_last)
                                         for x in (img_lr, img_lr_up, img_hr))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.stage == "rrdb":
                loss = self.objective(img_lr, img_hr)
            else:
                gen = step_generator(self.seed, self.step, self.d.rank, device)
                t = draw_timesteps(img_hr.shape[0], self.sched.num_timesteps, gen, device, self.plan,
                                   cfg.diffusion.plan_prob)
                noise = torch.randn(img_hr.shape, device=device, generator=gen)
                loss = self.objective(img_lr, img_lr_up, img_hr, batch["spe"].to(device), t, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.trained.parameters(), cfg.optim.clip_grad)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.trained)
        self.step += 1
        self.offset += 1
        if self.offset >= self.batches_per_epoch:
            self.epoch, self.offset = self.epoch + 1, 0
        loss_v = loss.detach()
        if self.d.enabled:
            dist.all_reduce(loss_v)
            loss_v /= self.d.world
        value = float(loss_v)
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step}")
        return value

    def due(self, every: int) -> bool:
        """True every `every` steps and at the last step."""
        return self.step % every == 0 or self.step == self.cfg.run.steps

    def log(self, loss: float, val_psnr_y: float | None) -> None:
        self.running.append(loss)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        row: dict = {}
        if self.due(self.cfg.run.log_every):
            row = {"loss": float(np.mean(self.running)), "lr": lr_at(self.step - 1, self.cfg)}
            self.running = []
        if val_psnr_y is not None:
            row["val_psnr_y"] = val_psnr_y
            log.info("step %d: validation PSNR-Y %.3f dB", self.step, val_psnr_y)
        if row:
            row.update(step=self.step, epoch=self.epoch, elapsed_s=round(time.monotonic() - self.t0, 1))
            self.runlog.write(row)

    def validate(self) -> float | None:
        """Validation PSNR-Y (of the EMA weights when EMA is on), when it is due; else None."""
        if not self.pairs or not self.due(self.cfg.val.every):
            return None
        with self._ema_weights():
            return validate(self.net, self.stage, self.pairs, self.cfg.val.steps, self.device)

    def should_stop(self, stop: StopFlag) -> bool:
        """A signal or the time budget; also whether `run.checkpoint_minutes` call for a save (`save_now`).
        Both are agreed by every process."""
        run, now = self.cfg.run, time.monotonic()
        self.out_of_time = run.max_minutes > 0 and now - self.t0 > run.max_minutes * 60
        stopping = stop.set or self.out_of_time
        self.save_now = run.checkpoint_minutes > 0 and now - self.saved_at > run.checkpoint_minutes * 60
        if self.d.enabled:
            flags = torch.tensor([float(stopping), float(self.save_now)], device=self.device)
            dist.all_reduce(flags)
            stopping, self.save_now = bool(flags[0].item()), bool(flags[1].item())
        return stopping

    def save(self) -> None:
        """The exact training state and the served checkpoint (EMA weights when EMA is on); rank 0 writes."""
        if self.d.main:
            cfg, dcfg = self.cfg, self.cfg.data
            meta = {"stage": self.stage, "step": self.step, "epoch": self.epoch, "offset": self.offset,
                    "batch_size": dcfg.batch_size, "seed": self.seed, "world_size": self.d.world,
                    "model": self.mcfg.to_dict(), "tune_encoder": self.tune_encoder}
            save_training_state(self.state_dir, self.trained, self.opt, self.ema, meta,
                                shard_bytes=int(cfg.run.state_shard_mb * 2**20))
            training = {"stage": self.stage, "steps": self.step,
                        "structure": bool(self.stage == "diffusion" and cfg.diffusion.structure),
                        "encoder_lr": cfg.diffusion.encoder_lr if self.tune_encoder else 0.0,
                        "encoder_l1": cfg.diffusion.encoder_l1 if self.tune_encoder else 0.0,
                        "plan_prob": cfg.diffusion.plan_prob, "plan_steps": self.plan_steps,
                        "ema": cfg.optim.ema, "pixel_loss": cfg.optim.pixel_loss if self.stage == "rrdb" else None,
                        "data": str(dcfg.train_dir), "images": len(self.images),
                        "hr_patch": dcfg.hr_patch, "batch_size": dcfg.batch_size * self.d.world,
                        "degradation": dcfg.degradation.kind, "val_degradation": cfg.val.degradation,
                        "teacher": None if dcfg.teacher is None else dcfg.teacher.model_dump(mode="json"),
                        "init": None if cfg.run.init is None else str(cfg.run.init)}
            info = CheckpointInfo(config=self.mcfg, name=cfg.name,
                                  provenance={"source": "samdiffsr train", "git": git_commit()}, training=training)
            with self._ema_weights():
                tmp = atomic_dir(self.out / "checkpoint")
                save_checkpoint(tmp, self.net, info, dtype=cfg.run.checkpoint_dtype)
                commit_dir(tmp, self.out / "checkpoint")
        self.saved_at = time.monotonic()
        if self.d.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.runlog.close()
        if self.d.main and self.runlog.path.exists():
            plot_curves(self.runlog.path, self.out / "curves.png", f"{self.cfg.name}: {self.stage}")
        if self.d.enabled:
            dist.barrier()

    def _ema_weights(self) -> contextlib.AbstractContextManager:
        return self.ema.applied(self.trained) if self.ema is not None else contextlib.nullcontext()


def train(cfg: TrainConfig, stage: Stage, out_dir: str | Path, resume: bool = True,
          progress: bool = True, on_save: Callable[[Trainer], None] | None = None) -> Path:
    """Train one stage into `out_dir`; returns the checkpoint directory (written by rank 0). `on_save` is
    called on rank 0 after every save (e.g. to copy the run's files out: `training.window`)."""
    trainer = Trainer(cfg, stage, out_dir, resume, progress)

    def save() -> None:
        trainer.save()
        if on_save is not None and trainer.d.main:
            on_save(trainer)

    trainer.objective.train()
    stopping = False
    with StopFlag() as stop:
        try:
            for batch in trainer.batches():
                trainer.set_lr()
                loss = trainer.optimize(batch)
                trainer.log(loss, trainer.validate())
                stopping = trainer.should_stop(stop)
                if trainer.due(cfg.run.checkpoint_every) or stopping or trainer.save_now:
                    save()
                if stopping:
                    break
        except RuntimeError as e:
            if not stop.set or "DataLoader worker" not in str(e):
                raise
            # A loader worker forked as the signal came got it too; every finished step is intact.
            stopping = True
            save()
        if stopping:
            log.warning("stopped at step %d (%s); resume with the same command", trainer.step,
                        "time budget" if trainer.out_of_time else "signal")
    trainer.close()
    return trainer.out / "checkpoint"
