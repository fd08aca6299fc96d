//! The daemon's lifecycle: the exports the command line gave are serving, the control
//! socket takes QMP commands, and SIGTERM or SIGINT shut everything down cleanly. Signals are
//! blocked in every thread and taken by one dedicated thread with `sigwait`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::control::ControlServer;
use crate::export::ExportError;
use crate::graph::Graph;
use crate::socket::SocketError;

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
    /// The option that named it, for messages (`--socket`, `--export addr.path`).
    pub option: &'static str,
}

/// Run the daemon until SIGTERM or SIGINT: the graph's exports are already serving (the
/// command line's), the control socket at `control` lets QMP clients add and remove more.
/// At shutdown every export stops and every disk is closed (bitmaps stored, data flushed).
pub fn run(graph: Arc<Graph>, control: Option<&Path>) -> Result<(), DaemonError> {
    let control = match control {
        Some(path) => Some(ControlServer::bind(path, graph.clone())?),
        None => None,
    };
    let signals = Signals::install()?;
    if let Some(control) = &control {
        control.start().map_err(DaemonError::Signals)?;
    }
    for line in graph.serving() {
        log::info!("{line}");
    }
    // Every socket listens now (the exports, metrics endpoint and NBD server were started
    // before).
    crate::systemd::notify(&format!("READY=1\nSTATUS={}", graph.status_line()));
    signals.wait()?;
    log::info!("shutting down");
    crate::systemd::notify("STOPPING=1");
    // No QMP command runs once the graph is being closed.
    drop(control);
    graph.shutdown()?;
    Ok(())
}

/// SIGTERM and SIGINT, taken by a thread of their own with `sigwait`.
struct Signals {
    received: Arc<EventFd>,
}

impl Signals {
    /// Block SIGTERM and SIGINT in this thread (and so in every thread it starts) and start the
    /// thread that waits for them.
    fn install() -> Result<Signals, DaemonError> {
        block_shutdown_signals().map_err(DaemonError::Signals)?;
        let received = Arc::new(EventFd::new(0).map_err(DaemonError::Signals)?);
        let set = signal_set();
        let notify = received.clone();
        std::thread::Builder::new()
            .name("vubd-signals".into())
            .spawn(move || loop {
                let mut signal = 0;
                // SAFETY: `set` is initialised and `signal` is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                    continue;
                }
                log::info!("received signal {signal}");
                let _ = notify.write(1);
            })
            .map_err(DaemonError::Signals)?;
        Ok(Signals { received })
    }

    /// Wait for the first signal.
    fn wait(&self) -> Result<(), DaemonError> {
        loop {
            match self.received.read() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DaemonError::Signals(e)),
            }
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
