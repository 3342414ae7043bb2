"""Shared fixtures: a tiny random checkpoint in our format and real photos from shared/."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread per process: tests and the servers they start share two cores, and
    oversubscribed threads slow small convolutions down tenfold."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference" / "upstream-tiny"
CORPUS = SHARED / "data" / "corpus-hr"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised `tiny` model saved in our checkpoint format."""
    from model.checkpoint import save_random_checkpoint
    from model.config import PRESETS

    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", PRESETS["tiny"], "tiny-random",
                                  provenance={"source": "tests"})


@pytest.fixture(scope="session")
def models_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two different tiny models: `default` (tiny_checkpoint's weights) and `real` (the efficient
    shapes, RLFB encoder and LR-space denoiser, recorded as trained on real-world degradations)."""
    from model.checkpoint import CheckpointInfo, read_info, save_checkpoint
    from model.config import PRESETS
    from model.network import SRDiffNet

    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_checkpoint, root / "default")
    torch.manual_seed(1)
    efficient = dataclasses.replace(PRESETS["tiny"], encoder="rlfb", denoiser_space="lr",
                                    extras={"default_tile": 32})
    info = CheckpointInfo(config=efficient, name="tiny-real", provenance={"source": "tests"},
                          training={"degradation": "real", "images": 3},
                          card={"summary": "a tiny model for JPEGs", "validation": {"jpeg75": {"steps=1": 20.0}}})
    save_checkpoint(root / "real", SRDiffNet(efficient), info)
    assert read_info(root / "real").card["summary"] == "a tiny model for JPEGs"
    return root


@pytest.fixture(scope="session")
def photo() -> Path:
    """A real photo (PNG) from the shared corpus."""
    return CORPUS / "val" / "skimage-chelsea.png"


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client for the module's `server` fixture (a `service.testing.LiveServer`)."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def require_tool(name: str) -> str:
    """Path of a command-line tool (PATH or this interpreter's bin/); a clear failure in CI if absent."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    msg = f"`{name}` is not installed: run `make system-deps` (Debian: apt-get install prometheus docker-compose)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)
