//! The NBD client (src/block/remote/nbd/) against real servers: qemu-nbd on a UNIX socket and
//! on TCP, and nbdkit with filters that take features away (structured replies,
//! write-zeroes), shrink the maximum payload, inject errors and delay replies. Data is checked
//! in the served file itself, read directly.
//!
//! TLS is in nbd_client_tls.rs, reconnection in nbd_client_reconnect.rs.

use std::fs;
use std::thread;

use vubd::block::remote::nbd::NbdClient;
use vubd::block::remote::RemoteStore;
use vubd::block::ZeroOp;

#[path = "common/nbd_servers.rs"]
mod servers;
use servers::*;

const MIB: usize = 1 << 20;

/// Several threads, each with many multi-iovec writes in flight at once, then as many reads;
/// the file must hold exactly what was written and the reads must return it.
fn pipelined_from_threads(
    c: &NbdClient,
    file: &std::path::Path,
    threads: usize,
    per_thread: usize,
) {
    let chunk = 64 << 10;
    thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let base = t * per_thread * chunk;
                let pending: Vec<_> = (0..per_thread)
                    .map(|i| {
                        let off = base + i * chunk;
                        write_async(c, off as u64, &pattern(off, chunk, 7), 1 + i % 5)
                    })
                    .collect();
                for p in pending {
                    assert_eq!(p.wait().0, chunk as i32);
                }
            });
        }
    });
    store(c).flush().unwrap();
    let total = threads * per_thread * chunk;
    let on_disk = fs::read(file).unwrap();
    assert!(
        on_disk[..total] == pattern(0, total, 7)[..],
        "the file holds what was written"
    );
    thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let base = t * per_thread * chunk;
                let pending: Vec<_> = (0..per_thread)
                    .map(|i| read_async(c, (base + i * chunk) as u64, chunk, 1 + i % 7))
                    .collect();
                for (i, p) in pending.into_iter().enumerate() {
                    let (r, data) = p.wait();
                    assert_eq!(r, chunk as i32);
                    let off = base + i * chunk;
                    assert!(data == pattern(off, chunk, 7), "read back at {off}");
                }
            });
        }
    });
}

#[test]
fn qemu_nbd_over_unix_serves_pipelined_reads_and_writes_from_several_threads() {
    let dir = TempDir::new("unix");
    let file = dir.join("disk.raw");
    patterned_file(&file, 16 * MIB, 1);
    let spec = unix_spec(&dir.join("nbd.sock"), "disk");
    let _server = qemu_nbd(&spec, &file, &["--cache=writeback"]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    assert_eq!(store(&c).size().unwrap(), 16 * MIB as u64);
    assert_eq!(c.driver(), "nbd");
    pipelined_from_threads(&c, &file, 4, 24);
}

#[test]
fn qemu_nbd_over_tcp_serves_pipelined_reads_and_writes() {
    let dir = TempDir::new("tcp");
    let file = dir.join("disk.raw");
    patterned_file(&file, 8 * MIB, 2);
    let spec = tcp_spec(free_port(), "disk");
    let _server = qemu_nbd(&spec, &file, &[]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    assert!(c.name().starts_with("nbd://127.0.0.1:"), "{}", c.name());
    pipelined_from_threads(&c, &file, 3, 16);
}

#[test]
fn requests_larger_than_the_maximum_payload_are_split() {
    let dir = TempDir::new("split");
    let file = dir.join("disk.raw");
    patterned_file(&file, 80 * MIB, 3);
    let spec = unix_spec(&dir.join("nbd.sock"), "");
    let _server = qemu_nbd(&spec, &file, &[]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    // qemu-nbd takes at most 32 MiB a request: 70 MiB is three of them.
    let data = pattern(5 * MIB, 70 * MIB, 9);
    assert_eq!(
        write_async(&c, 5 * MIB as u64, &data, 9).wait().0,
        70 * MIB as i32
    );
    let (r, back) = read_async(&c, 5 * MIB as u64, 70 * MIB, 4).wait();
    assert_eq!(r, 70 * MIB as i32);
    assert!(back == data);
    assert!(fs::read(&file).unwrap()[5 * MIB..75 * MIB] == data[..]);
}

#[test]
fn flush_trim_and_write_zeroes_with_and_without_unmap() {
    let dir = TempDir::new("zeroes");
    let file = dir.join("disk.raw");
    let mut expect = patterned_file(&file, 4 * MIB, 4);
    let spec = unix_spec(&dir.join("nbd.sock"), "disk");
    let _server = qemu_nbd(&spec, &file, &["--discard=unmap", "--cache=writeback"]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let s = store(&c);
    s.zeroes(0, 1 << 20, ZeroOp::WriteZeroes { unmap: false })
        .unwrap();
    s.zeroes(2 << 20, 1 << 20, ZeroOp::WriteZeroes { unmap: true })
        .unwrap();
    expect[..MIB].fill(0);
    expect[2 * MIB..3 * MIB].fill(0);
    s.flush().unwrap();
    assert!(fs::read(&file).unwrap() == expect);
    // A discard leaves the range unspecified: it only has to succeed, and leave the rest.
    s.zeroes(MIB as u64, 64 << 10, ZeroOp::Discard).unwrap();
    s.flush().unwrap();
    let after = fs::read(&file).unwrap();
    assert!(
        after[..MIB] == expect[..MIB] && after[MIB + (64 << 10)..] == expect[MIB + (64 << 10)..]
    );
}

#[test]
fn a_read_only_export_refuses_writes_without_sending_them() {
    let dir = TempDir::new("ro");
    let file = dir.join("disk.raw");
    let data = patterned_file(&file, MIB, 5);
    let spec = unix_spec(&dir.join("nbd.sock"), "disk");
    let _server = qemu_nbd(&spec, &file, &["--read-only"]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    assert!(c.read_only());
    let s = store(&c);
    let erofs = Some(libc::EROFS);
    assert_eq!(
        s.write_at(&[1u8; 512], 0).unwrap_err().raw_os_error(),
        erofs
    );
    for op in [ZeroOp::Discard, ZeroOp::WriteZeroes { unmap: false }] {
        assert_eq!(s.zeroes(0, 512, op).unwrap_err().raw_os_error(), erofs);
    }
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 4096).unwrap();
    assert!(buf[..] == data[4096..8192]);
    s.flush().unwrap();
    // Opened read-only on a writable export: the same.
    let spec2 = unix_spec(&dir.join("rw.sock"), "disk");
    let _rw = qemu_nbd(&spec2, &file, &[]);
    let c2 = NbdClient::connect(&spec2, true, None).unwrap();
    assert_eq!(
        store(&c2)
            .write_at(&[1u8; 512], 0)
            .unwrap_err()
            .raw_os_error(),
        erofs
    );
    assert_eq!(fs::read(&file).unwrap(), data);
}

#[test]
fn requests_past_the_end_are_refused_and_the_export_cannot_grow() {
    let dir = TempDir::new("end");
    let file = dir.join("disk.raw");
    patterned_file(&file, MIB, 6);
    let spec = unix_spec(&dir.join("nbd.sock"), "disk");
    let _server = qemu_nbd(&spec, &file, &[]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let s = store(&c);
    let mut buf = vec![0u8; 1024];
    let einval = Some(libc::EINVAL);
    assert_eq!(
        s.read_at(&mut buf, MIB as u64 - 512)
            .unwrap_err()
            .raw_os_error(),
        einval
    );
    assert_eq!(
        s.read_at(&mut buf, u64::MAX - 100)
            .unwrap_err()
            .raw_os_error(),
        einval
    );
    let enospc = Some(libc::ENOSPC);
    assert_eq!(
        s.write_at(&buf, MIB as u64).unwrap_err().raw_os_error(),
        enospc
    );
    let wz = ZeroOp::WriteZeroes { unmap: true };
    assert_eq!(
        s.zeroes(MIB as u64 - 512, 1024, wz)
            .unwrap_err()
            .raw_os_error(),
        enospc
    );
    assert_eq!(
        s.zeroes(MIB as u64, 512, ZeroOp::Discard)
            .unwrap_err()
            .raw_os_error(),
        einval
    );
    // The connection is untouched by all that.
    s.read_at(&mut buf, MIB as u64 - 1024).unwrap();
    c.grow_to(MIB as u64).unwrap();
    let err = c.grow_to(2 * MIB as u64).unwrap_err().to_string();
    assert!(
        err.contains("NBD exports cannot grow") && err.contains("socket="),
        "{err}"
    );
}

#[test]
fn nbdkit_without_structured_replies() {
    let dir = TempDir::new("nosr");
    let spec = unix_spec(&dir.join("nbd.sock"), "mem");
    let _server = nbdkit(&spec, &["--no-sr", "memory", "8M"]);
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let data = pattern(0, 3 * MIB, 11);
    let writes: Vec<_> = (0..3)
        .map(|i| write_async(&c, (i * MIB) as u64, &data[i * MIB..(i + 1) * MIB], 3 + i))
        .collect();
    for w in writes {
        assert_eq!(w.wait().0, MIB as i32);
    }
    let reads: Vec<_> = (0..6)
        .map(|i| read_async(&c, (i * MIB / 2) as u64, MIB / 2, 2 + i))
        .collect();
    for (i, r) in reads.into_iter().enumerate() {
        let (res, got) = r.wait();
        assert_eq!(res, (MIB / 2) as i32);
        assert!(got[..] == data[i * MIB / 2..(i + 1) * MIB / 2]);
    }
}

#[test]
fn nbdkit_without_write_zeroes_gets_written_zeroes() {
    let dir = TempDir::new("nozero");
    let file = dir.join("disk.raw");
    let mut expect = patterned_file(&file, 4 * MIB, 12);
    let log = dir.join("requests.log");
    let logarg = format!("logfile={}", log.display());
    let spec = unix_spec(&dir.join("nbd.sock"), "f");
    let fname = format!("file={}", file.display());
    let _server = nbdkit(
        &spec,
        &["--filter=log", "--filter=nozero", "file", &fname, &logarg],
    );
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let s = store(&c);
    s.zeroes(512, 3 * MIB as u64, ZeroOp::WriteZeroes { unmap: false })
        .unwrap();
    s.flush().unwrap();
    expect[512..512 + 3 * MIB].fill(0);
    assert!(fs::read(&file).unwrap() == expect);
    let log = fs::read_to_string(&log).unwrap();
    assert!(log.contains(" Write ") && !log.contains(" Zero "), "{log}");
}

#[test]
fn a_small_maximum_payload_forces_splits_of_transfers_and_written_zeroes() {
    let dir = TempDir::new("blocksize");
    let spec = unix_spec(&dir.join("nbd.sock"), "mem");
    let log = dir.join("requests.log");
    let logarg = format!("logfile={}", log.display());
    // Requests over 64 KiB would fail with EINVAL (blocksize-error-policy=error), and the
    // log shows what was sent.
    let _server = nbdkit(
        &spec,
        &[
            "--filter=log",
            "--filter=nozero",
            "--filter=blocksize-policy",
            "memory",
            "4M",
            &logarg,
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=64K",
            "blocksize-error-policy=error",
        ],
    );
    let c = NbdClient::connect(&spec, false, None).unwrap();
    assert_eq!(c.block_sizes(), (512, 4096, 64 << 10));
    let data = pattern(0, MIB + 4096, 13);
    assert_eq!(write_async(&c, 4096, &data, 5).wait().0, data.len() as i32);
    let (r, back) = read_async(&c, 4096, data.len(), 3).wait();
    assert_eq!(r, data.len() as i32);
    assert!(back == data);
    // Without write-zeroes (the nozero filter), zeroes are written a payload at a time.
    store(&c)
        .zeroes(0, 2 * MIB as u64, ZeroOp::WriteZeroes { unmap: true })
        .unwrap();
    let (_, zeroes) = read_async(&c, 0, 2 * MIB, 2).wait();
    assert!(zeroes.iter().all(|&b| b == 0));
    // Not a multiple of the minimum block: refused before sending.
    let mut small = vec![0u8; 100];
    let e = store(&c).read_at(&mut small, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    drop(c);
    let log = fs::read_to_string(&log).unwrap();
    let mut transfers = 0;
    for line in log
        .lines()
        .filter(|l| l.contains(" Write id=") || l.contains(" Read id="))
    {
        let count = line
            .split(" count=0x")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        assert!(u64::from_str_radix(count, 16).unwrap() <= 65536, "{line}");
        transfers += 1;
    }
    // 1 MiB + 4 KiB each way, then 2 MiB of zeroes written and read, in 64 KiB pieces.
    assert_eq!(transfers, 2 * 17 + 2 * 32, "{log}");
}

#[test]
fn injected_read_errors_fail_the_request_and_the_client_stays_usable() {
    let dir = TempDir::new("error");
    let trigger = dir.join("fail-reads");
    let trig = format!("error-pread-file={}", trigger.display());
    let spec = unix_spec(&dir.join("nbd.sock"), "mem");
    let _server = nbdkit(
        &spec,
        &[
            "--filter=error",
            "memory",
            "4M",
            "error-pread-rate=100%",
            &trig,
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
            &format!("error-pwrite-file={}", dir.join("fail-writes").display()),
        ],
    );
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let s = store(&c);
    s.write_at(&[8u8; 8192], 0).unwrap();
    fs::write(&trigger, b"").unwrap();
    let mut buf = vec![0u8; 8192];
    assert_eq!(
        s.read_at(&mut buf, 0).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    fs::remove_file(&trigger).unwrap();
    s.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![8u8; 8192]);
    fs::write(dir.join("fail-writes"), b"").unwrap();
    assert_eq!(
        s.write_at(&buf, 0).unwrap_err().raw_os_error(),
        Some(libc::ENOSPC)
    );
    fs::remove_file(dir.join("fail-writes")).unwrap();
    s.write_at(&buf, 8192).unwrap();
}

#[test]
fn delayed_replies_with_many_requests_in_flight() {
    let dir = TempDir::new("delay");
    let spec = unix_spec(&dir.join("nbd.sock"), "mem");
    let _server = nbdkit(
        &spec,
        &[
            "--filter=delay",
            "memory",
            "4M",
            "delay-read=300ms",
            "delay-write=200ms",
        ],
    );
    let c = NbdClient::connect(&spec, false, None).unwrap();
    let writes: Vec<_> = (0..32)
        .map(|i| write_async(&c, i * 65536, &pattern(i as usize * 65536, 65536, 14), 2))
        .collect();
    for w in writes {
        assert_eq!(w.wait().0, 65536);
    }
    let reads: Vec<_> = (0..32)
        .map(|i| read_async(&c, i * 65536, 65536, 3))
        .collect();
    for (i, r) in reads.into_iter().enumerate() {
        let (res, data) = r.wait();
        assert_eq!(res, 65536);
        assert!(data == pattern(i * 65536, 65536, 14), "read {i}");
    }
}

#[test]
fn connection_errors_name_the_server_and_the_export() {
    let dir = TempDir::new("errors");
    let sock = dir.join("nobody.sock");
    let err = NbdClient::connect(&unix_spec(&sock, "x"), false, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "nbd+unix:///x?socket={}: cannot connect",
            sock.display()
        )),
        "{err}"
    );
    let file = dir.join("disk.raw");
    patterned_file(&file, MIB, 0);
    let spec = unix_spec(&dir.join("nbd.sock"), "disk");
    let _server = qemu_nbd(&spec, &file, &[]);
    let err = NbdClient::connect(&unix_spec(&dir.join("nbd.sock"), "other"), false, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no export 'other'"), "{err}");
}
