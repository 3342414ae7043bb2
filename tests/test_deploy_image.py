"""The Dockerfile (hadolint plus the checks below) and the Kubernetes manifests (structure and cross-references:
ports, labels, paths, setting names), checked without a Docker engine or a cluster.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import tomllib

import yaml
from conftest import require_tool
from deploy_common import (
    IMAGE_UID,
    K8S,
    MODELS_IN_IMAGE,
    ROOT,
    metrics_in,
    setting_env_names,
)

from service.settings import Settings

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
    assert f"SAMDIFFSR_MODELS_DIR={MODELS_IN_IMAGE}" in env
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


