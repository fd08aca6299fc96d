#!/bin/sh
# Build the test guest's initramfs: busybox, the virtio modules of the installed Debian cloud
# kernel, and fio with its libraries. The guest's /init runs /script.sh, which the test adds as
# a second cpio archive concatenated to this one, and powers off.
#
# usage: mkinitramfs.sh OUT.cpio KERNEL_VERSION
set -eu
out=$1
kver=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/bin" "$work/lib/modules" "$work/proc" "$work/sys" "$work/dev" "$work/tmp"
cp /bin/busybox "$work/bin/busybox"
for cmd in sh mount insmod poweroff dd sha256sum cat echo sleep sync base64 blockdev grep cmp head tr stat; do
    ln -s busybox "$work/bin/$cmd"
done

# virtio_blk over PCI, in dependency order.
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    f=$(find "/lib/modules/$kver/kernel/drivers" -name "$m.ko*" | head -n 1)
    [ -n "$f" ] || { echo "mkinitramfs: module $m not found for $kver" >&2; exit 1; }
    cp "$f" "$work/lib/modules/"
done

if command -v fio >/dev/null 2>&1; then
    cp "$(command -v fio)" "$work/bin/fio"
    ldd "$(command -v fio)" | awk '/=> \//{print $3} /^\s*\/lib/{print $1}' | while read -r lib; do
        mkdir -p "$work$(dirname "$lib")"
        cp -L "$lib" "$work$lib"
    done
    mkdir -p "$work/lib64"
    cp -L /lib64/ld-linux-x86-64.so.2 "$work/lib64/"
fi

cat > "$work/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko 2>/dev/null || true
done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
echo "VUBD-GUEST-BEGIN"
sh /script.sh
echo "VUBD-GUEST-END status=$?"
sync
poweroff -f
INIT
chmod +x "$work/init"
(cd "$work" && find . | cpio -o -H newc --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
