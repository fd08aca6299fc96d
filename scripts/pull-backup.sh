#!/bin/bash
# One pull-mode backup of a running disk, with QEMU's QMP commands only, so that it runs
# unchanged against qemu-storage-daemon and vubd (docs/backup.md walks through it):
#
#   1. a fleecing image over the disk (blockdev-add, backing = the disk's node);
#   2. one transaction: a new checkpoint bitmap, the previous one disabled, and a backup job
#      (blockdev-backup sync=none) that copies old data into the fleecing image before the
#      guest overwrites it — a point-in-time view;
#   3. an NBD export of the view with the previous checkpoint's bitmap;
#   4. the copy: everything (full) or only the dirty extents (incremental), as a qcow2 image
#      backed by the previous backup, with qemu-img, qemu-io, nbdcopy and nbdinfo;
#   5. teardown, and the previous bitmap removed.
#
# usage: pull-backup.sh QMP_SOCKET NODE WORKDIR full CHECKPOINT
#        pull-backup.sh QMP_SOCKET NODE WORKDIR inc CHECKPOINT PREVIOUS PREVIOUS_BACKUP
# Writes WORKDIR/CHECKPOINT.qcow2 (full: a standalone image; inc: an overlay of
# PREVIOUS_BACKUP) and WORKDIR/CHECKPOINT.map.json (inc: the dirty extents copied).
# NBD_TLS_DIR=DIR serves the export with TLS (QEMU's x509 layout in DIR, which clients also use
# for its CA; NBD_TLS_HOSTNAME, default localhost, is the name the server certificate carries).
set -euo pipefail
qmp_socket=$1 node=$2 work=$3 mode=$4 checkpoint=$5
previous=${6:-} previous_backup=${7:-}
mkdir -p "$work"
nbd_socket=$work/nbd.sock
uri="nbd+unix:///backup?socket=$nbd_socket"
tls_opts="" tls_object=()
if [ -n "${NBD_TLS_DIR:-}" ]; then
    uri="nbds+unix:///backup?socket=$nbd_socket&tls-certificates=$NBD_TLS_DIR"
    tls_opts=", \"tls-creds\": \"tls-client\", \"tls-hostname\": \"${NBD_TLS_HOSTNAME:-localhost}\""
    tls_object=(--object "tls-creds-x509,id=tls-client,dir=$NBD_TLS_DIR,endpoint=client")
fi

# A small QMP client: negotiates, sends each argument as a command, skips events, fails on an
# error reply; prints the last command's return value.
qmp() {
    python3 - "$qmp_socket" "$@" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
ret = None
for cmd in ['{"execute": "qmp_capabilities"}'] + sys.argv[2:]:
    f.write(cmd + "\n"); f.flush()
    while True:
        reply = json.loads(f.readline())
        if "event" not in reply:
            break
    if "error" in reply:
        sys.exit(f"QMP error for {cmd}: {reply['error']['desc']}")
    ret = reply["return"]
print(json.dumps(ret))
EOF
}

# Wait until a query no longer lists an id (job cancel and export deletion finish
# asynchronously in QEMU).
wait_gone() {
    for _ in $(seq 1 200); do
        qmp "{\"execute\": \"$1\"}" | python3 -c "
import json, sys
sys.exit(any(x.get('id', x.get('device')) == '$2' for x in json.load(sys.stdin)))" && return 0
        sleep 0.05
    done
    echo "pull-backup: $2 still in $1" >&2
    return 1
}

size=$(qmp '{"execute": "query-named-block-nodes"}' | python3 -c "
import json, sys
print(next(n['image']['virtual-size'] for n in json.load(sys.stdin) if n['node-name'] == '$node'))")
fleece=$work/fleece-$checkpoint.qcow2
qemu-img create -q -f qcow2 "$fleece" "$size"

actions="{\"type\": \"block-dirty-bitmap-add\", \"data\": {\"node\": \"$node\", \"name\": \"$checkpoint\", \"persistent\": true}}"
if [ "$mode" = inc ]; then
    actions="$actions, {\"type\": \"block-dirty-bitmap-disable\", \"data\": {\"node\": \"$node\", \"name\": \"$previous\"}}"
fi
actions="$actions, {\"type\": \"blockdev-backup\", \"data\": {\"device\": \"$node\", \"target\": \"fleece\", \"sync\": \"none\", \"job-id\": \"backup-job\"}}"
bitmaps="[]"
[ "$mode" = inc ] && bitmaps="[\"$previous\"]"
server_tls=""
if [ -n "${NBD_TLS_DIR:-}" ]; then
    qmp "{\"execute\": \"object-add\", \"arguments\": {\"qom-type\": \"tls-creds-x509\", \"id\": \"tls0\", \"dir\": \"$NBD_TLS_DIR\", \"endpoint\": \"server\", \"verify-peer\": false}}" >/dev/null
    server_tls=", \"tls-creds\": \"tls0\""
fi
qmp "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"qcow2\", \"node-name\": \"fleece\", \"file\": {\"driver\": \"file\", \"filename\": \"$fleece\"}, \"backing\": \"$node\"}}" \
    "{\"execute\": \"transaction\", \"arguments\": {\"actions\": [$actions]}}" \
    "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"$nbd_socket\"}}$server_tls}}" \
    "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": \"nbd\", \"id\": \"backup-export\", \"node-name\": \"fleece\", \"name\": \"backup\", \"writable\": false, \"bitmaps\": $bitmaps}}" >/dev/null

target=$work/$checkpoint.qcow2
if [ "$mode" = full ]; then
    nbdcopy "$uri" "$work/full.raw"
    qemu-img convert -f raw -O qcow2 "$work/full.raw" "$target"
    rm -f "$work/full.raw"
else
    qemu-img create -q -f qcow2 -b "$previous_backup" -F qcow2 "$target"
    nbdinfo --json --map="qemu:dirty-bitmap:$previous" "$uri" > "$work/$checkpoint.map.json"
    # Each dirty extent: read from the export, written into the overlay at the same offset.
    python3 - "$work/$checkpoint.map.json" > "$work/$checkpoint.extents" <<'EOF'
import json, sys
for e in json.load(open(sys.argv[1])):
    if e["type"] & 1:
        print(e["offset"], e["length"])
EOF
    nbd_file="{\"driver\": \"nbd\", \"server\": {\"type\": \"unix\", \"path\": \"$nbd_socket\"}, \"export\": \"backup\"$tls_opts}"
    while read -r offset length; do
        qemu-img convert "${tls_object[@]}" -f raw -O raw \
            "json:{\"driver\": \"raw\", \"offset\": $offset, \"size\": $length, \"file\": $nbd_file}" \
            "$work/piece.bin"
        qemu-io -f qcow2 "$target" -c "write -q -s $work/piece.bin $offset $length" >/dev/null
    done < "$work/$checkpoint.extents"
    rm -f "$work/piece.bin"
fi

qmp '{"execute": "block-export-del", "arguments": {"id": "backup-export"}}' >/dev/null
wait_gone query-block-exports backup-export
qmp '{"execute": "block-job-cancel", "arguments": {"device": "backup-job"}}' >/dev/null
wait_gone query-block-jobs backup-job
qmp '{"execute": "blockdev-del", "arguments": {"node-name": "fleece"}}' \
    '{"execute": "nbd-server-stop"}' >/dev/null
if [ -n "${NBD_TLS_DIR:-}" ]; then
    qmp '{"execute": "object-del", "arguments": {"id": "tls0"}}' >/dev/null
fi
if [ "$mode" = inc ]; then
    qmp "{\"execute\": \"block-dirty-bitmap-remove\", \"arguments\": {\"node\": \"$node\", \"name\": \"$previous\"}}" >/dev/null
fi
rm -f "$fleece"
echo "pull-backup: $mode backup at checkpoint $checkpoint in $target"
