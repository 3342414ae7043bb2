"""A checkpoint of ours from published pretrained weights: the encoder loaded strictly, a fresh denoiser."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from model.checkpoint import CheckpointInfo, save_checkpoint
from model.config import ModelConfig
from model.network import SRDiffNet
from model.pretrained import PUBLISHED, PretrainedEncoder


def start_as_identity(net: SRDiffNet) -> None:
    """Zero the denoiser's last layer: with x0 prediction over the encoder's image it predicts a zero residual, so
    the model returns its encoder's image at any step count until it is trained."""
    last = net.denoise_fn.final_conv[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def pretrained_net(cfg: ModelConfig, weights: Mapping[str, str | Path], seed: int = 0,
                   check_sha256: bool = True) -> SRDiffNet:
    """A network of `cfg` (whose encoder names pretrained networks) with each member's published weights from
    `weights[name]` (the file, or the folder holding it) and a denoiser initialised from `seed`, its last layer
    zero (`start_as_identity`)."""
    if not cfg.pretrained:
        raise ValueError(f"encoder {cfg.encoder!r} names no pretrained network ({', '.join(PUBLISHED)})")
    missing = [n for n in cfg.pretrained if n not in weights]
    if missing:
        raise ValueError(f"no published weights given for {', '.join(missing)}")
    torch.manual_seed(seed)
    net = SRDiffNet(cfg)
    encoder = net.rrdb
    assert isinstance(encoder, PretrainedEncoder)
    encoder.load_published(dict(weights), check_sha256)
    start_as_identity(net)
    return net.eval()


def import_pretrained(out: str | Path, cfg: ModelConfig, weights: Mapping[str, str | Path], name: str,
                      seed: int = 0) -> Path:
    """Write a checkpoint of `cfg` with the published encoder weights (and its NOTICE): the starting point of a
    refiner's training, or, served at steps=0, the pretrained networks themselves."""
    net = pretrained_net(cfg, weights, seed)
    provenance = {"source": "samdiffsr import-pretrained",
                  "weights": {n: str(weights[n]) for n in cfg.pretrained}}
    card = {"summary": f"{' + '.join(n.upper() for n in cfg.pretrained)} (published weights); its denoiser is "
                       "untrained and returns the encoder's image at any step count"}
    # 256-px LR tiles: measured on the validation photos, these networks lose nothing to them (docs/model-card.md).
    extras = {"default_tile": 256, **cfg.extras, "default_steps": 0}
    cfg = dataclasses.replace(cfg, extras=extras)
    net.cfg = cfg
    return save_checkpoint(out, net, CheckpointInfo(config=cfg, name=name, provenance=provenance, card=card))
