#!/bin/bash
# The raw-data-file fast path against the raw format, side by side in one run:
#   1. loadgen IOPS and p50 latency, 4k random read/write at iodepth 1 and 32, backends
#      alternating run by run, median of REPS runs;
#   2. vubd's user-space instructions per I/O under callgrind (deterministic on a noisy
#      machine): the difference between two runs of N and 3N I/Os, divided by 2N.
# Both serve the same 1 GiB data file in /dev/shm: once as raw, once through qcow2 metadata
# made by `vubd create`.
#
# usage: scripts/bench-raw-vs-qcow2.sh [RUNTIME_S] [REPS]   (REPS=0: instructions per I/O only)
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${1:-5}
reps=${2:-3}
cargo build --release --quiet --bin vubd --example loadgen
vubd=$PWD/target/release/vubd
loadgen=$PWD/target/release/examples/loadgen
dir=$(mktemp -d /dev/shm/vubd-bench.XXXXXX)
# Pin the backend and the load generator to different CPUs: less noise between runs.
if [ "$(nproc)" -ge 2 ]; then pin_backend="taskset -c 1"; pin_load="taskset -c 0"; else pin_backend=""; pin_load=""; fi
trap 'rm -rf "$dir"' EXIT
dd if=/dev/urandom of="$dir/disk.raw" bs=1M count=1024 status=none
"$vubd" create "$dir/meta.qcow2" --data-file "$dir/disk.raw" >/dev/null

image_args() {
    if [ "$1" = raw ]; then echo "--image $dir/disk.raw"; else echo "--image $dir/meta.qcow2 --format qcow2"; fi
}

serve() { # kind [wrapper...]
    local kind=$1; shift
    rm -f "$dir/s.sock"
    # shellcheck disable=SC2046
    $pin_backend "$@" "$vubd" serve --socket "$dir/s.sock" $(image_args "$kind") 2>"$dir/serve.log" &
    pid=$!
    for _ in $(seq 300); do [ -S "$dir/s.sock" ] && break; sleep 0.1; done
    sleep 0.2
}

stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }

if [ "$reps" -gt 0 ]; then
echo "== loadgen, median of $reps x ${runtime}s runs, alternating =="
results=$dir/results
: >"$results"
for wl in "randread 1" "randread 32" "randwrite 1" "randwrite 32"; do
    set -- $wl
    for rep in $(seq "$reps"); do
        for kind in raw qcow2; do
            serve "$kind"
            echo "$kind $1 $2 $($pin_load "$loadgen" --socket "$dir/s.sock" --rw "$1" --bs 4k --iodepth "$2" --runtime "$runtime" --json)" >>"$results"
            stop
        done
    done
done
python3 - "$results" <<'EOF'
import json, statistics, sys, collections
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    kind, rw, qd, js = line.split(" ", 3)
    d[(rw, int(qd), kind)].append(json.loads(js))
print(f"{'workload':16} {'raw IOPS':>10} {'qcow2 IOPS':>11} {'ratio':>6} {'raw p50':>9} {'qcow2 p50':>10}")
for rw, qd in sorted({(k[0], k[1]) for k in d}):
    iops = [statistics.median(x["iops"] for x in d[(rw, qd, k)]) for k in ("raw", "qcow2")]
    p50 = [statistics.median(x["lat_us"]["p50"] for x in d[(rw, qd, k)]) for k in ("raw", "qcow2")]
    print(f"{rw + ' qd' + str(qd):16} {iops[0]:10.0f} {iops[1]:11.0f} {iops[1] / iops[0]:6.3f} {p50[0]:8.1f}us {p50[1]:9.1f}us")
EOF
fi

if command -v valgrind >/dev/null; then
    echo "== instructions per I/O in vubd (callgrind), 4k iodepth 32 =="
    n=20000
    for rw in randread randwrite; do
        for kind in raw qcow2; do
            for count in $n $((3 * n)); do
                serve "$kind" valgrind --tool=callgrind --callgrind-out-file=/dev/null --log-file="$dir/vg.log"
                $pin_load "$loadgen" --socket "$dir/s.sock" --rw "$rw" --iodepth 32 --ios "$count" --runtime 600 >/dev/null
                stop
                echo "$rw $kind $count $(grep -oE 'refs: +[0-9,]+' "$dir/vg.log" | tr -d ', ' | cut -d: -f2)"
            done
        done
    done >"$dir/cg"
    python3 - "$dir/cg" "$n" <<'EOF'
import sys
n = int(sys.argv[2]); d = {}
for line in open(sys.argv[1]):
    rw, kind, count, ir = line.split()
    d[(rw, kind, int(count))] = int(ir)
for rw in ("randread", "randwrite"):
    per = {k: (d[(rw, k, 3 * n)] - d[(rw, k, n)]) / (2 * n) for k in ("raw", "qcow2")}
    print(f"{rw:9}: raw {per['raw']:.0f}, qcow2+raw data file {per['qcow2']:.0f} instructions/I/O, ratio {per['qcow2'] / per['raw']:.3f}")
EOF
fi
