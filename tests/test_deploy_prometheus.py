"""Prometheus side of the deployment, checked with Prometheus' own tools and a real Prometheus server.

- `promtool check config` / `check rules` / `test rules` on deploy/prometheus.
- The Grafana dashboard's queries are valid PromQL (promtool parses them as recording rules).
- A live run: the real service (`samdiffsr serve`, tiny checkpoint, only the image's runtime dependencies
  importable) and a real Prometheus server on loopback,
  configured from deploy/prometheus/prometheus.yml with the service's address swapped in. Prometheus scrapes
  the service, `promtool check metrics` accepts its /metrics, every rule evaluates without error and the
  recording rules and dashboard queries return data; stopping the service makes TargetDown pending.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import require_tool
from PIL import Image

from service.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "rules" / "samdiffsr.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "samdiffsr.json"


# Starts `samdiffsr` with only what the Docker image installs importable: the modules of distributions outside
# the closure of pyproject.toml's runtime `dependencies` (train/dev extras, pip, ...) raise ImportError. So the
# live test also shows that `samdiffsr serve` needs nothing the image lacks.
RUNTIME_ONLY_LAUNCHER = """
import importlib.abc, importlib.metadata as md, re, sys, tomllib
from packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
runtime, todo = {norm(project["name"])}, [(Requirement(r), "") for r in project["dependencies"]]
while todo:
    req, extra = todo.pop()
    if req.marker is not None and not req.marker.evaluate({"extra": extra}):
        continue
    key = norm(req.name)
    try:
        dist = md.distribution(key)
    except md.PackageNotFoundError:
        continue
    if (key, frozenset(req.extras)) in runtime:
        continue
    runtime |= {key, (key, frozenset(req.extras))}
    todo += [(Requirement(r), e) for r in dist.requires or [] for e in ("", *req.extras)]
blocked = {mod for mod, dists in md.packages_distributions().items() if not {norm(d) for d in dists} & runtime}

class RuntimeOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in blocked:
            # What a missing module raises: code that copes with an absent optional module (anyio without
            # sniffio) catches ModuleNotFoundError, as it does in the image.
            raise ModuleNotFoundError(f"{name} is not installed in the image (not a runtime dependency)", name=name)

sys.meta_path.insert(0, RuntimeOnly())
from samdiffsr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query, with Grafana's variables replaced."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$model", ".*")
            assert "$" not in expr, f"unhandled Grafana variable in {p['title']}: {expr}"
            out.append((p["title"], expr))
    return out


def local_config(tmp: Path, service: str) -> Path:
    """deploy/prometheus/prometheus.yml for this machine: the service's loopback address instead of the
    compose DNS name, the rules from the repository, 1 s scrape and evaluation intervals. Nothing else changes."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    cfg["rule_files"] = [str(RULES)]
    jobs = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] == "samdiffsr":
            assert job.pop("dns_sd_configs")[0]["port"] == 8000
            job["static_configs"] = [{"targets": [service]}]
            jobs.append(job)
    cfg["scrape_configs"] = jobs
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------ offline checks


def test_promtool_checks_config_and_rules(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    proc = run([promtool, "check", "config", str(local_config(tmp_path, "127.0.0.1:8000"))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout and "rules found" in proc.stdout
    # The file exactly as shipped (the rule glob points into the container; nothing to load here).
    proc = run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run([promtool, "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_unit_tests() -> None:
    promtool = require_tool("promtool")
    proc = run([promtool, "test", "rules", "samdiffsr.rules.test.yml"], cwd=PROM_DIR / "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- live run


def http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check()` until it returns something truthy; fail with the process log after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Stack:
    def __init__(self, service: str, prometheus: str, service_proc: subprocess.Popen, service_log: Path) -> None:
        self.service, self.prometheus = service, prometheus
        self.service_proc, self.service_log = service_proc, service_log

    def query(self, expr: str) -> list[dict]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http(url)
        assert status == 200, f"{expr}: HTTP {status} {body[:300]!r}"
        out = json.loads(body)
        assert out["status"] == "success", out
        return out["data"]["result"]

    def api(self, path: str) -> dict:
        status, body = http(f"{self.prometheus}{path}")
        assert status == 200, body
        return json.loads(body)["data"]


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real service (tiny checkpoint, CPU) and a real Prometheus scraping it, both on loopback."""
    prometheus = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("live")
    sport, pport = free_port(), free_port()
    service = f"http://127.0.0.1:{sport}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMDIFFSR_")}
    env.update(SAMDIFFSR_CHECKPOINT=str(tiny_checkpoint), SAMDIFFSR_DEVICE="cpu", SAMDIFFSR_TILE_SIZE="16",
               SAMDIFFSR_TILE_OVERLAP="4", SAMDIFFSR_MAX_TILES_PER_BATCH="2", SAMDIFFSR_DEFAULT_STEPS="2",
               SAMDIFFSR_DRAIN_TIMEOUT_S="2", SAMDIFFSR_TORCH_THREADS="1")
    slog, plog = tmp / "service.log", tmp / "prometheus.log"
    with contextlib.ExitStack() as cleanup:
        sproc = subprocess.Popen(
            [sys.executable, "-c", RUNTIME_ONLY_LAUNCHER, "serve", "--host", "127.0.0.1", "--port", str(sport)],
            cwd=ROOT, env=env, stdout=cleanup.enter_context(slog.open("w")), stderr=subprocess.STDOUT)
        cleanup.callback(stop, sproc)
        pproc = subprocess.Popen(
            [prometheus, f"--config.file={local_config(tmp, f'127.0.0.1:{sport}')}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{pport}",
             "--log.level=warn"],
            stdout=cleanup.enter_context(plog.open("w")), stderr=subprocess.STDOUT)
        cleanup.callback(stop, pproc)
        prom = f"http://127.0.0.1:{pport}"
        wait_for(lambda: http(f"{prom}/-/ready", timeout=2)[0] == 200, 30, "Prometheus to be ready", pproc, plog)
        wait_for(lambda: http(f"{service}/readyz", timeout=2)[0] == 200, 90, "the service to be ready",
                 sproc, slog)

        # Traffic: a good image and one that is not an image, twice, with a scrape in between (so that
        # Prometheus sees the counters increase, and rate() has something to say).
        buf = io.BytesIO()
        Image.new("RGB", (20, 12), (200, 80, 20)).save(buf, format="PNG")
        live = Stack(service, prom, sproc, slog)
        for _ in range(2):
            status, body = http(f"{service}/v1/upscale?steps=1&seed=1", buf.getvalue(),
                                {"Content-Type": "image/png"}, timeout=60)
            assert status == 200, body[:300]
            status, _ = http(f"{service}/v1/upscale", b"not an image", {"Content-Type": "image/png"})
            assert status == 400
            wait_for(lambda: live.query('samdiffsr_requests_total{route="/v1/upscale", status="400"}'), 30,
                     "a scrape after the requests")
        yield live


def test_service_metrics_pass_promtool(stack: Stack) -> None:
    promtool = require_tool("promtool")
    status, body = http(f"{stack.service}/metrics")
    assert status == 200
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_prometheus_scrapes_the_service(stack: Stack) -> None:
    up = wait_for(lambda: [r for r in stack.query('up{job="samdiffsr"}') if r["value"][1] == "1"], 30,
                  "a successful scrape")
    assert len(up) == 1
    (info,) = stack.query("samdiffsr_model_info")
    assert info["metric"]["name"] == "tiny-random" and info["metric"]["device"] == "cpu"
    wait_for(lambda: stack.query('samdiffsr_requests_total{route="/v1/upscale", status="200"} >= 2'), 30,
             "the upscale requests in Prometheus")
    wait_for(lambda: stack.query('samdiffsr_errors_total{kind="invalid_image"} >= 1'), 30,
             "the rejected request in Prometheus")


def test_rules_evaluate_over_live_metrics(stack: Stack) -> None:
    # Recording rules produce samples from the scraped data.
    rate = wait_for(lambda: stack.query("job:samdiffsr_api_requests:rate5m > 0"), 30, "the request-rate rule")
    assert rate[0]["metric"]["job"] == "samdiffsr"
    wait_for(lambda: stack.query("job:samdiffsr_batch_tiles:mean5m > 0"), 30, "the tiles-per-call rule")
    # (rate() extrapolates, so the rule is approximate; the raw counters give the exact mean.)
    (mean,) = stack.query("samdiffsr_batch_tiles_sum / samdiffsr_batch_tiles_count")
    assert 1 <= float(mean["value"][1]) <= 2  # SAMDIFFSR_MAX_TILES_PER_BATCH=2
    assert stack.query("job:samdiffsr_api_request_duration_seconds:p95_5m > 0")
    # Every rule (recording and alerting) evaluated without error; no alert fires on a healthy service.
    groups = stack.api("/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) == len(shipped)
    for r in rules:
        assert r["health"] == "ok", (r["name"], r.get("lastError"))
    firing = [a for a in stack.api("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    assert not firing


def test_dashboard_queries_run_on_live_data(stack: Stack) -> None:
    empty = []
    for title, expr in dashboard_queries():
        if not stack.query(expr):
            empty.append(title)
    # Only what cannot have data on a healthy CPU replica may be empty (5xx ratio: no 5xx yet).
    assert set(empty) <= {"5xx ratio"}, f"dashboard panels without data: {empty}"


def test_target_down_alert_when_the_service_stops(stack: Stack) -> None:
    stop(stack.service_proc)
    # A graceful stop on SIGTERM (uvicorn re-raises the signal after its shutdown: status -15 / 143).
    assert stack.service_proc.returncode in (0, -signal.SIGTERM)
    assert "Finished server process" in stack.service_log.read_text()
    wait_for(lambda: stack.query('up{job="samdiffsr"} == 0'), 30, "the failed scrape")

    def pending() -> list[dict]:
        return [a for a in stack.api("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == "SamDiffSRTargetDown" and a["state"] == "pending"]

    (alert,) = wait_for(pending, 30, "SamDiffSRTargetDown to be pending")
    assert alert["labels"]["severity"] == "critical"
