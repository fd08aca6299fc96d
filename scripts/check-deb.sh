#!/bin/sh
# Check the package `make deb` built, as a new user would use it: its contents, its control
# data, and the installed files working — the binary serves a disk, the man pages render, the
# units verify. The package is unpacked into a scratch root (dpkg-deb -x) rather than
# installed over this machine; `dpkg --dry-run -i` checks it would install here.
#
# usage: scripts/check-deb.sh [PACKAGE.deb]   (default: the newest in target/debian)
set -eu
cd "$(dirname "$0")/.."
deb=${1:-$(ls -t target/debian/vubd_*.deb | head -1)}
root=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$root"' EXIT
pid=""
fail() { echo "check-deb: $*" >&2; exit 1; }

dpkg-deb --info "$deb" | grep -q "Package: vubd" || fail "$deb: not the vubd package"
contents=$(dpkg-deb --contents "$deb")
for f in ./usr/bin/vubd ./usr/share/man/man1/vubd.1 ./usr/share/man/man1/vubd-serve.1 \
    ./usr/lib/systemd/system/vubd@.service ./usr/lib/systemd/system/vubd@.socket \
    ./usr/lib/systemd/system/vubd.service \
    ./usr/share/doc/vubd/README.md ./usr/share/doc/vubd/usage.md \
    ./usr/share/doc/vubd/examples/vubd.conf.example; do
    echo "$contents" | grep -q " $f\(\.gz\)\?\$" || fail "$deb lacks $f"
done
dpkg --dry-run -i "$deb" >/dev/null || fail "dpkg would not install $deb here"

dpkg-deb -x "$deb" "$root"
vubd=$root/usr/bin/vubd
"$vubd" --version | grep -q "^vubd " || fail "the packaged binary does not run"
for page in "$root"/usr/share/man/man1/vubd-serve.1*; do
    man -l "$page" 2>/dev/null | grep -q -- "--socket" || fail "$page does not render"
done

# The packaged binary serves the mission's graph.
work=$root/work
mkdir -p "$work"
truncate -s 64M "$work/disk.raw"
"$vubd" create "$work/meta.qcow2" --data-file "$work/disk.raw" >/dev/null
"$vubd" bitmap "$work/meta.qcow2" add b0
"$vubd" serve --socket "$work/s.sock" --image "$work/meta.qcow2" --format qcow2 \
    --control "$work/qmp.sock" 2>"$work/log" &
pid=$!
for _ in $(seq 100); do [ -S "$work/qmp.sock" ] && break; sleep 0.05; done
scripts/qmp "$work/qmp.sock" '{"execute": "query-block"}' | grep -q '"name": "b0"' ||
    fail "the packaged vubd does not serve: $(cat "$work/log")"
kill "$pid" && wait "$pid" || fail "vubd did not exit cleanly: $(cat "$work/log")"
pid=""

# The packaged units, pointing at the packaged binary.
units=$root/units
mkdir -p "$units"
echo "VUBD_ARGS=--image $work/meta.qcow2 --format qcow2" >"$units/demo.conf"
for u in service socket; do
    sed -e "s#/usr/bin/vubd#$vubd#" -e "s#/etc/vubd/%i.conf#$units/demo.conf#" \
        "$root/usr/lib/systemd/system/vubd@.$u" >"$units/vubd@demo.$u"
done
MANPATH=$root/usr/share/man systemd-analyze verify "$units/vubd@demo.service" \
    "$units/vubd@demo.socket" || fail "systemd-analyze verify"
echo "check-deb: $deb installs, serves, documents and verifies"
