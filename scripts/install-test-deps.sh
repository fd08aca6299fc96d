#!/bin/sh
# Install, through apt, the Debian packages the tests and `make bench` need and the
# machine lacks.
#   qemu-utils          qemu-img / qemu-io / qemu-nbd / qemu-storage-daemon 10: the reference
#   qemu-system-x86     boots the Linux test guest (vhost-user-blk-pci)
#   linux-image-cloud-amd64, busybox-static   the test guest's kernel and userland
#   fio                 the guest's I/O verifier
#   libnbd-bin          nbdinfo, nbdcopy: NBD clients for bitmaps and backups
#   openssl             test certificates for NBD over TLS
#   systemd             systemd-socket-activate and systemd-analyze for the unit tests
#   curl                what `make run` prints for reading the metrics endpoint
#   fonts-dejavu-core   the font `make bench` draws its chart with
#   ceph-mon, ceph-osd, ceph-common   the throwaway Ceph cluster of the RBD tests
#                       (scripts/ceph-test-cluster.sh): its monitor, its memstore OSD, and
#                       rbd / ceph / ceph-authtool / monmaptool with librbd
#   nbdkit              NBD servers scripted by the tests
#
# QEMU comes from bookworm-backports (10.0): the oracle tests rely on qemu-img 10, and
# bookworm's qemu-system-x86 7.2 would replace it with 7.2 (the packages must match).
set -eu
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

version_ok() { # package minimum-version
    v=$(dpkg-query -W -f='${Version}' "$1" 2>/dev/null) || return 1
    [ -n "$v" ] && dpkg --compare-versions "$v" ge "$2"
}

backports=""
for p in qemu-utils qemu-system-x86; do
    version_ok "$p" "1:10" || backports="$backports $p"
done
main=""
for p in linux-image-cloud-amd64 busybox-static fio libnbd-bin openssl systemd curl fonts-dejavu-core \
    ceph-mon ceph-osd ceph-common nbdkit; do
    dpkg -s "$p" >/dev/null 2>&1 || main="$main $p"
done
[ -z "$backports$main" ] && exit 0

echo "installing:$backports$main"
if [ -n "$backports" ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" \
        "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" |
        $sudo tee /etc/apt/sources.list.d/vubd-bookworm-backports.sources >/dev/null
fi
$sudo apt-get update -qq
apt_install() {
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if [ -n "$backports" ]; then
    # Both at once, so that apt keeps their versions matched.
    apt_install -t bookworm-backports qemu-utils qemu-system-x86
fi
if [ -n "$main" ]; then
    apt_install $main
fi
