//! The daemon's lifecycle: the listening socket, the frontend connections, and a clean
//! shutdown on SIGTERM or SIGINT.
//!
//! Each frontend connection has its own thread and its own [`BlkBackend`] (queues, workers,
//! in-flight regions, dirty log) on the one [`BlkDevice`]. Up to [`MAX_FRONTENDS`] are served
//! at once: a VMM restarting (or QEMU's `reconnect-ms`) needs one, a live migration needs two
//! for a moment — the destination VMM attaches while the source still runs, and the source
//! stops its rings before the destination starts its own. Signals are blocked in every thread
//! and taken by one dedicated thread with `sigwait`, which wakes the accept loop and closes the
//! live connections.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use thiserror::Error;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::BlkBackend;
use super::device::BlkDevice;
use crate::control::ControlServer;
use crate::error::Chain;
use crate::export::ExportError;
use crate::graph::Graph;
use crate::socket::{bind_unix, RemoveOnDrop, SocketError};

/// Frontends served at once: one VMM, and a second one taking over from it in a live
/// migration.
pub const MAX_FRONTENDS: usize = 2;

/// Errors that stop the daemon. Each names what failed.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("accepting connections: {0}")]
    Accept(io::Error),
    #[error("signal handling: {0}")]
    Signals(io::Error),
}

/// Where and how to listen.
#[derive(Clone, Debug)]
pub struct SocketOptions {
    pub path: PathBuf,
    /// Permission bits of the socket file.
    pub mode: u32,
}

/// Serve `device` on `socket` until SIGTERM or SIGINT, with a QMP control socket at `control`
/// if given.
pub fn serve(
    device: Arc<BlkDevice>,
    socket: &SocketOptions,
    control: Option<&Path>,
    graph: Arc<Graph>,
) -> Result<(), DaemonError> {
    // A socket systemd passed (socket activation) is used as it is, and stays systemd's.
    let (listener, _remove_socket) = match crate::systemd::activated_socket(&socket.path) {
        Some(listener) => (listener, None),
        None => (
            bind_unix(&socket.path, socket.mode, "--socket")?,
            Some(RemoveOnDrop(socket.path.clone())),
        ),
    };
    // Accepting never blocks: a frontend that vanished between the wake-up and the accept
    // leaves the loop waiting for the next event, not stuck in accept().
    listener
        .set_nonblocking(true)
        .map_err(DaemonError::Accept)?;
    let control = match control {
        Some(path) => Some(ControlServer::bind(path, graph.clone())?),
        None => None,
    };
    let shutdown = Shutdown::install()?;
    if let Some(control) = &control {
        control.start().map_err(DaemonError::Signals)?;
    }
    log::info!(
        "serving {} ({} bytes) on {}",
        device.export().path().display(),
        device.export().size(),
        socket.path.display()
    );
    // Every socket listens now (the metrics endpoint and the NBD server were started before).
    crate::systemd::notify(&format!(
        "READY=1\nSTATUS=serving {} on {}",
        device.export().path().display(),
        socket.path.display()
    ));

    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    loop {
        connections.retain(|c| !c.is_finished());
        // With all places taken, the next frontend waits in the listen backlog until one
        // leaves (a VMM reconnecting while its old connection still drains gets in right after).
        let listen = connections.len() < MAX_FRONTENDS;
        match shutdown.wait(&listener, listen)? {
            Wake::Shutdown => break,
            Wake::ConnectionEnded => continue,
            Wake::Connecting => {}
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if shutdown.requested() => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                log::warn!("accepting a frontend: {e}");
                continue;
            }
        };
        match start_connection(&device, stream, &shutdown) {
            Ok(thread) => connections.push(thread),
            Err(e) => log::error!("setting up a frontend connection: {e}"),
        }
    }
    log::info!("shutting down");
    crate::systemd::notify("STOPPING=1");
    shutdown.close_connections();
    for connection in connections {
        let _ = connection.join();
    }
    drop(control);
    graph.shutdown();
    device.export().close()?;
    Ok(())
}

/// Serve one frontend on its own thread until it disconnects or shutdown is requested.
fn start_connection(
    device: &Arc<BlkDevice>,
    stream: UnixStream,
    shutdown: &Shutdown,
) -> io::Result<JoinHandle<()>> {
    let backend = BlkBackend::new(device.clone())?;
    let id = shutdown.add_connection(stream.try_clone()?);
    let device = device.clone();
    let state = shutdown.state.clone();
    std::thread::Builder::new()
        .name("vubd-frontend".into())
        .spawn(move || {
            log::info!("frontend connected");
            let mut handler = BackendReqHandler::from_stream(stream, Arc::new(Mutex::new(backend)));
            loop {
                match handler.handle_request() {
                    Ok(()) => {}
                    Err(VhostUserError::Disconnected | VhostUserError::PartialMessage) => break,
                    Err(e) => {
                        if !state.requested.load(Ordering::Acquire) {
                            log::warn!("frontend connection ended: {e}");
                        }
                        break;
                    }
                }
            }
            // Dropping the handler drops the backend: its queue threads stop and the I/O they
            // started completes.
            drop(handler);
            log::info!("frontend disconnected");
            if let Err(e) = device.export().flush() {
                log::error!("flush after disconnect: {}", Chain(&e));
            }
            state.remove_connection(id);
        })
}

/// Shutdown requests from SIGTERM / SIGINT.
struct Shutdown {
    state: Arc<ShutdownState>,
}

struct ShutdownState {
    requested: AtomicBool,
    /// Wakes the accept loop.
    wake: EventFd,
    /// Wakes the accept loop when a connection has ended.
    connection_ended: EventFd,
    /// The live connections' sockets, to close them on shutdown.
    connections: Mutex<Connections>,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    streams: Vec<(u64, UnixStream)>,
}

impl Shutdown {
    /// Block SIGTERM and SIGINT in this thread (and so in every thread it starts) and start the
    /// thread that waits for them.
    fn install() -> Result<Shutdown, DaemonError> {
        let state = Arc::new(ShutdownState {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK).map_err(DaemonError::Signals)?,
            connection_ended: EventFd::new(EFD_NONBLOCK).map_err(DaemonError::Signals)?,
            connections: Mutex::new(Connections::default()),
        });
        let set = signal_set();
        // SAFETY: `set` is an initialised sigset; a null old-set pointer is allowed.
        let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(DaemonError::Signals(io::Error::from_raw_os_error(ret)));
        }
        let thread_state = state.clone();
        std::thread::Builder::new()
            .name("vubd-signals".into())
            .spawn(move || loop {
                let mut signal = 0;
                // SAFETY: `set` is initialised and `signal` is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                    continue;
                }
                log::info!("received signal {signal}");
                thread_state.request();
            })
            .map_err(DaemonError::Signals)?;
        Ok(Shutdown { state })
    }

    fn requested(&self) -> bool {
        self.state.requested.load(Ordering::Acquire)
    }

    /// Remember a connection's socket, to close it on shutdown; returns its id.
    fn add_connection(&self, stream: UnixStream) -> u64 {
        let mut connections = self.state.lock_connections();
        let id = connections.next_id;
        connections.next_id += 1;
        // A signal that arrived just before must still close it.
        if self.requested() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        connections.streams.push((id, stream));
        id
    }

    fn close_connections(&self) {
        self.state.close_connections();
    }

    /// Wait until a frontend is connecting (only if `listen`), a connection has ended, or
    /// shutdown is requested.
    fn wait(&self, listener: &UnixListener, listen: bool) -> Result<Wake, DaemonError> {
        let mut fds = [
            libc::pollfd {
                fd: self.state.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.state.connection_ended.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let count: libc::nfds_t = if listen { 3 } else { 2 };
        loop {
            if self.requested() {
                return Ok(Wake::Shutdown);
            }
            // SAFETY: `fds` is a valid array of at least `count` pollfds.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), count, -1) };
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DaemonError::Accept(e));
            }
            if self.requested() {
                return Ok(Wake::Shutdown);
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let _ = self.state.connection_ended.read();
                return Ok(Wake::ConnectionEnded);
            }
            if listen && fds[2].revents & libc::POLLIN != 0 {
                return Ok(Wake::Connecting);
            }
        }
    }
}

/// Why the accept loop woke up.
enum Wake {
    Connecting,
    ConnectionEnded,
    Shutdown,
}

impl ShutdownState {
    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        self.close_connections();
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// End every live connection: its thread sees the frontend leave.
    fn close_connections(&self) {
        for (_, stream) in &self.lock_connections().streams {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// A connection ended: forget its socket and let the accept loop take the next one.
    fn remove_connection(&self, id: u64) {
        self.lock_connections().streams.retain(|(i, _)| *i != id);
        let _ = self.connection_ended.write(1);
    }
}

/// Block SIGTERM and SIGINT in the calling thread and every thread it starts from now on, so
/// that they reach only the daemon's signal thread (`sigwait`). Call it first thing, before
/// any thread exists (bitmap commit threads, the NBD server's): a thread that leaves them
/// unblocked would take the signal's default action, killing the process uncleanly.
pub fn block_shutdown_signals() -> io::Result<()> {
    let set = signal_set();
    // SAFETY: `set` is an initialised sigset; a null old-set pointer is allowed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signal numbers to it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}
