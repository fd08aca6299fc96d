#!/bin/bash
# The incremental backup walkthrough of docs/bitmaps.md, end to end: a raw disk served by vubd
# with a persistent dirty bitmap, a full backup, guest writes, an online checkpoint over QMP,
# a copy of only the dirty extents, and a verification with qemu-img compare.
#
# usage: scripts/incremental-backup-demo.sh [WORKDIR]   (default: a temporary directory)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${VUBD_BIN:-}" ]; then
    cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin vubd --example loadgen
fi
vubd=${VUBD_BIN:-$root/target/release/vubd}
loadgen=${LOADGEN_BIN:-$root/target/release/examples/loadgen}
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cd "$work"
step() { printf '\n== %s\n' "$*"; }

# A tiny QMP client: negotiate, then send each argument as a command.
qmp() {
    python3 - "$@" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect("qmp.sock"); f = s.makefile("rw")
f.readline()  # greeting
for cmd in ['{"execute": "qmp_capabilities"}'] + sys.argv[1:]:
    f.write(cmd + "\n"); f.flush()
    reply = json.loads(f.readline())
    if "error" in reply:
        sys.exit(f"QMP error: {reply['error']['desc']}")
    if cmd != '{"execute": "qmp_capabilities"}':
        print(json.dumps(reply["return"]))
EOF
}

step "1. A raw disk (64 MiB of data) and qcow2 metadata beside it"
dd if=/dev/urandom of=disk.raw bs=1M count=64 status=none
"$vubd" create meta.qcow2 --data-file disk.raw

step "2. Full backup, and the bitmap that starts recording from it"
"$vubd" bitmap meta.qcow2 add since-full
cp --sparse=always disk.raw full.raw

step "3. The VM runs: vubd serves the disk and records every write"
rm -f vm.sock qmp.sock
"$vubd" serve --socket vm.sock --image meta.qcow2 --format qcow2 --control qmp.sock 2>vubd.log &
vubd_pid=$!
trap 'kill "$vubd_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S vm.sock ] && [ -S qmp.sock ] && break; sleep 0.1; done
"$loadgen" --socket vm.sock --rw randwrite --bs 4k --iodepth 8 --ios 300 --size 64M >/dev/null
qmp '{"execute": "query-named-block-nodes"}' | python3 -c '
import json, sys
for b in json.load(sys.stdin)[0]["dirty-bitmaps"]:
    print("  bitmap %s: %d dirty bytes, recording=%s" % (b["name"], b["count"], b["recording"]))'

# (For the verification in step 7 only: what the disk holds at the checkpoint. Nothing writes
# now, so a plain copy is exact.)
cp --sparse=always disk.raw at-checkpoint.raw

step "4. Checkpoint: start a new bitmap and freeze the old one, atomically"
qmp '{"execute": "transaction", "arguments": {"actions": [
      {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "since-inc1", "persistent": true}},
      {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "since-full"}}]}}' >/dev/null
"$loadgen" --socket vm.sock --rw randwrite --bs 4k --iodepth 8 --ios 100 --size 64M >/dev/null

step "5. The VM stops (vubd stores the bitmaps and exits cleanly)"
kill -TERM "$vubd_pid"
wait "$vubd_pid"
qemu-img check meta.qcow2 | head -n 1

step "6. The incremental backup: copy only the extents 'since-full' marks"
"$vubd" bitmap meta.qcow2 dump since-full >extents-inc1.txt
# QEMU's tools read the same bitmap: qemu-nbd exports it, nbdinfo lists it.
if command -v nbdinfo >/dev/null; then
    rm -f nbd.sock
    qemu-nbd -r -t -f qcow2 -B since-full -k "$PWD/nbd.sock" meta.qcow2 &
    nbd_pid=$!
    for _ in $(seq 100); do [ -S nbd.sock ] && break; sleep 0.1; done
    nbdinfo --map=qemu:dirty-bitmap:since-full "nbd+unix:///?socket=$PWD/nbd.sock" | awk '$3 == 1 {n++} END {print "  nbdinfo: " n " dirty extents"}'
    kill "$nbd_pid"; wait "$nbd_pid" 2>/dev/null || true
fi
truncate -s "$(stat -c %s disk.raw)" inc1.raw
while read -r offset length; do
    dd if=disk.raw of=inc1.raw bs=64K iflag=skip_bytes,count_bytes oflag=seek_bytes conv=notrunc \
        skip="$offset" seek="$offset" count="$length" status=none
done <extents-inc1.txt
echo "  $(wc -l <extents-inc1.txt) extents, $(awk '{s += $2} END {print s}' extents-inc1.txt) bytes copied" \
     "of $(stat -c %s disk.raw); inc1.raw holds $(du -k inc1.raw | cut -f1) KiB on disk"
"$vubd" bitmap meta.qcow2 remove since-full

step "7. Restore full + incremental and verify against the disk at the checkpoint"
cp --sparse=always full.raw restored.raw
while read -r offset length; do
    dd if=inc1.raw of=restored.raw bs=64K iflag=skip_bytes,count_bytes oflag=seek_bytes conv=notrunc \
        skip="$offset" seek="$offset" count="$length" status=none
done <extents-inc1.txt
qemu-img compare -f raw -F raw restored.raw at-checkpoint.raw

step "8. The next incremental: what changed since the checkpoint, and the disk as it is now"
"$vubd" bitmap meta.qcow2 dump since-inc1 >extents-inc2.txt
while read -r offset length; do
    dd if=disk.raw of=restored.raw bs=64K iflag=skip_bytes,count_bytes oflag=seek_bytes conv=notrunc \
        skip="$offset" seek="$offset" count="$length" status=none
done <extents-inc2.txt
qemu-img compare -f raw -F qcow2 restored.raw meta.qcow2
