//! Test support: running the real `vubd` binary, and two independent vhost-user-blk frontends
//! to drive it — libblkio (`blkio` crate) for ordinary I/O, and a raw split-ring frontend that
//! can send any descriptor chain, well-formed or not.
//!
//! Each test file is its own crate and uses a subset, hence `dead_code` is allowed. A helper
//! two test files need lives here, once:
//!
//! * this module: scratch directories, test data, `vubd serve` as [`Vubd`];
//! * [`cli`]: other `vubd` subcommands and how they exit;
//! * [`data`]: comparing disk contents, SHA-256 digests;
//! * [`image`]: patching fields of qemu-img-made images, running vubd under a memory limit;
//! * [`blkio_client`], [`raw_frontend`]: the two frontends;
//! * [`hostile`], [`vhost_msg`]: the hostile-frontend harness (a served image and its model,
//!   guest memory snapshots, deadlines) and raw vhost-user messages;
//! * [`qemu`], [`qsd`], [`qmp`]: QEMU's tools, qemu-storage-daemon, and QMP as oracles;
//! * [`bitmaps`]: dirty bitmap workloads and reading stored bitmaps back;
//! * [`crash`]: a graph under fault injection, driven in-process, and a model of its bitmaps;
//! * [`load`]: a random load stamped on a logical clock, for kill tests.

#![allow(dead_code)]

pub mod bitmaps;
pub mod blkio_client;
pub mod ceph;
pub mod cli;
pub mod crash;
pub mod data;
pub mod hostile;
pub mod image;
pub mod load;
pub mod qemu;
pub mod qmp;
pub mod qsd;
pub mod raw_frontend;
pub mod tls;
pub mod vhost_msg;

use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A scratch directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        Self::new_in(&std::env::temp_dir(), name)
    }

    /// A scratch directory under `base` (e.g. /dev/shm, to test memory-backed files).
    pub fn new_in(base: &Path, name: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("vubd-test-{}-{name}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Create `path` of `len` bytes filled with `pattern(len, seed)`.
pub fn create_image(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = pattern(len, seed);
    fs::write(path, &data).expect("write image");
    data
}

/// The layout vubd is built for: `disk.raw` in `dir` (`len` bytes of `pattern(len, seed)`) with
/// qcow2 metadata `meta.qcow2` beside it, made by `vubd create`. Returns the disk's content.
pub fn raw_with_metadata(dir: &TempDir, len: usize, seed: u64) -> Vec<u8> {
    let disk = dir.join("disk.raw");
    let data = create_image(&disk, len, seed);
    cli::vubd_ok(&[
        "create",
        dir.join("meta.qcow2").to_str().expect("utf-8 path"),
        "--data-file",
        disk.to_str().expect("utf-8 path"),
    ]);
    data
}

pub fn vubd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vubd")
}

/// A running `vubd serve`.
pub struct Vubd {
    child: Option<Child>,
    pub socket: PathBuf,
}

impl Vubd {
    /// Start `vubd serve --socket SOCKET ARGS...` and wait until it accepts connections.
    pub fn start(socket: &Path, args: &[&str]) -> Vubd {
        Self::start_wrapped(&[], socket, args)
    }

    /// [`Vubd::start`] through a wrapper command (`prlimit --as=...`, say) that execs vubd.
    pub fn start_wrapped(wrapper: &[&str], socket: &Path, args: &[&str]) -> Vubd {
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(vubd_bin());
                c
            }
            None => Command::new(vubd_bin()),
        };
        let child = command
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vubd");
        let mut vubd = Vubd {
            child: Some(child),
            socket: socket.to_path_buf(),
        };
        vubd.wait_listening();
        vubd
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(&self.socket).is_ok() {
                // That probe connection counts as a frontend that left at once; give vubd a
                // moment to go back to accepting.
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("vubd exited early with {status}: {}", self.take_stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("vubd did not start listening on {}", self.socket.display());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Send `signal` and wait for the process to exit; returns its status and stderr.
    pub fn stop_with(&mut self, signal: i32) -> (ExitStatus, String) {
        let child = self.child.take().expect("vubd already stopped");
        signal_and_wait(child, signal, "vubd")
    }

    /// SIGTERM, and check that vubd exits 0 and removes its socket.
    pub fn stop(&mut self) -> String {
        let (status, stderr) = self.stop_with(libc::SIGTERM);
        assert!(status.success(), "vubd exited with {status}: {stderr}");
        assert!(!self.socket.exists(), "vubd left its socket behind");
        stderr
    }

    /// Whether the process is still running (not exited, not reaped).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// What vubd wrote to stderr, once it has exited.
    pub fn take_stderr(&mut self) -> String {
        self.child.as_mut().map(read_stderr).unwrap_or_default()
    }
}

impl Drop for Vubd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Send `signal` to `child` and wait up to 30 s for it to exit; returns its status and what it
/// wrote to its piped stderr. `name` says who did not exit, if it does not.
fn signal_and_wait(mut child: Child, signal: i32, name: &str) -> (ExitStatus, String) {
    // SAFETY: kill(2) on a child we own and have not reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child
            .try_wait()
            .unwrap_or_else(|e| panic!("wait {name}: {e}"))
        {
            return (status, read_stderr(&mut child));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} did not exit after signal {signal}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What `child` wrote to its piped stderr: all of it once the child has exited, and taken, so
/// a second call returns nothing.
fn read_stderr(child: &mut Child) -> String {
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    err
}

/// Wait until no process holds a lock on `file` (an image a killed vubd served); returns how
/// long that took. SIGKILL does not always release the lock with the process: an OFD lock goes
/// with the last reference to the open file, and io_uring requests in flight hold one until
/// the kernel's deferred ring teardown has cancelled them (measured: up to 5 ms after the
/// process was reaped, on a loaded 2-core machine). A vubd started meanwhile refuses the image
/// as "in use by another process"; a supervisor's restart delay covers it, and this stands for
/// that delay.
pub fn wait_unlocked(file: &fs::File) -> Duration {
    use std::os::fd::AsRawFd;
    let started = Instant::now();
    loop {
        // SAFETY: `flock` is plain data, for which all zeroes is a valid value.
        let mut probe: libc::flock = unsafe { std::mem::zeroed() };
        // A write lock over the whole file (l_len 0) conflicts with any lock held on it.
        probe.l_type = libc::F_WRLCK as i16;
        probe.l_whence = libc::SEEK_SET as i16;
        // SAFETY: fcntl(F_OFD_GETLK) on an open descriptor, with a valid `flock` to fill.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
        assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
        if probe.l_type == libc::F_UNLCK as i16 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a lock on the image outlived the killed vubd by 10 s"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}
