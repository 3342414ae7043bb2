#!/usr/bin/env bash
# Build the CPU variant of the Dockerfile and test the image by running the service from it.
#
#   deploy/image.sh build    # = make image
#   deploy/image.sh test     # = make image-test: build, start the service from the image, exercise it
#
# Engine: `docker build` when a Docker engine answers (`docker info`), else Debian's buildah (daemonless,
# `--isolation chroot`) on a base image made locally with debootstrap (bookworm, minbase), imported as
# $BASE_IMAGE. ENGINE=docker|buildah forces one. With buildah, the directory of this machine's torch CPU wheel
# (pip's find-links, or $TORCH_WHEELS) is bind-mounted into the build at /wheels and passed as the Dockerfile's
# TORCH_WHEELS build argument, so PyTorch's own index (often unreachable) is not needed; everything else comes
# from Debian and PyPI as in any other build.
#
# Settings (environment): IMAGE, ENGINE, BASE_IMAGE, DEBIAN_SUITE, DEBIAN_MIRROR, WORKDIR (rootfs and logs,
# outside the repository), TORCH_WHEELS, PORT (the port the test serves on; 8000 = the image's CMD unchanged),
# PHOTO (the picture the test upscales), CROP (its crop, WxH), READY_TIMEOUT_S.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ENGINE="${ENGINE:-auto}"
IMAGE="${IMAGE:-localhost/samdiffsr:cpu}"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian:bookworm}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
WORKDIR="${WORKDIR:-/var/tmp/samdiffsr-image}"
PORT="${PORT:-8000}"
PHOTO="${PHOTO:-}"
CROP="${CROP:-96x96}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-600}"
HOST_PYTHON="${HOST_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$HOST_PYTHON" ] || HOST_PYTHON=python3

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] FAIL: %s\n' "$*" >&2; exit 1; }

pick_engine() {
    if [ "$ENGINE" = auto ]; then
        if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=buildah; fi
    fi
    case "$ENGINE" in
        docker) ;;
        buildah)
            if ! command -v buildah >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
                if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
                    log "installing buildah and debootstrap (Debian packages)"
                    apt-get update -qq
                    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                        buildah debootstrap >/dev/null
                else
                    die "no Docker engine, and buildah/debootstrap are missing (Debian: apt-get install buildah debootstrap)"
                fi
            fi
            [ "$(id -u)" = 0 ] || die "the buildah path runs as root (debootstrap, chroot isolation)"
            ;;
        *) die "ENGINE must be auto, docker or buildah, not $ENGINE" ;;
    esac
    log "engine: $ENGINE"
}

# A setting of this machine's pip (environment or config files), e.g. pip_conf find-links.
pip_conf() {
    python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'\$/\1/p" | head -1
}

# The directory holding this machine's torch wheel: $TORCH_WHEELS, else pip's find-links.
torch_wheels() {
    local dirs="${TORCH_WHEELS:-}" d
    [ -n "$dirs" ] || dirs="$(pip_conf find-links)"
    for d in $dirs; do
        d="${d#file://}"
        if compgen -G "$d/torch-*.whl" >/dev/null; then echo "$d"; return; fi
    done
}

# A Debian base image made here: debootstrap minbase, set up like Docker Hub's debian image (apt sources with
# updates and security, apt's docker-clean hooks: no package caches left behind), imported with buildah.
make_base() {
    if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE exists"
        return
    fi
    local rootfs="$WORKDIR/rootfs-$DEBIAN_SUITE" start=$SECONDS ctr
    mkdir -p "$WORKDIR"
    rm -rf "$rootfs"
    log "debootstrap --variant=minbase $DEBIAN_SUITE $rootfs $DEBIAN_MIRROR"
    debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$WORKDIR/debootstrap.log" 2>&1 \
        || { tail -20 "$WORKDIR/debootstrap.log" >&2; die "debootstrap failed (log: $WORKDIR/debootstrap.log)"; }
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $DEBIAN_SUITE $DEBIAN_SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY_MIRROR
Suites: $DEBIAN_SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" --numeric-owner -cf "$WORKDIR/rootfs-$DEBIAN_SUITE.tar" .
    ctr="$(buildah from scratch)"
    buildah add --quiet "$ctr" "$WORKDIR/rootfs-$DEBIAN_SUITE.tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash \
        --os linux --arch amd64 "$ctr"
    buildah commit --quiet --format docker "$ctr" "$BASE_IMAGE" >/dev/null
    buildah rm "$ctr" >/dev/null
    rm -rf "$rootfs" "$WORKDIR/rootfs-$DEBIAN_SUITE.tar"
    log "base image $BASE_IMAGE made in $((SECONDS - start)) s"
}

BUILD_S=""
build() {
    pick_engine
    local start
    if [ "$ENGINE" = docker ]; then
        local args=(--build-arg VARIANT=cpu)
        [ -n "${CPU_BASE_IMAGE:-}" ] && args+=(--build-arg "CPU_BASE_IMAGE=$CPU_BASE_IMAGE")
        start=$SECONDS
        log "docker build ${args[*]} -t $IMAGE ."
        docker build "${args[@]}" -t "$IMAGE" .
        BUILD_S=$((SECONDS - start))
    else
        make_base
        local wheels args
        wheels="$(torch_wheels)"
        # CUDA_BASE_IMAGE too: the unused GPU stage then names a local image instead of nvidia/cuda.
        # Bind mounts go under /tmp: buildah leaves their (empty) mount points in the layers, and /tmp is a tmpfs
        # in compose and Kubernetes.
        args=(--isolation chroot --format docker --layers --force-rm
              --build-arg VARIANT=cpu --build-arg "CPU_BASE_IMAGE=$BASE_IMAGE" --build-arg "CUDA_BASE_IMAGE=$BASE_IMAGE")
        if [ -n "$wheels" ]; then
            log "torch from the host's local wheels: $wheels (bind-mounted at /tmp/wheels)"
            args+=(--volume "$wheels:/tmp/wheels:ro" --build-arg TORCH_WHEELS=/tmp/wheels)
        else
            log "no local torch wheel found: torch comes from the Dockerfile's TORCH_CPU_INDEX_URL"
        fi
        local cert
        cert="$(pip_conf cert)"
        if [ -n "$cert" ] && [ -f "$cert" ]; then
            log "pip's CA bundle here ($cert) is bind-mounted for pip in the build (TLS-intercepting networks)"
            args+=(--volume "$cert:/tmp/build-ca.pem:ro" --build-arg PIP_CERT=/tmp/build-ca.pem)
        fi
        start=$SECONDS
        log "buildah build ${args[*]} -f Dockerfile -t $IMAGE ."
        buildah build "${args[@]}" -f Dockerfile -t "$IMAGE" .
        BUILD_S=$((SECONDS - start))
    fi
    log "built $IMAGE in $BUILD_S s ($(image_size))"
}

image_size() {
    if [ "$ENGINE" = docker ]; then
        docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}'
    else
        buildah images --format '{{.Size}}' "$IMAGE" | head -1
    fi
}

# The image's config as JSON (Docker's config object: Entrypoint, Cmd, User, Env, Healthcheck, ...).
image_config() {
    if [ "$ENGINE" = docker ]; then
        docker image inspect --format '{{json .Config}}' "$IMAGE"
    else
        buildah inspect --type image "$IMAGE" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["Docker"]["config"]))'
    fi
}

cfg_get() {  # cfg_get KEY -> one line per list item (or the value)
    python3 -c 'import json, sys
v = json.loads(sys.argv[1]).get(sys.argv[2])
for x in (v if isinstance(v, list) else [v] if v is not None else []):
    print(x)' "$CONFIG" "$1"
}

CTR=""
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        sleep 2
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    if [ -n "$CTR" ]; then
        if [ "$ENGINE" = docker ]; then docker rm -f "$CTR" >/dev/null 2>&1 || true
        else buildah rm "$CTR" >/dev/null 2>&1 || true; fi
    fi
}

# Run a command in the test container as the image's user (the health check).
in_container() {
    if [ "$ENGINE" = docker ]; then docker exec "$CTR" "$@"
    else buildah run --isolation chroot --user "$USER_SPEC" "$CTR" -- "$@"; fi
}

http() {  # http OUTFILE CURL-ARGS... -> prints the status code
    curl -sS -o "$1" -w '%{http_code}' --max-time 600 "${@:2}" || echo 000
}

test_image() {
    build
    local out="$WORKDIR/test" start code
    mkdir -p "$out"
    rm -f "$out"/*
    CONFIG="$(image_config)"
    USER_SPEC="$(cfg_get User)"
    mapfile -t ENTRY < <(cfg_get Entrypoint)
    mapfile -t CMD < <(cfg_get Cmd)
    case "${USER_SPEC%%:*}" in ""|0|root) die "the image runs as root (User=$USER_SPEC)" ;; esac
    local argv=("${ENTRY[@]}" "${CMD[@]}")
    if [ "$PORT" != 8000 ]; then  # the CMD's --port 8000, moved (e.g. when 8000 is taken on this host)
        local i
        for i in "${!argv[@]}"; do [ "${argv[$i]}" = 8000 ] && argv[i]="$PORT"; done
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then die "port $PORT is in use here: set PORT"; fi
    trap cleanup EXIT
    log "image user $USER_SPEC, workdir $(cfg_get WorkingDir), command: ${argv[*]}"

    # ---- start the service from the image (its entrypoint + command, its user, env and workdir)
    start=$SECONDS
    if [ "$ENGINE" = docker ]; then
        CTR="$(docker run -d -p "127.0.0.1:$PORT:$PORT" --read-only --tmpfs /tmp --entrypoint "${ENTRY[0]}" \
            "$IMAGE" "${argv[@]:1}")"
        docker logs -f "$CTR" >"$out/server.log" 2>&1 &
    else
        # chroot isolation: the image's filesystem, env, workdir and user, on the host's network (no netns).
        CTR="$(buildah from --quiet "$IMAGE")"
        buildah run --isolation chroot --user "$USER_SPEC" "$CTR" -- "${argv[@]}" >"$out/server.log" 2>&1 &
        SERVER_PID=$!
    fi
    local ready=""
    while [ $((SECONDS - start)) -lt "$READY_TIMEOUT_S" ]; do
        if [ "$(http /dev/null "http://127.0.0.1:$PORT/readyz")" = 200 ]; then ready=1; break; fi
        if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
        sleep 2
    done
    [ -n "$ready" ] || { tail -30 "$out/server.log" >&2; die "/readyz never answered 200"; }
    local ready_s=$((SECONDS - start))
    log "/readyz 200 after $ready_s s"

    # The server process and its user, seen from the host.
    local spid suser
    if [ "$ENGINE" = docker ]; then
        spid="$(docker inspect --format '{{.State.Pid}}' "$CTR")"
    else
        spid="$(ss -Hltnp "sport = :$PORT" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)"
    fi
    if [ -n "$spid" ]; then
        suser="$(ps -o uid= -p "$spid" | tr -d ' ')"
        log "listening process $spid, uid $suser: $(tr '\0' ' ' <"/proc/$spid/cmdline")"
        [ "$suser" = "${USER_SPEC%%:*}" ] || die "the server runs as uid $suser, not the image's ${USER_SPEC%%:*}"
    fi

    # ---- upscale a photo
    local photo="$out/photo.png" w h
    if [ -z "$PHOTO" ]; then
        local photos=("$ROOT"/../shared/data/corpus-hr/val/*.png)
        [ -f "${photos[0]}" ] && PHOTO="${photos[0]}"
    fi
    w="${CROP%x*}"; h="${CROP#*x}"
    if [ -n "$PHOTO" ]; then
        "$HOST_PYTHON" -c 'import sys; from PIL import Image
im = Image.open(sys.argv[1]).convert("RGB"); w, h = int(sys.argv[3]), int(sys.argv[4])
l, t = (im.width - w) // 2, (im.height - h) // 2
im.crop((l, t, l + w, t + h)).save(sys.argv[2])' "$PHOTO" "$photo" "$w" "$h"
    else
        die "no photo to upscale: set PHOTO=path/to/picture"
    fi
    start=$SECONDS
    code="$(http "$out/photo_x4.png" -F "image=@$photo" "http://127.0.0.1:$PORT/v1/upscale")"
    local up_s=$((SECONDS - start)) dims
    dims="$(python3 -c 'import struct, sys
b = open(sys.argv[1], "rb").read(24)
print("%dx%d" % struct.unpack(">II", b[16:24]) if b[:8] == b"\x89PNG\r\n\x1a\n" else "not-a-png")' "$out/photo_x4.png")"
    log "POST /v1/upscale ${w}x${h} $(basename "${PHOTO:-}") -> HTTP $code in $up_s s, PNG $dims, $(stat -c %s "$out/photo_x4.png") bytes"
    [ "$code" = 200 ] || { head -c 600 "$out/photo_x4.png" >&2; echo >&2; die "upscale answered $code"; }
    [ "$dims" = "$((4 * w))x$((4 * h))" ] || die "the output is $dims, not $((4 * w))x$((4 * h))"

    # ---- metrics
    code="$(http "$out/metrics.txt" "http://127.0.0.1:$PORT/metrics")"
    [ "$code" = 200 ] || die "/metrics answered $code"
    grep -E '^samdiffsr_(images_total|model_info|requests_total\{.*/v1/upscale.*status="200")' "$out/metrics.txt" \
        | sed 's/^/[image]   /' >&2
    # One series per served model (label model); the photo went to one of them (tests/test_deploy_metrics.py runs
    # these patterns against a real /metrics).
    grep -qE '^samdiffsr_images_total\{model="[^"]+"\} 1(\.0)?$' "$out/metrics.txt" \
        || die "/metrics does not count the upscaled image"
    grep -qE '^samdiffsr_model_info\{.*device="cpu".*\} 1(\.0)?$' "$out/metrics.txt" || die "/metrics: no model_info on cpu"

    # ---- the image's HEALTHCHECK command, run in the container as the image's user
    local hc
    hc="$(python3 -c 'import json, sys; print(json.dumps(json.loads(sys.argv[1]).get("Healthcheck") or {}))' "$CONFIG")"
    mapfile -t HC < <(python3 -c 'import json, sys; [print(x) for x in json.loads(sys.argv[1]).get("Test") or []]' "$hc")
    [ "${HC[0]:-}" = CMD ] || die "the image has no exec-form HEALTHCHECK (got: $hc)"
    local hc_cmd=("${HC[@]:1}")
    local i
    for i in "${!hc_cmd[@]}"; do hc_cmd[i]="${hc_cmd[i]//127.0.0.1:8000/127.0.0.1:$PORT}"; done
    local hc_rc=0
    in_container "${hc_cmd[@]}" || hc_rc=$?
    log "HEALTHCHECK ($(python3 -c 'import json, sys; h = json.loads(sys.argv[1])
print(", ".join(f"{k.lower()} {v / 1e9:g}s" if k != "Retries" else f"retries {v}" for k, v in h.items() if k != "Test"))' "$hc")) exits $hc_rc while serving"
    [ "$hc_rc" = 0 ] || die "the health check fails on a ready server"

    # ---- SIGTERM: the server drains and exits; the health check then fails
    if [ "$ENGINE" = buildah ]; then
        local target="${spid:-$SERVER_PID}"
        kill -TERM "$target"
        local waited=0
        while kill -0 "$target" 2>/dev/null && [ $waited -lt 60 ]; do sleep 1; waited=$((waited + 1)); done
        kill -0 "$target" 2>/dev/null && die "the server did not exit within 60 s of SIGTERM"
        wait "$SERVER_PID" 2>/dev/null || true
        log "SIGTERM to the server (pid $target): exited after ${waited} s"
        hc_rc=0
        in_container "${hc_cmd[@]}" >/dev/null 2>&1 || hc_rc=$?
        log "HEALTHCHECK exits $hc_rc with the server stopped"
        [ "$hc_rc" != 0 ] || die "the health check passes with no server"
    fi

    log "PASS: image $IMAGE ($ENGINE), size $(image_size), build $BUILD_S s, ready in $ready_s s, upscale HTTP 200 ${w}x${h} -> $dims ($(stat -c %s "$out/photo_x4.png") bytes) in $up_s s"
    log "server log: $out/server.log"
}

case "${1:-}" in
    build) build ;;
    test) test_image ;;
    *) echo "usage: $0 build|test" >&2; exit 2 ;;
esac
