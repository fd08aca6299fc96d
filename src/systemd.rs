//! systemd integration, without linking libsystemd: readiness notification (`sd_notify`'s
//! protocol: a datagram to `$NOTIFY_SOCKET`) and socket activation (`sd_listen_fds`'s
//! protocol: listening sockets from descriptor 3 on, counted by `$LISTEN_FDS`, for the process
//! `$LISTEN_PID`).
//!
//! Activated sockets are matched to vubd's options by their path: a socket unit's
//! `ListenStream=` is the path given to `--socket` or `--control`. vubd then listens on the
//! descriptor it was handed instead of creating the socket, and leaves the file alone at exit
//! (it is systemd's).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The first descriptor systemd passes.
const LISTEN_FDS_START: RawFd = 3;

/// Tell the service manager `state` (`READY=1`, `STOPPING=1`, `STATUS=...`), if one asked to
/// be told. Errors are logged, never fatal: a daemon runs the same without a manager.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            // An abstract socket.
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(PathBuf::from(&path))?,
        };
        socket.send_to_addr(state.as_bytes(), &addr).map(|_| ())
    })();
    if let Err(e) = result {
        log::warn!("notifying systemd ({state}): {e}");
    }
}

/// Listening UNIX sockets handed over by socket activation, by path; taken once.
static ACTIVATED: Mutex<Option<BTreeMap<PathBuf, UnixListener>>> = Mutex::new(None);

/// Take the sockets systemd passed to this process (if it passed any to this process). Call
/// once, early, before any thread exists: it reads and clears the environment.
pub fn take_activated_sockets() {
    let mut sockets = BTreeMap::new();
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<RawFd>().ok())
        .unwrap_or(0);
    // Not inherited by anything vubd starts.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: called before any thread exists (see above), so nothing reads the
        // environment concurrently.
        unsafe { std::env::remove_var(var) };
    }
    if for_us {
        for fd in LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count.clamp(0, 1024)) {
            match adopt(fd) {
                Ok(Some((path, listener))) => {
                    sockets.insert(path, listener);
                }
                Ok(None) => log::warn!(
                    "socket activation: descriptor {fd} is not a UNIX socket with a path; ignored"
                ),
                Err(e) => log::warn!("socket activation: descriptor {fd}: {e}"),
            }
        }
    }
    *ACTIVATED.lock().unwrap_or_else(|p| p.into_inner()) = Some(sockets);
}

/// Descriptor `fd` as a listening UNIX socket and its path, marked close-on-exec.
fn adopt(fd: RawFd) -> io::Result<Option<(PathBuf, UnixListener)>> {
    // SAFETY: F_SETFD on a descriptor systemd passed to this process for it to own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was passed to this process to own (LISTEN_PID is ours), and is
    // adopted once: `take_activated_sockets` runs once and visits each descriptor once.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    let Ok(addr) = listener.local_addr() else {
        return Ok(None);
    };
    Ok(addr
        .as_pathname()
        .map(|path| (path.to_path_buf(), listener)))
}

/// The key under which the activated socket for `path` is kept, if systemd passed one.
fn activated_key(sockets: &BTreeMap<PathBuf, UnixListener>, path: &Path) -> Option<PathBuf> {
    if sockets.contains_key(path) {
        return Some(path.to_path_buf());
    }
    // The same file under another spelling (relative, through a symbolic link).
    let wanted = std::fs::canonicalize(path).ok()?;
    sockets
        .keys()
        .find(|k| std::fs::canonicalize(k).ok().as_ref() == Some(&wanted))
        .cloned()
}

/// Whether systemd passed a socket listening at `path`.
pub fn is_activated(path: &Path) -> bool {
    let activated = ACTIVATED.lock().unwrap_or_else(|p| p.into_inner());
    activated
        .as_ref()
        .is_some_and(|sockets| activated_key(sockets, path).is_some())
}

/// The activated socket listening at `path`, if systemd passed one; taken once.
pub fn activated_socket(path: &Path) -> Option<UnixListener> {
    let mut activated = ACTIVATED.lock().unwrap_or_else(|p| p.into_inner());
    let sockets = activated.as_mut()?;
    let key = activated_key(sockets, path)?;
    sockets.remove(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_a_datagram_socket_and_ignores_a_missing_manager() {
        let dir = std::env::temp_dir().join(format!("vubd-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let manager = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only user of NOTIFY_SOCKET in the test process.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify("READY=1");
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        notify("STOPPING=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
