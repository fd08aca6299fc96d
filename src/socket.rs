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
    #[error("socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
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
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
                option,
            })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(SocketError::InUse {
                    path: path.to_path_buf(),
                    option,
                })
            }
            // Nobody listens: a stale socket left by a process that died.
            Err(_) => fs::remove_file(path).map_err(io_err)?,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    // Create the socket with no permissions beyond the owner's, then widen as asked, so that it
    // is never reachable by others in between.
    // SAFETY: umask only swaps the process's file mode mask; vubd binds its sockets before it
    // starts threads that create files.
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
