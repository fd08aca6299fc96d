//! Real NBD servers for the NBD client's tests (tests/nbd_client*.rs): qemu-nbd and nbdkit
//! as child processes killed when their guard drops (a failing test leaves none behind), the
//! specs that reach them, and asynchronous requests with a safety net against hangs.

#![allow(dead_code)]

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vubd::block::remote::location::{NbdServer, NbdSpec};
use vubd::block::remote::nbd::NbdClient;
use vubd::block::remote::{Completion, RemoteOp, RemoteStore, Waiter};

/// How long anything may take before a test calls it a hang (a safety net, not a measure).
pub const HANG: Duration = Duration::from_secs(60);

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vubd-nbdc-{}-{name}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A server process, SIGKILLed and reaped on drop.
pub struct Server {
    child: Option<Child>,
    what: String,
}

impl Server {
    /// Start `cmd` and wait until `server` accepts connections.
    pub fn start(mut cmd: Command, server: &NbdServer) -> Server {
        let what = format!("{cmd:?}");
        if let NbdServer::Unix(path) = server {
            let _ = fs::remove_file(path);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut s = Server {
            child: Some(child),
            what,
        };
        s.wait_ready(server);
        s
    }

    fn wait_ready(&mut self, server: &NbdServer) {
        let deadline = Instant::now() + HANG;
        loop {
            let up = match server {
                NbdServer::Unix(p) => UnixStream::connect(p).is_ok(),
                NbdServer::Inet { host, port } => {
                    std::net::TcpStream::connect((host.as_str(), *port)).is_ok()
                }
            };
            if up {
                return;
            }
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("{} exited ({status}) before serving: {err}", self.what);
            }
            assert!(Instant::now() < deadline, "{} never served", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child, which is not reaped yet (so the pid is its).
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    /// Freeze the server: requests sent now stay in flight.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Kill the server (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn unix_spec(socket: &Path, export: &str) -> NbdSpec {
    NbdSpec {
        server: NbdServer::Unix(socket.to_path_buf()),
        export: export.into(),
        tls_creds: None,
        tls_hostname: None,
        reconnect_delay: Duration::ZERO,
        open_timeout: Duration::ZERO,
    }
}

pub fn tcp_spec(port: u16, export: &str) -> NbdSpec {
    NbdSpec {
        server: NbdServer::Inet {
            host: "127.0.0.1".into(),
            port,
        },
        ..unix_spec(Path::new("/"), export)
    }
}

/// A TCP port nothing listens on now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `qemu-nbd` serving `file` (raw) as export `export` on `spec`'s socket, persistent (it keeps
/// serving after a client leaves), with `extra` arguments.
pub fn qemu_nbd(spec: &NbdSpec, file: &Path, extra: &[&str]) -> Server {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "--persistent", "-x", &spec.export]);
    match &spec.server {
        NbdServer::Unix(p) => {
            cmd.arg("-k").arg(p);
        }
        NbdServer::Inet { host, port } => {
            cmd.args(["-b", host, "-p", &port.to_string()]);
        }
    }
    cmd.args(extra).arg(file);
    Server::start(cmd, &spec.server)
}

/// `nbdkit` in the foreground on `spec`'s UNIX socket with `args` (filters, plugin, its
/// parameters); it dies with the test process as well.
pub fn nbdkit(spec: &NbdSpec, args: &[&str]) -> Server {
    let NbdServer::Unix(path) = &spec.server else {
        panic!("nbdkit tests use unix sockets");
    };
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent", "-e", &spec.export, "-U"])
        .arg(path)
        .args(args);
    Server::start(cmd, &spec.server)
}

/// A file of `len` bytes of `pattern(offset)`.
pub fn patterned_file(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let data = pattern(0, len, seed);
    fs::write(path, &data).unwrap();
    data
}

/// Deterministic bytes for `[offset, offset + len)`, different per seed.
pub fn pattern(offset: usize, len: usize, seed: u8) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 11) as u8 ^ seed)
        .collect()
}

pub fn store(c: &NbdClient) -> &(dyn RemoteStore + 'static) {
    c
}

/// An asynchronous request and its buffers (kept alive and in place until it completes).
pub struct Pending {
    bufs: Vec<Vec<u8>>,
    _iov: Vec<libc::iovec>,
    waiter: Waiter,
}

impl Pending {
    /// The request's result and its buffers joined, failing the test if it never completes.
    pub fn wait(self) -> (i32, Vec<u8>) {
        let (tx, rx) = mpsc::channel();
        let waiter = self.waiter;
        std::thread::spawn(move || {
            let _ = tx.send(waiter.wait());
        });
        let result = rx.recv_timeout(HANG).expect("a request never completed");
        (result, self.bufs.concat())
    }
}

fn submit(c: &NbdClient, mut bufs: Vec<Vec<u8>>, offset: u64, write: bool) -> Pending {
    let iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let (done, waiter) = Completion::oneshot();
    let (ptr, iovcnt) = (iov.as_ptr(), iov.len() as u32);
    let op = if write {
        RemoteOp::Writev {
            offset,
            iov: ptr,
            iovcnt,
        }
    } else {
        RemoteOp::Readv {
            offset,
            iov: ptr,
            iovcnt,
        }
    };
    // SAFETY: the buffers and iovecs move into the returned Pending (heap data stays put),
    // which is only taken apart after the completion in `wait`.
    unsafe { c.submit(op, done) };
    Pending {
        bufs,
        _iov: iov,
        waiter,
    }
}

/// Cut `data` into `pieces` buffers of uneven sizes (as a guest's scattered pages are).
fn scatter(data: &[u8], pieces: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = data;
    for i in 0..pieces {
        let n = if i + 1 == pieces {
            rest.len()
        } else {
            (rest.len() / (pieces - i)) / 512 * 512 + if i % 2 == 0 { 512 } else { 0 }
        }
        .min(rest.len());
        out.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    out
}

/// Start writing `data` at `offset`, from `pieces` buffers.
pub fn write_async(c: &NbdClient, offset: u64, data: &[u8], pieces: usize) -> Pending {
    submit(c, scatter(data, pieces), offset, true)
}

/// Start reading `len` bytes at `offset` into `pieces` buffers.
pub fn read_async(c: &NbdClient, offset: u64, len: usize, pieces: usize) -> Pending {
    submit(c, scatter(&vec![0xa5; len], pieces), offset, false)
}
