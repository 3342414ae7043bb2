"""Every recipe in configs/ loads (its fields valid, its model buildable), and the cards for `samdiffsr repack` are
cards: a recipe that fails only when someone runs it hours later is a broken recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_loads(path: Path) -> None:
    cfg = load_config(path)
    model = cfg.model.build()
    assert cfg.run.steps > 0 and model.scale == 4


@pytest.mark.parametrize("path", sorted((CONFIGS / "cards").glob("*.json")), ids=lambda p: p.name)
def test_card_has_a_summary_and_figures(path: Path) -> None:
    card = json.loads(path.read_text())
    assert card["summary"] and "bicubic" in card["validation"]
