//! The NBD server (src/nbd/) against real clients: nbdinfo, nbdcopy, qemu-img and qemu-io
//! read an in-memory export with known data, holes and a dirty bitmap, over UNIX sockets,
//! TCP and TLS; plus the limits (connections, oversized options and requests) and export
//! removal, with a hand-written client where a real one cannot be made to misbehave.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde_json::Value;
use vubd::nbd::wire::*;

#[path = "common/tls.rs"]
mod tls;
use vubd::nbd::{ExportSource, ListenAddr, NbdError, NbdServer, ServerOptions, TlsCreds};

// ---------------------------------------------------------------------------------------------
// An in-memory export: data, allocation map, one dirty bitmap.

const SIZE: u64 = 4 << 20;

/// (start, length, base:allocation flags) — covers the disk; holes read as zeroes.
const ALLOCATION: &[(u64, u64, u32)] = &[
    (0, 65536, 0),
    (65536, 983040, STATE_HOLE | STATE_ZERO),
    (1 << 20, 4096, 0),
    ((1 << 20) + 4096, 4096, STATE_ZERO),
    ((1 << 20) + 8192, (3 << 20) - 8192, STATE_HOLE | STATE_ZERO),
];
/// Dirty ranges of bitmap "b1" (start, length).
const DIRTY: &[(u64, u64)] = &[(0, 4096), (2 << 20, 65536), ((4 << 20) - 512, 512)];

struct MemSource {
    data: Vec<u8>,
}

fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8 | 1
}

impl MemSource {
    fn new() -> MemSource {
        let mut data = vec![0u8; SIZE as usize];
        for &(start, len, flags) in ALLOCATION {
            if flags & STATE_ZERO == 0 {
                for o in start..start + len {
                    data[o as usize] = pattern(o);
                }
            }
        }
        MemSource { data }
    }
}

/// Append the pieces of `map` (start, length, flags) overlapping [offset, offset+len).
fn slice_map(map: &[(u64, u64, u32)], offset: u64, len: u64, out: &mut Vec<(u64, u32)>) {
    let end = offset + len;
    for &(s, l, f) in map {
        let (a, b) = (s.max(offset), (s + l).min(end));
        if a < b {
            out.push((b - a, f));
        }
    }
}

fn dirty_map() -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    let mut pos = 0;
    for &(s, l) in DIRTY {
        if s > pos {
            map.push((pos, s - pos, 0));
        }
        map.push((s, l, 1));
        pos = s + l;
    }
    if pos < SIZE {
        map.push((pos, SIZE - pos, 0));
    }
    map
}

impl ExportSource for MemSource {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn allocation(&self, offset: u64, len: u64, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        slice_map(ALLOCATION, offset, len, out);
        Ok(())
    }
    fn bitmaps(&self) -> Vec<String> {
        vec!["b1".into()]
    }
    fn dirty(
        &self,
        index: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<(u64, u32)>,
    ) -> io::Result<()> {
        assert_eq!(index, 0);
        slice_map(&dirty_map(), offset, len, out);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vubd-nbd-{}-{name}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    out
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A server on a UNIX socket in `dir` with export "disk" (and "" for the empty-name test).
fn unix_server(dir: &TempDir, options: ServerOptions) -> (NbdServer, PathBuf, Arc<MemSource>) {
    let sock = dir.join("nbd.sock");
    let server = NbdServer::start(ListenAddr::Unix(sock.clone()), options).unwrap();
    let source = Arc::new(MemSource::new());
    server
        .add_export("disk", Some("test disk".into()), source.clone())
        .unwrap();
    (server, sock, source)
}

fn uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Merge a map of (offset, length, type) into maximal runs, for comparison.
fn merged(runs: impl IntoIterator<Item = (u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (o, l, t) in runs {
        match out.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}

fn map_json(text: &str) -> Vec<(u64, u64, u64)> {
    let v: Value = serde_json::from_str(text).unwrap();
    merged(v.as_array().unwrap().iter().map(|e| {
        (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        )
    }))
}

// ---------------------------------------------------------------------------------------------
// Real clients.

#[test]
fn nbdinfo_reports_the_export() {
    let dir = TempDir::new("info");
    let (server, sock, _) = unix_server(&dir, ServerOptions::default());
    let out = run_ok(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(uri(&sock, "disk")),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["description"], "test disk");
    assert_eq!(e["export-size"], SIZE);
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_cache"], true);
    assert_eq!(e["can_flush"], false);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(contexts, ["base:allocation", "qemu:dirty-bitmap:b1"]);

    // --list: every export, with its description.
    server
        .add_export("second", None, Arc::new(MemSource::new()))
        .unwrap();
    let out = run_ok(
        Command::new("nbdinfo")
            .args(["--list", "--json"])
            .arg(format!("nbd+unix://?socket={}", sock.display())),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["disk", "second"]);
    assert_eq!(server.exports(), ["disk", "second"]);

    // An unknown export is refused.
    let out = run(Command::new("nbdinfo").arg(uri(&sock, "nope")));
    assert!(!out.status.success());
    server.stop();
    assert!(!sock.exists(), "the socket is removed on stop");
}

#[test]
fn nbdinfo_map_matches_the_source() {
    let dir = TempDir::new("map");
    let (_server, sock, _) = unix_server(&dir, ServerOptions::default());
    let out = run_ok(
        Command::new("nbdinfo")
            .args(["--map", "--json"])
            .arg(uri(&sock, "disk")),
    );
    let expect = merged(ALLOCATION.iter().map(|&(s, l, f)| (s, l, u64::from(f))));
    assert_eq!(map_json(&out), expect);

    let out = run_ok(
        Command::new("nbdinfo")
            .args(["--map=qemu:dirty-bitmap:b1", "--json"])
            .arg(uri(&sock, "disk")),
    );
    let expect = merged(
        dirty_map()
            .into_iter()
            .map(|(s, l, f)| (s, l, u64::from(f))),
    );
    assert_eq!(map_json(&out), expect);
}

#[test]
fn nbdcopy_qemu_img_and_qemu_io_read_the_same_bytes() {
    let dir = TempDir::new("copy");
    let (_server, sock, source) = unix_server(&dir, ServerOptions::default());
    let reference = dir.join("reference.raw");
    fs::write(&reference, &source.data).unwrap();
    let u = uri(&sock, "disk");

    {
        let out = dir.join("nbdcopy.raw");
        run_ok(Command::new("nbdcopy").arg(&u).arg(&out));
        assert!(
            fs::read(&out).unwrap() == source.data,
            "nbdcopy copy differs"
        );
    }
    {
        let out = dir.join("convert.raw");
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(&u)
                .arg(&out),
        );
        assert!(
            fs::read(&out).unwrap() == source.data,
            "qemu-img convert differs"
        );
        run_ok(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(&u)
                .arg(&reference),
        );
    }
    {
        // A data byte, a zero run in a hole, and a read across the end of the data.
        let p = pattern(4096);
        let out = run_ok(
            Command::new("qemu-io")
                .args(["-r", "-f", "raw"])
                .args([
                    "-c",
                    &format!("read -P {p} 4096 1"),
                    "-c",
                    "read -P 0 65536 65536",
                    "-c",
                    "read -v 1052670 4",
                ])
                .arg(&u),
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
        let want = format!(
            "{:02x} {:02x} 00 00",
            pattern((1 << 20) + 4094),
            pattern((1 << 20) + 4095)
        );
        assert!(out.contains(&want), "{out}\nexpected {want}");
    }
}

#[test]
fn tcp_with_a_port_chosen_by_the_kernel() {
    let server = NbdServer::start(
        ListenAddr::Tcp("127.0.0.1".into(), "0".into()),
        ServerOptions::default(),
    )
    .unwrap();
    server
        .add_export("disk", None, Arc::new(MemSource::new()))
        .unwrap();
    let addr = server.local_addr().unwrap();
    assert_ne!(addr.port(), 0);
    let out = run_ok(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("nbd://127.0.0.1:{}/disk", addr.port())),
    );
    assert_eq!(out.trim(), SIZE.to_string());

    // An address in use is a Bind error naming it.
    let err = NbdServer::start(
        ListenAddr::Tcp("127.0.0.1".into(), addr.port().to_string()),
        ServerOptions::default(),
    )
    .err()
    .unwrap();
    assert!(matches!(err, NbdError::Bind { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", addr.port())),
        "{err}"
    );
}

#[test]
fn several_clients_at_once() {
    let dir = TempDir::new("multi");
    let (_server, sock, source) = unix_server(&dir, ServerOptions::default());
    let u = uri(&sock, "disk");
    let mut children = Vec::new();
    for i in 0..4 {
        let out = dir.join(&format!("copy{i}.raw"));
        // --connections=2: each nbdcopy also opens several connections (multi-conn).
        let child = Command::new("nbdcopy")
            .arg("--connections=2")
            .arg(&u)
            .arg(&out)
            .spawn()
            .unwrap();
        children.push((child, out));
    }
    for (mut child, out) in children {
        assert!(child.wait().unwrap().success());
        assert!(fs::read(&out).unwrap() == source.data);
    }
}

// ---------------------------------------------------------------------------------------------
// TLS.

#[test]
fn tls_with_client_certificates() {
    let dir = TempDir::new("tls");
    tls::make_certs(&dir.0);
    let creds = TlsCreds::load_x509(&dir.join("server"), true).unwrap();
    let (_server, sock, _) = unix_server(
        &dir,
        ServerOptions {
            tls: Some(Arc::new(creds)),
            ..ServerOptions::default()
        },
    );
    let tls_uri = |certs: &str| {
        format!(
            "nbds+unix:///disk?socket={}&tls-certificates={}",
            sock.display(),
            dir.join(certs).display()
        )
    };
    // The CA and a client certificate it signed: served, over TLS.
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(tls_uri("client")));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["TLS"], true);
    assert_eq!(v["exports"][0]["export-size"], SIZE);
    {
        let copy = dir.join("copy.raw");
        run_ok(Command::new("nbdcopy").arg(tls_uri("client")).arg(&copy));
        assert!(fs::read(&copy).unwrap() == MemSource::new().data);
    }
    // A client of another CA: refused (it does not trust the server, nor the server it).
    let out = run(Command::new("nbdinfo").arg(tls_uri("other")));
    assert!(!out.status.success());
    // A client without TLS: refused (NBD_REP_ERR_TLS_REQD; checked byte by byte in the
    // protocol tests).
    let out = run(Command::new("nbdinfo").arg(uri(&sock, "disk")));
    assert!(!out.status.success(), "a plain client got in");
    // Byte by byte: before STARTTLS every option but STARTTLS and ABORT is NBD_REP_ERR_TLS_REQD,
    // and NBD_OPT_EXPORT_NAME (which has no error reply) closes the connection.
    let mut c = Raw::connect(&sock);
    assert!(c.hello());
    for opt in [OPT_LIST, OPT_STRUCTURED_REPLY, OPT_INFO, OPT_GO, 99] {
        c.option(opt, &[]);
        assert_eq!(c.reply().0, REP_ERR_TLS_REQD, "option {opt}");
    }
    c.option(OPT_EXPORT_NAME, b"disk");
    assert!(c.closed());
    let mut c = Raw::connect(&sock);
    assert!(c.hello());
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply().0, REP_ACK);
    // STARTTLS is acknowledged; what follows is a TLS handshake (garbage here: closed).
    let mut c = Raw::connect(&sock);
    assert!(c.hello());
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().0, REP_ACK);
    c.send(&[0u8; 64]);
    // The server may send a TLS alert first; then it closes.
    let mut rest = Vec::new();
    let _ = c.0.read_to_end(&mut rest);
    assert!(rest.len() < 64, "{rest:?}");
    // A client trusting the CA but with no certificate of its own.
    let nocert = dir.join("nocert");
    fs::create_dir_all(&nocert).unwrap();
    fs::copy(dir.join("client/ca-cert.pem"), nocert.join("ca-cert.pem")).unwrap();
    let out = run(Command::new("nbdinfo").arg(tls_uri("nocert")));
    assert!(
        !out.status.success(),
        "a client without a certificate got in"
    );
}

#[test]
fn tls_without_peer_verification() {
    let dir = TempDir::new("tls-noverify");
    tls::make_certs(&dir.0);
    // No ca-cert.pem needed on the server side.
    fs::remove_file(dir.join("server/ca-cert.pem")).unwrap();
    let creds = TlsCreds::load_x509(&dir.join("server"), false).unwrap();
    let (_server, sock, _) = unix_server(
        &dir,
        ServerOptions {
            tls: Some(Arc::new(creds)),
            ..ServerOptions::default()
        },
    );
    let nocert = dir.join("nocert");
    fs::create_dir_all(&nocert).unwrap();
    fs::copy(dir.join("client/ca-cert.pem"), nocert.join("ca-cert.pem")).unwrap();
    let out = run_ok(Command::new("nbdinfo").arg("--size").arg(format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        sock.display(),
        nocert.display()
    )));
    assert_eq!(out.trim(), SIZE.to_string());
}

#[test]
fn tls_credential_errors_name_the_file() {
    let dir = TempDir::new("tls-errors");
    let err = TlsCreds::load_x509(&dir.0, true).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, NbdError::Tls { .. }));
    assert!(
        text.contains("server-cert.pem") && text.contains("missing"),
        "{text}"
    );
    tls::make_certs(&dir.0);
    let server = dir.join("server");
    fs::remove_file(server.join("ca-cert.pem")).unwrap();
    let text = TlsCreds::load_x509(&server, true).unwrap_err().to_string();
    assert!(text.contains("ca-cert.pem"), "{text}");
    fs::write(server.join("ca-cert.pem"), "not a certificate").unwrap();
    let text = TlsCreds::load_x509(&server, true).unwrap_err().to_string();
    assert!(
        text.contains("ca-cert.pem") && text.contains("no certificate"),
        "{text}"
    );
    // A key that is not the certificate's.
    fs::copy(
        dir.join("client/client-key.pem"),
        server.join("server-key.pem"),
    )
    .unwrap();
    let text = TlsCreds::load_x509(&server, false).unwrap_err().to_string();
    assert!(text.contains("server-key.pem"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Limits and management, with a hand-written client.

struct Raw(UnixStream);

impl Raw {
    fn connect(sock: &Path) -> Raw {
        Raw(UnixStream::connect(sock).unwrap())
    }
    /// Read the greeting and send the client flags. False if the server closed at once.
    fn hello(&mut self) -> bool {
        let mut g = [0u8; 18];
        if self.0.read_exact(&mut g).is_err() {
            return false;
        }
        assert_eq!(&g[..8], b"NBDMAGIC");
        self.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        true
    }
    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }
    /// One option reply: (reply type, data).
    fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        (u32::from_be_bytes(h[12..16].try_into().unwrap()), data)
    }
    /// NBD_OPT_GO on `name`; panics unless acknowledged.
    fn go(&mut self, name: &str) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        loop {
            match self.reply().0 {
                REP_INFO => continue,
                REP_ACK => return,
                other => panic!("GO refused: {other:#x}"),
            }
        }
    }
    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request {
            magic: REQUEST_MAGIC,
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.send(&r.encode());
    }
    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }
    /// True if the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn connections_beyond_the_limit_are_closed() {
    let dir = TempDir::new("limit");
    let (server, sock, _) = unix_server(
        &dir,
        ServerOptions {
            max_connections: 2,
            ..ServerOptions::default()
        },
    );
    let mut a = Raw::connect(&sock);
    let mut b = Raw::connect(&sock);
    assert!(a.hello() && b.hello());
    let mut c = Raw::connect(&sock);
    assert!(!c.hello(), "a third connection was served");
    // A slot frees when a client leaves.
    a.option(OPT_ABORT, &[]);
    assert_eq!(a.reply().0, REP_ACK);
    assert!(a.closed());
    drop(a);
    // The server removes the slot when the connection thread ends; retry until it has (the
    // outcome is checked, not the time it takes).
    let mut served = false;
    for _ in 0..500 {
        let mut d = Raw::connect(&sock);
        if d.hello() {
            served = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(served);
    b.go("disk");
    assert_eq!(server.connections("disk"), 1);
}

#[test]
fn oversized_options_and_requests_are_refused() {
    let dir = TempDir::new("oversize");
    let (_server, sock, source) = unix_server(&dir, ServerOptions::default());

    // An option claiming 2 GiB: NBD_REP_ERR_TOO_BIG, then the connection is closed without
    // the server reading (or allocating) the payload.
    let mut c = Raw::connect(&sock);
    assert!(c.hello());
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_INFO.to_be_bytes());
    b.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    c.send(&b);
    assert_eq!(c.reply().0, REP_ERR_TOO_BIG);
    assert!(c.closed());

    // A 1 GiB read with simple replies: EINVAL, and the connection goes on.
    let mut c = Raw::connect(&sock);
    assert!(c.hello());
    c.go("disk");
    c.request(CMD_READ, 0, 7, 0, 1 << 30);
    assert_eq!(c.simple(), (EINVAL, 7));
    c.request(CMD_READ, 0, 8, 100, 16);
    assert_eq!(c.simple(), (0, 8));
    let mut data = [0u8; 16];
    c.0.read_exact(&mut data).unwrap();
    assert_eq!(&data[..], &source.data[100..116]);
    // A 1 GiB write: EOVERFLOW, then closed (its payload is not read).
    c.request(CMD_WRITE, 0, 9, 0, 1 << 30);
    assert_eq!(c.simple(), (EOVERFLOW, 9));
    assert!(c.closed());
}

#[test]
fn remove_export_safe_and_hard() {
    let dir = TempDir::new("remove");
    let (server, sock, _) = unix_server(&dir, ServerOptions::default());
    let mut c = Raw::connect(&sock);
    assert!(c.hello());
    c.go("disk");
    assert_eq!(server.connections("disk"), 1);

    let err = server.remove_export("disk", false).unwrap_err();
    assert!(matches!(err, NbdError::InUse(_)));
    assert_eq!(err.to_string(), "export 'disk' still in use");
    assert_eq!(server.exports(), ["disk"]);
    // Still served.
    c.request(CMD_FLUSH, 0, 1, 0, 0);
    assert_eq!(c.simple(), (0, 1));

    server.remove_export("disk", true).unwrap();
    assert!(c.closed(), "hard removal disconnects clients");
    assert_eq!(server.connections("disk"), 0);
    assert!(server.exports().is_empty());
    assert!(matches!(
        server.remove_export("disk", false),
        Err(NbdError::NoSuchExport(_))
    ));

    // Safe removal of an idle export, then a new client cannot find it.
    server
        .add_export("disk", None, Arc::new(MemSource::new()))
        .unwrap();
    assert!(matches!(
        server.add_export("disk", None, Arc::new(MemSource::new())),
        Err(NbdError::ExportExists(_))
    ));
    server.remove_export("disk", false).unwrap();
    let mut c = Raw::connect(&sock);
    assert!(c.hello());
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"disk");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_GO, &d);
    assert_eq!(c.reply().0, REP_ERR_UNKNOWN);
}

#[test]
fn stop_closes_every_connection() {
    let dir = TempDir::new("stop");
    let (server, sock, _) = unix_server(&dir, ServerOptions::default());
    let mut idle = Raw::connect(&sock);
    assert!(idle.hello());
    let mut busy = Raw::connect(&sock);
    assert!(busy.hello());
    busy.go("disk");
    server.stop();
    assert!(idle.closed() && busy.closed());
    assert!(UnixStream::connect(&sock).is_err());
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let dir = TempDir::new("timeout");
    let (_server, sock, _) = unix_server(
        &dir,
        ServerOptions {
            handshake_timeout: std::time::Duration::from_millis(200),
            ..ServerOptions::default()
        },
    );
    let mut c = Raw::connect(&sock);
    assert!(c.hello());
    // Say nothing: the server gives up (the read below blocks until it does).
    assert!(c.closed());
}

#[test]
fn a_client_that_never_reads_is_dropped_after_the_handshake_timeout() {
    let dir = TempDir::new("flood");
    let (_server, sock, _) = unix_server(
        &dir,
        ServerOptions {
            handshake_timeout: std::time::Duration::from_millis(300),
            max_connections: 1,
            ..ServerOptions::default()
        },
    );
    // Options whose replies the client never reads: the server's writes block once the
    // socket buffers are full, and the deadline must still free the slot.
    let mut flood = Raw::connect(&sock);
    assert!(flood.hello());
    let mut writer = flood.0.try_clone().unwrap();
    let pump = std::thread::spawn(move || {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&OPT_LIST.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        for _ in 0..100_000 {
            if writer.write_all(&b).is_err() {
                return;
            }
        }
    });
    let mut served = false;
    for _ in 0..500 {
        let mut c = Raw::connect(&sock);
        if c.hello() {
            served = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(served, "the flooding client kept its slot");
    drop(flood);
    pump.join().unwrap();
}
