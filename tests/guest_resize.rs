//! Growing a disk under a running Linux guest: QMP `block_resize` on vubd's control socket
//! grows the image, its raw data file and its bitmap, and vubd tells QEMU through the
//! vhost-user configuration-change message; QEMU raises the guest's configuration interrupt
//! and Linux's virtio-blk picks up the new capacity — no reboot, no reattach. The guest then
//! writes and verifies data past the old end, which lands in the data file and in the bitmap.
//!
//! The disk is the mission graph: qcow2 metadata over a raw data file, with a persistent
//! bitmap. Needs the guest kit of `tests/qemu_guest.rs` (skipped without it unless
//! VUBD_REQUIRE_GUEST=1), qemu-img, qemu-nbd and nbdinfo.

mod common;
#[path = "guest/kit.rs"]
mod kit;
#[path = "guest/vm.rs"]
mod vm;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use common::bitmaps::{nbd_dirty_granules, vubd_bitmap};
use common::cli::vubd_ok;
use common::qemu::{assert_check_clean, info_json};
use common::qmp::Qmp;
use common::{TempDir, Vubd};
use kit::{initrd_with_script, make_initramfs};
use vm::{assert_guest_clean, kit_or_skip, Vm, VmSpec, GUEST_CHECKS, GUEST_END};

const BITMAP: &str = "since-boot";
const GRANULE: u64 = 64 << 10;
const OLD_SIZE: u64 = 64 << 20;
const NEW_SIZE: u64 = 192 << 20;
/// What the guest writes past the old end, and where.
const WRITTEN: u64 = 1 << 20;
const BEFORE: &str = "VUBD-RESIZE-BEFORE ";
const AFTER: &str = "VUBD-RESIZE-AFTER ";
const WRITE_OK: &str = "VUBD-RESIZE-WRITE-OK";
/// Booting to the script under TCG takes 10-30 s; the slack is for a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const RESIZE_TIMEOUT: Duration = Duration::from_secs(120);

/// The guest's part: report the disk's size, wait until it changes (for up to 150 s), report
/// it again with what the kernel logged, then write and verify 1 MiB past the old end.
fn script() -> String {
    format!(
        "busybox stty -echo\n\
         before=$(cat /sys/block/vda/size)\n\
         echo \"{BEFORE}$before\"\n\
         i=0\n\
         while [ \"$(cat /sys/block/vda/size)\" = \"$before\" ] && [ $i -lt 1500 ]; do\n\
         \x20   sleep 0.1; i=$((i + 1))\n\
         done\n\
         echo \"{AFTER}$(cat /sys/block/vda/size)\"\n\
         busybox dmesg | grep -i 'new size'\n\
         fio --filename=/dev/vda --ioengine=libaio --direct=1 --rw=write --bs=64k --iodepth=4 \
             --offset={old} --size={written} --verify=crc32c --do_verify=1 --verify_fatal=1 \
             --name=past-the-old-end </dev/null >/tmp/fio.out 2>&1\n\
         rc=$?\n\
         if [ $rc -ne 0 ] || grep -qiE 'err= *[1-9]|fio: |error|bad magic' /tmp/fio.out; then\n\
         \x20   cat /tmp/fio.out\n\
         \x20   exit 1\n\
         fi\n\
         echo {WRITE_OK}\n\
         {GUEST_CHECKS}",
        old = OLD_SIZE,
        written = WRITTEN,
    )
}

/// The number after `marker` on the console.
fn reported(console: &str, marker: &str) -> Option<u64> {
    console
        .lines()
        .find_map(|l| l.strip_prefix(marker))
        .and_then(|n| n.trim().parse().ok())
}

#[test]
fn a_linux_guest_sees_its_disk_grow_without_a_reboot() {
    let Some(kit) = kit_or_skip("the online resize guest test") else {
        return;
    };
    let dir = TempDir::new("guest-resize");
    let meta = dir.join("meta.qcow2");
    let raw = dir.join("disk.raw");
    vubd_ok(&[
        "create",
        meta.to_str().unwrap(),
        "--data-file",
        raw.to_str().unwrap(),
        "--size",
        &OLD_SIZE.to_string(),
    ]);
    vubd_bitmap(&dir, &["add", BITMAP, "--granularity", "64K"]);
    let socket = dir.join("vubd.sock");
    let control = dir.join("control.sock");
    let args = [
        "--image",
        meta.to_str().unwrap(),
        "--format",
        "qcow2",
        "--control",
        control.to_str().unwrap(),
    ];
    let mut vubd = Vubd::start(&socket, &args);

    let initramfs = dir.join("initramfs.cpio");
    make_initramfs(&kit, &initramfs).expect("initramfs");
    let initrd = initrd_with_script(&initramfs, &script()).expect("initrd");
    let mut guest = Vm::start(
        &kit,
        &VmSpec {
            name: "guest",
            dir: dir.path(),
            initrd: &initrd,
            vhost_socket: &socket,
            num_queues: 1,
            reconnect_ms: None,
            incoming: None,
        },
    );
    guest
        .wait_for(&[BEFORE], BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        reported(&guest.console(), BEFORE),
        Some(OLD_SIZE / 512),
        "{}",
        guest.describe()
    );

    let mut qmp = Qmp::connect(&control);
    qmp.ok(
        "block_resize",
        json!({"node-name": "disk", "size": NEW_SIZE}),
    );
    let ended = guest.wait_for(&[GUEST_END], RESIZE_TIMEOUT);
    let exited = ended.and_then(|_| guest.wait_exit(Duration::from_secs(30)));
    let stderr = vubd.stop();
    let context = format!("{}\n--- vubd ---\n{stderr}", guest.describe());
    if let Err(e) = exited {
        panic!("{e}\n--- vubd ---\n{stderr}");
    }
    let console = guest.console();
    assert_eq!(
        reported(&console, AFTER),
        Some(NEW_SIZE / 512),
        "the guest sees the new capacity:\n{context}"
    );
    assert!(console.contains(WRITE_OK), "{context}");
    assert_guest_clean(&console, &context);
    assert!(
        stderr.contains("1 frontend(s) told"),
        "vubd told QEMU of the change:\n{stderr}"
    );

    // The image is consistent at the new size, and the data file holds the disk.
    assert_check_clean(dir.path(), "meta.qcow2");
    let info = info_json(dir.path(), "meta.qcow2");
    assert_eq!(info["virtual-size"], NEW_SIZE, "{info}");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), NEW_SIZE);
    // The bitmap, grown with the disk, holds exactly what the guest wrote past the old end.
    let dirty = nbd_dirty_granules(dir.path(), "meta.qcow2", BITMAP, GRANULE);
    let written: BTreeSet<u64> = (OLD_SIZE / GRANULE..(OLD_SIZE + WRITTEN) / GRANULE).collect();
    assert_eq!(dirty, written, "{context}");
    let kernel = console
        .lines()
        .find(|l| l.contains("new size"))
        .unwrap_or("(no kernel line)");
    eprintln!("guest_resize: the guest's kernel logged: {kernel}");
}
