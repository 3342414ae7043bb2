"""The network a training stage starts from: fresh or from `run.init`'s weights, with its encoder set up for stage 2
(a stage-1 checkpoint, the published pretrained encoders, or trained along), and whether a saved run may go on."""

from __future__ import annotations

import logging

import torch

from model.config import ModelConfig
from model.loading import load_any
from model.network import SRDiffNet
from model.published import pretrained_net
from training.config import TrainConfig
from training.fusion import fit_mix
from training.objectives import Stage, freeze

log = logging.getLogger(__name__)


# What a stage-1 checkpoint must match.
RRDB_SHAPE = ("scale", "encoder", "rrdb_num_block", "rrdb_num_feat", "rrdb_growth")
ENCODER_FIELDS = (*RRDB_SHAPE, "lr_up_divisor")  # what a resumed stage-1 run must keep


def build_model(cfg: TrainConfig, stage: Stage, seed: int) -> SRDiffNet:
    """A fresh network (from `run.init`'s weights when set); for stage 2 with the stage-1 RRDB loaded (and frozen
    unless `diffusion.encoder_lr` tunes it); the parameters `optim.frozen` names held fixed."""
    net = _build_model(cfg, stage, seed)
    freeze(net, cfg.optim.frozen)
    return net


def _build_model(cfg: TrainConfig, stage: Stage, seed: int) -> SRDiffNet:
    mcfg: ModelConfig = cfg.model.build()
    if stage == "diffusion" and from_published(cfg, mcfg):
        return published_start(cfg, mcfg, seed)
    torch.manual_seed(seed)
    net = SRDiffNet(mcfg)
    if cfg.run.init is not None:
        pre, info = load_any(cfg.run.init)
        if mcfg.pretrained and info.config.pretrained == mcfg.pretrained:
            pre.rrdb.keep(mcfg.pretrained_blocks)  # a pruned encoder starts from the whole one's first blocks
        try:
            net.load_state_dict(pre.state_dict())
        except RuntimeError as e:
            raise ValueError(f"{cfg.run.init}: its network does not match this config's: {e}") from None
        log.info("weights from %s", cfg.run.init)
    if stage == "diffusion":
        src = cfg.diffusion.rrdb_checkpoint
        if src is None:
            if cfg.diffusion.tunes_encoder:
                log.info("no diffusion.rrdb_checkpoint: the encoder trains with the denoiser (starting from %s "
                         "unless the run resumes)", cfg.run.init or "scratch")
                return net
            raise ValueError("stage 2 needs diffusion.rrdb_checkpoint (a stage-1 checkpoint), or "
                             "diffusion.encoder_lr > 0 to train the encoder with the denoiser")
        pre, info = load_any(src)
        a, b = info.config, mcfg
        keys = RRDB_SHAPE
        if any(getattr(a, k) != getattr(b, k) for k in keys):
            raise ValueError(f"{src}: its RRDB ({[getattr(a, k) for k in keys]}) does not match this "
                             f"config's ({[getattr(b, k) for k in keys]})")
        net.rrdb.load_state_dict(pre.rrdb.state_dict())
        net.rrdb.requires_grad_(cfg.diffusion.tunes_encoder)
    return net


def from_published(cfg: TrainConfig, mcfg: ModelConfig) -> bool:
    """Whether stage 2 starts from the published weights of its pretrained encoders (`diffusion.pretrained_dir`,
    no stage-1 checkpoint, no `run.init`)."""
    return (bool(mcfg.pretrained) and cfg.diffusion.pretrained_dir is not None
            and cfg.diffusion.rrdb_checkpoint is None and cfg.run.init is None)


def published_start(cfg: TrainConfig, mcfg: ModelConfig, seed: int) -> SRDiffNet:
    """The published encoders (`model.published.pretrained_net`: loaded strictly, the refiner starting as their
    image), their mix fitted where `diffusion.fit_mix_patches` asks, frozen unless `diffusion.encoder_lr` tunes
    them."""
    folders = {n: cfg.diffusion.pretrained_dir / n for n in mcfg.pretrained}
    net = pretrained_net(mcfg, folders, seed).train()
    log.info("encoder: the published %s weights from %s", "+".join(mcfg.pretrained), cfg.diffusion.pretrained_dir)
    if cfg.diffusion.fit_mix_patches and len(mcfg.pretrained) > 1:
        fit_mix(net.rrdb, cfg.data.train_dir, cfg.data.cache_dir, cfg.diffusion.fit_mix_patches, seed=seed)
    net.rrdb.requires_grad_(cfg.diffusion.tunes_encoder)
    return net


def same_trained_network(a: ModelConfig, b: ModelConfig, stage: Stage) -> bool:
    """Whether a run saved with config `a` can go on with `b`: stage 1 trains only the encoder, so only the
    encoder's fields must agree there (the diffusion's target and base may be chosen later)."""
    if stage == "rrdb":
        return all(getattr(a, k) == getattr(b, k) for k in ENCODER_FIELDS)
    return a == b

