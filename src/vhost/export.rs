//! A vhost-user-blk export: one device served on one listening socket, with its own accept
//! thread and one thread per frontend connection. A daemon runs any number of them side by
//! side (`--export` repeated, QMP `block-export-add`); nothing is shared between two exports
//! but the process, so a frontend that misbehaves on one socket is refused or disconnected
//! there and the others never notice.
//!
//! Each connection has its own [`BlkBackend`] (queues, workers, in-flight regions, dirty log)
//! on the export's one [`BlkDevice`]. Up to [`MAX_FRONTENDS`] are served at once: a VMM
//! restarting (or QEMU's `reconnect-ms`) needs one, a live migration needs two for a moment —
//! the destination VMM attaches while the source still runs, and the source stops its rings
//! before the destination starts its own.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::BlkBackend;
use super::config_change::peek_backend_channel;
use super::daemon::{DaemonError, SocketOptions};
use super::device::BlkDevice;
use crate::error::Chain;
use crate::socket::{bind_unix, RemoveOnDrop};

/// Frontends served at once by one export: one VMM, and a second one taking over from it in
/// a live migration.
pub const MAX_FRONTENDS: usize = 2;

/// A device being served on its socket.
pub struct VhostExport {
    device: Arc<BlkDevice>,
    socket: PathBuf,
    state: Arc<ExportState>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VhostExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostExport")
            .field("socket", &self.socket)
            .finish()
    }
}

/// What the accept thread, the connection threads and the owner share.
struct ExportState {
    stopping: AtomicBool,
    /// Wakes the accept loop to stop.
    wake: EventFd,
    /// Wakes the accept loop when a connection has ended.
    connection_ended: EventFd,
    /// The live connections' sockets, to close them when the export stops.
    connections: Mutex<Connections>,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    streams: Vec<(u64, UnixStream)>,
}

impl VhostExport {
    /// Listen on `socket` (or on the socket systemd passed for its path) and serve `device`
    /// to the frontends that connect, on a thread of its own.
    pub fn start(device: Arc<BlkDevice>, socket: &SocketOptions) -> Result<Self, DaemonError> {
        // A socket systemd passed (socket activation) is used as it is, and stays systemd's.
        let (listener, remove) = match crate::systemd::activated_socket(&socket.path) {
            Some(listener) => (listener, None),
            None => (
                bind_unix(&socket.path, socket.mode, socket.option)?,
                Some(RemoveOnDrop(socket.path.clone())),
            ),
        };
        // Accepting never blocks: a frontend that vanished between the wake-up and the accept
        // leaves the loop waiting for the next event, not stuck in accept().
        listener
            .set_nonblocking(true)
            .map_err(DaemonError::Accept)?;
        let state = Arc::new(ExportState {
            stopping: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK).map_err(DaemonError::Accept)?,
            connection_ended: EventFd::new(EFD_NONBLOCK).map_err(DaemonError::Accept)?,
            connections: Mutex::new(Connections::default()),
        });
        let accept = {
            let (device, state) = (device.clone(), state.clone());
            std::thread::Builder::new()
                .name("vubd-accept".into())
                .spawn(move || {
                    // The socket file goes when the accept loop is done with it.
                    let _remove = remove;
                    accept_loop(&device, &listener, &state)
                })
                .map_err(DaemonError::Accept)?
        };
        Ok(VhostExport {
            device,
            socket: socket.path.clone(),
            state,
            accept: Some(accept),
        })
    }

    pub fn device(&self) -> &Arc<BlkDevice> {
        &self.device
    }

    /// The socket frontends connect to.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// How many frontends are connected.
    pub fn connections(&self) -> usize {
        self.state.live_connections()
    }

    /// Stop accepting, disconnect every frontend and wait until their queues have stopped and
    /// the I/O they started has completed. The export's disk stays open.
    pub fn stop(mut self) {
        self.stop_serving();
    }

    fn stop_serving(&mut self) {
        self.state.stopping.store(true, Ordering::Release);
        let _ = self.state.wake.write(1);
        self.state.close_connections();
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

impl Drop for VhostExport {
    fn drop(&mut self) {
        self.stop_serving();
    }
}

/// Accept frontends until the export stops, then wait for the connections to end.
fn accept_loop(device: &Arc<BlkDevice>, listener: &UnixListener, state: &Arc<ExportState>) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    loop {
        connections.retain(|c| !c.is_finished());
        // With all places taken, the next frontend waits in the listen backlog until one
        // leaves (a VMM reconnecting while its old connection still drains gets in right after).
        // Places are counted from the live sockets, which a leaving connection gives up before
        // it wakes this loop: its thread may not have finished yet when the loop looks.
        let listen = state.live_connections() < MAX_FRONTENDS;
        match state.wait(listener, listen) {
            Ok(Wake::Stop) => break,
            Ok(Wake::ConnectionEnded) => continue,
            Ok(Wake::Connecting) => {}
            Err(e) => {
                log::error!(
                    "{}: waiting for frontends: {e}",
                    device.export().path().display()
                );
                break;
            }
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if state.stopping() => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                log::warn!("accepting a frontend: {e}");
                continue;
            }
        };
        match start_connection(device, stream, state) {
            Ok(thread) => connections.push(thread),
            Err(e) => log::error!("setting up a frontend connection: {e}"),
        }
    }
    state.close_connections();
    for connection in connections {
        let _ = connection.join();
    }
}

/// Serve one frontend on its own thread until it disconnects or the export stops.
fn start_connection(
    device: &Arc<BlkDevice>,
    stream: UnixStream,
    state: &Arc<ExportState>,
) -> io::Result<JoinHandle<()>> {
    let backend = Arc::new(Mutex::new(BlkBackend::new(device.clone())?));
    let peek = stream.try_clone()?;
    let id = state.add_connection(stream.try_clone()?);
    let device = device.clone();
    let state = state.clone();
    std::thread::Builder::new()
        .name("vubd-frontend".into())
        .spawn(move || {
            log::info!("frontend connected to {}", device.export().id());
            let mut handler = BackendReqHandler::from_stream(stream, backend.clone());
            loop {
                // The backend channel, if the next message hands one over: kept to send
                // configuration-change notices on (see config_change).
                let channel = peek_backend_channel(&peek).unwrap_or(None);
                match handler.handle_request() {
                    Ok(()) => {}
                    Err(VhostUserError::Disconnected | VhostUserError::PartialMessage) => break,
                    Err(e) => {
                        if !state.stopping() {
                            log::warn!("{}: frontend connection ended: {e}", device.export().id());
                        }
                        break;
                    }
                }
                if let Some(channel) = channel {
                    let takes = backend
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .takes_config_notices();
                    if takes {
                        device.notices().add(id, channel);
                    }
                }
            }
            device.notices().remove(id);
            // Dropping the handler and our handle drops the backend: its queue threads stop
            // and the I/O they started completes.
            drop(handler);
            drop(backend);
            log::info!("frontend disconnected from {}", device.export().id());
            if let Err(e) = device.export().flush() {
                log::error!("flush after disconnect: {}", Chain(&e));
            }
            state.remove_connection(id);
        })
}

/// Why the accept loop woke up.
enum Wake {
    Connecting,
    ConnectionEnded,
    Stop,
}

impl ExportState {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn lock_connections(&self) -> MutexGuard<'_, Connections> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections being served (their sockets not yet given up).
    fn live_connections(&self) -> usize {
        self.lock_connections().streams.len()
    }

    /// Remember a connection's socket, to close it when the export stops; returns its id.
    fn add_connection(&self, stream: UnixStream) -> u64 {
        let mut connections = self.lock_connections();
        let id = connections.next_id;
        connections.next_id += 1;
        // A stop requested just before must still close it.
        if self.stopping() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        connections.streams.push((id, stream));
        id
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

    /// Wait until a frontend is connecting (only if `listen`), a connection has ended, or the
    /// export stops.
    fn wait(&self, listener: &UnixListener, listen: bool) -> io::Result<Wake> {
        let mut fds = [
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.connection_ended.as_raw_fd(),
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
            if self.stopping() {
                return Ok(Wake::Stop);
            }
            // SAFETY: `fds` is a valid array of at least `count` pollfds.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), count, -1) };
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if self.stopping() {
                return Ok(Wake::Stop);
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let _ = self.connection_ended.read();
                return Ok(Wake::ConnectionEnded);
            }
            if listen && fds[2].revents & libc::POLLIN != 0 {
                return Ok(Wake::Connecting);
            }
        }
    }
}
