#!/bin/sh
# `make run`: the mission's graph on a demo disk — ./demo/disk.raw, a plain raw file, adopted
# by qcow2 metadata beside it (./demo/meta.qcow2) that carries a persistent dirty bitmap —
# served on ./demo/vubd.sock with a QMP control socket and a metrics endpoint; prints how to
# attach a VM, read the bitmap and the statistics, and take backups.
#
# DEMO_DIR (default ./demo) and VUBD (default ./target/release/vubd) change where and what.
set -eu
cd "$(dirname "$0")/.."
demo=${DEMO_DIR:-demo}
mkdir -p "$demo"
demo=$(cd "$demo" && pwd)
vubd=${VUBD:-./target/release/vubd}
disk=$demo/disk.raw
meta=$demo/meta.qcow2
if [ ! -e "$disk" ]; then
    truncate -s 1G "$disk"
    echo "created $disk (1 GiB, sparse)"
fi
if [ ! -e "$meta" ]; then
    # Adopts the raw file byte for byte: the guest's data stays in disk.raw.
    "$vubd" create "$meta" --data-file "$disk" >/dev/null
    "$vubd" bitmap "$meta" add since-create
    echo "created $meta: qcow2 metadata over $disk, with the persistent bitmap since-create"
fi
sock="$demo/vubd.sock"
qmp="$demo/qmp.sock"
metrics="$demo/metrics.sock"
queues=2
cat <<TXT

vubd serves $disk (qcow2 metadata: $meta) on $sock with $queues queues.

Attach a VM:
  QEMU (guest memory must be shared with vubd; use -accel kvm where KVM works):
    qemu-system-x86_64 -accel tcg -m 1G -smp 2 \\
      -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
      -chardev socket,id=vubd0,path=$sock,reconnect-ms=1000 \\
      -device vhost-user-blk-pci,chardev=vubd0,num-queues=$queues \\
      -kernel /boot/vmlinuz-... -initrd ... -append 'console=ttyS0' -nographic
  cloud-hypervisor:
    cloud-hypervisor --memory size=1G,shared=on \\
      --disk vhost_user=true,socket=$sock,num_queues=$queues,queue_size=256 \\
      --kernel ... --cmdline 'console=ttyS0' --serial tty --console off
  Without a VM (libblkio load generator):
    cargo run --release --example loadgen -- --socket $sock --rw randwrite --bs 4k --iodepth 32 --runtime 10

Read the bitmap (what changed since the disk was adopted) and the statistics:
  scripts/qmp $qmp '{"execute": "query-block"}'
  scripts/qmp $qmp '{"execute": "query-blockstats"}'
  curl -s --unix-socket $metrics http://vubd/metrics

Take backups while the disk is in use (QEMU's pull-mode flow over NBD; docs/backup.md):
  scripts/pull-backup.sh $qmp disk $demo/backups full backup-1
  scripts/pull-backup.sh $qmp disk $demo/backups inc backup-2 backup-1 $demo/backups/backup-1.qcow2

Stop with Ctrl-C.
TXT
exec "$vubd" serve --socket "$sock" --image "$meta" --format qcow2 --num-queues "$queues" \
    --control "$qmp" --metrics "unix:$metrics"
