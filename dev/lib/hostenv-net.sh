# Networks of dev/hostenv hosts, and the faults tests inject into them (sourced by
# dev/hostenv after common.sh and hostenv-build.sh).
#
# Every host sits in a network namespace of its own (mh-NAME) with one interface, eth0, a
# veth whose other end is on a bridge of this machine. A bridge is one *network*: number N
# (0..249), subnet 10.251.N.0/24, bridge mhbN holding the gateway 10.251.N.1 (where the local
# atproto network listens, dev/devnet --host), hosts at .2-.126. Each network belongs to an
# owner (MESHLET_HOSTENV_OWNER, a PID, or "manual"): the hosts one test run boots share its
# network, runs side by side get different ones, and `down --stale` removes the networks of
# owners that died. Allocation is serialised by a lock file, so parallel runs never pick the
# same number. State: $HE_RUN/.net/N/{owner,hosts/NAME (the host's number k)}; the dot keeps
# it out of the host glob ($HE_RUN/*/).
#
# Faults are nftables tables in the host's namespace, one per fault, named after it, so
# healing is deleting the table:
#   meshlet-nat            behind NAT: outbound connections leave from a "public" address
#                          10.251.N.(k+128) (snat), nothing new comes in (input drop)
#   meshlet-cut-to-PEER    packets to PEER's addresses are dropped (a one-way link cut)
#   meshlet-cut-port-P     packets to the gateway's TCP port P are dropped (cut from a PDS)
# There is no latency or loss injection: this kernel has no sch_netem (`tc qdisc add ...
# netem` fails with "Specified qdisc kind is unknown").
# shellcheck shell=bash

HE_NET_DIR="$HE_RUN/.net"
HE_NET_PREFIX=10.251
HE_NET_MAX=249
HE_HOST_MIN=2
HE_HOST_MAX=126
HE_NAT_OFFSET=128

he_netns() { echo "mh-$1"; }
he_net_gw() { echo "$HE_NET_PREFIX.$1.1"; }
he_net_bridge() { echo "mhb$1"; }
he_net_owner_key() { echo "${MESHLET_HOSTENV_OWNER:-manual}"; }

# he_net_locked CMD...: run CMD (a function) holding the allocation lock.
he_net_locked() {
    mkdir -p "$HE_NET_DIR"
    local fd
    exec {fd}>"$HE_RUN/.net.lock"
    flock "$fd"
    local rc=0
    "$@" || rc=$?
    exec {fd}>&-
    return "$rc"
}

# The network of OWNER: the existing one, or a new one (bridge created). Prints N.
_he_net_for_owner() {
    local owner="$1" d n
    for d in "$HE_NET_DIR"/*/; do
        [ -d "$d" ] || continue
        if [ "$(cat "$d/owner" 2>/dev/null)" = "$owner" ]; then basename "$d"; return 0; fi
    done
    for n in $(seq 0 "$HE_NET_MAX"); do
        [ -e "$HE_NET_DIR/$n" ] && continue
        # Someone else's leftovers (or a bridge made by hand) keep the number taken.
        ip link show "$(he_net_bridge "$n")" >/dev/null 2>&1 && continue
        ip -4 -o addr show | grep -q " $HE_NET_PREFIX\.$n\." && continue
        mkdir -p "$HE_NET_DIR/$n/hosts"
        echo "$owner" > "$HE_NET_DIR/$n/owner"
        local br; br=$(he_net_bridge "$n")
        # A MAC of its own: a bridge without one takes the lowest of its ports' and changes
        # it when that port goes (a host powered off) or a lower one comes; every other
        # host's ARP entry for the gateway then points nowhere for 15-45 s, cutting it from
        # the PLC and the PDSes (a real router's MAC does not move with its neighbours).
        ip link add "$br" address "$(printf '02:6d:68:62:%02x:%02x' $((n / 256)) $((n % 256)))" \
            type bridge
        ip addr add "$(he_net_gw "$n")/24" dev "$br"
        ip link set "$br" up
        echo "$n"; return 0
    done
    echo "dev/hostenv: no free network number (0..$HE_NET_MAX)" >&2
    return 1
}
he_net_for_owner() { he_net_locked _he_net_for_owner "$1"; }

# The host number k of NAME in network N: kept for the life of the network, so a host that
# is powered off and on again comes back at the same address.
_he_net_host_number() {
    local n="$1" name="$2" f="$HE_NET_DIR/$1/hosts/$2" k
    if [ -s "$f" ]; then cat "$f"; return 0; fi
    for k in $(seq "$HE_HOST_MIN" "$HE_HOST_MAX"); do
        if ! grep -qx "$k" "$HE_NET_DIR/$n/hosts/"* 2>/dev/null; then
            echo "$k" > "$f"; echo "$k"; return 0
        fi
    done
    echo "dev/hostenv: network $n is full" >&2
    return 1
}

# he_net_attach NAME N: the host's namespace and its link to bridge N (before boot).
he_net_attach() {
    local name="$1" n="$2" dir; dir=$(he_dir "$1")
    local k; k=$(he_net_locked _he_net_host_number "$n" "$name")
    local ns; ns=$(he_netns "$name")
    local veth="mhv${n}x${k}" peer="mhp${n}x${k}" addr="$HE_NET_PREFIX.$n.$k"
    ip netns del "$ns" 2>/dev/null || true
    ip link del "$veth" 2>/dev/null || true
    ip netns add "$ns"
    ip link add "$veth" type veth peer name "$peer"
    ip link set "$veth" master "$(he_net_bridge "$n")" up
    ip link set "$peer" netns "$ns" name eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$(he_net_gw "$n")"
    echo "$n" > "$dir/net"
    echo "$addr" > "$dir/address"
    echo "$veth" > "$dir/veth"
}

# he_net_detach NAME: remove the host's namespace and link (its faults go with them).
he_net_detach() {
    local name="$1" dir; dir=$(he_dir "$1")
    ip netns del "$(he_netns "$name")" 2>/dev/null || true
    if [ -s "$dir/veth" ]; then ip link del "$(cat "$dir/veth")" 2>/dev/null || true; fi
}

he_host_net() { cat "$(he_dir "$1")/net" 2>/dev/null || true; }
he_host_address() { cat "$(he_dir "$1")/address" 2>/dev/null || true; }
he_host_public() {  # the address a host behind NAT is seen from
    local a; a=$(he_host_address "$1"); [ -n "$a" ] || return 0
    echo "${a%.*}.$(( ${a##*.} + HE_NAT_OFFSET ))"
}

# he_net_remove N: the bridge and the network's state (its hosts must be down), and what a
# host of it left if something else tore it down (an older dev/hostenv knows no namespaces).
he_net_remove() {
    local n="$1" f link
    for f in "$HE_NET_DIR/$n/hosts/"*; do
        [ -e "$f" ] || continue
        [ -d "$(he_dir "$(basename "$f")")" ] || ip netns del "$(he_netns "$(basename "$f")")" 2>/dev/null || true
    done
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' \
            | grep "^mhv${n}x" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    ip link del "$(he_net_bridge "$n")" 2>/dev/null || true
    rm -rf "${HE_NET_DIR:?}/$n"
}

# Namespaces mh-NAME of hosts that are gone (torn down by an older dev/hostenv, or a
# teardown that was killed): removed by `down --stale`.
he_netns_remove_orphans() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^mh-/ { print $1 }'); do
        [ -d "$(he_dir "${ns#mh-}")" ] || ip netns del "$ns" 2>/dev/null || true
    done
    return 0
}

he_net_hosts_up() {  # names of hosts still up in network N
    local d
    for d in "$HE_RUN"/*/; do
        [ -d "$d" ] || continue
        [ "$(cat "$d/net" 2>/dev/null)" = "$1" ] && basename "$d"
    done
    return 0
}

# --- faults ------------------------------------------------------------------------------

he_nft() { ip netns exec "$(he_netns "$1")" nft "${@:2}"; }
he_faults() { he_nft "$1" list tables 2>/dev/null | awk '$3 ~ /^meshlet-/ { print substr($3, 9) }'; }

he_require_net() {
    local leader; leader=$(he_pid "$1" leader)
    he_alive "$leader" || { echo "dev/hostenv: host '$1' is not up" >&2; exit 1; }
    [ -n "$(he_host_address "$1")" ] || { echo "dev/hostenv: host '$1' has no network of its own" >&2; exit 1; }
}

he_fault_nat() {
    local name="$1" pub; pub=$(he_host_public "$name")
    ip -n "$(he_netns "$name")" addr replace "$pub/32" dev eth0
    he_nft "$name" -f - <<EOF
table inet meshlet-nat {
    chain input {
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state related accept
        ct direction reply accept
    }
    chain postrouting {
        type nat hook postrouting priority srcnat;
        oifname "eth0" snat ip to $pub
    }
}
EOF
}

he_fault_cut() {
    local name="$1" peer="$2" addrs
    he_check_name "$peer"
    addrs="$(he_host_address "$peer"), $(he_host_public "$peer")"
    [ "$addrs" != ", " ] || { echo "dev/hostenv: host '$peer' has no address" >&2; exit 1; }
    he_nft "$name" -f - <<EOF
table inet meshlet-cut-to-$peer {
    chain output {
        type filter hook output priority filter;
        ip daddr { $addrs } drop
    }
}
EOF
}

he_fault_cut_port() {
    local name="$1" port="$2" gw; gw=$(he_net_gw "$(he_host_net "$1")")
    [[ "$port" =~ ^[0-9]+$ ]] || { echo "dev/hostenv: bad port '$port'" >&2; exit 2; }
    he_nft "$name" -f - <<EOF
table inet meshlet-cut-port-$port {
    chain output {
        type filter hook output priority filter;
        ip daddr $gw tcp dport $port drop
    }
}
EOF
}

# he_heal NAME FAULT: delete the fault's table (and the NAT's public address).
he_heal() {
    local name="$1" fault="$2"
    he_nft "$name" delete table inet "meshlet-$fault" 2>/dev/null || true
    if [ "$fault" = nat ]; then
        ip -n "$(he_netns "$name")" addr del "$(he_host_public "$name")/32" dev eth0 2>/dev/null || true
    fi
}

cmd_fault() {
    local name="${1:-}" kind="${2:-}"
    [ -n "$kind" ] || { echo "usage: dev/hostenv fault NAME nat | cut PEER [--both] | cut-port PORT" >&2; exit 2; }
    he_check_name "$name"; he_require_net "$name"
    case "$kind" in
        nat) he_fault_nat "$name" ;;
        cut)
            local peer="${3:?usage: dev/hostenv fault NAME cut PEER [--both]}"
            he_fault_cut "$name" "$peer"
            if [ "${4:-}" = --both ]; then he_require_net "$peer"; he_fault_cut "$peer" "$name"; fi ;;
        cut-port) he_fault_cut_port "$name" "${3:?usage: dev/hostenv fault NAME cut-port PORT}" ;;
        *) echo "dev/hostenv: unknown fault '$kind' (nat, cut, cut-port)" >&2; exit 2 ;;
    esac
}

cmd_heal() {
    local name="${1:-}"
    [ -n "$name" ] || { echo "usage: dev/hostenv heal NAME [FAULT...]   (no FAULT: all)" >&2; exit 2; }
    he_check_name "$name"; he_require_net "$name"
    shift
    local faults=("$@") f
    [ ${#faults[@]} -gt 0 ] || mapfile -t faults < <(he_faults "$name")
    for f in "${faults[@]}"; do he_heal "$name" "$f"; done
}

# dev/hostenv net up|down|status: the owner's network (for what runs beside the hosts, like
# dev/devnet, which must listen on the gateway before any host boots).
cmd_net() {
    local sub="${1:-status}"
    case "$sub" in
        up)
            local n; n=$(he_net_for_owner "$(he_net_owner_key)")
            echo "network=$n gateway=$(he_net_gw "$n") subnet=$HE_NET_PREFIX.$n.0/24 bridge=$(he_net_bridge "$n")" ;;
        down)
            local n="${2:-}" d
            if [ -z "$n" ]; then
                for d in "$HE_NET_DIR"/*/; do
                    [ -d "$d" ] && [ "$(cat "$d/owner")" = "$(he_net_owner_key)" ] && n=$(basename "$d")
                done
            fi
            [ -n "$n" ] || return 0
            local up; up=$(he_net_hosts_up "$n")
            if [ -n "$up" ]; then
                echo "dev/hostenv: network $n still has hosts: $up (dev/hostenv down them first)" >&2; exit 1
            fi
            he_net_locked he_net_remove "$n" ;;
        status)
            local d
            printf '%-4s %-16s %-8s %s\n' NET SUBNET OWNER HOSTS
            for d in "$HE_NET_DIR"/*/; do
                [ -d "$d" ] || continue
                local n; n=$(basename "$d")
                printf '%-4s %-16s %-8s %s\n' "$n" "$HE_NET_PREFIX.$n.0/24" "$(cat "$d/owner")" \
                    "$(he_net_hosts_up "$n" | tr '\n' ' ')"
            done ;;
        *) echo "usage: dev/hostenv net up|down [N]|status" >&2; exit 2 ;;
    esac
}

# Networks whose owner died and that have no host left (after `down --stale`).
he_net_remove_stale() {
    he_netns_remove_orphans
    local d n owner
    for d in "$HE_NET_DIR"/*/; do
        [ -d "$d" ] || continue
        n=$(basename "$d"); owner=$(cat "$d/owner" 2>/dev/null || true)
        [[ "$owner" =~ ^[0-9]+$ ]] || continue  # "manual", "demo": removed by hand
        if ! he_alive "$owner"; then
            [ -z "$(he_net_hosts_up "$n")" ] && he_net_locked he_net_remove "$n"
        fi
    done
    return 0
}
