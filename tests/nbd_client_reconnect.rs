//! The NBD client losing its server (QEMU's `reconnect-delay` and `open-timeout`): qemu-nbd
//! is frozen with SIGSTOP so that requests are surely in flight (sent, unanswered), then
//! killed, and restarted on the same socket or not.
//!
//! Nothing here measures time: a test waits for outcomes (requests completing, or failing),
//! with a generous safety net against hangs.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use vubd::block::remote::location::NbdSpec;
use vubd::block::remote::nbd::NbdClient;

#[path = "common/nbd_servers.rs"]
mod servers;
use servers::*;

const MIB: usize = 1 << 20;

fn spec_with(dir: &TempDir, delay: u64) -> NbdSpec {
    NbdSpec {
        reconnect_delay: Duration::from_secs(delay),
        ..unix_spec(&dir.join("nbd.sock"), "disk")
    }
}

/// Freeze the server, start `n` writes (4 KiB at 64 KiB steps from 1 MiB) and `n` reads
/// (4 KiB at 64 KiB steps from 0): all are sent and unanswered when this returns.
fn requests_in_flight(c: &NbdClient, n: usize, server: &Server) -> (Vec<Pending>, Vec<Pending>) {
    server.stop();
    let writes = (0..n)
        .map(|i| {
            let off = MIB + i * 65536;
            write_async(c, off as u64, &pattern(off, 4096, 0x5a), 2)
        })
        .collect();
    let reads = (0..n)
        .map(|i| read_async(c, (i * 65536) as u64, 4096, 3))
        .collect();
    (writes, reads)
}

/// Retry a read until it succeeds (the client reconnecting in the background).
fn read_when_back(c: &NbdClient, offset: u64) -> Vec<u8> {
    let deadline = Instant::now() + HANG;
    loop {
        let (r, data) = read_async(c, offset, 4096, 1).wait();
        if r == 4096 {
            return data;
        }
        assert_eq!(r, -libc::EIO);
        assert!(Instant::now() < deadline, "never reconnected");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn restart(spec: &NbdSpec, file: &Path) -> Server {
    qemu_nbd(spec, file, &[])
}

#[test]
fn requests_in_flight_wait_for_the_server_to_come_back_and_are_sent_again() {
    let dir = TempDir::new("back");
    let file = dir.join("disk.raw");
    let mut expect = patterned_file(&file, 4 * MIB, 1);
    // Generous, so that a slow machine restarting qemu-nbd stays within it.
    let spec = spec_with(&dir, 60);
    let mut server = qemu_nbd(&spec, &file, &[]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let (writes, reads) = requests_in_flight(&c, 8, &server);
    server.kill();
    // A request made while the server is away waits as well.
    let late = read_async(&c, 3 * MIB as u64, 4096, 1);
    let _server = restart(&spec, &file);
    for w in writes {
        assert_eq!(w.wait().0, 4096);
    }
    for (i, r) in reads.into_iter().enumerate() {
        let (res, data) = r.wait();
        assert_eq!(res, 4096);
        assert!(data[..] == expect[i * 65536..i * 65536 + 4096], "read {i}");
    }
    let (res, data) = late.wait();
    assert_eq!(res, 4096);
    assert!(data[..] == expect[3 * MIB..3 * MIB + 4096]);
    for i in 0..8 {
        let off = MIB + i * 65536;
        expect[off..off + 4096].copy_from_slice(&pattern(off, 4096, 0x5a));
    }
    store(&c).flush().unwrap();
    assert!(
        fs::read(&file).unwrap() == expect,
        "the writes were sent again"
    );
}

#[test]
fn without_a_reconnect_delay_requests_in_flight_fail_at_once_and_later_ones_work_again() {
    let dir = TempDir::new("nodelay");
    let file = dir.join("disk.raw");
    let expect = patterned_file(&file, 4 * MIB, 2);
    let spec = spec_with(&dir, 0);
    let mut server = qemu_nbd(&spec, &file, &[]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let (writes, reads) = requests_in_flight(&c, 4, &server);
    server.kill();
    for p in writes.into_iter().chain(reads) {
        assert_eq!(p.wait().0, -libc::EIO);
    }
    // Nobody serves: new requests fail at once too.
    assert_eq!(read_async(&c, 0, 4096, 1).wait().0, -libc::EIO);
    let _server = restart(&spec, &file);
    assert!(read_when_back(&c, 8192)[..] == expect[8192..8192 + 4096]);
}

#[test]
fn waiting_requests_fail_once_the_delay_passes_without_a_server() {
    let dir = TempDir::new("gone");
    let file = dir.join("disk.raw");
    patterned_file(&file, 4 * MIB, 3);
    let spec = spec_with(&dir, 1);
    let mut server = qemu_nbd(&spec, &file, &[]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let (writes, reads) = requests_in_flight(&c, 4, &server);
    server.kill();
    for p in writes.into_iter().chain(reads) {
        assert_eq!(p.wait().0, -libc::EIO);
    }
    // Once the delay has passed, new requests fail without waiting.
    assert_eq!(read_async(&c, 0, 4096, 1).wait().0, -libc::EIO);
    // Dropping a client that keeps reconnecting stops it.
    drop(c);
}

#[test]
fn a_server_back_with_a_smaller_export_is_given_up() {
    let dir = TempDir::new("shrunk");
    let file = dir.join("disk.raw");
    patterned_file(&file, 4 * MIB, 4);
    let spec = spec_with(&dir, 60);
    let mut server = qemu_nbd(&spec, &file, &[]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let (writes, reads) = requests_in_flight(&c, 2, &server);
    server.kill();
    let small = dir.join("small.raw");
    patterned_file(&small, 2 * MIB, 4);
    let mut smaller = restart(&spec, &small);
    for p in writes.into_iter().chain(reads) {
        assert_eq!(p.wait().0, -libc::EIO);
    }
    // For good: even with the right export back, nothing is sent any more.
    smaller.kill();
    let _back = restart(&spec, &file);
    assert_eq!(read_async(&c, 0, 4096, 1).wait().0, -libc::EIO);
}

#[test]
fn open_timeout_waits_for_a_server_that_starts_late() {
    let dir = TempDir::new("late");
    let file = dir.join("disk.raw");
    let expect = patterned_file(&file, MIB, 5);
    let spec = NbdSpec {
        open_timeout: Duration::from_secs(60),
        ..spec_with(&dir, 0)
    };
    let starter = {
        let (spec, file) = (spec.clone(), file.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            restart(&spec, &file)
        })
    };
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let mut buf = vec![0u8; 4096];
    store(&c).read_at(&mut buf, 0).unwrap();
    assert!(buf[..] == expect[..4096]);
    drop(c);
    drop(starter.join().unwrap());
    // Without open-timeout, one try: the error says what failed.
    let spec0 = spec_with(&dir, 0);
    let err = NbdClient::connect(&spec0, false, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot connect"), "{err}");
    // With one that passes, the message says so.
    let spec1 = NbdSpec {
        open_timeout: Duration::from_secs(1),
        ..spec0
    };
    let err = NbdClient::connect(&spec1, false, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("open-timeout=1 s"), "{err}");
}

#[test]
fn dropping_the_client_fails_what_waits_for_a_reconnection() {
    let dir = TempDir::new("dropwait");
    let file = dir.join("disk.raw");
    patterned_file(&file, 4 * MIB, 6);
    let spec = spec_with(&dir, 60);
    let mut server = qemu_nbd(&spec, &file, &[]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let (writes, reads) = requests_in_flight(&c, 3, &server);
    server.kill();
    drop(c);
    for p in writes.into_iter().chain(reads) {
        assert_eq!(p.wait().0, -libc::EIO);
    }
}
