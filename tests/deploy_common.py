"""What the deployment-file tests share: paths, the image's constants, and the service's setting and metric names."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml
from conftest import require_tool

from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "samdiffsr.json"
RULES = DEPLOY / "prometheus" / "rules" / "samdiffsr.rules.yml"
K8S = DEPLOY / "kubernetes"
IMAGE_UID = 10001
MODELS_IN_IMAGE = "/opt/samdiffsr/checkpoints"
# Settings fixed by the image's command line instead of the environment.
FIXED_BY_CMD = {"host", "port"}


def setting_env_names() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields if name not in FIXED_BY_CMD}


def service_metric_names() -> set[str]:
    """Every sample name the service exports (counters' _total, histograms' _bucket/_sum/_count ...)."""
    m = Metrics()
    m.set_models([("x", "x", "torch", "cpu")])
    m.errors.labels(kind="x").inc()
    m.requests.labels(route="/", method="GET", status="200", model="x").inc()
    m.request_duration.labels(route="/", model="x").observe(1)
    m.queue_wait.labels(model="x").observe(1)
    m.batch_tiles.labels(model="x").observe(1)
    m.denoiser_call.labels(model="x").observe(1)
    m.jobs.labels(status="queued").set(0)
    m.jobs_finished.labels(status="done").inc()
    return {s.name for fam in m.registry.collect() for s in fam.samples}


def metrics_in(promql: str) -> set[str]:
    """Service metric names in a PromQL expression (not recording-rule names such as job:samdiffsr_x:rate5m)."""
    return set(re.findall(r"(?<![:\w])samdiffsr_[a-z_]+\b(?!:)", promql))


def compose_config(*files: Path, env: dict[str, str] | None = None) -> dict:
    """The resolved compose model from docker-compose's own `config` (validates against the spec)."""
    exe = require_tool("docker-compose")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SAMDIFFSR_", "COMPOSE_", "GRAFANA_",
                                                                        "PROMETHEUS_"))}
    args = [exe, "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(f)]
    proc = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**clean, **(env or {})})
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)

