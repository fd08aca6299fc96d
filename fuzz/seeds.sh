#!/usr/bin/env bash
# Seed corpus for the qcow2_open_check fuzz target: small qcow2 images made by qemu-img and
# qemu-io, one per feature vubd reads (plain, v2, refcount widths, external data file raw and
# not, backing file, snapshot, bitmaps, zlib and zstd compressed clusters, lazy refcounts,
# preallocated metadata, extended L2). Clusters of 512 bytes (4 KiB where the feature needs
# it) keep them a few KiB each.
#
# Stored names match the files the target puts beside each image: data.raw (data file) and
# base.raw (raw backing file).
#
# Usage: fuzz/seeds.sh [OUT_DIR]   (default: fuzz/seeds/qcow2_open_check)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/seeds/qcow2_open_check}
for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || {
        echo "seeds.sh: $tool is needed (Debian: apt-get install qemu-utils)" >&2
        exit 1
    }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

SIZE=256K
small="-o cluster_size=512"

# qemu-io writes: a few patterns at scattered offsets (data clusters, several L2 entries).
fill() {
    qemu-io -f qcow2 "$@" \
        -c "write -P 0xaa 0 4k" \
        -c "write -P 0x55 100k 1k" \
        -c "write -z 150k 2k" \
        -c "write -P 0x11 250k 512" >/dev/null
}

seed() { # name: move ./img.qcow2 into the corpus
    mv img.qcow2 "$out/$1.qcow2"
    rm -f data.raw
}

qemu-img create -q -f qcow2 $small img.qcow2 $SIZE && fill img.qcow2 && seed plain
qemu-img create -q -f qcow2 $small img.qcow2 $SIZE && seed empty
qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 img.qcow2 $SIZE && fill img.qcow2 && seed v2
for bits in 1 8 64; do
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=$bits img.qcow2 $SIZE
    fill img.qcow2 && seed refcount$bits
done
qemu-img create -q -f qcow2 -o cluster_size=512,data_file=data.raw,data_file_raw=on img.qcow2 $SIZE
fill img.qcow2 && seed datafile-raw
qemu-img create -q -f qcow2 -o cluster_size=512,data_file=data.raw img.qcow2 $SIZE
fill img.qcow2 && seed datafile
qemu-img create -q -f raw base.raw 1M
qemu-img create -q -f qcow2 $small -b base.raw -F raw img.qcow2 $SIZE
qemu-io -f qcow2 -c "write -P 0x77 1k 2k" img.qcow2 >/dev/null && seed backing
qemu-img create -q -f qcow2 $small img.qcow2 $SIZE && fill img.qcow2
qemu-img snapshot -c snap1 img.qcow2
qemu-io -f qcow2 -c "write -P 0x33 0 1k" -c "write -P 0x44 200k 512" img.qcow2 >/dev/null
seed snapshot
# Bitmaps need 4 KiB clusters: the extension must fit in the first cluster with the header.
qemu-img create -q -f qcow2 -o cluster_size=4096 img.qcow2 $SIZE
qemu-img bitmap --add --granularity 512 img.qcow2 b0
qemu-img bitmap --add --disable img.qcow2 b1
fill img.qcow2 && seed bitmaps
qemu-io -f raw -c "write -P 0x5a 0 64k" -c "write -P 0x00 64k 64k" -c "write -P 0x12 200k 8k" \
    base.raw >/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=4096 base.raw img.qcow2 && seed compressed-zlib
qemu-img convert -c -O qcow2 -o cluster_size=4096,compression_type=zstd base.raw img.qcow2 &&
    seed compressed-zstd
qemu-img create -q -f qcow2 -o cluster_size=512,lazy_refcounts=on img.qcow2 $SIZE
fill img.qcow2 && seed lazy-refcounts
qemu-img create -q -f qcow2 -o cluster_size=512,preallocation=metadata img.qcow2 8K
seed prealloc-metadata
qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on img.qcow2 $SIZE && seed extended-l2

du -sh "$out"
