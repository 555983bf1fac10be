# Booting, using and stopping dev/hostenv hosts (sourced by dev/hostenv after common.sh and
# hostenv-build.sh). A host NAME lives in $HE_RUN/NAME:
#   upper/ work/ root/   overlayfs of the base rootfs (root/ is what nspawn boots)
#   containers/          meshlet's podman storage (podman's overlay can't sit on overlayfs)
#   dev/                 our own /dev/net/tun and /dev/fuse nodes
#   nspawn.pid leader.pid console.log venv owner nspawn.lock
# and cgroups /sys/fs/cgroup/*/meshlet-hostenv/NAME (all hierarchies but cpuset).
# shellcheck shell=bash

HE_NAME_RE='^[a-z0-9][a-z0-9-]{0,30}$'
HE_PODMAN_STORE=/home/meshlet/.local/share/containers
HE_SUBIDS=$((65536 * 64))
HE_BOOT_TIMEOUT="${MESHLET_HOSTENV_BOOT_TIMEOUT:-60}"

he_dir() { echo "$HE_RUN/$1"; }
# Alive and not a zombie (this machine's PID 1 may be slow to reap orphans).
he_alive() {
    local st; [ -n "${1:-}" ] && st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) \
        && [ -n "$st" ] && [ "${st:0:1}" != Z ]
}
he_pid() { cat "$(he_dir "$1")/$2.pid" 2>/dev/null || true; }

he_check_name() {
    [[ "$1" =~ $HE_NAME_RE ]] || { echo "dev/hostenv: bad host name '$1' (want $HE_NAME_RE)" >&2; exit 2; }
}

# The cgroup hierarchies a host gets a cgroup of its own in: every mounted one but cpuset
# (a new cpuset cgroup starts with no CPUs and no memory nodes).
he_cgroup_roots() {
    if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
        echo /sys/fs/cgroup
        return
    fi
    local d
    for d in /sys/fs/cgroup/*; do
        [ "$(basename "$d")" = cpuset ] && continue
        case "$(stat -f -c %T "$d" 2>/dev/null)" in cgroupfs|cgroup2fs) echo "$d" ;; esac
    done
}

he_cgroups() {
    local root
    for root in $(he_cgroup_roots); do echo "$root/meshlet-hostenv/$1"; done
}

# Internal (`dev/hostenv _launch NAME`, run under setsid): join the host's own cgroups, then
# become systemd-nspawn. Its PID is the nspawn PID.
he_launch() {
    local name="$1" dir; dir=$(he_dir "$1")
    echo $$ > "$dir/nspawn.pid"
    local cg
    for cg in $(he_cgroups "$name"); do
        mkdir -p "$cg"
        echo $$ > "$cg/cgroup.procs"
    done
    export SYSTEMD_NSPAWN_API_VFS_WRITABLE=network
    local net=()
    # In its own namespace the host may set its own firewall (meshlet's replica rules).
    if [ -s "$dir/address" ]; then
        net=(--network-namespace-path="/run/netns/$(he_netns "$name")" --capability=CAP_NET_ADMIN)
    fi
    exec systemd-nspawn -q -D "$dir/root" -M "$name" --register=no --keep-unit "${net[@]}" \
        --kill-signal=SIGRTMIN+3 --system-call-filter=@keyring --link-journal=no \
        --console=read-only \
        --bind="$dir/dev/tun:/dev/net/tun" --bind="$dir/dev/fuse:/dev/fuse" \
        --bind="$dir/containers:$HE_PODMAN_STORE" --bind="$ROOT:$ROOT" \
        --bind-ro="$(cat "$dir/venv"):$HE_VENV" \
        /usr/local/sbin/meshlet-init
}

# The container's PID 1 as seen from here: nspawn's child whose innermost PID is 1.
he_find_leader() {
    local nspawn="$1" c
    for c in $(cat "/proc/$nspawn/task/"*/children 2>/dev/null); do
        if awk '/^NSpid:/ { exit !($NF == 1 && NF > 2) }' "/proc/$c/status" 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    return 1
}

he_in() { local leader="$1"; shift; nsenter -t "$leader" -a -- "$@"; }

he_log_tail() {
    echo "--- last 30 lines of $1 ---" >&2
    tail -n 30 "$1" >&2 2>/dev/null || true
    echo "--- end of $1 ---" >&2
}

he_prepare() {
    local name="$1" dir; dir=$(he_dir "$1")
    mkdir -p "$dir/upper" "$dir/work" "$dir/root" "$dir/dev"
    he_venv_dir > "$dir/venv"
    # Whose host this is: `down --stale` removes hosts whose owner process has died.
    echo "${MESHLET_HOSTENV_OWNER:-}" > "$dir/owner"
    mount -t overlay "meshlet-hostenv-$name" \
        -o "lowerdir=$HE_BASE,upperdir=$dir/upper,workdir=$dir/work" "$dir/root"
    # nspawn's lock file for this tree is named after it; a killed nspawn leaves it behind.
    stat -c 'inode-%d:%i' "$dir/root" > "$dir/nspawn.lock"
    # Per host: its own identity, and podman storage on a real filesystem.
    tr -d '-' < /proc/sys/kernel/random/uuid > "$dir/root/etc/machine-id"
    echo "$name" > "$dir/root/etc/hostname"
    if [ -d "$HE_BASE$HE_PODMAN_STORE" ]; then
        cp -a "$HE_BASE$HE_PODMAN_STORE" "$dir/containers"
    else
        mkdir -p "$dir/containers" && chown 1000:1000 "$dir/containers"
    fi
    # The extra packages (hostenv-build.sh), unpacked without their maintainer scripts.
    # --keep-directory-symlink: /lib is a symlink to usr/lib (merged /usr) and stays one.
    local deb
    for deb in "$(he_extra_debs_dir)"/*.deb; do
        [ -f "$deb" ] || continue
        dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$dir/root"
    done
    # Rootless podman gives each replica a user namespace of its own (--userns=auto, 65536
    # ids each): room for 64 at once, as the package's postinst allocates.
    echo "meshlet:100000:$HE_SUBIDS" > "$dir/root/etc/subuid"
    echo "meshlet:100000:$HE_SUBIDS" > "$dir/root/etc/subgid"
    mknod -m 666 "$dir/dev/tun" c 10 200
    mknod -m 666 "$dir/dev/fuse" c 10 229
}

# he_boot NAME: start nspawn in the background (returns at once).
he_boot() {
    local name="$1" dir; dir=$(he_dir "$1")
    # Not a process group leader, setsid does not fork: $! is the PID that becomes nspawn.
    setsid "$ROOT/dev/hostenv" _launch "$name" </dev/null >"$dir/console.log" 2>&1 &
    echo $! > "$dir/nspawn.pid"
}

# he_wait_ready NAME: wait for the leader, then for systemd to finish booting and for
# meshlet's user manager (rootless podman wants /run/user/1000).
he_wait_ready() {
    local name="$1" dir; dir=$(he_dir "$1")
    local deadline=$(( $(date +%s) + HE_BOOT_TIMEOUT )) nspawn="" leader="" state=""
    while [ "$(date +%s)" -lt "$deadline" ]; do
        nspawn=$(he_pid "$name" nspawn)
        if [ -n "$nspawn" ] && ! he_alive "$nspawn"; then
            echo "systemd-nspawn for '$name' exited during boot" >&2; return 1
        fi
        if [ -z "$leader" ] && [ -n "$nspawn" ]; then leader=$(he_find_leader "$nspawn" || true); fi
        if [ -n "$leader" ]; then
            state=$(he_in "$leader" systemctl is-system-running 2>/dev/null || true)
            case "$state" in
                running|degraded)
                    if he_in "$leader" systemctl -q is-active user@1000.service 2>/dev/null \
                        && he_in "$leader" sh -c 'kill -0 "$(cat /run/user/1000/libpod/tmp/pause.pid)"' \
                            2>/dev/null; then
                        echo "$leader" > "$dir/leader.pid"
                        if [ "$state" = degraded ]; then
                            echo "warning: host '$name' is degraded; failed units:" >&2
                            he_in "$leader" systemctl --failed --no-legend >&2 || true
                        fi
                        return 0
                    fi ;;
            esac
        fi
        sleep 0.1
    done
    echo "host '$name' did not finish booting in ${HE_BOOT_TIMEOUT}s (state: ${state:-no leader})" >&2
    return 1
}

he_base_ready() {
    [ -d "$HE_BASE" ] && [ -f "$HE_STAMPS/image" ] && [ -f "$(he_venv_dir)/pyvenv.cfg" ] \
        && [ -d "$(he_extra_debs_dir)" ] || {
        echo "dev/hostenv: the base rootfs is not built; run: dev/hostenv build" >&2; exit 1; }
}

cmd_up() {
    [ $# -ge 1 ] || { echo "usage: dev/hostenv up NAME..." >&2; exit 2; }
    he_base_ready
    local name t0; t0=$(date +%s%N)
    for name in "$@"; do
        he_check_name "$name"
        if he_alive "$(he_pid "$name" nspawn)"; then
            echo "dev/hostenv: host '$name' is already up" >&2; exit 1
        fi
        [ -e "$(he_dir "$name")" ] && he_teardown "$name" >/dev/null 2>&1
    done
    mkdir -p "$HE_RUN"
    # The hosts of one owner share a network; MESHLET_HOSTENV_NET=shared keeps the old way
    # (this machine's network, loopback between hosts).
    local net=""
    if [ "${MESHLET_HOSTENV_NET:-own}" != shared ]; then
        net=$(he_net_for_owner "$(he_net_owner_key)") || exit 1
    fi
    for name in "$@"; do
        local log="$LOGDIR/hostenv-up-$name.log"
        if ! { he_prepare "$name" && { [ -z "$net" ] || he_net_attach "$name" "$net"; }; } >"$log" 2>&1; then
            echo "dev/hostenv: step 'prepare overlay for $name' FAILED" >&2
            he_log_tail "$log"; he_teardown "$name" >/dev/null 2>&1; exit 1
        fi
        he_boot "$name"
    done
    local failed=0
    for name in "$@"; do
        if ! he_wait_ready "$name" 2>"$LOGDIR/hostenv-wait-$name.log"; then
            echo "dev/hostenv: step 'boot $name' FAILED" >&2
            cat "$LOGDIR/hostenv-wait-$name.log" >&2
            cp "$(he_dir "$name")/console.log" "$LOGDIR/hostenv-console-$name.log" 2>/dev/null || true
            he_log_tail "$LOGDIR/hostenv-console-$name.log"
            failed=1
        else
            cat "$LOGDIR/hostenv-wait-$name.log" >&2
            rm -f "$LOGDIR/hostenv-wait-$name.log" "$LOGDIR/hostenv-up-$name.log"
            echo "$name $(he_pid "$name" leader)"
        fi
    done
    if [ "$failed" = 1 ]; then
        for name in "$@"; do he_teardown "$name" >/dev/null 2>&1 || true; done
        exit 1
    fi
    local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    printf 'dev/hostenv: up %s in %d.%02ds\n' "$*" $((ms / 1000)) $((ms % 1000 / 10)) >&2
}

cmd_exec() {
    local name="${1:-}"; [ -n "$name" ] || { echo "usage: dev/hostenv exec NAME [--user U] [-E K=V]... [--] CMD..." >&2; exit 2; }
    shift
    local user=root cwd="$ROOT" props=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --user|-u) user="$2"; shift 2 ;;
            --user=*) user="${1#--user=}"; shift ;;
            -E|--setenv) props+=(-E "$2"); shift 2 ;;
            --cwd) cwd="$2"; shift 2 ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    [ $# -ge 1 ] || { echo "dev/hostenv exec: no command" >&2; exit 2; }
    local leader; leader=$(he_pid "$name" leader)
    if ! he_alive "$leader"; then echo "dev/hostenv: host '$name' is not up" >&2; exit 125; fi
    if [ "$user" != root ]; then
        local uid; uid=$(he_in "$leader" id -u "$user") || exit 125
        props+=(-E "XDG_RUNTIME_DIR=/run/user/$uid"
                -E "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/$uid/bus")
    fi
    # A named unit, stopped if we are interrupted: systemd-run alone would leave it running.
    local unit="hostenv-exec-$$-$RANDOM.service" child rc sig=""
    he_exec_stop() {
        sig="$1"
        nsenter -t "$leader" -a -- systemctl stop "$unit" >/dev/null 2>&1 || true
    }
    trap 'he_exec_stop INT' INT; trap 'he_exec_stop TERM' TERM; trap 'he_exec_stop HUP' HUP
    exec 3<&0  # a background job's stdin would be /dev/null
    nsenter -t "$leader" -a -- systemd-run --quiet --wait --pipe --collect --unit="$unit" \
        --service-type=exec -p User="$user" -p WorkingDirectory="$cwd" "${props[@]}" -- "$@" <&3 &
    child=$!
    while :; do
        wait "$child" && rc=0 || rc=$?
        kill -0 "$child" 2>/dev/null || break  # else wait was cut short by a signal
    done
    if [ -n "$sig" ]; then exit $(( 128 + $(kill -l "$sig") )); fi
    exit "$rc"
}

cmd_shell() {
    local leader; leader=$(he_pid "${1:?usage: dev/hostenv shell NAME}" leader)
    he_alive "$leader" || { echo "dev/hostenv: host '$1' is not up" >&2; exit 1; }
    exec nsenter -t "$leader" -a -- env -i TERM="${TERM:-xterm}" HOME=/root \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin bash -l
}

# Kill whatever is left in a host's cgroups (after nspawn is gone or would not stop).
he_kill_cgroups() {
    local name="$1" cg p i left
    for i in $(seq 1 25); do
        left=0
        for cg in $(he_cgroups "$name"); do
            [ -d "$cg" ] || continue
            for p in $(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null); do
                kill -KILL "$p" 2>/dev/null && left=1
            done
        done
        [ "$left" = 0 ] && return 0
        sleep 0.2
    done
    echo "processes of host '$name' survived SIGKILL for 5s" >&2
}

# he_teardown NAME [abrupt]: stop the host if it runs (a clean poweroff, or with `abrupt`
# SIGKILL to every process of it, like pulling the plug), then remove everything it made.
he_teardown() {
    local name="$1" dir; dir=$(he_dir "$1")
    local nspawn i; nspawn=$(he_pid "$name" nspawn)
    if [ "${2:-}" != abrupt ] && he_alive "$nspawn"; then
        # nspawn turns SIGTERM into SIGRTMIN+3 for the container's systemd: a clean poweroff.
        kill -TERM "$nspawn"
        for i in $(seq 1 300); do he_alive "$nspawn" || break; sleep 0.1; done
        he_alive "$nspawn" && echo "host '$name' did not power off in 30s; killing it" >&2
    fi
    if he_alive "$nspawn"; then
        kill -KILL "$nspawn" 2>/dev/null || true
        for i in $(seq 1 50); do he_alive "$nspawn" || break; sleep 0.1; done
    fi
    he_kill_cgroups "$name"
    he_net_detach "$name"
    # What nspawn leaves behind when it was killed rather than let exit.
    if [ -s "$dir/nspawn.lock" ]; then rm -f "/run/systemd/nspawn/locks/$(cat "$dir/nspawn.lock")"; fi
    rm -rf "/run/systemd/nspawn/propagate/$name"
    if mountpoint -q "$dir/root"; then
        umount "$dir/root" 2>/dev/null || { sleep 0.5; umount "$dir/root" || umount -l "$dir/root"; }
    fi
    local cg
    for cg in $(he_cgroups "$name"); do
        [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
        rmdir "$(dirname "$cg")" 2>/dev/null || true
    done
    rm -rf "$dir"
    rmdir "$HE_RUN" 2>/dev/null || true
}

cmd_down() {
    local mode=""
    if [ "${1:-}" = --abrupt ]; then mode=abrupt; shift; fi
    [ $# -ge 1 ] || { echo "usage: dev/hostenv down [--abrupt] NAME... | --all" >&2; exit 2; }
    local names=() name
    if [ "$1" = --stale ]; then
        local owner
        [ -d "$HE_RUN" ] && for name in "$HE_RUN"/*/; do
            [ -d "$name" ] || continue
            name=$(basename "$name"); owner=$(cat "$(he_dir "$name")/owner" 2>/dev/null || true)
            if [ -n "$owner" ] && ! he_alive "$owner"; then names+=("$name"); fi
        done
    elif [ "$1" = --all ]; then
        [ -d "$HE_RUN" ] && for name in "$HE_RUN"/*/; do [ -d "$name" ] && names+=("$(basename "$name")"); done
    else
        for name in "$@"; do he_check_name "$name"; names+=("$name"); done
    fi
    [ ${#names[@]} -gt 0 ] || { [ "$1" = --stale ] && he_net_remove_stale; return 0; }
    local pids=() rc=0
    for name in "${names[@]}"; do
        he_teardown "$name" $mode >"$LOGDIR/hostenv-down-$name.log" 2>&1 &
        pids+=($!)
    done
    local i=0
    for name in "${names[@]}"; do
        if ! wait "${pids[$i]}" || [ -e "$(he_dir "$name")" ]; then
            echo "dev/hostenv: step 'down $name' FAILED" >&2
            he_log_tail "$LOGDIR/hostenv-down-$name.log"; rc=1
        else
            rm -f "$LOGDIR/hostenv-down-$name.log"
        fi
        i=$((i + 1))
    done
    [ "$1" = --stale ] && he_net_remove_stale
    return "$rc"
}

cmd_status() {
    [ -d "$HE_RUN" ] || { echo "no hosts"; return 0; }
    local d name nspawn leader state faults
    printf '%-24s %-8s %-8s %-14s %-10s %s\n' NAME NSPAWN LEADER ADDRESS STATE FAULTS
    for d in "$HE_RUN"/*/; do
        [ -d "$d" ] || continue
        name=$(basename "$d"); nspawn=$(he_pid "$name" nspawn); leader=$(he_pid "$name" leader)
        if he_alive "$leader"; then
            state=$(he_in "$leader" systemctl is-system-running 2>/dev/null || true)
        elif he_alive "$nspawn"; then state=booting
        else state="dead (clean up: dev/hostenv down $name)"; fi
        faults=""
        [ -n "$(he_host_address "$name")" ] && faults=$(he_faults "$name" | tr '\n' ' ')
        printf '%-24s %-8s %-8s %-14s %-10s %s\n' "$name" "${nspawn:--}" "${leader:--}" \
            "$(he_host_address "$name" | grep . || echo shared)" "$state" "${faults:--}"
    done
    if compgen -G "$HE_NET_DIR/*/owner" >/dev/null; then echo; cmd_net status; fi
}
