#!/bin/bash
# Where a backend's time goes, per I/O: system calls, context switches and CPU time (perf stat
# on the backend process, all its threads), then the hottest functions (perf record). Same
# graph as `make bench`: qcow2 metadata over a 1 GiB raw data file of random data in /dev/shm,
# one enabled bitmap; backend on CPU 1, examples/loadgen on CPU 0.
#
# usage: scripts/profile.sh vubd|qsd RW BS IODEPTH [RUNTIME_S] [EXTRA VUBD ARGS...]
#   e.g. scripts/profile.sh vubd randwrite 4k 1 5 --poll-us 50
# PERF_DATA=FILE keeps the perf recording (perf report -i FILE).
# PROFILE_DIR=/var/tmp PROFILE_CACHE=none profiles on a disk filesystem with O_DIRECT on the data
# file (vubd --cache none, qemu-storage-daemon cache.direct=on), as make bench's real-disk table.
set -euo pipefail
cd "$(dirname "$0")/.."
backend=${1:?usage: scripts/profile.sh vubd|qsd RW BS IODEPTH [RUNTIME_S] [VUBD ARGS...]}
rw=${2:?RW}
bs=${3:?BS}
depth=${4:?IODEPTH}
runtime=${5:-5}
shift $(($# < 5 ? $# : 5))
command -v perf >/dev/null || { echo "profile.sh: perf not found (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release --quiet --bin vubd --example loadgen
vubd=$PWD/target/release/vubd
loadgen=$PWD/target/release/examples/loadgen
cache=${PROFILE_CACHE:-writeback}
case $cache in none) direct=on ;; writeback) direct=off ;; *) echo "profile.sh: PROFILE_CACHE must be none or writeback" >&2; exit 2 ;; esac
dir=$(mktemp -d "${PROFILE_DIR:-/dev/shm}/vubd-profile.XXXXXX")
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
pid=
dd if=/dev/urandom of="$dir/disk.raw" bs=1M count=1024 status=none
"$vubd" create "$dir/meta.qcow2" --data-file "$dir/disk.raw" >/dev/null
"$vubd" bitmap "$dir/meta.qcow2" add backup >/dev/null

start() {
    rm -f "$dir/s.sock"
    case $backend in
    vubd)
        taskset -c 1 "$vubd" serve --socket "$dir/s.sock" --image "$dir/meta.qcow2" --format qcow2 --cache "$cache" "$@" \
            2>"$dir/backend.log" &
        ;;
    qsd)
        taskset -c 1 qemu-storage-daemon \
            --blockdev "driver=file,node-name=data,filename=$dir/disk.raw,aio=io_uring,cache.direct=$direct" \
            --blockdev "driver=file,node-name=meta,filename=$dir/meta.qcow2" \
            --blockdev driver=qcow2,node-name=fmt,file=meta,data-file=data \
            --object iothread,id=io0 \
            --export "type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path=$dir/s.sock,writable=on,iothread=io0" \
            2>"$dir/backend.log" &
        ;;
    *) echo "profile.sh: backend must be vubd or qsd" >&2; exit 2 ;;
    esac
    pid=$!
    for _ in $(seq 300); do [ -S "$dir/s.sock" ] && break; sleep 0.1; done
    sleep 0.3
}
load() { taskset -c 0 "$loadgen" --socket "$dir/s.sock" --rw "$rw" --bs "$bs" --iodepth "$depth" --runtime "$runtime" --json; }

start "$@"
perf stat -x, -e raw_syscalls:sys_enter,context-switches,task-clock -p "$pid" -o "$dir/stat" &
stat_pid=$!
result=$(load)
kill -INT "$stat_pid"; wait "$stat_pid" 2>/dev/null || true
ios=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ios"])' "$result")
python3 - "$dir/stat" "$ios" "$result" <<'EOF'
import json, sys
ios = int(sys.argv[2])
r = json.loads(sys.argv[3])
print(f"{r['iops']:.0f} IOPS, p50 {r['lat_us']['p50']:.1f} us, p99 {r['lat_us']['p99']:.1f} us, {ios} I/Os")
for line in open(sys.argv[1]):
    f = line.strip().split(",")
    if len(f) < 3 or not f[0].replace(".", "").isdigit():
        continue
    value, event = float(f[0]), f[2]
    if event == "task-clock":
        print(f"  backend CPU      {value * 1000 / ios:8.2f} us per I/O")
    else:
        print(f"  {event:16} {value / ios:8.2f} per I/O")
EOF

perf record -q -g -o "$dir/perf.data" -p "$pid" 2>/dev/null &
rec_pid=$!
load >/dev/null
kill -INT "$rec_pid"; wait "$rec_pid" 2>/dev/null || true
echo "hottest functions (self time, all backend threads):"
perf report -q -i "$dir/perf.data" --no-children --sort symbol --percent-limit 2 2>/dev/null \
    | grep -E '^ +[0-9]' | head -20
# Keep the recording for a closer look: PERF_DATA=/tmp/perf.data scripts/profile.sh ...
if [ -n "${PERF_DATA:-}" ]; then cp "$dir/perf.data" "$PERF_DATA"; fi
