# syntax=docker/dockerfile:1
# SAM-DiffSR x4 super-resolution service.
#
#   GPU (default): docker build -t samdiffsr .
#   CPU:           docker build --build-arg VARIANT=cpu -t samdiffsr:cpu .
#   No Docker:     make image (deploy/image.sh: buildah on a local Debian base); make image-test runs it
#
# The GPU variant installs PyPI's CUDA build of torch, whose wheel pins the CUDA user-space libraries it was
# built against (cuBLAS, cuDNN, cuFFT, ... as nvidia-* wheels). onnxruntime-gpu (built for the same CUDA major)
# loads those same libraries: the runtime stage registers their directories with the dynamic loader, so one
# matching copy serves both and the base image only needs the CUDA runtime layer (cudart + driver hooks), not
# a second multi-GB toolkit copy. The host needs an NVIDIA driver new enough for that CUDA major and the
# NVIDIA container toolkit (`docker run --gpus all`, or the GPU reservation in docker-compose.yml).

ARG VARIANT=cuda
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG CPU_BASE_IMAGE=ubuntu:24.04

# ---- base: the OS image of the chosen variant plus the Python interpreter (no pip, no compilers) ----
FROM ${CUDA_BASE_IMAGE} AS base-cuda
FROM ${CPU_BASE_IMAGE} AS base-cpu
# A stage chosen by the build argument (both stages above are pinned images).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Distribution packages follow the base image's release (and its security updates) rather than exact pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---- builder: a virtualenv in /opt/venv with torch, the project's dependencies and the project ----
FROM base AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# Where the CPU variant's torch comes from (PyTorch's CPU-only wheels, no CUDA libraries inside).
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
# Or a directory of local torch wheels inside the build, e.g. a bind mount (deploy/image.sh: `buildah build
# --volume /opt/wheels:/tmp/wheels:ro --build-arg TORCH_WHEELS=/tmp/wheels`): torch itself then comes from there
# (no index), its dependencies from PyPI. Empty (the default): the index above (CPU) or PyPI (CUDA).
ARG TORCH_WHEELS=
# A CA bundle for pip inside the build, where a proxy intercepts TLS (e.g. a bind mount: `buildah build
# --volume /etc/ssl/certs/ca-certificates.crt:/tmp/build-ca.pem:ro --build-arg PIP_CERT=/tmp/build-ca.pem`).
# Build-time only: an ARG of the builder stage, so nothing of it reaches the runtime image.
ARG PIP_CERT
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# torch first: the largest layer, rebuilt only when the version or variant changes.
RUN if [ -n "$TORCH_WHEELS" ]; then \
        pip install --no-index --find-links "${TORCH_WHEELS}" --no-deps "torch==${TORCH_VERSION}" \
        && pip install "torch==${TORCH_VERSION}"; \
    elif [ "$VARIANT" = "cpu" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX_URL}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

# Then the runtime dependencies listed in pyproject.toml (not the train/dev extras): cached until it changes
# (README.md, which pyproject.toml names, comes with the project below, so editing it does not reinstall these).
# The CPU variant takes ONNX Runtime's CPU build instead of onnxruntime-gpu (the same `onnxruntime` module,
# without the CUDA/TensorRT providers' libraries).
COPY pyproject.toml ./
RUN python3 -c "import sys, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d.replace('onnxruntime-gpu', 'onnxruntime') if sys.argv[1] == 'cpu' else d for d in deps))" \
        "$VARIANT" > requirements.txt \
    && pip install -r requirements.txt

# Then the project itself (a regular, non-editable install), and pip goes: the image never installs at run time.
COPY README.md ./
COPY model ./model
COPY training ./training
COPY service ./service
COPY samdiffsr ./samdiffsr
RUN pip install --no-deps . \
    && pip uninstall -y pip

# ---- runtime: the interpreter, the virtualenv, the shipped checkpoint, an unprivileged user ----
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="samdiffsr" \
      org.opencontainers.image.description="SAM-DiffSR x4 diffusion super-resolution HTTP service" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.samdiffsr.variant="${VARIANT}"

COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Make the CUDA libraries that came as nvidia-* wheels (with torch) visible to the dynamic loader, so that
# onnxruntime-gpu's CUDA execution provider finds the same cuDNN/cuBLAS that torch uses. No-op on CPU.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    if [ -d "$site/nvidia" ]; then \
        find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u > /etc/ld.so.conf.d/samdiffsr-nvidia.conf \
        && ldconfig; \
    fi

RUN groupadd --system --gid 10001 samdiffsr \
    && useradd --system --uid 10001 --gid samdiffsr --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin samdiffsr

# The shipped models, owned by root and read-only for the service; every one is served, by its directory's name.
# To serve others, mount a folder of checkpoint directories and point SAMDIFFSR_MODELS_DIR at it
# (docker-compose.yml mounts ./checkpoints at /models), or name them in SAMDIFFSR_MODELS.
COPY checkpoints/default /opt/samdiffsr/checkpoints/default
COPY checkpoints/real /opt/samdiffsr/checkpoints/real
COPY checkpoints/fast /opt/samdiffsr/checkpoints/fast
COPY checkpoints/best /opt/samdiffsr/checkpoints/best
# Attribution of the third-party weights the shipped checkpoints build on (each checkpoint has its own NOTICE too).
COPY NOTICE /opt/samdiffsr/NOTICE

# HOME=/tmp: anything that caches under ~ writes to the (tmpfs) /tmp; the rest of the filesystem can be read-only.
WORKDIR /tmp
ENV HOME=/tmp \
    SAMDIFFSR_MODELS_DIR=/opt/samdiffsr/checkpoints \
    SAMDIFFSR_DEVICE=auto \
    SAMDIFFSR_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8000

# Ready = the model is loaded and the queue accepts work. Python's urllib: no curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]

# Exec form: the server itself is PID 1 and receives SIGTERM directly (uvicorn drains in-flight requests).
ENTRYPOINT ["samdiffsr", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
