//! The daemon's lifecycle: the listening socket, one frontend connection after another, and a
//! clean shutdown on SIGTERM or SIGINT.
//!
//! vhost-user-backend's daemon serves a single connection, so vubd builds a fresh backend and
//! daemon for each frontend that connects (a VMM restarting, or QEMU's `reconnect-ms`), all on
//! the same [`BlkDevice`]. Signals are blocked in every thread and taken by one dedicated
//! thread with `sigwait`, which wakes the accept loop or closes the live connection.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::BlkBackend;
use super::device::BlkDevice;
use crate::control::ControlServer;
use crate::error::Chain;
use crate::export::ExportError;
use crate::graph::Graph;
use crate::socket::{bind_unix, RemoveOnDrop, SocketError};
use crate::virtio_blk::request::GuestMemory;

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
    #[error("setting up a frontend connection")]
    Connection(#[source] io::Error),
    // vhost-user-backend's error implements Display but not std's Error: shown, not chained.
    #[error("vhost-user: {0}")]
    VhostUser(vhost_user_backend::Error),
}

/// Where and how to listen.
#[derive(Clone, Debug)]
pub struct SocketOptions {
    pub path: PathBuf,
    /// Permission bits of the socket file.
    pub mode: u32,
}

/// Serve `device` on `socket` until SIGTERM or SIGINT, one connection at a time, with a QMP
/// control socket at `control` if given.
pub fn serve(
    device: Arc<BlkDevice>,
    socket: &SocketOptions,
    control: Option<&Path>,
    graph: Arc<Graph>,
) -> Result<(), DaemonError> {
    let listener = bind_unix(&socket.path, socket.mode, "--socket")?;
    let _remove_socket = RemoveOnDrop(socket.path.clone());
    let control = match control {
        Some(path) => Some(ControlServer::bind(path, graph.clone())?),
        None => None,
    };
    let shutdown = Shutdown::install(listener.as_raw_fd())?;
    if let Some(control) = &control {
        control.start().map_err(DaemonError::Signals)?;
    }
    log::info!(
        "serving {} ({} bytes) on {}",
        device.export().path().display(),
        device.export().size(),
        socket.path.display()
    );

    while !shutdown.requested() {
        if !shutdown.wait_for_connection(&listener)? {
            break;
        }
        serve_connection(&device, &listener, &shutdown)?;
        if let Err(e) = device.export().flush() {
            log::error!("flush after disconnect: {}", Chain(&e));
        }
    }
    log::info!("shutting down");
    drop(control);
    graph.shutdown();
    device.export().close()?;
    Ok(())
}

/// Accept one frontend and serve it until it disconnects or shutdown is requested.
fn serve_connection(
    device: &Arc<BlkDevice>,
    listener: &UnixListener,
    shutdown: &Shutdown,
) -> Result<(), DaemonError> {
    let mem = GuestMemoryAtomic::new(GuestMemory::new());
    let backend = Arc::new(BlkBackend::new(device.clone()).map_err(DaemonError::Connection)?);
    let mut daemon = VhostUserDaemon::new("vubd".to_string(), backend.clone(), mem)
        .map_err(DaemonError::VhostUser)?;
    for (index, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        let worker = backend.worker(index);
        handler
            .register_listener(
                worker.wake_fd().as_raw_fd(),
                EventSet::IN,
                backend.wake_event_id(),
            )
            .map_err(DaemonError::Connection)?;
    }

    let clone = listener.try_clone().map_err(DaemonError::Accept)?;
    let mut listener = Listener::from(clone);
    match daemon.start(&mut listener) {
        Ok(()) => {}
        Err(_) if shutdown.requested() => return Ok(()),
        Err(e) => {
            log::warn!("accepting a frontend: {e}");
            return Ok(());
        }
    }
    log::info!("frontend connected");
    shutdown.set_connection(daemon.shutdown_handle());
    match daemon.wait() {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => {}
        Err(e) => log::warn!("frontend connection ended: {e}"),
    }
    shutdown.set_connection(None);
    log::info!("frontend disconnected");

    // Stop the queue threads, then wait for the I/O they started.
    drop(daemon);
    backend.drain();
    Ok(())
}

/// Shutdown requests from SIGTERM / SIGINT.
struct Shutdown {
    state: Arc<ShutdownState>,
}

struct ShutdownState {
    requested: AtomicBool,
    /// Wakes the accept loop.
    wake: EventFd,
    listener_fd: RawFd,
    connection: Mutex<Option<ShutdownHandle>>,
}

impl Shutdown {
    /// Block SIGTERM and SIGINT in this thread (and so in every thread it starts) and start the
    /// thread that waits for them.
    fn install(listener_fd: RawFd) -> Result<Shutdown, DaemonError> {
        let state = Arc::new(ShutdownState {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK).map_err(DaemonError::Signals)?,
            listener_fd,
            connection: Mutex::new(None),
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

    fn set_connection(&self, handle: Option<ShutdownHandle>) {
        let mut connection = self
            .state
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *connection = handle;
        // A signal that arrived just before the handle was stored must still close it.
        if self.requested() {
            if let Some(handle) = connection.as_ref() {
                handle.shutdown();
            }
        }
    }

    /// Wait until a frontend is connecting (true) or shutdown is requested (false).
    fn wait_for_connection(&self, listener: &UnixListener) -> Result<bool, DaemonError> {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.state.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            if self.requested() {
                return Ok(false);
            }
            // SAFETY: `fds` is a valid array of two pollfds.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DaemonError::Accept(e));
            }
            if self.requested() {
                return Ok(false);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(true);
            }
        }
    }
}

impl ShutdownState {
    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        // Wake an accept() that a vanished connection left blocked.
        // SAFETY: shutdown() on our own listening socket fd; it only changes socket state.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(handle) = self
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            handle.shutdown();
        }
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
