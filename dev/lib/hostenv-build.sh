# Building the base rootfs of dev/hostenv (sourced by dev/hostenv after common.sh).
# Each stage records a stamp under $HE_CACHE; a stage runs again only when its stamp is
# missing or its input changed, so `dev/hostenv build` is cheap when nothing changed.
# shellcheck shell=bash

HE_CACHE="$CACHE/hostenv"
HE_BASE="$HE_CACHE/base"
HE_STAMPS="$HE_CACHE/stamps"
HE_VENV=/opt/meshlet-venv
HE_SUITE=bookworm
HE_RUN="${MESHLET_HOSTENV_RUN:-/run/meshlet-hostenv}"
HE_PACKAGES="podman uidmap slirp4netns fuse-overlayfs crun catatonit conmon
 containernetworking-plugins dbus-user-session libpam-systemd python3 python3-venv python3-dev
 gcc libc6-dev libsystemd-dev pkg-config busybox-static systemd-sysv dbus procps iproute2
 util-linux ca-certificates"

# The Debian mirror and security mirror the host itself uses (deb822 or one-line format).
# Packages each host gets on top of the base, unpacked into its overlay at `up` (see
# he_prepare): adding one here does not rebuild the base, which hosts may be running from.
# nftables: meshlet's network rules for replicas (docs/runtime.md, "The network").
HE_EXTRA_PACKAGES="nftables libnftables1 libedit2"
HE_EXTRA_DEBS="$HE_CACHE/extra-debs"

he_mirrors() {
    python3 - <<'EOF'
import glob, re
main = sec = None
def take(uri, suites):
    global main, sec
    uri = uri.rstrip("/")
    if any(s.endswith("-security") for s in suites):
        sec = sec or uri
    elif "bookworm" in suites:
        main = main or uri
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
            for uri in fields.get("uris", []):
                take(uri, fields.get("suites", []))
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        parts = re.sub(r"\[[^]]*\]", "", line).split()
        if len(parts) >= 3 and parts[0] == "deb":
            take(parts[1], [parts[2]])
print(main or "http://deb.debian.org/debian")
print(sec or "http://deb.debian.org/debian-security")
EOF
}

# he_nspawn CMD...: run CMD in the (non-booted) base rootfs with the host's network.
he_nspawn() {
    systemd-nspawn -q -D "$HE_BASE" --register=no --keep-unit --console=pipe \
        --bind="$HE_CACHE/apt-archives:/var/cache/apt/archives" \
        -E DEBIAN_FRONTEND=noninteractive -E LC_ALL=C.UTF-8 "$@"
}

he_stamp_ok() { [ -f "$HE_STAMPS/$1" ] && [ "$(cat "$HE_STAMPS/$1")" = "$2" ]; }
he_stamp_set() { mkdir -p "$HE_STAMPS"; echo "$2" > "$HE_STAMPS/$1"; }

he_stage_debootstrap() {
    local mirrors main
    mirrors=$(he_mirrors); main=$(echo "$mirrors" | sed -n 1p)
    rm -rf "$HE_BASE" "$HE_BASE.tmp" "$HE_STAMPS"
    mkdir -p "$HE_CACHE/debs" "$HE_CACHE/apt-archives/partial"
    echo "mirror: $main"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus \
        --cache-dir="$HE_CACHE/debs" "$HE_SUITE" "$HE_BASE.tmp" "$main" \
        || { rm -rf "$HE_BASE.tmp"; return 1; }
    mv "$HE_BASE.tmp" "$HE_BASE"
}

he_stage_packages() {
    local mirrors main sec
    mirrors=$(he_mirrors); main=$(echo "$mirrors" | sed -n 1p); sec=$(echo "$mirrors" | sed -n 2p)
    rm -f "$HE_BASE/etc/apt/sources.list"
    cat > "$HE_BASE/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $main
Suites: $HE_SUITE $HE_SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $sec
Suites: $HE_SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # shellcheck disable=SC2086
    he_nspawn sh -ec "apt-get update -q
        apt-get install -y -q --no-install-recommends $(echo $HE_PACKAGES)"
}

# Everything that makes the rootfs a usable meshlet host. Its text is its stamp.
he_configure_script() {
    cat <<'EOF'
set -eu
# PID-1 shim: nspawn mounts the v1 cgroup controllers read-only on a hybrid host, which makes
# systemd silently ignore MemoryMax/CPUQuota/TasksMax. Remount them rw, then become systemd.
cat > /usr/local/sbin/meshlet-init <<'SH'
#!/bin/sh
for d in /sys/fs/cgroup/*; do
    mountpoint -q "$d" && mount -o remount,bind,rw "$d" 2>/dev/null || true
done
mountpoint -q /sys/fs/cgroup && mount -o remount,rw /sys/fs/cgroup 2>/dev/null || true
exec /lib/systemd/systemd "$@"
SH
chmod 755 /usr/local/sbin/meshlet-init

# Rootless podman for user meshlet (uid 1000), its user manager started at boot (linger).
id meshlet >/dev/null 2>&1 || useradd -m -u 1000 -s /bin/bash meshlet
echo "meshlet:100000:65536" > /etc/subuid
echo "meshlet:100000:65536" > /etc/subgid
mkdir -p /var/lib/systemd/linger && touch /var/lib/systemd/linger/meshlet
mkdir -p /etc/containers
cat > /etc/containers/storage.conf <<'CONF'
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
CONF
cat > /etc/containers/registries.conf <<'CONF'
unqualified-search-registries = []
short-name-mode = "permissive"
CONF

# Rootless podman keeps its user namespace alive with a pause process, started by the first
# podman call. Started inside a unit, it dies with that unit, and podman 4.3 then fails
# every later call ("invalid internal status ... podman system migrate"). Hold it here.
cat > /etc/systemd/system/meshlet-podman-pause.service <<'UNIT'
[Unit]
Description=Rootless podman user namespace (pause process) for user meshlet
After=user@1000.service
Wants=user@1000.service

[Service]
User=meshlet
Environment=XDG_RUNTIME_DIR=/run/user/1000 HOME=/home/meshlet
ExecStart=/usr/bin/podman unshare /bin/sleep infinity

[Install]
WantedBy=multi-user.target
UNIT
systemctl enable meshlet-podman-pause.service >/dev/null 2>&1

# A quiet, quick boot: no getty on the console, volatile journal, no firstboot questions.
systemctl mask console-getty.service getty@tty1.service systemd-firstboot.service \
    systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
# Root podman is not used (meshlet runs rootless), and its storage could not live on the
# host's overlayfs root anyway: keep its boot-time units from failing the boot.
systemctl mask podman.service podman.socket podman-restart.service podman-auto-update.service \
    podman-auto-update.timer podman-clean-transient.service >/dev/null 2>&1 || true
mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=64M\n' \
    > /etc/systemd/journald.conf.d/meshlet.conf
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
echo meshlet-host > /etc/hostname
# Mount point of the project's venv (built beside the base, bound in by dev/hostenv up).
rm -rf /opt/meshlet-venv && mkdir -p /opt/meshlet-venv
EOF
}

he_stage_configure() {
    he_configure_script > "$HE_BASE/root/meshlet-configure.sh"
    he_nspawn sh /root/meshlet-configure.sh
    rm -f "$HE_BASE/root/meshlet-configure.sh"
}

# localhost/busybox:latest in meshlet's rootless storage, built from busybox-static.
he_stage_image() {
    # XDG_RUNTIME_DIR as on the booted host: podman records its run/tmp dirs in its database.
    he_nspawn sh -ec '
        install -d -m 700 -o meshlet -g meshlet /run/user/1000
        d=$(mktemp -d); mkdir -p "$d/bin" "$d/etc" "$d/tmp" "$d/proc" "$d/sys" "$d/dev"
        cp /bin/busybox "$d/bin/busybox"
        for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$d/bin/$a"; done
        echo "root:x:0:0:root:/root:/bin/sh" > "$d/etc/passwd"
        echo "root:x:0:" > "$d/etc/group"
        tar -C "$d" -cf /tmp/bb.tar . && chmod 644 /tmp/bb.tar && rm -rf "$d"
        rm -rf /home/meshlet/.local/share/containers
        cd /home/meshlet
        runuser -u meshlet -- env HOME=/home/meshlet XDG_RUNTIME_DIR=/run/user/1000 sh -ec "
            podman import --change \"CMD [\\\"/bin/sh\\\"]\" /tmp/bb.tar localhost/busybox:latest
            podman image ls"
        rm -f /tmp/bb.tar'
}

# The venv's requirements: the project's runtime deps plus the test runner.
he_requirements() {
    python3 - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
for dep in p["dependencies"]:
    print(dep)
for dep in p.get("optional-dependencies", {}).get("dev", []):
    if dep.lower().startswith(("pytest", "hypothesis")):
        print(dep)
EOF
}

he_venv_key() {
    { he_requirements; echo "root=$ROOT"; python3 -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"].get("scripts"))' "$ROOT/pyproject.toml"; } \
        | sha256sum | cut -d' ' -f1
}

# The CA bundle the host's pip trusts (this machine reaches PyPI through a TLS proxy).
he_host_ca() {
    local ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
    [ -f "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
    echo "$ca"
}

# The venv lives beside the base, in venvs/KEY (KEY: the dependency list and the project
# folder), and hosts bind it read-only at $HE_VENV: a change of the project's dependencies
# builds a new one while hosts keep running on theirs.
he_venv_dir() { echo "$HE_CACHE/venvs/$(he_venv_key)"; }

he_stage_venv() {
    local dir="$1"
    rm -rf "$dir" "$dir.tmp"; mkdir -p "$dir.tmp" "$HE_CACHE/venv-src" "$PIP_CACHE_DIR"
    he_requirements > "$HE_CACHE/venv-src/requirements.txt"
    # --volatile=overlay: the base stays untouched (hosts may be running from it).
    he_nspawn --volatile=overlay --bind="$dir.tmp:$HE_VENV" \
        --bind-ro="$HE_CACHE/venv-src:/mnt/venv-src" --bind="$PIP_CACHE_DIR:/root/.cache/pip" \
        --bind="$ROOT:$ROOT" --bind-ro="$(he_host_ca):/mnt/host-ca.crt" \
        -E PIP_CERT=/mnt/host-ca.crt -E SSL_CERT_FILE=/mnt/host-ca.crt \
        -E PIP_DISABLE_PIP_VERSION_CHECK=1 -E PIP_DEFAULT_TIMEOUT=180 sh -ec "
        python3 -m venv $HE_VENV
        $HE_VENV/bin/pip install -q --upgrade pip
        $HE_VENV/bin/pip install -q -r /mnt/venv-src/requirements.txt
        $HE_VENV/bin/pip install -q --no-deps -e $ROOT
        $HE_VENV/bin/python -c 'import pystemd.run, trio, podman; print(\"venv ok\")'"
    mv -T "$dir.tmp" "$dir"
    he_prune_venvs "$dir"
}

# Keep the venv just built, any a running host uses, and the five newest others (other
# checkouts or worktrees of the project may share this cache); remove the rest.
he_prune_venvs() {
    local v kept=0
    for v in $(ls -dt "$HE_CACHE"/venvs/*/ 2>/dev/null); do
        v="${v%/}"
        [ "$v" = "$1" ] && continue
        grep -qxF "$v" "$HE_RUN"/*/venv 2>/dev/null && continue
        case "$v" in *.tmp) continue ;; esac
        kept=$((kept + 1))
        [ "$kept" -le 5 ] || rm -rf "$v"
    done
}

# The extra packages' .debs, downloaded on this machine (Debian bookworm too) by apt.
he_stage_extra_debs() {
    local dir="$1"
    rm -rf "$dir" "$dir.tmp"; mkdir -p "$dir.tmp"
    # shellcheck disable=SC2086
    (cd "$dir.tmp" && apt-get download -q $HE_EXTRA_PACKAGES 2>&1 | grep -v '^W: Download is performed unsandboxed') || true
    [ "$(ls "$dir.tmp"/*.deb 2>/dev/null | wc -l)" -eq "$(echo $HE_EXTRA_PACKAGES | wc -w)" ] \
        || { echo "could not download $HE_EXTRA_PACKAGES" >&2; rm -rf "$dir.tmp"; return 1; }
    mv -T "$dir.tmp" "$dir"
}
he_extra_debs_dir() { echo "$HE_EXTRA_DEBS/$(echo "$HE_EXTRA_PACKAGES" | sha256sum | cut -c1-16)"; }

he_hosts_running() { compgen -G "$HE_RUN/*/nspawn.pid" >/dev/null; }

he_guard_base() {
    if he_hosts_running; then
        echo "dev/hostenv: stage '$1' must change the base rootfs, but hosts run from it:" >&2
        ls "$HE_RUN" >&2
        echo "stop them first (dev/hostenv down NAME...), or wait for them to finish" >&2
        exit 1
    fi
}

cmd_build() {
    mkdir -p "$HE_CACHE"
    exec 9>"$HE_CACHE/build.lock"
    flock 9
    local t0; t0=$(date +%s)
    step "host packages" host_packages
    if [ ! -d "$HE_BASE" ] || ! he_stamp_ok debootstrap "$HE_SUITE"; then
        he_guard_base debootstrap
        step "hostenv: debootstrap $HE_SUITE (minbase)" he_stage_debootstrap
        he_stamp_set debootstrap "$HE_SUITE"
    fi
    local key
    key=$(echo "$HE_PACKAGES" | sha256sum | cut -d' ' -f1)
    if ! he_stamp_ok packages "$key"; then
        he_guard_base packages
        step "hostenv: apt-get install podman, python, ..." he_stage_packages
        he_stamp_set packages "$key"
    fi
    key=$(he_configure_script | sha256sum | cut -d' ' -f1)
    if ! he_stamp_ok configure "$key"; then
        he_guard_base configure
        step "hostenv: configure (user meshlet, shim)" he_stage_configure
        he_stamp_set configure "$key"
    fi
    key=$(declare -f he_stage_image | sha256sum | cut -d' ' -f1)
    if ! he_stamp_ok image "$key"; then
        he_guard_base image
        step "hostenv: busybox image" he_stage_image
        he_stamp_set image "$key"
    fi
    local extra; extra=$(he_extra_debs_dir)
    if [ ! -d "$extra" ]; then
        step "hostenv: extra packages ($HE_EXTRA_PACKAGES)" he_stage_extra_debs "$extra"
    fi
    local venv; venv=$(he_venv_dir)
    if [ ! -f "$venv/pyvenv.cfg" ]; then
        step "hostenv: venv $HE_VENV (project deps, pystemd)" he_stage_venv "$venv"
    fi
    echo "hostenv: base rootfs ready at $HE_BASE ($(( $(date +%s) - t0 ))s)" >&2
}
