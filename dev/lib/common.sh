# Shared helpers for dev/ scripts. Source it; it sets ROOT, CACHE and the step helpers.
# shellcheck shell=bash
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Heavy downloads (Node, npm packages, rootfs, pip wheels) live here and are reused.
CACHE="${MESHLET_CACHE:-/var/cache/meshlet-dev}"
VENV="${MESHLET_VENV:-$ROOT/.venv}"
LOGDIR="${MESHLET_LOGDIR:-$CACHE/logs}"
mkdir -p "$CACHE" "$LOGDIR"
export PIP_CACHE_DIR="$CACHE/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

_t0=$(date +%s)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# step NAME CMD...: run CMD with its output in a log; print the time it took, or on
# failure the failing step and the tail of its log, then exit non-zero.
step() {
    local name="$1"; shift
    local log="$LOGDIR/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '-').log"
    local t=$(date +%s)
    printf '==> %-48s' "$name" >&2
    if "$@" >"$log" 2>&1; then
        printf ' ok (%ss)\n' "$(( $(date +%s) - t ))" >&2
    else
        local rc=$?
        printf ' FAILED (rc=%s, %ss)\n' "$rc" "$(( $(date +%s) - t ))" >&2
        echo "--- last 40 lines of $log ---" >&2
        tail -n 40 "$log" >&2
        echo "--- end of $log ---" >&2
        exit "$rc"
    fi
}

apt_ready=""
# apt_install PKG...: install Debian packages that are missing (apt-get update once).
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -z "$apt_ready" ]; then apt-get update -q; apt_ready=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

host_packages() {
    apt_install systemd-container debootstrap libsystemd-dev pkg-config gcc python3-dev \
        python3-venv iproute2 nftables ca-certificates lintian rpm rpmlint groff-base \
        chromium chromium-driver docker-registry apache2-utils
}

# The project's virtualenv (rebuilt when pyproject.toml changes).
venv_ready() {
    local stamp="$VENV/.pyproject.sha"
    local want; want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e "$ROOT[dev]"
    echo "$want" > "$stamp"
}

elapsed() { echo "$(( $(date +%s) - _t0 ))"; }
