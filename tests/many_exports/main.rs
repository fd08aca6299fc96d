//! Many disks in one vubd process: each `--disk` (or qemu-storage-daemon `--export
//! type=vhost-user-blk`) is an export of its own — socket, connections, bitmaps, statistics —
//! and nothing done on one shows on another.
//!
//! * [`several_disks`]: three disks driven at once keep their data, bitmaps and counts apart
//!   (files read directly, QMP, `/metrics`, qemu-nbd + nbdinfo, `qemu-img check`); SIGTERM
//!   with every frontend attached closes every disk cleanly.
//! * [`qsd_syntax`]: one qemu-storage-daemon command line with two vhost-user-blk exports,
//!   run by vubd and by qemu-storage-daemon, serves both disks in both.
//! * [`isolation`]: a hostile frontend on one export (garbage, protocol violations, abrupt
//!   disconnects, both frontend places taken) does not disturb a verified load on another.
//! * [`errors`]: command lines mixing forms or sharing a socket are refused with one line,
//!   leaving no socket behind.

#[path = "../common/mod.rs"]
mod common;
mod errors;
mod isolation;
mod qsd_syntax;
mod several_disks;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::qmp::Qmp;
use common::{cli::vubd_ok, create_image, vubd_bin, TempDir};

pub(crate) const KIB: u64 = 1 << 10;
pub(crate) const MIB: u64 = 1 << 20;
/// Size of every disk.
pub(crate) const DISK: usize = 16 << 20;
/// How long one step (a connection, a load, a daemon's start or exit) may take before the
/// test calls it stuck.
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

/// A running daemon (vubd, or qemu-storage-daemon) started in a scratch directory, whose
/// stderr is collected as it comes (a chatty daemon never blocks on a full pipe). Dropping it
/// kills it.
pub(crate) struct Proc {
    child: Option<Child>,
    stderr: Option<JoinHandle<String>>,
    name: &'static str,
}

impl Proc {
    /// `vubd serve ARGS...` in `dir`, once every path of `sockets` exists.
    pub(crate) fn vubd(dir: &TempDir, args: &[&str], sockets: &[&str]) -> Proc {
        let mut full = vec!["serve"];
        full.extend_from_slice(args);
        Self::spawn("vubd", vubd_bin(), dir, &full, sockets)
    }

    /// `program ARGS...` in `dir` (where relative file names resolve), once every path of
    /// `sockets` (relative to `dir`) exists.
    pub(crate) fn spawn(
        name: &'static str,
        program: &str,
        dir: &TempDir,
        args: &[&str],
        sockets: &[&str],
    ) -> Proc {
        let mut child = Command::new(program)
            .current_dir(dir.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        let mut proc = Proc {
            child: Some(child),
            stderr: Some(stderr),
            name,
        };
        let deadline = Instant::now() + DEADLINE;
        for socket in sockets {
            while !dir.join(socket).exists() {
                if !proc.running() {
                    let (status, err) = proc.stop();
                    panic!("{name} exited early ({status}): {err}");
                }
                assert!(
                    Instant::now() < deadline,
                    "{name}: no {socket} within {DEADLINE:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        proc
    }

    pub(crate) fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGTERM (nothing if it has exited already) and wait for the exit; returns its status
    /// and everything it wrote to stderr.
    pub(crate) fn stop(&mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("already stopped");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit within {DEADLINE:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stderr = self
            .stderr
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default();
        (status, stderr)
    }

    /// SIGTERM: the daemon must exit 0 without a panic. Returns its stderr.
    pub(crate) fn stop_ok(&mut self) -> String {
        let (status, stderr) = self.stop();
        assert!(
            status.success(),
            "{} exited with {status}: {stderr}",
            self.name
        );
        assert!(
            !stderr.contains("panicked"),
            "{} panicked: {stderr}",
            self.name
        );
        stderr
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Run `f` on a thread; fail if it does not finish within [`DEADLINE`] (a daemon that stopped
/// answering leaves libblkio waiting forever: the test's [`Proc`] kills it as it unwinds).
pub(crate) fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: not done within {DEADLINE:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: failed (see above)"),
    }
}

/// The mission graph in `dir`: `data` (a raw file of `pattern(DISK, seed)`) adopted unchanged
/// by qcow2 metadata `meta`, made by `vubd create`. Returns the disk's content.
pub(crate) fn mission(dir: &TempDir, meta: &str, data: &str, seed: u64) -> Vec<u8> {
    let model = create_image(&dir.join(data), DISK, seed);
    let meta = dir.join(meta);
    let data = dir.join(data);
    vubd_ok(&[
        "create",
        meta.to_str().unwrap(),
        "--data-file",
        data.to_str().unwrap(),
    ]);
    model
}

/// Apply `writes` to `model`.
pub(crate) fn apply(model: &mut [u8], writes: &[(u64, Vec<u8>)]) {
    for (offset, data) in writes {
        model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
}

/// The UNIX sockets left in `dir`.
pub(crate) fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_socket())
        .map(|e| e.path())
        .collect()
}

/// The `query-blockstats` entry of node `node`; the reply must have one entry per name of
/// `nodes`, in any order.
pub(crate) fn blockstats(qmp: &mut Qmp, nodes: &[&str], node: &str) -> Value {
    let reply = qmp.ok("query-blockstats", json!({}));
    let mut names: Vec<&str> = reply
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node-name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    let mut want = nodes.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "one query-blockstats entry per disk: {reply}");
    reply
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["node-name"] == node)
        .unwrap()["stats"]
        .clone()
}

/// `query-block-exports` as (id, node-name, type), sorted.
pub(crate) fn exports(qmp: &mut Qmp) -> Vec<(String, String, String)> {
    let reply = qmp.ok("query-block-exports", json!({}));
    let s = |e: &Value, k: &str| {
        e[k].as_str()
            .unwrap_or_else(|| panic!("{k} in {e}"))
            .to_string()
    };
    let mut list: Vec<_> = reply
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (s(e, "id"), s(e, "node-name"), s(e, "type")))
        .collect();
    list.sort();
    list
}

/// One Prometheus sample: name, labels, value.
pub(crate) type Sample = (String, BTreeMap<String, String>, f64);

/// `GET /metrics` on the UNIX socket `socket`, parsed (label values must hold no comma).
pub(crate) fn scrape(socket: &Path) -> Vec<Sample> {
    let mut stream = UnixStream::connect(socket).expect("connect to the metrics socket");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read /metrics");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let labels = labels
                .trim_end_matches('}')
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value.parse().unwrap())
        })
        .collect()
}

/// The samples of `name` whose labels include `labels`.
pub(crate) fn select<'a>(
    samples: &'a [Sample],
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |(n, l, _)| {
        n == name
            && labels
                .iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
    })
}

/// The sum of the samples of `name` whose labels include `labels`.
pub(crate) fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
    select(samples, name, labels).map(|s| s.2 as u64).sum()
}
