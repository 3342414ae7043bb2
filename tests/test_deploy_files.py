"""Deployment files are consistent with each other and with the service, checked without a Docker engine.

Compose files are validated by docker-compose's own `config` (the compose-spec schema; no daemon needed), the
Grafana dashboard and Prometheus rules by the metric names the service exports. The image and the Kubernetes
manifests: test_deploy_image.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from deploy_common import (
    DASHBOARD,
    DEPLOY,
    FIXED_BY_CMD,
    MODELS_IN_IMAGE,
    ROOT,
    RULES,
    compose_config,
    metrics_in,
    service_metric_names,
    setting_env_names,
)

from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings

# --------------------------------------------------------------------------------------------- compose


class _ComposeLoader(yaml.SafeLoader):
    """YAML loader that understands Compose v2's `!reset` merge tag."""


class _Reset:
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def _merge(base: object, over: object) -> object:
    """Compose's override merge for the shapes our override uses (mappings merge, `!reset` removes)."""
    if isinstance(over, dict) and isinstance(base, dict):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, _Reset):
                out.pop(k, None)
            else:
                out[k] = _merge(base.get(k), v)
        return out
    return over


def _ports(svc: dict) -> set[tuple[int, int]]:
    """(published, target) pairs from either compose output style (1.x short strings, 2.x mappings)."""
    out = set()
    for p in svc.get("ports", []):
        if isinstance(p, str):
            *_, published, target = p.split("/")[0].split(":")
            out.add((int(published), int(target)))
        else:
            out.add((int(p["published"]), int(p["target"])))
    return out


def _mounts(svc: dict) -> dict[str, str]:
    """{target: source} of a service's volumes from either compose output style."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
            out[target] = source
        else:
            out[v["target"]] = v["source"]
    return out


def test_compose_file_is_valid_and_complete() -> None:
    cfg = compose_config(ROOT / "docker-compose.yml")
    services = cfg["services"]
    assert set(services) == {"samdiffsr", "prometheus", "grafana"}
    for name, svc in services.items():
        assert svc.get("restart") == "unless-stopped", name
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
    app = services["samdiffsr"]
    assert "/readyz" in " ".join(app["healthcheck"]["test"])
    assert app["build"]["context"] == str(ROOT) and (ROOT / app["build"]["dockerfile"]).is_file()
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"

    # The ports and volumes the README promises.
    assert (8000, 8000) in _ports(services["samdiffsr"])
    assert (9090, 9090) in _ports(services["prometheus"])
    assert (3000, 3000) in _ports(services["grafana"])
    mounts = {name: _mounts(svc) for name, svc in services.items()}
    assert set(mounts["samdiffsr"]) == {"/models"}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/rules", "/prometheus"} <= set(mounts["prometheus"])
    assert {"/etc/grafana/provisioning", "/etc/grafana/dashboards", "/var/lib/grafana"} <= set(mounts["grafana"])
    for name, by_target in mounts.items():
        for target, source in by_target.items():
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: bind source for {target} missing: {source}"
    assert set(cfg["volumes"]) == {"prometheus-data", "grafana-data"}

    # Every service setting is passed through (unset stays unset), plus the checkpoint inside the image.
    env = app["environment"]
    assert set(env) == setting_env_names(), "compose passes exactly the service's settings"
    assert env["SAMDIFFSR_MODELS_DIR"] == "/models"  # the mounted host folder's checkpoints
    assert all(v is None for k, v in env.items() if k != "SAMDIFFSR_MODELS_DIR")


def test_compose_settings_come_from_the_environment() -> None:
    cfg = compose_config(ROOT / "docker-compose.yml",
                         env={"SAMDIFFSR_MAX_QUEUE": "7", "SAMDIFFSR_PUBLISH_PORT": "18000"})
    app = cfg["services"]["samdiffsr"]
    assert app["environment"]["SAMDIFFSR_MAX_QUEUE"] == "7"
    assert _ports(app) == {(18000, 8000)}


def test_cpu_override_drops_the_gpu(tmp_path: Path) -> None:
    base = yaml.load((ROOT / "docker-compose.yml").read_text(), Loader=_ComposeLoader)
    over = yaml.load((ROOT / "docker-compose.cpu.yml").read_text(), Loader=_ComposeLoader)
    merged = _merge(base, over)
    # docker-compose 1.x does not know `!reset`: validate the merged model instead.
    (tmp_path / "merged.yml").write_text(yaml.safe_dump(merged, sort_keys=False))
    cfg = compose_config(tmp_path / "merged.yml")
    app = cfg["services"]["samdiffsr"]
    assert "devices" not in app.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert app["build"]["args"]["VARIANT"] == "cpu"
    assert app["environment"]["SAMDIFFSR_DEVICE"] == "cpu"
    assert set(cfg["services"]) == {"samdiffsr", "prometheus", "grafana"}


def test_prometheus_and_grafana_wiring() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "samdiffsr")
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["samdiffsr"] and sd["port"] == 8000 and job["metrics_path"] == "/metrics"
    assert prom["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert list((DEPLOY / "prometheus" / "rules").glob("*.yml")) == [RULES]

    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "samdiffsr.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    uids = {json.dumps(p["datasource"]) for p in dash["panels"]} | {
        json.dumps(t["datasource"]) for p in dash["panels"] for t in p["targets"]}
    assert uids == {json.dumps({"type": "prometheus", "uid": source["uid"]})}


def test_env_example_lists_every_variable_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = dict(re.findall(r"^# ([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.M))
    used = set()
    for f in ("docker-compose.yml", "docker-compose.cpu.yml"):
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / f).read_text()))
    assert used <= set(documented), f"undocumented in .env.example: {used - set(documented)}"
    assert setting_env_names() <= set(documented), setting_env_names() - set(documented)

    image_env = {"SAMDIFFSR_MODELS_DIR": MODELS_IN_IMAGE, "SAMDIFFSR_LOG_FORMAT": "json"}
    for name, field in Settings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        if name in FIXED_BY_CMD:
            continue
        expected = image_env.get(env, field.default)
        shown = documented[env]
        if expected is None:
            assert shown == "", env
        elif isinstance(expected, bool):
            assert shown == str(expected).lower(), env
        else:
            assert shown == str(expected), f"{env}: .env.example says {shown!r}, default is {expected!r}"



# ------------------------------------------------------------------------------- dashboard, rules, docs


def test_dashboard_covers_the_service_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exported = service_metric_names()
    used: set[str] = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            used |= metrics_in(t["expr"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
    assert used <= exported, f"dashboard reads metrics the service does not export: {used - exported}"
    # Request rate, latency percentiles, queue depth, tiles per denoiser call, errors, GPU memory.
    for needed in ("samdiffsr_requests_total", "samdiffsr_request_duration_seconds_bucket",
                   "samdiffsr_queue_depth", "samdiffsr_batch_tiles_sum", "samdiffsr_errors_total",
                   "samdiffsr_gpu_memory_bytes", "samdiffsr_denoiser_call_duration_seconds_bucket",
                   "samdiffsr_queue_wait_seconds_bucket", "samdiffsr_tiles_in_flight", "samdiffsr_model_info",
                   "samdiffsr_jobs", "samdiffsr_jobs_finished_total", "samdiffsr_job_queue_wait_seconds_bucket",
                   "samdiffsr_job_store_bytes"):
        assert needed in used, needed
    # No two panels overlap.
    cells = set()
    for p in panels:
        g = p["gridPos"]
        new = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & new, p["title"]
        cells |= new


def test_rules_read_only_exported_metrics() -> None:
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(metrics_in(e) for e in exprs))
    assert used <= service_metric_names(), used - service_metric_names()
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    for e in exprs:
        assert set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", e)) <= recorded, e
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"SamDiffSRTargetDown", "SamDiffSRHighErrorRate", "SamDiffSRQueueSaturated",
            "SamDiffSRHighLatencyP95"} <= alerts


def test_docs_document_settings_and_metrics() -> None:
    """The deployment page lists every metric family and the promised ports and commands; every setting is on the
    (generated) configuration page."""
    section = (ROOT / "docs" / "deployment.md").read_text()
    settings_page = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    for env in setting_env_names():
        assert f"`{env}`" in settings_page, f"the configuration page misses {env}"
    families = {f.name for f in Metrics().registry.collect()}
    for fam in families:
        assert fam in section, f"the deployment page's metrics list misses {fam}"
    for promised in ("docker compose up", "docker-compose.cpu.yml", "8000", "9090", "3000", "/models",
                     "kubectl apply -k deploy/kubernetes"):
        assert promised in section, promised
