"""A checkpoint of ours from published pretrained weights: the encoder loaded strictly, a fresh denoiser."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint import CheckpointInfo, save_checkpoint
from model.config import PRESETS, ModelConfig
from model.network import SRDiffNet
from model.pretrained import PUBLISHED
from model.pretrained_encoder import PretrainedEncoder, encoder_name, member_blocks


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


def member_net(net: SRDiffNet, name: str, seed: int = 0) -> SRDiffNet:
    """One network of `net`'s fused encoder as a model of its own: that member's weights (its blocks as `net` keeps
    them), the rest of `net`'s configuration, and a fresh denoiser that returns the member's image at any step
    count (`start_as_identity`)."""
    blocks = member_blocks(net.cfg.encoder)
    if name not in blocks or len(blocks) < 2:
        raise ValueError(f"{name!r} is not a member of the fused encoder {net.cfg.encoder!r}")
    cfg = dataclasses.replace(net.cfg, encoder=encoder_name({name: blocks[name]}, net.cfg.pretrained_widths))
    torch.manual_seed(seed)
    out = SRDiffNet(cfg)
    out.rrdb.nets[name].load_state_dict(net.rrdb.nets[name].state_dict())
    start_as_identity(out)
    return out.eval()


def refiner_config(encoder: str) -> ModelConfig:
    """The shape of the refiners over pretrained encoders (configs/refine.yaml): an LR-space U-Net of width 32,
    multipliers 1-2, predicting the residual over the encoder's image."""
    return dataclasses.replace(PRESETS["small"], encoder=encoder, denoiser_space="lr", prediction="sample",
                               residual_base="rrdb", hidden_size=32, dim_mults=(1, 2))


def save_untrained(out: str | Path, net: SRDiffNet, name: str, card: dict[str, Any],
                   provenance: dict[str, Any]) -> Path:
    """Save a network on pretrained encoders whose denoiser is untrained: served at steps=0 (its encoders' image)
    in 256-px LR tiles (measured on the validation photos, these networks lose nothing to them; docs/model-card.md)."""
    net.cfg = dataclasses.replace(net.cfg, extras={"default_tile": 256, **net.cfg.extras, "default_steps": 0})
    return save_checkpoint(out, net, CheckpointInfo(config=net.cfg, name=name, provenance=provenance, card=card))


def import_pretrained(out: str | Path, cfg: ModelConfig, weights: Mapping[str, str | Path], name: str,
                      seed: int = 0) -> Path:
    """Write a checkpoint of `cfg` with the published encoder weights (and its NOTICE): the starting point of a
    refiner's training, or, served at steps=0, the pretrained networks themselves."""
    net = pretrained_net(cfg, weights, seed)
    provenance = {"source": "samdiffsr import-pretrained",
                  "weights": {n: str(weights[n]) for n in cfg.pretrained}}
    card = {"summary": f"{' + '.join(n.upper() for n in cfg.pretrained)} (published weights); its denoiser is "
                       "untrained and returns the encoder's image at any step count"}
    return save_untrained(out, net, name, card, provenance)
