#!/bin/sh
# A throwaway single-host Ceph cluster for the RBD tests, from the Debian packages
# (ceph-mon, ceph-osd, ceph-common; scripts/install-test-deps.sh installs them):
#
#   scripts/ceph-test-cluster.sh start DIR   prints DIR/ceph.conf, for `rbd -c DIR/ceph.conf`
#                                             and librbd's `conf=DIR/ceph.conf`
#   scripts/ceph-test-cluster.sh stop DIR    kills the daemons and removes DIR
#
# One monitor (mon.a) on 127.0.0.1 with msgr v2 only, on a free port the script picks, so
# that several clusters run at once; no manager; one OSD (osd.0) on memstore: the data lives
# in the OSD's memory, whose RSS is ~36 MB idle plus about twice what the images hold (nothing
# caps it: the OSD accepted 1.1 GiB beyond its 1 GiB `memstore device bytes`, taking 2.3 GB);
# pool `rbd`, of size 1, initialised for RBD. Auth is cephx: DIR/keyring holds client.admin,
# which ceph.conf names for every client.
# Everything lives under DIR (configuration, keyrings, mon store, OSD directory, logs in
# DIR/log, admin sockets and pid files in DIR/run); nothing under /etc/ceph, /var/lib/ceph,
# /var/log/ceph or /run/ceph. The daemons run as the current user, detached from the
# script's output. `start` returns once an RBD image can be written and read back.
#
# start replaces DIR if it holds an older cluster (dead or alive); on failure it prints one
# line naming the step and its log, stops what it started and keeps DIR for the post-mortem.
set -eu
prog=ceph-test-cluster.sh
memstore_bytes=1073741824 # 1 GiB: the capacity the OSD reports (not a limit on its RAM)

usage() {
    echo "usage: $0 start DIR | stop DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
action=$1
dir=$2
case $action in start | stop) ;; *) usage ;; esac
case $dir in
"" | *[!A-Za-z0-9._/+-]*)
    # ceph.conf values and QEMU's "rbd:pool/image:conf=PATH" filenames are not quoted.
    echo "$prog: DIR must be made of letters, digits and . _ / + - only: '$dir'" >&2
    exit 2
    ;;
esac

# fd 3: the caller's stderr, for die, which may run (from the trap) inside a command whose
# output goes to a log. The daemons get it closed, not to hold the caller's pipe open.
exec 3>&2
starting=""
die() { # message: one line on stderr; a failed start stops what it started
    echo "$prog: $*" >&3
    [ -z "$starting" ] || kill_daemons
    exit 1
}

# The ceph-mon / ceph-osd processes of the cluster in $dir: those named in its pid files
# and any other started with `-c $dir/ceph.conf` (one that died before writing its pid file
# or a pid file lost). A pid is only taken if its executable and command line match, so a
# recycled pid is never killed.
daemon_pids() {
    conf=$dir/ceph.conf
    for pid in $(cat "$dir"/run/*.pid 2>/dev/null) \
        $(grep -lF -- "$conf" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
        case $(readlink "/proc/$pid/exe" 2>/dev/null) in
        */ceph-mon | */ceph-osd | */ceph-mon" (deleted)" | */ceph-osd" (deleted)") ;;
        *) continue ;;
        esac
        tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$conf" || continue
        echo "$pid"
    done | sort -u
}

kill_daemons() { # SIGTERM, then SIGKILL after 5 s
    pids=$(daemon_pids)
    [ -n "$pids" ] || return 0
    # SIGCONT: a test may have stopped the OSD (SIGSTOP) to stall the cluster.
    kill -TERM $pids 2>/dev/null || true
    kill -CONT $pids 2>/dev/null || true
    i=0
    while [ $i -lt 100 ]; do
        alive=""
        for pid in $pids; do
            ! kill -0 "$pid" 2>/dev/null || alive="$alive $pid"
        done
        [ -n "$alive" ] || return 0
        [ $i -ne 50 ] || kill -KILL $alive 2>/dev/null || true
        sleep 0.1
        i=$((i + 1))
    done
    echo "$prog: could not kill the daemons of $dir:$alive" >&3
    return 1
}

# An existing DIR is only removed when it is one of ours (or empty).
remove_dir() {
    [ -e "$dir" ] || return 0
    [ -d "$dir" ] || die "$dir is not a directory"
    if [ ! -e "$dir/ceph.conf" ] && [ -n "$(ls -A "$dir")" ]; then
        die "$dir is not empty and holds no ceph.conf: not removing it"
    fi
    dir=$(cd "$dir" && pwd -P)
    kill_daemons || exit 1
    rm -rf "$dir"
}

if [ "$action" = stop ]; then
    remove_dir
    exit 0
fi

# ---- start ----------------------------------------------------------------------------
remove_dir
mkdir -p "$dir" || die "cannot create $dir"
dir=$(cd "$dir" && pwd -P)
conf=$dir/ceph.conf
log=$dir/log/start.log
starting=1
trap 'die "interrupted"' INT TERM HUP
mkdir -p "$dir/log" "$dir/run" "$dir/crash" "$dir/osd.0"
: >"$log"

run() { # log-file description command...: runs command, output to $log
    runlog=$1 what=$2
    shift 2
    echo "+ $*" >>"$log"
    "$@" </dev/null >>"$log" 2>&1 || die "$what failed (see $runlog)"
}

fsid=$(cat /proc/sys/kernel/random/uuid)
osd_uuid=$(cat /proc/sys/kernel/random/uuid)

# Keys: client.admin (DIR/keyring, for every client), osd.0 (in its data directory), mon.;
# the monitor's keyring also holds the other two, which `ceph-mon --mkfs` imports into its
# auth database, so that no `ceph auth` command is needed afterwards.
run "$log" "creating the keyrings" ceph-authtool --create-keyring "$dir/keyring" --gen-key \
    -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
run "$log" "creating the keyrings" ceph-authtool --create-keyring "$dir/osd.0/keyring" --gen-key \
    -n osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
run "$log" "creating the keyrings" ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key \
    -n mon. --cap mon 'allow *'
run "$log" "creating the keyrings" ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/keyring"
run "$log" "creating the keyrings" ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/osd.0/keyring"

write_conf() { # port
    cat >"$conf" <<EOF
# Throwaway test cluster made by scripts/ceph-test-cluster.sh; removed by its stop.
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$1]
mon initial members = a
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
ms bind msgr1 = false
ms bind msgr2 = true
run dir = $dir/run
crash dir = $dir/crash
mon allow pool size one = true
mon warn on pool no redundancy = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0

[client]
keyring = $dir/keyring

[mon]
mon data = $dir/mon.\$id
keyring = $dir/mon.\$id/keyring
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
mon cluster log file = $dir/log/cluster.log
# A taken port fails the start at once (default: 3 tries, 5 s apart), to retry another.
ms bind retry count = 1
# Never shut the monitor down for lack of disk space in a test.
mon data avail warn = 1
mon data avail crit = 0
# Commit map changes every 0.1 s instead of every second: start and stop wait on a few.
paxos propose interval = 0.1

[osd]
osd data = $dir/osd.\$id
keyring = $dir/osd.\$id/keyring
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
public addr = 127.0.0.1
cluster addr = 127.0.0.1
osd objectstore = memstore
memstore device bytes = $memstore_bytes
# (osd memory target only sizes BlueStore's caches: nothing to lower for memstore.)
# On SIGTERM, exit without waiting for the monitor (which may be stopping too) to ack.
osd fast shutdown notify mon = false
# A client that died (SIGKILL) keeps an image's exclusive lock until its watch times out;
# 5 s instead of 30 lets the crash-restart tests see the lock broken soon.
osd client watch timeout = 5
EOF
}

port_in_use() { # port: anything on it in /proc/net/tcp{,6}
    grep -q "$(printf ':%04X ' "$1")" /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# The monitor: a random free port in 20000-29999 (below the kernel's ephemeral ports and
# away from the OSDs' 6800-7300); another start may take the same port in between, so a
# monitor that fails to start is retried on another port.
attempt=1
while :; do
    port=$(($(od -An -N2 -tu2 /dev/urandom) % 10000 + 20000))
    port_in_use "$port" && continue
    write_conf "$port"
    rm -rf "$dir/mon.a" "$dir/monmap"
    run "$log" "creating the monitor map" monmaptool --create --fsid "$fsid" \
        --addv a "[v2:127.0.0.1:$port]" "$dir/monmap"
    run "$log and $dir/log/mon.a.log" "creating the monitor" ceph-mon -c "$conf" -i a --mkfs \
        --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
    # Daemonizes once it listens: the exit status tells whether it got the port.
    echo "+ ceph-mon -c $conf -i a" >>"$log"
    if timeout --foreground 60 ceph-mon -c "$conf" -i a </dev/null >>"$dir/log/mon.a.out" 2>&1 3>&-; then
        break
    fi
    [ $attempt -lt 5 ] || die "starting ceph-mon failed (see $dir/log/mon.a.log and mon.a.out)"
    kill_daemons
    attempt=$((attempt + 1))
done

# The OSD: memstore needs no device; --no-mon-config: mkfs reads ceph.conf only.
run "$log and $dir/log/osd.0.log" "creating the OSD" ceph-osd -c "$conf" -i 0 --mkfs \
    --osd-uuid "$osd_uuid" --no-mon-config
ceph_() { timeout --foreground 30 ceph -c "$conf" "$@"; }
run "$log" "adding osd.0 to the cluster (ceph osd new)" ceph_ osd new "$osd_uuid" 0
echo "+ ceph-osd -c $conf -i 0" >>"$log"
timeout --foreground 60 ceph-osd -c "$conf" -i 0 </dev/null >>"$dir/log/osd.0.out" 2>&1 3>&- ||
    die "starting ceph-osd failed (see $dir/log/osd.0.log and osd.0.out)"
run "$log" "creating pool rbd" ceph_ osd pool create rbd 8 8
# What `rbd pool init` does, without its I/O: the probe below waits for I/O, with a clear error.
run "$log" "enabling application rbd on pool rbd" ceph_ osd pool application enable rbd rbd

# Ready when a 1 MiB image can be written, read back and removed: the first attempt waits
# for the OSD to boot and the PGs to peer; later ones cover transient errors. Every rbd
# command has the time left: any I/O blocks while no PG is active.
head -c 1048576 /dev/urandom >"$dir/run/probe.bin"
probe() { # seconds
    rbd_="timeout --foreground $1 rbd -c $conf --no-progress"
    # An earlier attempt may have left the image behind.
    [ -z "$retry" ] || $rbd_ rm rbd/probe || true
    $rbd_ import "$dir/run/probe.bin" rbd/probe &&
        $rbd_ export rbd/probe - | cmp - "$dir/run/probe.bin" &&
        $rbd_ rm rbd/probe
}
deadline=$(($(date +%s) + 60))
retry=""
while :; do
    left=$((deadline - $(date +%s)))
    [ $left -gt 0 ] ||
        die "the cluster could not serve I/O within 60 s (see $dir/log/osd.0.log and $log)"
    echo "+ probe: rbd import, export, rm" >>"$log"
    if probe "$left" </dev/null >>"$log" 2>&1; then
        break
    fi
    retry=1
    sleep 1
done
rm -f "$dir/run/probe.bin"
starting=""
echo "$conf"
