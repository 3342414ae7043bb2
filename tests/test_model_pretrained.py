"""The pretrained encoders (RFDN, RLFN, SAFMN): conformance with the published networks' outputs, strict loading,
the checkpoints built on them and the licences they carry."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED
from PIL import Image

from model.attribution import NOTICE
from model.checkpoint import load_checkpoint_dir
from model.config import PRESETS, ModelConfig
from model.pretrained import PUBLISHED, load_published, load_strict, published_state
from model.pretrained_encoder import PretrainedEncoder, encoder_name, member_blocks, member_widths
from model.published import import_pretrained, pretrained_net
from model.runtime import TorchRuntime
from model.upscale import Upscaler
from samdiffsr.cli import main

PRETRAINED = SHARED / "pretrained"
REFERENCE = PRETRAINED / "reference"
INPUTS = sorted(p.name for p in (REFERENCE / "lr").glob("*.png"))


def _u8(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def networks() -> dict[str, torch.nn.Module]:
    return {name: load_published(name, PRETRAINED / name) for name in PUBLISHED}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_each_network_matches_its_conformance_vectors_within_one_level(name: str, networks: dict) -> None:
    """Whole image, fp32, through our encoder contract (LR in [-1, 1] -> x4 image in [-1, 1])."""
    assert INPUTS, "no conformance inputs"
    encoder = PretrainedEncoder((name,)).eval()
    encoder.nets[name] = networks[name]
    for file in INPUTS:
        lr = torch.from_numpy(_u8(REFERENCE / "lr" / file)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            sr, _ = encoder(lr * 2 - 1)
        ours = np.round(((sr[0] + 1) / 2).permute(1, 2, 0).numpy() * 255).astype(np.int16)
        expected = _u8(REFERENCE / name / file)
        assert ours.shape == expected.shape
        assert np.abs(ours - expected).max() <= 1, (name, file)


def test_parameter_counts_are_the_published_ones(networks: dict) -> None:
    for name, net in networks.items():
        assert sum(p.numel() for p in net.parameters()) == PUBLISHED[name].parameters


def test_loading_is_strict_and_names_what_does_not_match() -> None:
    state = published_state(PRETRAINED / "rlfn" / PUBLISHED["rlfn"].file)
    net = PUBLISHED["rlfn"].network()
    missing = {k: v for k, v in state.items() if k != "conv_2.bias"}
    with pytest.raises(ValueError, match=r"missing keys: conv_2\.bias"):
        load_strict(net, missing, "rlfn")
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
        load_strict(net, {**state, "extra.weight": torch.zeros(1)}, "rlfn")
    with pytest.raises(ValueError, match=r"wrong shapes: conv_1\.bias \(3,\)"):
        load_strict(net, {**state, "conv_1.bias": torch.zeros(3)}, "rlfn")
    with pytest.raises(ValueError, match="does not match"):  # another network's weights
        load_strict(net, published_state(PRETRAINED / "rfdn" / PUBLISHED["rfdn"].file), "rfdn weights")


def test_weights_that_are_not_the_published_file_are_refused(tmp_path: Path) -> None:
    state = published_state(PRETRAINED / "rlfn" / PUBLISHED["rlfn"].file)
    state["conv_1.bias"] = state["conv_1.bias"] + 1
    torch.save(state, tmp_path / PUBLISHED["rlfn"].file)
    with pytest.raises(ValueError, match="sha256"):
        load_published("rlfn", tmp_path)
    assert load_published("rlfn", tmp_path, check_sha256=False) is not None


def test_encoder_names_and_fusions_are_validated() -> None:
    base = PRESETS["tiny"]
    assert dataclasses.replace(base, encoder="rfdn+rlfn").pretrained == ("rfdn", "rlfn")
    narrowed = dataclasses.replace(base, encoder="rfdn:3+rlfn/32")
    assert narrowed.pretrained_blocks == {"rfdn": 3, "rlfn": 4} and narrowed.pretrained_widths == {"rlfn": 32}
    for name in ("rfdn:3+rlfn/32", "rfdn+rlfn", "rlfn:2", "safmn"):  # names written back as they were read
        assert encoder_name(member_blocks(name), member_widths(name)) == name
    for bad in ("rfdn+rfdn", "rfdn+rrdb", "srcnn", "rfdn+", "rfdn/32", "rlfn/48", "rlfn/", "rlfn/x"):
        with pytest.raises(ValueError, match="encoder must be one of"):
            dataclasses.replace(base, encoder=bad)
    with pytest.raises(ValueError, match="x4"):
        dataclasses.replace(base, encoder="rlfn", scale=2)


def test_a_checkpoint_on_a_pretrained_encoder_serves_the_network_at_steps_0_and_carries_its_notice(
        tmp_path: Path, networks: dict) -> None:
    cfg = dataclasses.replace(PRESETS["tiny"], encoder="rlfn", denoiser_space="lr", prediction="sample",
                              residual_base="rrdb")
    out = import_pretrained(tmp_path / "rlfn", cfg, {"rlfn": PRETRAINED / "rlfn"}, "rlfn-test")
    text = (out / NOTICE).read_text()
    assert "RLFN" in text and "MIT License" in text and PUBLISHED["rlfn"].sha256 in text
    net, info = load_checkpoint_dir(out)
    assert info.config.extras["default_steps"] == 0 and info.config.extras["default_tile"] == 256
    lr = torch.rand(1, 3, 24, 20)
    with torch.no_grad():
        _, sr = net.encode(lr * 2 - 1)
        direct, _ = networks["rlfn"](lr * 255)
    assert torch.allclose((sr + 1) / 2 * 255, direct.clamp(0, 255), atol=1e-3)
    shutil.rmtree(out)


def test_a_member_of_a_fusion_becomes_a_model_of_its_own(tmp_path: Path, networks: dict, capsys) -> None:
    """`samdiffsr repack PAIR OUT --member rlfn`: RLFN's weights as the pair holds them (pruned ones stay pruned),
    a denoiser that returns its image at any step count, served at steps=0; a name that is not a member is
    refused."""
    cfg = dataclasses.replace(PRESETS["tiny"], encoder="rfdn+rlfn:3", denoiser_space="lr", prediction="sample",
                              residual_base="rrdb")
    pair = import_pretrained(tmp_path / "pair", cfg, {n: PRETRAINED / n for n in cfg.pretrained}, "pair")
    assert main(["repack", str(pair), str(tmp_path / "rlfn"), "--member", "rlfn", "--dtype", "fp32"]) == 0
    net, info = load_checkpoint_dir(tmp_path / "rlfn")
    assert info.config.encoder == "rlfn:3" and info.config.extras["default_steps"] == 0
    assert info.provenance["member"].startswith("rlfn of ") and not info.card
    assert "RLFN" in (tmp_path / "rlfn" / NOTICE).read_text()
    whole, whole_info = load_checkpoint_dir(pair)
    whole.rrdb.mix.data.copy_(torch.tensor([[0.0] * 3, [1.0] * 3]))  # the pair's image: RLFN's alone
    lr = np.random.default_rng(0).random((20, 24, 3), dtype=np.float32)
    alone = Upscaler(TorchRuntime(net, info, torch.device("cpu")), tile=0)
    inside = Upscaler(TorchRuntime(whole, whole_info, torch.device("cpu")), tile=0)
    at0, at2 = (alone.upscale_rgb(lr, steps=steps, seed=1) for steps in (0, 2))
    assert np.abs(at0 - inside.upscale_rgb(lr, steps=0)).max() < 1e-5
    assert np.abs(at2 - at0).max() < 1e-5
    for bad in ("safmn", "rfdn:3"):
        assert main(["repack", str(pair), str(tmp_path / "x"), "--member", bad]) == 2
        assert "is not a member of the fused encoder 'rfdn+rlfn:3'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_each_network_alone_becomes_an_encoder_with_its_published_weights(name: str, networks: dict) -> None:
    cfg = dataclasses.replace(PRESETS["tiny"], encoder=name, denoiser_space="lr", prediction="sample",
                              residual_base="rrdb")
    net = pretrained_net(cfg, {name: PRETRAINED / name})
    mine = net.rrdb.nets[name].state_dict()
    assert mine.keys() == networks[name].state_dict().keys()
    assert all(torch.equal(v, networks[name].state_dict()[k]) for k, v in mine.items())


def test_a_fusion_starts_as_the_members_mean_and_conditions_on_every_member(networks: dict) -> None:
    cfg = dataclasses.replace(PRESETS["tiny"], encoder="rfdn+rlfn", denoiser_space="lr")
    net = pretrained_net(cfg, {n: PRETRAINED / n for n in cfg.pretrained})
    lr = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        cond, sr = net.encode(lr * 2 - 1)
        a, _ = networks["rfdn"](lr * 255)
        b, _ = networks["rlfn"](lr * 255)
    assert torch.allclose((sr + 1) / 2, ((a + b) / 2 / 255).clamp(0, 1), atol=1e-5)
    assert cond.shape == (1, *ModelConfig.cond_shape(cfg, 20, 24))
    assert cfg.cond_channels == 50 + 46 + 2 * 48


def test_inputs_smaller_than_the_attention_needs_are_padded_and_cropped_back(networks: dict) -> None:
    """ESA needs 15 px a side; a 4x40 tile (a thin image's) is padded by its edges, and its output cropped back."""
    encoder = PretrainedEncoder(("rfdn", "rlfn")).eval()
    for name in ("rfdn", "rlfn"):
        encoder.nets[name] = networks[name]
    for h, w in ((1, 1), (4, 40), (14, 15)):
        with torch.no_grad():
            sr, feats = encoder(torch.rand(1, 3, h, w) * 2 - 1)
        assert sr.shape == (1, 3, 4 * h, 4 * w) and feats[0].shape[-2:] == (h, w)
    x = torch.rand(1, 3, 24, 20) * 2 - 1  # large enough: no padding, the networks' own answer
    with torch.no_grad():
        sr, _ = encoder(x)
        direct = (networks["rfdn"]((x + 1) / 2 * 255)[0] + networks["rlfn"]((x + 1) / 2 * 255)[0]) / 2 / 255
    assert torch.allclose((sr + 1) / 2, direct.clamp(0, 1), atol=1e-5)


def test_the_folded_image_path_is_forwards_image(networks: dict) -> None:
    """`image` (steps=0: the mix, the input ranges and [-1, 1] folded into each member's last convolution, one
    pixel shuffle) gives `forward`'s image: each network alone and all three fused with uneven weights, at a
    photo's size and at a thin, padded size; in bf16 no further from fp32 than `forward` is."""
    photo = torch.from_numpy(_u8(REFERENCE / "lr" / INPUTS[0])).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    for names in [*((n,) for n in PUBLISHED), tuple(PUBLISHED)]:
        encoder = PretrainedEncoder(names).eval()
        for n in names:
            encoder.nets[n] = networks[n]
        if len(names) > 1:
            encoder.mix.data = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.4, 0.3], [0.2, 0.3, 0.5]])
        for x in (photo, photo[..., :4, :40]):
            with torch.no_grad():
                assert torch.allclose(encoder.image(x), encoder(x)[0], atol=1e-5), names
    half = copy.deepcopy(encoder).to(torch.bfloat16)
    with torch.no_grad():
        exact = encoder(photo)[0]
        folded, unfolded = half.image(photo.bfloat16()).float(), half(photo.bfloat16())[0].float()
    levels = 255 / 2  # [-1, 1] -> 8-bit levels
    assert (folded - exact).abs().mean() <= (unfolded - exact).abs().mean() < 0.5 / levels
    assert (folded - exact).abs().max() < 3 / levels


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_serving_in_place_gives_trainings_answer_and_gradients_flow(name: str, networks: dict) -> None:
    """Without gradients the networks overwrite their fresh tensors (`_lrelu`, `_plus`, ESA's gate); with them
    (training) they do not, and both give the same image and trunk."""
    net = copy.deepcopy(networks[name])
    x = torch.rand(1, 3, 20, 24) * net.input_range
    with torch.no_grad():
        served = net(x)
    trained = net(x)
    for a, b in zip(served, trained, strict=True):
        assert torch.allclose(a, b.detach(), atol=1e-6)
    trained[0].mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_a_member_can_keep_its_first_blocks() -> None:
    """`name:N` keeps a pretrained network's first N blocks: the name is validated, the network built smaller."""
    base = PRESETS["tiny"]
    cfg = dataclasses.replace(base, encoder="rfdn:3+rlfn")
    assert cfg.pretrained == ("rfdn", "rlfn") and cfg.pretrained_blocks == {"rfdn": 3, "rlfn": 4}
    nets = PretrainedEncoder(cfg.pretrained, 4, cfg.pretrained_blocks).nets
    assert (nets["rfdn"].blocks, nets["rlfn"].blocks) == (3, 4) and not hasattr(nets["rfdn"], "B4")
    assert nets["rfdn"].c[0].in_channels == 3 * 50
    for bad in ("rfdn:0", "rfdn:5", "rfdn:", "rfdn:x", "safmn:9", "rfdn:3+rfdn"):
        with pytest.raises(ValueError, match="'name:N' keeps the first N"):
            dataclasses.replace(base, encoder=bad)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_pruning_keeps_the_first_blocks_weights_and_drops_only_what_the_rest_read(name: str, networks: dict) -> None:
    """A pruned network is the published one without its last block: its weights load strictly into the smaller
    architecture; for RFDN, whose 1x1 fusion reads every block, zeroing the dropped block's share of the fusion in
    the whole network gives the pruned network's answer exactly."""
    whole = networks[name]
    kept = whole.published_blocks - 1
    pruned = copy.deepcopy(whole).keep(kept)
    load_strict(PUBLISHED[name].network(blocks=kept), pruned.state_dict(), "the pruned state")
    for k, v in pruned.state_dict().items():
        if k in whole.state_dict() and v.shape == whole.state_dict()[k].shape:
            assert torch.equal(v, whole.state_dict()[k]), k
    x = torch.rand(1, 3, 20, 24) * whole.input_range
    with torch.no_grad():
        image, trunk = pruned(x)
        assert image.shape == whole(x)[0].shape and trunk.shape[1] == whole.channels
        if name == "rfdn":
            zeroed = copy.deepcopy(whole)
            zeroed.c[0].weight[:, kept * whole.channels:] = 0
            assert torch.allclose(zeroed(x)[0], image, atol=1e-4)


def test_a_pruned_encoder_loads_the_published_weights_and_starts_from_a_whole_checkpoint(tmp_path: Path) -> None:
    """The published weights load into a pruned member (its first blocks'); a network built with the whole
    encoder, pruned, loads strictly into the pruned architecture; the model card says what was kept."""
    from model.attribution import builds_on, notice
    from model.network import SRDiffNet

    cfg = dataclasses.replace(PRESETS["tiny"], encoder="rfdn+rlfn+safmn", denoiser_space="lr", prediction="sample",
                              residual_base="rrdb")
    small = dataclasses.replace(cfg, encoder="rfdn:2+rlfn+safmn:5")
    enc = PretrainedEncoder(small.pretrained, 4, small.pretrained_blocks)
    enc.load_published({n: PRETRAINED / n for n in small.pretrained})
    published = published_state(PRETRAINED / "rfdn" / PUBLISHED["rfdn"].file)
    assert torch.equal(enc.nets["rfdn"].B2.c1_d.weight, published["B2.c1_d.weight"])
    assert [net.blocks for net in enc.nets.values()] == [2, 4, 5]
    whole = SRDiffNet(cfg)
    whole.rrdb.keep(small.pretrained_blocks)
    SRDiffNet(small).load_state_dict(whole.state_dict())
    entries = builds_on(small)
    assert entries[0]["kept"] == "its first 2 of 4 blocks" and "kept" not in entries[1]
    assert entries[2]["kept"] == "its first 5 of 8 blocks"
    assert "kept: its first 2 of 4 blocks" in notice(small)
