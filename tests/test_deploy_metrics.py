"""The metric names and labels that deploy/ reads exist in a real server's /metrics, so that they cannot drift apart.

A real uvicorn server with two tiny models upscales one image (and refuses one request, for an error series);
then every `grep -qE` pattern of the image test (deploy/image.sh) must match its /metrics, and every metric name
and label that the Grafana dashboard, the alert rules and the image test use must be in it.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

import httpx
import pytest
import yaml
from deploy_common import DASHBOARD, DEPLOY, RULES
from PIL import Image

from service.settings import Settings
from service.testing import LiveServer

IMAGE_SH = DEPLOY / "image.sh"
# Labels Prometheus adds to every scraped series (the scrape job's), not the service's.
TARGET_LABELS = {"job", "instance"}
NAME = r"(?<![:\w])(samdiffsr_[a-z_]+)\b(?!:)"


@pytest.fixture(scope="module")
def exposition(models_dir) -> Iterator[str]:
    settings = Settings(models_dir=models_dir, tile_size=32, tile_overlap=4, max_tiles_per_batch=2, default_steps=1,
                        torch_threads=1, device="cpu", drain_timeout_s=5)
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), (90, 140, 200)).save(buf, "PNG")
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        r = c.post("/v1/upscale", files={"image": ("a.png", buf.getvalue(), "image/png")})
        assert r.status_code == 200, r.text
        assert c.post("/v1/upscale", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        yield c.get("/metrics").text


def series(text: str) -> dict[str, set[str]]:
    """Sample name -> its label names, from the exposition text; family names (HELP lines) with their samples'."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            out.setdefault(line.split()[2], set())
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            name = name.split()[0]
            labels = set(re.findall(r'(\w+)="', rest.rpartition("}")[0])) if rest else set()
            out.setdefault(name, set()).update(labels)
    families = [n for n in out if not n.endswith(("_total", "_bucket", "_sum", "_count", "_created"))]
    for fam in families:
        for suffix in ("_total", "_bucket", "_sum", "_count"):
            out[fam] |= out.get(fam + suffix, set()) - {"le"}
    return out


def promql_uses(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its selector) of each metric in a PromQL expression, plus ("", labels) for the
    labels its aggregations group by (`by (...)`, `without (...)`, `on (...)`, `ignoring (...)`)."""
    out = [(m.group(1), set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2) or "")))
           for m in re.finditer(NAME + r"(?:\{([^}]*)\})?", expr)]
    grouped = re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
    out.append(("", {g.strip() for gs in grouped for g in gs.split(",") if g.strip()}))
    return out


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            exprs.extend(v for k, v in x.items() if k in ("expr", "query") and isinstance(v, str))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def check_exprs(exprs: list[str], exported: dict[str, set[str]], where: str) -> None:
    assert exprs, f"no PromQL expressions found in {where}"
    problems = []
    for expr in exprs:
        uses = promql_uses(expr)
        labels_here = set().union(*(exported.get(m, set()) for m, _ in uses if m)) | TARGET_LABELS | {"le"}
        for metric, labels in uses:
            if metric and metric not in exported:
                problems.append(f"{metric} is not in /metrics ({expr})")
            known = (exported.get(metric, set()) | TARGET_LABELS) if metric else labels_here
            if labels - known:
                problems.append(f"labels {sorted(labels - known)} of {metric or 'a grouping'} are not in /metrics "
                                f"({expr})")
    assert not problems, f"{where}:\n" + "\n".join(problems)


def test_the_image_tests_metric_checks_pass_on_a_real_server(exposition):
    patterns = re.findall(r"grep -qE '([^']+)' \"\$out/metrics\.txt\"", IMAGE_SH.read_text())
    assert len(patterns) >= 2, "deploy/image.sh's /metrics checks were not found"
    lines = exposition.splitlines()
    for pattern in patterns:
        assert any(re.search(pattern, line) for line in lines), f"deploy/image.sh's check {pattern!r} fails"
    exported = series(exposition)
    for line in IMAGE_SH.read_text().splitlines():
        for name in re.findall(NAME, line):
            if "metrics.txt" in line or "grep" in line:
                assert name in exported, f"deploy/image.sh reads {name}, which /metrics lacks"
                used = set(re.findall(r'(\w+)="', line.partition(name)[2])) - {"image"}
                assert used <= exported[name], f"deploy/image.sh reads labels {used - exported[name]} of {name}"


def test_the_dashboard_reads_real_metric_names_and_labels(exposition):
    check_exprs(dashboard_exprs(), series(exposition), str(DASHBOARD.relative_to(DEPLOY.parent)))


def test_the_alert_rules_read_real_metric_names_and_labels(exposition):
    check_exprs(rule_exprs(), series(exposition), str(RULES.relative_to(DEPLOY.parent)))


def test_the_check_catches_drift():
    """A label or a name the service does not export is reported."""
    exported = series('# HELP samdiffsr_images_total x\nsamdiffsr_images_total{model="a"} 1.0\n')
    check_exprs(["sum by (model) (rate(samdiffsr_images_total[5m]))"], exported, "ok")
    for bad in ('samdiffsr_images_total{route="/"}', "sum by (kind) (samdiffsr_images_total)", "samdiffsr_image_total"):
        with pytest.raises(AssertionError):
            check_exprs([bad], exported, "bad")
