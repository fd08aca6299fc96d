//! The control socket: QMP, the QEMU Machine Protocol, so that existing QMP clients and
//! scripts written against qemu-storage-daemon manage vubd's dirty bitmaps unchanged.
//!
//! Each client gets the QMP greeting, must negotiate capabilities, then sends JSON commands
//! (`{"execute": ..., "arguments": ..., "id": ...}`) and receives one `return` or `error`
//! object per command. Clients are served one thread each; bitmap operations serialise inside
//! the bitmap manager.

mod framer;
mod qmp;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::export::Export;
use crate::socket::{bind_unix, RemoveOnDrop, SocketError};
use framer::{Frame, Framer};

pub use qmp::Session;

/// The listening control socket.
pub struct ControlServer {
    listener: UnixListener,
    device: Arc<Export>,
    _remove: RemoveOnDrop,
}

impl ControlServer {
    /// Create the control socket (mode 0600).
    pub fn bind(path: &Path, device: Arc<Export>) -> Result<ControlServer, SocketError> {
        let listener = bind_unix(path, 0o600, "--control")?;
        Ok(ControlServer {
            listener,
            device,
            _remove: RemoveOnDrop(path.to_path_buf()),
        })
    }

    /// Accept clients on a thread of their own.
    pub fn start(&self) -> io::Result<()> {
        let listener = self.listener.try_clone()?;
        let device = self.device.clone();
        std::thread::Builder::new()
            .name("vubd-control".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else {
                        break;
                    };
                    let device = device.clone();
                    let _ = std::thread::Builder::new()
                        .name("vubd-qmp".into())
                        .spawn(move || serve_client(stream, device));
                }
            })?;
        Ok(())
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Wake the accept loop so that it ends.
        // SAFETY: shutdown() on our own listening socket; it only changes socket state.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

fn send(stream: &mut UnixStream, value: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.extend_from_slice(b"\r\n");
    stream.write_all(&line)
}

/// The reply to one framed message.
fn answer(session: &mut Session, frame: Frame) -> Value {
    match frame {
        Frame::Message(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(request) => session.handle(&request),
            Err(e) => qmp::error("GenericError", &format!("JSON parse error, {e}"), None),
        },
        Frame::Error(e) => qmp::error("GenericError", &e.to_string(), None),
    }
}

/// Run one QMP session until the client hangs up. Malformed messages are answered with an
/// error and the session goes on.
fn serve_client(mut stream: UnixStream, device: Arc<Export>) {
    let mut session = Session::new(device);
    if send(&mut stream, &session.greeting()).is_err() {
        return;
    }
    let mut framer = Framer::new(framer::LIMITS);
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for &byte in &chunk[..n] {
            if let Some(frame) = framer.push(byte) {
                let reply = answer(&mut session, frame);
                if send(&mut stream, &reply).is_err() {
                    return;
                }
            }
        }
    }
}
