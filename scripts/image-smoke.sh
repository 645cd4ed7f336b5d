#!/usr/bin/env bash
# Build the Dockerfile for real and run the image in --demo mode; check /metrics, /healthz, the
# HEALTHCHECK, the numeric non-root user, a read-only root filesystem and that no source tree is in
# the image.
#
# No registry is reachable for base images, so `python:3.11-slim` is made locally (docs/DEPLOY.md,
# TOOLING.md 4): debootstrap a Debian bookworm rootfs with python3, `docker import` it, and tag a
# thin shim on top as python:3.11-slim. It is a Debian python3 (3.11) stand-in, not the real slim
# image, but it runs the same Dockerfile. Needs root; installs docker.io and debootstrap with apt.
#
# Usage: sudo scripts/image-smoke.sh         (SMOKE_CACHE=/var/tmp/dcs-image-smoke keeps the rootfs)
# Prints the time of each step; exit 0 = the image works.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SMOKE_CACHE:-/var/tmp/dcs-image-smoke}"
IMAGE="dcs-migration-exporter:smoke"
# Host networking (bridged containers hang here, TOOLING.md 4): the container listens on a free
# host port, and DCS_EXPORTER_HEALTHCHECK_URL moves the image's HEALTHCHECK there, as a user
# who changes the port would.
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
WORK="$(mktemp -d /tmp/dcs-image-smoke.XXXXXX)"
SOCK="$WORK/docker.sock"
DOCKERD_PID=""
CONTAINER=""

now_ms() { echo $(($(date +%s%N) / 1000000)); }
seconds_since() { local ms=$(($(now_ms) - $1)); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
step_start=0
step() { step_start=$(now_ms); printf '\n[image-smoke] %s\n' "$*" >&2; }
done_step() { printf '[image-smoke]   ... %s s\n' "$(seconds_since "$step_start")" >&2; }
fail() { printf '[image-smoke] FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
    set +e
    if [[ -n "$CONTAINER" ]]; then
        docker logs "$CONTAINER" >"$WORK/container.log" 2>&1
        docker rm -f "$CONTAINER" >/dev/null 2>&1
    fi
    if [[ -n "$DOCKERD_PID" ]] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        kill "$DOCKERD_PID"
        for _ in $(seq 50); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
    fi
    # dockerd's data root holds overlay/vfs layers: unmount leftovers before deleting.
    grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

[[ $(id -u) -eq 0 ]] || fail "run as root (dockerd and debootstrap need it)"
total_start=$(now_ms)

# --- tools --------------------------------------------------------------------------------------
step "apt: docker.io, debootstrap"
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
done_step
# The docker.io package's CLI matches its daemon; prefer it over any other docker on PATH.
docker() { /usr/bin/docker --host "unix://$SOCK" "$@"; }

# --- base rootfs (cached) -----------------------------------------------------------------------
step "debootstrap bookworm rootfs with python3 (cached in $CACHE)"
mkdir -p "$CACHE"
if [[ ! -s "$CACHE/rootfs.tar" ]]; then
    mirror="$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true) \
        | grep -oE '^(URIs:|deb) +https?://[^ ]+' | grep -v security | head -n1 | awk '{print $2}' || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
        bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    # Egress to PyPI goes through the host's CA; the image build's pip needs it.
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
    tar -C "$WORK/rootfs" -cf "$CACHE/rootfs.tar.tmp" . && mv "$CACHE/rootfs.tar.tmp" "$CACHE/rootfs.tar"
    rm -rf "$WORK/rootfs"
fi
done_step

# --- docker daemon ------------------------------------------------------------------------------
step "start dockerd on $SOCK"
dockerd --host "unix://$SOCK" --data-root "$WORK/data" --exec-root "$WORK/exec" \
    --pidfile "$WORK/dockerd.pid" --iptables=false --ip6tables=false --bridge=none \
    >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; fail "dockerd did not start"; }
done_step

step "import the rootfs and tag the python:3.11-slim stand-in"
docker import -c 'CMD ["/bin/bash"]' "$CACHE/rootfs.tar" local/bookworm-python:3.11 >/dev/null
mkdir -p "$WORK/base"
cat >"$WORK/base/Dockerfile" <<'EOF'
FROM local/bookworm-python:3.11
ENV LANG=C.UTF-8
CMD ["python3"]
EOF
DOCKER_BUILDKIT=0 docker build -q --network host -t python:3.11-slim "$WORK/base" >/dev/null
done_step

# --- the project's image ------------------------------------------------------------------------
step "docker build $IMAGE (the project's Dockerfile)"
DOCKER_BUILDKIT=0 docker build --network host -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; fail "docker build"; }
size="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
printf '[image-smoke]   image size %s MB\n' "$((size / 1024 / 1024))" >&2
done_step

step "inspect: user, port, healthcheck, no source tree"
user="$(docker image inspect -f '{{.Config.User}}' "$IMAGE")"
[[ "$user" == "65532:65532" ]] || fail "image user is '$user', expected 65532:65532"
docker image inspect -f '{{json .Config.ExposedPorts}}' "$IMAGE" | grep -q '"9713/tcp"' || fail "EXPOSE 9713"
docker image inspect -f '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q 'DCS_EXPORTER_HEALTHCHECK_URL' \
    || fail "HEALTHCHECK"
docker image inspect -f '{{json .Config.Env}}' "$IMAGE" \
    | grep -q '"DCS_EXPORTER_HEALTHCHECK_URL=http://127.0.0.1:9713/healthz"' || fail "HEALTHCHECK URL"
probe="$(docker create "$IMAGE")"
docker export "$probe" | tar -t >"$WORK/files.txt"
docker rm "$probe" >/dev/null
grep -q '^opt/dcs-migration-exporter/lib/python3[.0-9]*/site-packages/exporter/cli.py$' "$WORK/files.txt" \
    || fail "the installed package is missing"
if grep -E '^(src/|etc/dcs-migration-exporter/.+|.*/exporter/cli\.py$)' "$WORK/files.txt" \
    | grep -v '/site-packages/' ; then
    fail "a source tree is in the image"
fi
done_step

step "docker run --demo (read-only root, no capabilities, no new privileges, host network)"
CONTAINER="$(docker run -d --pull never --network host --read-only --tmpfs /tmp \
    --cap-drop ALL --security-opt no-new-privileges \
    --health-interval 2s --health-start-period 2s \
    -e "DCS_EXPORTER_HEALTHCHECK_URL=http://127.0.0.1:$PORT/healthz" \
    "$IMAGE" --demo --web.listen-address "127.0.0.1:$PORT")"
ok=""
for _ in $(seq 60); do
    if curl -sf "http://127.0.0.1:$PORT/metrics" >"$WORK/metrics.txt" \
        && grep -q '^dcs_migration_up{task_id=".*"} 1.0$' "$WORK/metrics.txt"; then
        ok=1; break
    fi
    sleep 0.5
done
[[ -n "$ok" ]] || { docker logs "$CONTAINER" | tail -20; fail "no dcs_migration_up 1 on /metrics"; }
grep '^dcs_migration_\(up\|progress_ratio\|exporter_build_info\)' "$WORK/metrics.txt" >&2
curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null || fail "/healthz"
done_step

step "wait for the HEALTHCHECK to report healthy"
health=""
for _ in $(seq 40); do
    health="$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER")"
    [[ "$health" == "healthy" ]] && break
    sleep 0.5
done
[[ "$health" == "healthy" ]] || {
    docker inspect -f '{{json .State.Health.Log}}' "$CONTAINER" >&2
    fail "health status '$health'"
}
running_user="$(docker inspect -f '{{.Config.User}}' "$CONTAINER")"
printf '[image-smoke]   health=%s user=%s\n' "$health" "$running_user" >&2
done_step

step "docker stop: SIGTERM to the exporter as PID 1 exits 0 within 5 s"
stop_start=$(now_ms)
docker stop -t 10 "$CONTAINER" >/dev/null
stop_ms=$(($(now_ms) - stop_start))
exit_code="$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")"
printf '[image-smoke]   exit code %s after %s ms\n' "$exit_code" "$stop_ms" >&2
[[ "$exit_code" == "0" ]] || { docker logs "$CONTAINER" 2>&1 | tail -20; fail "exit code $exit_code after SIGTERM"; }
((stop_ms < 5000)) || fail "SIGTERM took ${stop_ms} ms (limit 5000)"
if docker logs "$CONTAINER" 2>&1 | grep -E 'Traceback|Unclosed client session'; then
    fail "the log after SIGTERM has a traceback or an unclosed session"
fi
done_step

printf '\n[image-smoke] OK in %s s\n' "$(seconds_since "$total_start")" >&2
