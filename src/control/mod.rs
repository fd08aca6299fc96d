//! The control socket: QMP, the QEMU Machine Protocol, so that existing QMP clients and
//! scripts written against qemu-storage-daemon manage vubd's dirty bitmaps unchanged.
//!
//! Each client gets the QMP greeting, must negotiate capabilities, then sends JSON commands
//! (`{"execute": ..., "arguments": ..., "id": ...}`) and receives one `return` or `error`
//! object per command. Clients are served one thread each, so that a slow bitmap operation
//! for one client does not stall the others; bitmap operations serialise inside the bitmap
//! manager.
//!
//! The socket is mode 0600, but what its clients send is still treated as untrusted input,
//! and every resource a client can make vubd spend is bounded (docs/usage.md lists the
//! limits): [`MAX_CLIENTS`] threads, one message of [`framer::LIMITS`] buffered per client,
//! and [`NEGOTIATION_TIMEOUT`] for a client that connects and does not negotiate. Dropping the
//! [`ControlServer`] closes every client and waits for their threads, so that no command runs
//! once the export is being closed.

mod backup;
mod blockstats;
pub(crate) mod framer;
mod qmp;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::graph::Graph;
use crate::socket::{bind_unix, RemoveOnDrop, SocketError};
use framer::{Frame, Framer};

pub use qmp::Session;

/// Clients served at once. One more is told so in a QMP error object and closed, rather than
/// left waiting: a client that waits cannot tell a busy server from a hung one.
pub const MAX_CLIENTS: usize = 16;

/// Time from connecting to a successful `qmp_capabilities`. A client that connects and says
/// nothing holds a thread and one of the [`MAX_CLIENTS`] places; real clients negotiate at
/// once. Once negotiated, a client may stay idle as long as it likes (libvirt keeps its
/// monitor connection open for the life of the VM).
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the accept loop waits after a failed accept (out of file descriptors, say), so
/// that a lasting failure does not spin a CPU.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The listening control socket.
pub struct ControlServer {
    listener: UnixListener,
    device: Arc<Graph>,
    clients: Arc<Clients>,
    /// The accept loop, once started; joined on drop.
    accept: Mutex<Option<JoinHandle<()>>>,
    /// The socket file, removed on drop unless systemd owns it (socket activation).
    remove: Option<RemoveOnDrop>,
    path: std::path::PathBuf,
}

/// The clients being served, shared by the accept loop, the client threads and the server.
struct Clients {
    /// Set when the server is dropped: accept nothing more.
    closing: AtomicBool,
    live: Mutex<Live>,
}

#[derive(Default)]
struct Live {
    next_id: u64,
    clients: HashMap<u64, Client>,
}

/// A client's thread, and a handle on its socket to wake it when the server closes.
struct Client {
    stream: UnixStream,
    thread: JoinHandle<()>,
}

/// Lock `mutex`, even if a thread panicked while holding it: the data stays consistent (only
/// inserts and removes under it).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl ControlServer {
    /// Create the control socket (mode 0600).
    pub fn bind(path: &Path, device: Arc<Graph>) -> Result<ControlServer, SocketError> {
        let (listener, remove) = match crate::systemd::activated_socket(path) {
            Some(listener) => (listener, None),
            None => (
                bind_unix(path, 0o600, "--control")?,
                Some(RemoveOnDrop(path.to_path_buf())),
            ),
        };
        Ok(ControlServer {
            listener,
            device,
            clients: Arc::new(Clients {
                closing: AtomicBool::new(false),
                live: Mutex::new(Live::default()),
            }),
            accept: Mutex::new(None),
            remove,
            path: path.to_path_buf(),
        })
    }

    /// Accept clients on a thread of their own.
    pub fn start(&self) -> io::Result<()> {
        let listener = self.listener.try_clone()?;
        let device = self.device.clone();
        let clients = self.clients.clone();
        let thread = std::thread::Builder::new()
            .name("vubd-control".into())
            .spawn(move || accept_loop(&listener, &device, &clients))?;
        *lock(&self.accept) = Some(thread);
        Ok(())
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.clients.closing.store(true, Ordering::Release);
        // Wake the accept loop so that it ends: accept() on a shut-down socket fails. A socket
        // systemd passed stays systemd's, for the next activation: connect to it instead.
        if self.remove.is_some() {
            // SAFETY: shutdown() on our own listening socket; it only changes socket state.
            unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        } else {
            let _ = UnixStream::connect(&self.path);
        }
        if let Some(thread) = lock(&self.accept).take() {
            let _ = thread.join();
        }
        // No client is admitted any more. Wake every client thread (a read or a write on a
        // shut-down socket returns at once) and wait for it: one in the middle of a command
        // finishes that command first.
        let clients = std::mem::take(&mut lock(&self.clients.live).clients);
        for client in clients.values() {
            let _ = client.stream.shutdown(Shutdown::Both);
        }
        for (_, client) in clients {
            let _ = client.thread.join();
        }
    }
}

fn accept_loop(listener: &UnixListener, device: &Arc<Graph>, clients: &Arc<Clients>) {
    let mut failing = false;
    loop {
        match listener.accept() {
            Ok(_) if clients.closing.load(Ordering::Acquire) => break,
            Ok((stream, _)) => {
                failing = false;
                clients.admit(stream, device);
            }
            Err(_) if clients.closing.load(Ordering::Acquire) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if !failing {
                    log::warn!("control socket: accepting a client: {e}");
                }
                failing = true;
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

impl Clients {
    /// Serve `stream` on a thread of its own, or refuse it if [`MAX_CLIENTS`] are served.
    fn admit(self: &Arc<Self>, stream: UnixStream, device: &Arc<Graph>) {
        let mut live = lock(&self.live);
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        if live.clients.len() >= MAX_CLIENTS {
            drop(live);
            log::debug!("control socket: refusing a client, {MAX_CLIENTS} are connected");
            refuse(
                stream,
                &format!("Too many QMP clients: {MAX_CLIENTS} are connected; try again later"),
            );
            return;
        }
        let handle = match stream.try_clone() {
            Ok(handle) => handle,
            Err(e) => {
                drop(live);
                refuse(stream, &format!("Cannot serve the client: {e}"));
                return;
            }
        };
        let id = live.next_id;
        live.next_id += 1;
        let clients = self.clone();
        let device = device.clone();
        let spawned = std::thread::Builder::new()
            .name("vubd-qmp".into())
            .spawn(move || {
                let _leave = Leave { clients, id };
                serve_client(stream, device);
            });
        match spawned {
            // The thread removes itself under the lock held here, so it finds itself inserted.
            Ok(thread) => {
                live.clients.insert(
                    id,
                    Client {
                        stream: handle,
                        thread,
                    },
                );
            }
            Err(e) => {
                drop(live);
                log::warn!("control socket: starting a client thread: {e}");
                refuse(handle, &format!("Cannot serve the client: {e}"));
            }
        }
    }
}

/// Gives a client's place back when its thread ends, even by a panic.
struct Leave {
    clients: Arc<Clients>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        lock(&self.clients.live).clients.remove(&self.id);
    }
}

/// Tell a client it will not be served, and close it. The write cannot block: a new
/// connection's buffer is empty, and the socket is non-blocking in case it is not.
fn refuse(mut stream: UnixStream, desc: &str) {
    let _ = stream.set_nonblocking(true);
    let _ = send(&mut stream, &qmp::error("GenericError", desc, None));
}

fn send(stream: &mut UnixStream, value: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.extend_from_slice(b"\r\n");
    stream.write_all(&line)
}

/// Apply the negotiation deadline to reads and writes, or lift it once negotiated. Returns
/// false once the deadline has passed.
fn apply_deadline(stream: &UnixStream, deadline: Option<Instant>) -> io::Result<bool> {
    let timeout = match deadline {
        None => None,
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            Some(left)
        }
    };
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    Ok(true)
}

/// The reply to one framed message.
pub(crate) fn answer(session: &mut Session, frame: Frame) -> Value {
    match frame {
        Frame::Message(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(request) => session.handle(&request),
            Err(e) => qmp::error("GenericError", &format!("JSON parse error, {e}"), None),
        },
        Frame::Error(e) => qmp::error("GenericError", &e.to_string(), None),
    }
}

/// Run one QMP session until the client hangs up, does not negotiate in time, or the server
/// closes. Malformed messages are answered with an error and the session goes on.
fn serve_client(mut stream: UnixStream, device: Arc<Graph>) {
    let mut deadline = Some(Instant::now() + NEGOTIATION_TIMEOUT);
    let mut session = Session::new(device);
    if !matches!(apply_deadline(&stream, deadline), Ok(true))
        || send(&mut stream, &session.greeting()).is_err()
    {
        return;
    }
    let mut framer = Framer::new(framer::LIMITS);
    let mut chunk = [0u8; 8192];
    loop {
        if deadline.is_some() {
            if session.negotiated() {
                deadline = None;
            }
            match apply_deadline(&stream, deadline) {
                Ok(true) => {}
                Ok(false) => {
                    log::debug!("control socket: closing a client that did not negotiate");
                    let desc = format!(
                        "No capabilities negotiation within {} seconds; closing",
                        NEGOTIATION_TIMEOUT.as_secs()
                    );
                    let _ = send(&mut stream, &qmp::error("GenericError", &desc, None));
                    return;
                }
                Err(_) => return,
            }
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            // A timeout: the deadline is checked above.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        for &byte in &chunk[..n] {
            if let Some(frame) = framer.push(byte) {
                let reply = answer(&mut session, frame);
                if send(&mut stream, &reply).is_err() {
                    return;
                }
                for event in session.take_events() {
                    if send(&mut stream, &event).is_err() {
                        return;
                    }
                }
            }
        }
    }
}
