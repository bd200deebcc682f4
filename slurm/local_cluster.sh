#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for the tests and for trying the launchers.
#
#   slurm/local_cluster.sh up      install what is missing (Debian packages), start munge,
#                                  slurmctld and one slurmd per node; prints the env to use
#   slurm/local_cluster.sh down    stop the daemons, delete namespaces, bridge and /etc/hosts lines
#   slurm/local_cluster.sh status  sinfo
#
# Each node is a network namespace joined to a Linux bridge by a veth pair, with its own address
# and hostname, so a multi-node rendezvous crosses a real (virtual) network. Needs root.
# Jobs run as root on the shared filesystem (repo and venv are visible to both nodes).
set -euo pipefail

STATE=${VLSCALE_SLURM_DIR:-/tmp/vlscale-slurm}
CONF="$STATE/slurm.conf"
BRIDGE=vlsbr0
SUBNET=10.77.0
CTL_NAME=vlctl
NODES=(vln1 vln2)
PORT_CTL=${VLSCALE_SLURMCTLD_PORT:-16817}
PORT_D=${VLSCALE_SLURMD_PORT:-16818}
HOSTS_TAG="# vlscale-local-cluster"

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (namespaces, a bridge, daemons)"; }

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged nsenter unshare ip; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged is already running with a working key
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- munged --force
    touch "$STATE/started-munge"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged does not answer (munge -n | unmunge fails)"
}

hosts_add() {
    sed -i "/$HOSTS_TAG\$/d" /etc/hosts
    echo "$SUBNET.1 $CTL_NAME $HOSTS_TAG" >>/etc/hosts
    local i=11
    for node in "${NODES[@]}"; do
        echo "$SUBNET.$i $node $HOSTS_TAG" >>/etc/hosts
        i=$((i + 1))
    done
}

network_up() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i=11
    for node in "${NODES[@]}"; do
        local ns="vls-$node"
        ip netns list | grep -qw "$ns" || ip netns add "$ns"
        if ! ip link show "vh-$node" >/dev/null 2>&1; then
            ip link add "vh-$node" type veth peer name "vn-$node"
            ip link set "vn-$node" netns "$ns"
        fi
        ip link set "vh-$node" master "$BRIDGE" up
        ip -n "$ns" addr replace "$SUBNET.$i/24" dev "vn-$node"
        ip -n "$ns" link set "vn-$node" up
        ip -n "$ns" link set lo up
        i=$((i + 1))
    done
}

write_conf() {
    mkdir -p "$STATE/state" "$STATE/log"
    local nodes_csv
    nodes_csv=$(IFS=,; echo "${NODES[*]}")
    {
        echo "ClusterName=vlscale"
        echo "SlurmctldHost=$CTL_NAME($SUBNET.1)"
        echo "SlurmctldPort=$PORT_CTL"
        echo "SlurmdPort=$PORT_D"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        # cred_expire also delays a requeued job's restart (default 120 s); sched_interval is
        # how often the scheduler looks at jobs whose BeginTime has passed (default 60 s).
        echo "AuthInfo=cred_expire=10"
        echo "SchedulerParameters=sched_interval=2"
        echo "StateSaveLocation=$STATE/state"
        echo "SlurmdSpoolDir=$STATE/spool-%n"
        echo "SlurmctldPidFile=$STATE/slurmctld.pid"
        echo "SlurmdPidFile=$STATE/slurmd-%n.pid"
        echo "SlurmctldLogFile=$STATE/log/slurmctld.log"
        echo "SlurmdLogFile=$STATE/log/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "SchedulerType=sched/builtin"
        echo "ReturnToService=2"
        echo "MpiDefault=none"
        echo "KillWait=10"
        echo "MinJobAge=600"
        echo "InactiveLimit=0"
        echo "SlurmctldTimeout=30"
        echo "SlurmdTimeout=30"
        local i=11
        for node in "${NODES[@]}"; do
            echo "NodeName=$node NodeAddr=$SUBNET.$i CPUs=2 State=UNKNOWN"
            i=$((i + 1))
        done
        echo "PartitionName=debug Nodes=$nodes_csv Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
    for node in "${NODES[@]}"; do mkdir -p "$STATE/spool-$node"; done
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_daemons() {
    if ! pid_alive "$STATE/slurmctld.pid"; then
        # A fresh state each time: no jobs from an earlier cluster come back.
        unshare --uts sh -c "hostname $CTL_NAME; exec slurmctld -c -f '$CONF'"
    fi
    for node in "${NODES[@]}"; do
        pid_alive "$STATE/slurmd-$node.pid" && continue
        # nsenter, not `ip netns exec`: the latter remounts /sys and slurmd loses the cgroup fs.
        # unshare --uts gives each slurmd its own hostname, which is how it finds its NodeName.
        nsenter --net="/var/run/netns/vls-$node" unshare --uts \
            sh -c "hostname $node; exec slurmd -f '$CONF'"
    done
    local deadline=$((SECONDS + 60))
    while [ $SECONDS -lt $deadline ]; do
        local idle
        idle=$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle' || true)
        [ "$idle" = "${#NODES[@]}" ] && return
        sleep 0.5
    done
    SLURM_CONF="$CONF" sinfo -N >&2 || true
    tail -n 20 "$STATE"/log/*.log >&2 || true
    die "the nodes did not become idle within 60 s (logs in $STATE/log)"
}

up() {
    need_root
    install_packages
    mkdir -p "$STATE"
    start_munge
    hosts_add
    network_up
    write_conf
    start_daemons
    log "up: ${#NODES[*]} nodes idle; use SLURM_CONF=$CONF"
    echo "export SLURM_CONF=$CONF"
}

kill_pidfile() {
    local file=$1
    [ -s "$file" ] || return 0
    local pid
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

down() {
    need_root
    if [ -f "$CONF" ]; then
        SLURM_CONF="$CONF" scancel --full --signal=KILL --partition=debug 2>/dev/null || true
    fi
    for node in "${NODES[@]}"; do kill_pidfile "$STATE/slurmd-$node.pid"; done
    kill_pidfile "$STATE/slurmctld.pid"
    # Job processes left behind in a namespace (slurmstepd, tasks) are ended by pid.
    for node in "${NODES[@]}"; do
        local ns="vls-$node"
        if ip netns list | grep -qw "$ns"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do
                kill -9 "$pid" 2>/dev/null || true
            done
            ip netns del "$ns" || true
        fi
        ip link del "vh-$node" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    sed -i "/$HOSTS_TAG\$/d" /etc/hosts
    if [ -f "$STATE/started-munge" ] && [ -s /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$STATE/started-munge"
    fi
    rm -rf "$STATE/state" "$STATE"/spool-*
    log "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) SLURM_CONF="$CONF" sinfo -N ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
