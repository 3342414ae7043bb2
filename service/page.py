"""The try-it page at `/`: plain HTML, CSS and JavaScript from service/static/, no build step."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"


@functools.cache
def index_html() -> str:
    """The page (read once)."""
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


async def page() -> HTMLResponse:
    return HTMLResponse(index_html(), headers={"Cache-Control": "no-cache"})


def add_page(app: FastAPI) -> None:
    """Serve the page at `/` and its assets under `/static/` (public: the API calls carry the token)."""
    app.add_api_route("/", page, response_class=HTMLResponse, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
