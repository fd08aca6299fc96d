#!/bin/sh
# `make run`: serve ./demo/disk.raw on ./demo/vubd.sock and print how to attach to it.
set -eu
cd "$(dirname "$0")/.."
mkdir -p demo
disk=demo/disk.raw
if [ ! -e "$disk" ]; then
    truncate -s 1G "$disk"
    echo "created $disk (1 GiB, sparse)"
fi
sock="$(pwd)/demo/vubd.sock"
queues=2
cat <<TXT

vubd serves $(pwd)/$disk on $sock with $queues queues. Attach with:

  QEMU (guest memory must be shared with vubd; use -accel kvm where KVM works):
    qemu-system-x86_64 -accel tcg -m 1G -smp 2 \\
      -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
      -chardev socket,id=vubd0,path=$sock \\
      -device vhost-user-blk-pci,chardev=vubd0,num-queues=$queues \\
      -kernel /boot/vmlinuz-... -initrd ... -append 'console=ttyS0' -nographic

  cloud-hypervisor:
    cloud-hypervisor --memory size=1G,shared=on \\
      --disk vhost_user=true,socket=$sock,num_queues=$queues,queue_size=256 \\
      --kernel ... --cmdline 'console=ttyS0' --serial tty --console off

  Without a VM (libblkio load generator):
    cargo run --release --example loadgen -- --socket $sock --rw randread --bs 4k --iodepth 32 --runtime 10

Stop with Ctrl-C.
TXT
exec ./target/release/vubd serve --socket "$sock" --image "$disk" --num-queues "$queues"
