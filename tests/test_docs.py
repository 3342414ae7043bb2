"""The documentation: the generated reference pages match the code, every setting, command-line option and HTTP
route is on the site, the site builds without a warning, and the README stays short."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from samdiffsr import docgen
from samdiffsr.cli import build_parser
from service.app import create_app
from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def site_text() -> str:
    return "\n".join(p.read_text() for p in DOCS.rglob("*.md"))


@pytest.mark.parametrize("name", sorted(docgen.PAGES))
def test_generated_pages_match_the_code(name: str) -> None:
    page = DOCS / "reference" / name
    assert page.read_text() == docgen.PAGES[name](), f"{page} is out of date: run `python -m samdiffsr.docgen`"


def test_every_setting_option_and_route_is_on_the_site() -> None:
    text = site_text()
    for name in Settings.model_fields:
        assert f"`{ENV_PREFIX}{name.upper()}`" in text, name
    for _, _, parser in docgen._walk(build_parser(), "samdiffsr"):
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in text, f"{parser.prog} {flag}"
    spec = create_app(Settings.model_construct()).openapi()
    for path, ops in spec["paths"].items():
        for method in ops:
            assert f"`{method.upper()} {path}`" in text, f"{method.upper()} {path}"


def test_a_missing_setting_is_caught(monkeypatch) -> None:
    """The check above fails when the code grows a setting the site does not have (drift is detected)."""
    from pydantic.fields import FieldInfo

    fields = dict(Settings.model_fields)
    fields["brand_new_knob"] = FieldInfo(default=1, description="x")
    monkeypatch.setattr(Settings, "model_fields", fields)
    assert "SAMDIFFSR_BRAND_NEW_KNOB" in docgen.settings_reference()
    assert docgen.main(["--check"]) == 1


def test_the_site_builds_without_warnings(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    proc = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()


def test_the_readme_is_short_and_its_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "make run" in text and "make test" in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text)  # no dated logs


def test_cli_reference_covers_every_command() -> None:
    names = [name for name, _, _ in docgen._walk(build_parser(), "samdiffsr")][1:]
    page = (DOCS / "reference" / "cli.md").read_text()
    assert names and all(f"## `{n}`" in page for n in names)
    assert isinstance(build_parser(), argparse.ArgumentParser)
