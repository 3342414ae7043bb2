"""Deployment files are consistent with each other and with the service, checked without a Docker engine.

Compose files are validated by docker-compose's own `config` (the compose-spec schema; no daemon needed),
the Dockerfile by hadolint plus the checks below, Kubernetes manifests and the Grafana dashboard by
structure and by cross-references (ports, labels, paths, metric and setting names).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import tomllib
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
CHECKPOINT_IN_IMAGE = "/opt/samdiffsr/checkpoints/default"
# Settings fixed by the image's command line instead of the environment.
FIXED_BY_CMD = {"host", "port"}


def setting_env_names() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields if name not in FIXED_BY_CMD}


def service_metric_names() -> set[str]:
    """Every sample name the service exports (counters' _total, histograms' _bucket/_sum/_count ...)."""
    m = Metrics()
    m.set_model("x", "torch", "cpu")
    m.errors.labels(kind="x").inc()
    m.requests.labels(route="/", method="GET", status="200").inc()
    m.request_duration.labels(route="/").observe(1)
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
    assert env["SAMDIFFSR_CHECKPOINT"] == CHECKPOINT_IN_IMAGE
    assert all(v is None for k, v in env.items() if k != "SAMDIFFSR_CHECKPOINT")


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

    image_env = {"SAMDIFFSR_CHECKPOINT": CHECKPOINT_IN_IMAGE, "SAMDIFFSR_LOG_FORMAT": "json"}
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


# -------------------------------------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (or a parent of it) out of the build context (last match wins)."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        rx = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]")
        parts = path.strip("/").split("/")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not neg
    return excluded


def test_dockerfile_lints_clean() -> None:
    exe = require_tool("hadolint")
    proc = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_production_rules() -> None:
    ins = _instructions((ROOT / "Dockerfile").read_text())
    stages = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    assert len(stages) >= 3, "multi-stage build"
    final = ins[stages[-1]:]
    kinds = [k for k, _ in final]
    # Final stage: non-root user, health check on /readyz, exec-form entrypoint, the server command.
    user = next(a for k, a in reversed(final) if k == "USER")
    assert user.split(":")[0] == str(IMAGE_UID)
    health = next(a for k, a in final if k == "HEALTHCHECK")
    assert "/readyz" in health and "CMD [" in health
    entry = json.loads(next(a for k, a in final if k == "ENTRYPOINT"))
    cmd = json.loads(next(a for k, a in final if k == "CMD"))
    assert [*entry, *cmd] == ["samdiffsr", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert ("EXPOSE", "8000") in final
    assert "ADD" not in kinds
    env = " ".join(a for k, a in final if k == "ENV")
    assert f"SAMDIFFSR_CHECKPOINT={CHECKPOINT_IN_IMAGE}" in env
    # No compilers or package caches in the runtime image.
    for k, a in final:
        if k == "RUN" and "apt-get install" in a:
            assert "rm -rf /var/lib/apt/lists" in a and "--no-install-recommends" in a
            assert not re.search(r"\b(build-essential|gcc|g\+\+|python3-dev|python3-pip)\b", a)
    assert "PIP_NO_CACHE_DIR=1" in " ".join(a for k, a in ins if k == "ENV")
    # A CPU variant through a build argument.
    assert ("ARG", "VARIANT=cuda") in ins
    assert any(k == "FROM" and "${VARIANT}" in a for k, a in ins)


def test_dockerfile_copies_only_what_exists_and_is_in_the_context() -> None:
    ins = _instructions((ROOT / "Dockerfile").read_text())
    sources = []
    for k, a in ins:
        if k == "COPY" and "--from=" not in a:
            args = [w for w in a.split() if not w.startswith("--")]
            sources += args[:-1]
    assert sources, "the Dockerfile copies the project"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source missing: {src}"
        assert not _dockerignore_excludes(src), f".dockerignore excludes COPY source {src}"
    ckpt = ROOT / "checkpoints" / "default"
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    for private in (".venv", ".git", "shared", "tests", "checkpoints/other", "data/x.png", ".env",
                    "model/__pycache__/x.pyc"):
        assert _dockerignore_excludes(private), f"{private} would be sent to the Docker daemon"


def test_the_image_installs_every_file_of_the_packages() -> None:
    """The image installs the project as a wheel (`pip install .`), which carries a package's non-Python files
    only where pyproject.toml's [tool.setuptools.package-data] names them: a file left out works in the editable
    development install but is missing in the container."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = project.get("tool", {}).get("setuptools", {}).get("package-data", {})
    missing = []
    for top in ("model", "training", "service", "samdiffsr"):
        for f in sorted((ROOT / top).rglob("*")):
            if not f.is_file() or f.suffix in (".py", ".pyc", ".pyo") or "__pycache__" in f.parts:
                continue
            rel = f.relative_to(ROOT).as_posix()
            covered = any(
                (key == "*" or rel.startswith(key.replace(".", "/") + "/"))
                and fnmatch.fnmatch(rel if key == "*" else rel[len(key) + 1:], pattern)
                for key, patterns in package_data.items() for pattern in patterns
            )
            if not covered:
                missing.append(rel)
    assert not missing, (f"not in the wheel, so not in the image: {missing}; name them in pyproject.toml's "
                         "[tool.setuptools.package-data]")


def test_image_build_hooks_leave_the_default_build_alone() -> None:
    """The local-build hooks (deploy/image.sh, `make image`) change nothing for a plain `docker compose up`."""
    ins = _instructions((ROOT / "Dockerfile").read_text())
    stages = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    builder, runtime = ins[stages[-2]:stages[-1]], ins[stages[-1]:]
    # Local wheels: off unless asked for; a CA bundle for pip: a builder-stage ARG without a default.
    assert ("ARG", "TORCH_WHEELS=") in builder and ("ARG", "PIP_CERT") in builder
    assert not any("PIP_CERT" in a or "TORCH_WHEELS" in a for _, a in runtime)
    assert not any(k == "ENV" and "PIP_CERT" in a for k, a in ins)
    # The image targets exist and stay out of `make test` (they download and build for minutes).
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^image:.*\n\tdeploy/image\.sh build$", makefile, re.M)
    assert re.search(r"^image-test:.*\n\tdeploy/image\.sh test$", makefile, re.M)
    assert "image" not in re.search(r"^test:(.*)$", makefile, re.M).group(1)
    script = ROOT / "deploy" / "image.sh"
    assert os.access(script, os.X_OK)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# -------------------------------------------------------------------------------------------- Kubernetes


def _k8s_docs() -> dict[str, dict]:
    docs = {}
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for d in yaml.safe_load_all(f.read_text()):
            assert d["apiVersion"] and d["metadata"]["name"], f
            docs[d["kind"]] = d
    return docs


def test_kubernetes_manifests_fit_together() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert listed == {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    docs = _k8s_docs()
    assert {"Deployment", "Service", "PodDisruptionBudget", "ScaledObject", "ConfigMap", "ServiceMonitor"} <= set(docs)

    dep = docs["Deployment"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel.items() <= labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        s = docs[kind]["spec"]["selector"]
        s = s.get("matchLabels", s)
        assert s.items() <= labels.items(), kind
    assert docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= \
        docs["Service"]["metadata"]["labels"].items()

    (c,) = pod["spec"]["containers"]
    assert c["image"] in {i["name"] for i in kust["images"]}
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names == {"http": 8000} and c["args"] == ["--host", "0.0.0.0", "--port", "8000"]
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    # Jobs live in one replica: a client sticks to it for at least a job's lifetime.
    svc = docs["Service"]["spec"]
    assert svc["sessionAffinity"] == "ClientIP"
    assert svc["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] >= Settings.model_fields["job_ttl_s"].default
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == docs["Service"]["spec"]["ports"][0]["name"]
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    sec = pod["spec"]["securityContext"]
    assert sec["runAsNonRoot"] and sec["runAsUser"] == IMAGE_UID
    assert c["securityContext"]["readOnlyRootFilesystem"]
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])

    assert set(docs["ConfigMap"]["data"]) <= setting_env_names()
    assert {e["name"] for e in c.get("env", [])} <= setting_env_names()
    assert c["envFrom"][0]["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]

    so = docs["ScaledObject"]["spec"]
    assert so["scaleTargetRef"]["name"] == dep["metadata"]["name"] and so["scaleTargetRef"]["kind"] == "Deployment"
    assert 1 <= so["minReplicaCount"] < so["maxReplicaCount"]
    (trigger,) = so["triggers"]
    assert trigger["type"] == "prometheus"
    assert metrics_in(trigger["metadata"]["query"]) == {"samdiffsr_queue_depth"}
    assert docs["PodDisruptionBudget"]["apiVersion"] == "policy/v1"


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


def test_readme_documents_settings_and_metrics() -> None:
    text = (ROOT / "README.md").read_text()
    start, end = text.index("<!-- section:deploy -->"), text.index("<!-- /section:deploy -->")
    section = text[start:end]
    for env in setting_env_names() | {"SAMDIFFSR_CHECKPOINT"}:
        assert f"`{env}`" in section, f"README's configuration table misses {env}"
    families = {f.name for f in Metrics().registry.collect()}
    for fam in families:
        assert fam in section, f"README's metrics list misses {fam}"
    for promised in ("docker compose up", "docker-compose.cpu.yml", "8000", "9090", "3000", "/models",
                     "kubectl apply -k deploy/kubernetes"):
        assert promised in section, promised
