//! The NBD server: a listening socket, an accept thread, a thread per connection, and the
//! export table the connections and the management calls share.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, info, warn};

use super::conn::{self, Env, Socket};
use super::handshake::Exports;
use super::proto::MAX_STRING;
use super::{ExportEntry, ExportSource, NbdError, TlsCreds};

/// Where the server listens, as QEMU's `SocketAddress` (`type: unix` / `type: inet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A UNIX socket path. A stale socket there is replaced; one a live process serves is
    /// refused. Created with mode 0600 and removed when the server stops.
    Unix(PathBuf),
    /// A host (name or address) and a port number. Port "0" picks a free port; see
    /// [`NbdServer::local_addr`].
    Tcp(String, String),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "{}", p.display()),
            ListenAddr::Tcp(h, p) if h.contains(':') => write!(f, "[{h}]:{p}"),
            ListenAddr::Tcp(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// With credentials, every client must start TLS before anything else (FORCEDTLS).
    pub tls: Option<Arc<TlsCreds>>,
    /// Most simultaneous connections (handshaking or transmitting); 0 = unlimited, QEMU's
    /// default `max-connections`. Connections beyond it are closed at once.
    pub max_connections: usize,
    /// Time a client has to finish the handshake (so a silent client does not hold a
    /// connection slot forever). Transmission has no idle limit, as in QEMU.
    pub handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            tls: None,
            max_connections: 0,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn try_clone(&self) -> io::Result<Listener> {
        Ok(match self {
            Listener::Unix(l) => Listener::Unix(l.try_clone()?),
            Listener::Tcp(l) => Listener::Tcp(l.try_clone()?),
        })
    }

    /// Wake a thread blocked in accept() on this socket: on Linux, shutdown() of a listening
    /// socket makes accept() fail at once (EINVAL). This does not depend on the socket path
    /// still leading to us, as a connection to ourselves would.
    fn wake(&self) {
        let fd = match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        // SAFETY: `fd` belongs to a listener this struct owns, open for the whole call;
        // shutdown() only changes the socket's state.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// A live connection as the table keeps it.
struct Slot {
    /// A second handle on the socket, to end the connection from outside.
    closer: Socket,
    /// The export it transmits on, once past the handshake.
    export: Option<String>,
}

#[derive(Default)]
struct Table {
    exports: BTreeMap<String, Arc<ExportEntry>>,
    conns: HashMap<u64, Slot>,
    next_id: u64,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    table: Mutex<Table>,
    stopping: AtomicBool,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_connections: usize,
    handshake_timeout: Duration,
}

impl Shared {
    /// The table; a thread that panicked while holding it left nothing half-done that
    /// matters more than serving on.
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Exports for Shared {
    fn lookup(&self, name: &str) -> Option<Arc<ExportEntry>> {
        self.table().exports.get(name).cloned()
    }

    fn list(&self) -> Vec<Arc<ExportEntry>> {
        self.table().exports.values().cloned().collect()
    }

    fn attach(&self, id: u64, export: &Arc<ExportEntry>) -> bool {
        let mut t = self.table();
        let current = t
            .exports
            .get(&export.name)
            .is_some_and(|e| Arc::ptr_eq(e, export));
        match t.conns.get_mut(&id) {
            Some(slot) if current => {
                slot.export = Some(export.name.clone());
                true
            }
            _ => false,
        }
    }
}

/// A running NBD server. Dropping it stops it like [`NbdServer::stop`].
pub struct NbdServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    /// A second handle on the listening socket, to wake the accept thread.
    waker: Listener,
    local: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
}

impl NbdServer {
    /// Listen on `addr` and start accepting clients (QEMU's `nbd-server-start`).
    pub fn start(addr: ListenAddr, options: ServerOptions) -> Result<NbdServer, NbdError> {
        let bind_err = |source| NbdError::Bind {
            addr: addr.to_string(),
            source,
        };
        let (listener, local, unix_path) = match &addr {
            ListenAddr::Unix(path) => {
                // Refuse a socket a live process serves; replace a stale one (QEMU unlinks it).
                match crate::socket::check_free(path, "path") {
                    Ok(true) => fs::remove_file(path).map_err(bind_err)?,
                    Ok(false) => {}
                    Err(e) => return Err(bind_err(io::Error::other(e.to_string()))),
                }
                let l = UnixListener::bind(path).map_err(bind_err)?;
                // Only the owner may connect. Set after bind: with the usual umask the
                // socket is never writable (connectable) by others in between.
                fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
                (Listener::Unix(l), None, Some(path.clone()))
            }
            ListenAddr::Tcp(host, port) => {
                let text = addr.to_string();
                let addrs: Vec<SocketAddr> = (host.as_str(), 0)
                    .to_socket_addrs()
                    .and_then(|a| {
                        let port: u16 = port.parse().map_err(|_| {
                            io::Error::new(io::ErrorKind::InvalidInput, "port is not a number")
                        })?;
                        Ok(a.map(|mut s| {
                            s.set_port(port);
                            s
                        })
                        .collect())
                    })
                    .map_err(|source| NbdError::Resolve {
                        addr: text.clone(),
                        source,
                    })?;
                let l = TcpListener::bind(&addrs[..]).map_err(bind_err)?;
                let local = l.local_addr().map_err(bind_err)?;
                (Listener::Tcp(l), Some(local), None)
            }
        };
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
            stopping: AtomicBool::new(false),
            tls: options.tls.as_ref().map(|t| t.config()),
            max_connections: options.max_connections,
            handshake_timeout: options.handshake_timeout,
        });
        let waker = listener.try_clone().map_err(bind_err)?;
        let accept_shared = shared.clone();
        let accept = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .map_err(|source| NbdError::Thread {
                what: "accept",
                source,
            })?;
        info!("nbd: listening on {addr}");
        Ok(NbdServer {
            shared,
            accept: Some(accept),
            waker,
            local,
            unix_path,
        })
    }

    /// The TCP address actually bound (the port chosen for port "0"); `None` for UNIX
    /// sockets.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// Export `source` as `name` (QEMU's `block-export-add` with `type: nbd`). Exports are
    /// read-only. The name is what clients ask for; "" is a name like any other (as in
    /// QEMU, the empty name selects the export named "" and nothing else).
    pub fn add_export(
        &self,
        name: &str,
        description: Option<String>,
        source: Arc<dyn ExportSource>,
    ) -> Result<(), NbdError> {
        if name.len() > MAX_STRING || name.contains('\0') {
            return Err(NbdError::InvalidName(name.to_string()));
        }
        let mut t = self.shared.table();
        if t.exports.contains_key(name) {
            return Err(NbdError::ExportExists(name.to_string()));
        }
        t.exports.insert(
            name.to_string(),
            Arc::new(ExportEntry {
                name: name.to_string(),
                description,
                source,
            }),
        );
        Ok(())
    }

    /// Remove an export (QEMU's `block-export-del`). Without `hard` (mode `safe`) it is
    /// refused while clients transmit on it; with `hard` they are disconnected. Clients still
    /// in the handshake can no longer select it either way.
    pub fn remove_export(&self, name: &str, hard: bool) -> Result<(), NbdError> {
        let mut t = self.shared.table();
        if !t.exports.contains_key(name) {
            return Err(NbdError::NoSuchExport(name.to_string()));
        }
        let users: Vec<u64> = t
            .conns
            .iter()
            .filter(|(_, s)| s.export.as_deref() == Some(name))
            .map(|(&id, _)| id)
            .collect();
        if !users.is_empty() && !hard {
            return Err(NbdError::InUse(name.to_string()));
        }
        t.exports.remove(name);
        for id in users {
            if let Some(slot) = t.conns.get_mut(&id) {
                slot.closer.shutdown();
                // No longer counted as a user, even before its thread has noticed.
                slot.export = None;
            }
        }
        Ok(())
    }

    /// Names of the exports, sorted.
    pub fn exports(&self) -> Vec<String> {
        self.shared.table().exports.keys().cloned().collect()
    }

    /// Connections in the transmission phase on `export` (0 for an unknown name).
    pub fn connections(&self, export: &str) -> usize {
        self.shared
            .table()
            .conns
            .values()
            .filter(|s| s.export.as_deref() == Some(export))
            .count()
    }

    /// Close the listener and every connection, and wait for their threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.waker.wake();
        // Should shutdown() not wake it (not Linux), a connection of our own does.
        if !accept.is_finished() {
            let _ = match (&self.unix_path, self.local) {
                (Some(path), _) => UnixStream::connect(path).map(drop),
                (None, Some(mut addr)) => {
                    if addr.ip().is_unspecified() {
                        addr.set_ip(match addr {
                            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                        });
                    }
                    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map(drop)
                }
                _ => Ok(()),
            };
        }
        let _ = accept.join();
        // No new connection can appear now: close the others and wait for them.
        let threads = {
            let mut t = self.shared.table();
            for slot in t.conns.values() {
                slot.closer.shutdown();
            }
            std::mem::take(&mut t.threads)
        };
        for th in threads {
            let _ = th.join();
        }
        if let Some(path) = &self.unix_path {
            let _ = fs::remove_file(path);
        }
        info!("nbd: server stopped");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    loop {
        let accepted = match &listener {
            Listener::Unix(l) => l.accept().map(|(s, _)| Socket::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, peer)| {
                debug!("nbd: connection from {peer}");
                // Replies are written whole; do not hold the last segment back.
                let _ = s.set_nodelay(true);
                Socket::Tcp(s)
            }),
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let socket = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("nbd: accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        admit(socket, &shared);
    }
}

/// Register and start a connection, or close it at once when the limit is reached.
fn admit(socket: Socket, shared: &Arc<Shared>) {
    let Ok(closer) = socket.try_clone() else {
        return;
    };
    let id = {
        let mut t = shared.table();
        t.threads.retain(|th| !th.is_finished());
        if shared.max_connections != 0 && t.conns.len() >= shared.max_connections {
            debug!("nbd: refusing a connection: {} already", t.conns.len());
            return; // dropping the socket closes it
        }
        let id = t.next_id;
        t.next_id += 1;
        t.conns.insert(
            id,
            Slot {
                closer,
                export: None,
            },
        );
        id
    };
    let thread_shared = shared.clone();
    let spawned = thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            let env = Env {
                exports: &*thread_shared,
                tls: thread_shared.tls.clone(),
                handshake_timeout: Some(thread_shared.handshake_timeout),
                id,
            };
            let transcript = conn::run(Box::new(socket), &env);
            debug!("nbd: connection {id} ended: {}", transcript.end);
            thread_shared.table().conns.remove(&id);
        });
    let mut t = shared.table();
    match spawned {
        Ok(handle) => t.threads.push(handle),
        Err(e) => {
            warn!("nbd: cannot start a connection thread: {e}");
            t.conns.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn server_is_shareable() {
        assert_send_sync::<NbdServer>();
    }

    #[test]
    fn stop_does_not_need_the_socket_path() {
        let dir = std::env::temp_dir().join(format!("vubd-nbd-stop-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let server =
            NbdServer::start(ListenAddr::Unix(path.clone()), ServerOptions::default()).unwrap();
        // Someone removed the socket: stop must still wake the accept thread.
        fs::remove_file(&path).unwrap();
        server.stop();
        let tcp = NbdServer::start(
            ListenAddr::Tcp("127.0.0.1".into(), "0".into()),
            ServerOptions::default(),
        )
        .unwrap();
        drop(tcp);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_addresses() {
        let e = NbdServer::start(
            ListenAddr::Tcp("127.0.0.1".into(), "http".into()),
            ServerOptions::default(),
        )
        .err()
        .unwrap();
        assert!(matches!(e, NbdError::Resolve { .. }), "{e}");
        let e = NbdServer::start(
            ListenAddr::Unix("/nonexistent-dir/x.sock".into()),
            ServerOptions::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent-dir/x.sock"), "{e}");
    }
}
