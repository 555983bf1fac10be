# A clean Debian 12 to install the packages into (sourced by dev/package after common.sh).
#
# The base is debootstrap's minbase with systemd and dbus only: no meshlet user, no podman,
# no Python — what a fresh server has. It is built once into $CACHE/pkgtest/base; each host
# boots an overlay of it with systemd-nspawn, the recipe of dev/hostenv (a cgroup of its own
# under every v1 hierarchy, rw cgroup mounts via a PID-1 shim, --keep-unit --register=no),
# shares the machine's network (the Debian mirror; the local PDS on 127.0.0.1) and sees the
# project folder read-only at the same path.
# shellcheck shell=bash

PT_CACHE="$CACHE/pkgtest"
PT_BASE="$PT_CACHE/base"
PT_RUN="${MESHLET_PKGTEST_RUN:-/run/meshlet-pkgtest}"
PT_SUITE=bookworm
PT_NAME_RE='^[a-z0-9][a-z0-9-]{0,30}$'

pt_mirrors() { source "$ROOT/dev/lib/hostenv-build.sh" && he_mirrors; }

pt_configure() {
    local main sec
    main=$(pt_mirrors | sed -n 1p); sec=$(pt_mirrors | sed -n 2p)
    rm -f "$PT_BASE.tmp/etc/apt/sources.list"
    cat > "$PT_BASE.tmp/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $main
Suites: $PT_SUITE $PT_SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $sec
Suites: $PT_SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    cat > "$PT_BASE.tmp/usr/local/sbin/pkgtest-init" <<'SH'
#!/bin/sh
for d in /sys/fs/cgroup/*; do
    mountpoint -q "$d" && mount -o remount,bind,rw "$d" 2>/dev/null || true
done
mountpoint -q /sys/fs/cgroup && mount -o remount,rw /sys/fs/cgroup 2>/dev/null || true
exec /lib/systemd/systemd "$@"
SH
    chmod 755 "$PT_BASE.tmp/usr/local/sbin/pkgtest-init"
    systemd-nspawn -q -D "$PT_BASE.tmp" --register=no --keep-unit --console=pipe \
        -E DEBIAN_FRONTEND=noninteractive sh -ec '
        apt-get update -q
        systemctl mask console-getty.service getty@tty1.service systemd-firstboot.service \
            systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
            e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
        mkdir -p /etc/systemd/journald.conf.d
        printf "[Journal]\nStorage=volatile\n" > /etc/systemd/journald.conf.d/pkgtest.conf
        : > /etc/machine-id; rm -f /var/lib/dbus/machine-id
        apt-get clean'
}

pt_build() {
    [ -d "$PT_BASE" ] && return 0
    rm -rf "$PT_BASE.tmp"; mkdir -p "$PT_CACHE/debs"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus \
        --cache-dir="$PT_CACHE/debs" "$PT_SUITE" "$PT_BASE.tmp" "$(pt_mirrors | sed -n 1p)" \
        || return 1
    pt_configure || return 1
    mv "$PT_BASE.tmp" "$PT_BASE"
}

pt_dir() { echo "$PT_RUN/$1"; }
pt_alive() { local st; [ -n "${1:-}" ] && st=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${st:0:1}" != Z ]; }
pt_pid() { cat "$(pt_dir "$1")/$2.pid" 2>/dev/null || true; }
pt_in() { local leader="$1"; shift; nsenter -t "$leader" -a -- "$@"; }

pt_cgroup_roots() {
    if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then echo /sys/fs/cgroup; return; fi
    local d
    for d in /sys/fs/cgroup/*; do
        [ "$(basename "$d")" = cpuset ] && continue
        case "$(stat -f -c %T "$d" 2>/dev/null)" in cgroupfs|cgroup2fs) echo "$d" ;; esac
    done
}

# Internal (run under setsid): join the host's cgroups, then become systemd-nspawn.
pt_launch() {
    local name="$1" dir; dir=$(pt_dir "$1")
    echo $$ > "$dir/nspawn.pid"
    : > "$dir/cgroups"
    local root cg
    for root in $(pt_cgroup_roots); do
        cg="$root/meshlet-pkgtest/$name"; mkdir -p "$cg"
        echo "$cg" >> "$dir/cgroups"; echo $$ > "$cg/cgroup.procs"
    done
    export SYSTEMD_NSPAWN_API_VFS_WRITABLE=network
    exec systemd-nspawn -q -D "$dir/root" -M "$name" --register=no --keep-unit \
        --kill-signal=SIGRTMIN+3 --system-call-filter=@keyring --link-journal=no \
        --console=read-only --bind-ro="$ROOT:$ROOT" \
        --bind="$dir/dev/tun:/dev/net/tun" --bind="$dir/dev/fuse:/dev/fuse" \
        --bind="$PT_CACHE/apt-archives:/var/cache/apt/archives" \
        /usr/local/sbin/pkgtest-init
}

pt_find_leader() {
    local c
    for c in $(cat "/proc/$1/task/"*/children 2>/dev/null); do
        if awk '/^NSpid:/ { exit !($NF == 1 && NF > 2) }' "/proc/$c/status" 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    return 1
}

pt_up() {
    local name="$1" dir; dir=$(pt_dir "$1")
    [[ "$name" =~ $PT_NAME_RE ]] || { echo "bad host name '$name'" >&2; return 2; }
    [ -d "$PT_BASE" ] || { echo "the clean base is not built: dev/package testhost build" >&2; return 1; }
    pt_alive "$(pt_pid "$name" nspawn)" && { echo "host '$name' is already up" >&2; return 1; }
    pt_down "$name" >/dev/null 2>&1 || true
    mkdir -p "$dir/upper" "$dir/work" "$dir/root" "$dir/dev" "$PT_CACHE/apt-archives/partial"
    # /dev/net/tun and /dev/fuse as an installed Debian has them: 0666, set by udev's rules
    # (minbase has no udev). nspawn would copy this machine's nodes, 0600 on a VM without
    # udev, and rootless podman's slirp4netns could not open the tun device: every replica
    # exited 126 ("open(/dev/net/tun): Permission denied"). Our own nodes, not the
    # machine's: what the host's tmpfiles do to them stays inside.
    mknod -m 666 "$dir/dev/tun" c 10 200
    mknod -m 666 "$dir/dev/fuse" c 10 229
    mount -t overlay "meshlet-pkgtest-$name" \
        -o "lowerdir=$PT_BASE,upperdir=$dir/upper,workdir=$dir/work" "$dir/root" || return 1
    stat -c 'inode-%d:%i' "$dir/root" > "$dir/nspawn.lock"
    tr -d '-' < /proc/sys/kernel/random/uuid > "$dir/root/etc/machine-id"
    echo "$name" > "$dir/root/etc/hostname"
    # What an installed Debian has and debootstrap does not write.
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        "$name" > "$dir/root/etc/hosts"
    setsid "$ROOT/dev/package" testhost _launch "$name" </dev/null >"$dir/console.log" 2>&1 &
    local deadline=$(( $(date +%s) + 60 )) nspawn leader="" state=""
    while [ "$(date +%s)" -lt "$deadline" ]; do
        nspawn=$(pt_pid "$name" nspawn)
        if [ -n "$nspawn" ] && ! pt_alive "$nspawn"; then
            echo "nspawn for '$name' exited during boot:" >&2; tail -20 "$dir/console.log" >&2; return 1
        fi
        [ -z "$leader" ] && [ -n "$nspawn" ] && leader=$(pt_find_leader "$nspawn" || true)
        if [ -n "$leader" ]; then
            state=$(pt_in "$leader" systemctl is-system-running 2>/dev/null || true)
            case "$state" in running|degraded)
                echo "$leader" > "$dir/leader.pid"; echo "$name $leader"; return 0 ;;
            esac
        fi
        sleep 0.1
    done
    echo "host '$name' did not boot in 60s (state: ${state:-no leader})" >&2
    return 1
}

pt_exec() {
    local name="$1"; shift
    local leader; leader=$(pt_pid "$name" leader)
    pt_alive "$leader" || { echo "host '$name' is not up" >&2; return 125; }
    exec 3<&0
    pt_in "$leader" systemd-run --quiet --wait --pipe --collect --service-type=exec \
        -p WorkingDirectory=/root -E DEBIAN_FRONTEND=noninteractive -E LC_ALL=C.UTF-8 \
        -- "$@" <&3
}

pt_down() {
    local name="$1" dir; dir=$(pt_dir "$1")
    [ -d "$dir" ] || return 0
    local nspawn i; nspawn=$(pt_pid "$name" nspawn)
    if pt_alive "$nspawn"; then
        kill -TERM "$nspawn"
        for i in $(seq 1 300); do pt_alive "$nspawn" || break; sleep 0.1; done
        pt_alive "$nspawn" && kill -KILL "$nspawn"
    fi
    local cg p
    if [ -f "$dir/cgroups" ]; then
        for i in 1 2 3 4 5; do
            while read -r cg; do
                for p in $(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null); do
                    kill -KILL "$p" 2>/dev/null || true
                done
            done < "$dir/cgroups"
            sleep 0.1
        done
    fi
    [ -s "$dir/nspawn.lock" ] && rm -f "/run/systemd/nspawn/locks/$(cat "$dir/nspawn.lock")"
    rm -rf "/run/systemd/nspawn/propagate/$name"
    if mountpoint -q "$dir/root"; then
        umount "$dir/root" 2>/dev/null || { sleep 0.5; umount "$dir/root" || umount -l "$dir/root"; }
    fi
    if [ -f "$dir/cgroups" ]; then
        while read -r cg; do
            [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
            rmdir "$(dirname "$cg")" 2>/dev/null || true
        done < "$dir/cgroups"
    fi
    rm -rf "$dir"
    rmdir "$PT_RUN" 2>/dev/null || true
}

cmd_testhost() {
    local sub="${1:-}"; shift || true
    case "$sub" in
        build) [ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
               step "host packages" host_packages
               step "clean bookworm (minbase + systemd + dbus)" pt_build ;;
        up) pt_up "${1:?usage: dev/package testhost up NAME}" ;;
        exec) local n="${1:?usage: dev/package testhost exec NAME [--] CMD...}"; shift
              [ "${1:-}" = -- ] && shift
              pt_exec "$n" "$@" ;;
        put) local d; d="$(pt_dir "${1:?usage: dev/package testhost put NAME FILE}")/root/root/pkgs"
             mkdir -p "$d" && cp "${2:?usage: dev/package testhost put NAME FILE}" "$d/" \
                 && echo "/root/pkgs/$(basename "$2")" ;;
        down) pt_down "${1:?usage: dev/package testhost down NAME}" ;;
        _launch) pt_launch "$1" ;;
        *) echo "usage: dev/package testhost build | up NAME | exec NAME CMD... | put NAME FILE | down NAME" >&2
           exit 2 ;;
    esac
}
