//! A real Linux guest under QEMU (TCG) uses a disk served by vubd: the kernel's virtio-blk
//! driver over vhost-user-blk-pci, with fio verifying its own writes.
//!
//! Needs qemu-system-x86_64, a Debian kernel under /boot with its modules, and busybox; `make
//! test` installs them. Without them the test says so and passes, unless VUBD_REQUIRE_GUEST=1
//! (as `make test` sets), where a missing piece is a failure.

mod common;
#[path = "guest/kit.rs"]
mod kit;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::data::sha256_hex;
use common::{create_image, pattern, TempDir, Vubd};
use kit::{find_kit, initrd_with_script, make_initramfs, GuestKit};

/// Boot the guest on `socket`, run `script` in it, and return the console output between the
/// begin and end markers.
fn run_guest(kit: &GuestKit, initramfs: &Path, socket: &Path, queues: u32, script: &str) -> String {
    let initrd = initrd_with_script(initramfs, script).expect("initrd");
    // The console goes to a file: a pipe nobody reads while the guest runs could fill up.
    let console_path = initramfs.with_extension("console");
    let console_file = fs::File::create(&console_path).expect("console file");
    let mut child = Command::new(&kit.qemu)
        .args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kit.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .arg("-device")
        .arg(format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"))
        .stdin(std::process::Stdio::null())
        .stdout(console_file.try_clone().expect("console file"))
        .stderr(console_file)
        .spawn()
        .expect("start qemu");
    let deadline = Instant::now() + Duration::from_secs(240);
    let read_console = || {
        fs::read_to_string(&console_path)
            .unwrap_or_default()
            .replace('\r', "")
    };
    while child.try_wait().expect("wait qemu").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("guest did not finish within 240 s:\n{}", read_console());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let console = read_console();
    let begin = console
        .find("VUBD-GUEST-BEGIN")
        .unwrap_or_else(|| panic!("guest never ran its script:\n{console}"));
    let body = &console[begin..];
    assert!(
        body.contains("VUBD-GUEST-END status=0"),
        "guest script failed:\n{body}"
    );
    body.to_string()
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn linux_guest_uses_the_disk_and_a_second_boot_sees_its_writes() {
    let kit = match find_kit() {
        Ok(kit) => kit,
        Err(why) if std::env::var("VUBD_REQUIRE_GUEST").as_deref() != Ok("1") => {
            eprintln!("skipping the QEMU guest test: {why}");
            return;
        }
        Err(why) => panic!("QEMU guest test required but cannot run: {why}"),
    };
    let dir = TempDir::new("qemu-guest");
    let initramfs = dir.join("initramfs.cpio");
    make_initramfs(&kit, &initramfs).expect("initramfs");

    const DISK: usize = 64 << 20;
    let image = dir.join("disk.raw");
    let mut model = create_image(&image, DISK, 31);
    let mut vubd = Vubd::start(
        &dir.join("vubd.sock"),
        &["--image", image.to_str().unwrap(), "--num-queues", "2"],
    );

    // First boot: the guest sees the image's content, writes a marker and runs fio with
    // verification in the second half of the disk. Each of the two fio jobs owns a 16 MiB
    // region: jobs sharing blocks overwrite each other's verify headers, and fio then reports
    // EILSEQ whatever the device does.
    let first_mib = sha256_hex(&model[..1 << 20]);
    let marker = pattern(4096, 32);
    let marker_sum = sha256_hex(&marker);
    fs::write(dir.join("marker"), &marker).unwrap();
    let script = format!(
        "set -e\n\
         cat /sys/block/vda/size\n\
         dd if=/dev/vda bs=1M count=1 2>/dev/null | sha256sum\n\
         printf '%s' '{marker_b64}' | base64 -d > /tmp/marker\n\
         dd if=/tmp/marker of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null\n\
         if command -v fio >/dev/null; then\n\
           fio --name=verify --filename=/dev/vda --offset=32M --offset_increment=16M --size=16M \
               --rw=randrw --bs=4k --iodepth=16 --numjobs=2 --ioengine=libaio --direct=1 --runtime=3 --time_based \
               --verify=crc32c --do_verify=1 --group_reporting 2>&1 | grep -E 'err=|IOPS'\n\
         fi\n",
        marker_b64 = base64(&marker),
    );
    let out = run_guest(&kit, &initramfs, &vubd.socket, 2, &script);
    assert!(out.contains(&(DISK / 512).to_string()), "disk size:\n{out}");
    assert!(
        out.contains(&first_mib),
        "the guest reads the image's data:\n{out}"
    );
    if out.contains("err=") {
        assert!(out.contains("err= 0"), "fio reported errors:\n{out}");
    }
    model[1 << 20..(1 << 20) + 4096].copy_from_slice(&marker);

    // Second boot, same daemon: the marker written by the first guest is there.
    let script = "dd if=/dev/vda bs=4096 skip=256 count=1 2>/dev/null | sha256sum\n";
    let out = run_guest(&kit, &initramfs, &vubd.socket, 1, script);
    assert!(
        out.contains(&marker_sum),
        "second boot reads the first boot's write:\n{out}"
    );

    vubd.stop();
    let file = fs::read(&image).unwrap();
    assert!(
        file[..DISK / 2] == model[..DISK / 2],
        "first half of the disk as written"
    );
}
