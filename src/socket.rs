//! Listening UNIX sockets that refuse to steal a socket a live process serves.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("socket {}: already served by a live process; stop it or choose another {option}", path.display())]
    InUse { path: PathBuf, option: &'static str },
    #[error("socket {}: exists and is not a socket; remove it or choose another {option}", path.display())]
    NotASocket { path: PathBuf, option: &'static str },
    #[error("socket {}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{option} {address}")]
    Listen {
        option: &'static str,
        address: String,
        source: io::Error,
    },
}

/// Check that a socket can be created at `path`: nothing is there, or a stale socket
/// (nobody listening; returns true). A live socket, or a file that is not a socket, is an
/// error naming `option`. Serving checks this before opening (and locking) its images, so a
/// second daemon started by mistake is told about the socket, the thing it got wrong.
pub fn check_free(path: &Path, option: &'static str) -> Result<bool, SocketError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(SocketError::NotASocket {
            path: path.to_path_buf(),
            option,
        }),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(SocketError::InUse {
                path: path.to_path_buf(),
                option,
            }),
            // Nobody listens: a stale socket left by a process that died.
            Err(_) => Ok(true),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SocketError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Create a listening socket at `path` with permission bits `mode`. A stale socket (nobody
/// listening) is replaced; a live one, or a file that is not a socket, is an error naming
/// `option`.
pub fn bind_unix(
    path: &Path,
    mode: u32,
    option: &'static str,
) -> Result<UnixListener, SocketError> {
    let io_err = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    if check_free(path, option)? {
        fs::remove_file(path).map_err(io_err)?;
    }
    // Create the socket with no permissions beyond the owner's, then widen as asked, so that it
    // is never reachable by others in between.
    // SAFETY: umask only swaps the process's file mode mask. vubd's threads create no files
    // but sockets, and every socket is bound here: at startup, or at runtime under the graph's
    // lock (block-export-add, nbd-server-start), so two binds never interleave their swaps.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(io_err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err)?;
    Ok(listener)
}

/// Removes a socket file when dropped.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
