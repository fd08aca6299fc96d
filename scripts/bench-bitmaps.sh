#!/bin/bash
# Dirty bitmap overhead in the write path: 4k random writes at iodepth 32 on a qcow2 image over
# a 1 GiB raw data file in /dev/shm, with 0, 1 and 8 enabled bitmaps, side by side in one run:
#   1. loadgen IOPS and p50, and vubd's CPU time per write (user + system, from /proc),
#      configurations alternating run by run, median of REPS runs;
#   2. vubd's user-space instructions per write under callgrind (deterministic): the
#      difference between runs of N and 3N writes, divided by 2N.
#
# usage: scripts/bench-bitmaps.sh [RUNTIME_S] [REPS]
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

# One metadata image per configuration, all over the same data file.
for n in 0 1 8; do
    "$vubd" create "$dir/meta$n.qcow2" --data-file "$dir/disk.raw" >/dev/null
    for i in $(seq 1 "$n"); do "$vubd" bitmap "$dir/meta$n.qcow2" add "b$i" >/dev/null; done
done

serve() { # bitmaps [wrapper...]
    local n=$1; shift
    rm -f "$dir/s.sock"
    $pin_backend "$@" "$vubd" serve --socket "$dir/s.sock" --image "$dir/meta$n.qcow2" --format qcow2 2>"$dir/serve.log" &
    pid=$!
    for _ in $(seq 300); do [ -S "$dir/s.sock" ] && break; sleep 0.1; done
    sleep 0.2
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }

echo "== 4k randwrite iodepth 32, median of $reps x ${runtime}s runs, alternating =="
: >"$dir/results"
for rep in $(seq "$reps"); do
    for n in 0 1 8; do
        serve "$n"
        before=$(cpu_ticks)
        result=$($pin_load "$loadgen" --socket "$dir/s.sock" --rw randwrite --bs 4k --iodepth 32 --runtime "$runtime" --json)
        echo "$n $(( $(cpu_ticks) - before )) $result" >>"$dir/results"
        stop
    done
done
python3 - "$dir/results" "$(getconf CLK_TCK)" <<'EOF'
import json, statistics, sys, collections
hz = int(sys.argv[2])
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    n, ticks, js = line.split(" ", 2)
    r = json.loads(js)
    r["cpu_us"] = int(ticks) / hz * 1e6 / r["ios"]
    d[int(n)].append(r)
base = statistics.median(x["iops"] for x in d[0])
base_cpu = statistics.median(x["cpu_us"] for x in d[0])
for n in sorted(d):
    iops = statistics.median(x["iops"] for x in d[n])
    p50 = statistics.median(x["lat_us"]["p50"] for x in d[n])
    cpu = statistics.median(x["cpu_us"] for x in d[n])
    print(f"{n} bitmaps: {iops:9.0f} IOPS ({iops / base:.3f} of none)  p50 {p50:6.1f}us  "
          f"vubd CPU {cpu:.2f}us/write ({cpu / base_cpu:.3f} of none)")
EOF

if command -v valgrind >/dev/null; then
    echo "== instructions per write in vubd (callgrind), 4k randwrite iodepth 32 =="
    w=20000
    for n in 0 1 8; do
        for count in $w $((3 * w)); do
            serve "$n" valgrind --tool=callgrind --callgrind-out-file=/dev/null --log-file="$dir/vg.log"
            $pin_load "$loadgen" --socket "$dir/s.sock" --rw randwrite --iodepth 32 --ios "$count" --runtime 600 >/dev/null
            stop
            echo "$n $count $(grep -oE 'refs: +[0-9,]+' "$dir/vg.log" | tr -d ', ' | cut -d: -f2)"
        done
    done >"$dir/cg"
    python3 - "$dir/cg" "$w" <<'EOF'
import sys
w = int(sys.argv[2]); d = {}
for line in open(sys.argv[1]):
    n, count, ir = line.split()
    d[(int(n), int(count))] = int(ir)
per = {n: (d[(n, 3 * w)] - d[(n, w)]) / (2 * w) for n in (0, 1, 8)}
for n in (0, 1, 8):
    print(f"{n} bitmaps: {per[n]:.0f} instructions/write, ratio to none {per[n] / per[0]:.3f}")
EOF
fi
