//! An NBD client as a [`RemoteStore`]: vubd serving a disk whose data is on an NBD server
//! (qemu-nbd, nbdkit, qemu-storage-daemon, another vubd), following the NBD protocol
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>, "proto.md" below)
//! and QEMU's `nbd` block driver options ([`NbdSpec`]).
//!
//! * `handshake.rs`: connecting and fixed newstyle negotiation (STARTTLS, structured replies,
//!   `NBD_OPT_GO` with block sizes, `NBD_OPT_EXPORT_NAME` as the fallback); `info.rs`: what
//!   it learns about the export, and what a reconnection must keep of it;
//! * `tls.rs`: [`TlsClientCreds`], QEMU's client `tls-creds-x509` layout, with rustls;
//! * `socket.rs`, `transport.rs`: the byte stream, zero-copy `sendmsg`/`readv` on plain
//!   sockets, a shared rustls session with TLS;
//! * `cmd.rs`: an operation and the commands it is split into;
//! * `conn.rs`: one connection, its send path and its table of commands in flight;
//! * `reply.rs`: the reader thread's reply parsing (simple and structured replies);
//! * `reconnect.rs`: where commands go, `reconnect-delay`, the reconnecting supervisor.
//!
//! Threads: submitters (the queue threads) send their own requests, one at a time under the
//! connection's send lock; one reader thread per connection parses replies and completes
//! requests, from any number in flight (matched by cookie); one supervisor thread per client
//! reconnects. The server is untrusted: every length it sends is bounded, a reply is checked
//! against its request before any byte of it lands in guest memory, and a server breaking the
//! protocol only loses its connection.

mod cmd;
mod conn;
mod error;
mod handshake;
mod info;
mod reconnect;
mod reply;
mod socket;
mod tls;
mod transport;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::cmd::{Bufs, Cmd, Parent};
use self::conn::Conn;
use self::handshake::{establish, Attempt, Config};
use self::info::{ExportInfo, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES};
use self::reconnect::{Phase, Shared, RETRY_INTERVAL};
use super::location::{NbdSpec, RemoteSpec};
use super::{Completion, RemoteOp, RemoteStore};
use crate::block::ZeroOp;
use crate::nbd::wire::{
    CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, FLAG_READ_ONLY,
    FLAG_SEND_FLUSH, MAX_STRING,
};
use crate::thread::spawn_quiet;

pub use self::error::NbdClientError;
pub use self::tls::{client_creds, register_client_creds, unregister_client_creds, TlsClientCreds};

/// The most a trim or write-zeroes command covers: they carry no payload, so the server's
/// maximum payload does not bound them (proto.md, "Size constraints"), only the 32-bit length
/// does. 1 GiB is a multiple of every minimum block size (at most 64 KiB).
const ZERO_CHUNK: u64 = 1 << 30;

/// A connection to one NBD export. See the module documentation.
pub struct NbdClient {
    shared: Arc<Shared>,
    supervisor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("server", &self.shared.cfg.name)
            .field("size", &self.shared.info.size)
            .finish()
    }
}

impl NbdClient {
    /// Connect to `spec`'s export, retrying for up to `spec.open_timeout` (0: one try), do
    /// the handshake, and start the reader and reconnecting threads. With `tls`, the
    /// connection is TLS from the first option on; `spec.tls_creds` names the credentials the
    /// caller loaded (it must not be set without them). `read_only` refuses writes here, as a
    /// read-only export does.
    pub fn connect(
        spec: &NbdSpec,
        read_only: bool,
        tls: Option<TlsClientCreds>,
    ) -> Result<NbdClient, NbdClientError> {
        let name = RemoteSpec::Nbd(spec.clone()).to_string();
        if spec.export.len() > MAX_STRING {
            return Err(NbdClientError::ExportNameTooLong {
                server: name,
                len: spec.export.len(),
            });
        }
        if let (Some(id), None) = (&spec.tls_creds, &tls) {
            return Err(NbdClientError::TlsCredsMissing {
                server: name,
                id: id.clone(),
            });
        }
        let tls = match tls {
            Some(creds) => Some((creds, tls::server_name(spec, &name)?)),
            None => None,
        };
        let cfg = Config {
            name,
            spec: spec.clone(),
            tls,
        };
        let (wire, info) = first_connection(&cfg)?;
        log::info!(
            "{}: connected, {} bytes{}{}, block sizes {}/{}/{}",
            cfg.name,
            info.size,
            if info.has(FLAG_READ_ONLY) {
                ", read-only"
            } else {
                ""
            },
            if info.structured {
                ", structured replies"
            } else {
                ""
            },
            info.min_block,
            info.preferred_block,
            info.max_block
        );
        let conn = Arc::new(Conn::new(wire, info.clone()));
        let shared = Arc::new(Shared::new(cfg, info, read_only, conn.clone()));
        let reader = shared.spawn_reader(conn.clone())?;
        let sup = shared.clone();
        let supervisor = spawn_quiet("nbd-reconnect", move || sup.supervise(reader));
        match supervisor {
            Ok(h) => Ok(NbdClient {
                shared,
                supervisor: Some(h),
            }),
            Err(source) => {
                // Without a supervisor the reader is joined by nobody: let it go (it ends
                // once the socket is shut down and holds nothing but the connection).
                shared.lock().phase = Phase::Closing;
                conn.fail();
                Err(NbdClientError::Thread {
                    server: shared.cfg.name.clone(),
                    what: "reconnect",
                    source,
                })
            }
        }
    }

    /// The export's block size constraints (minimum, preferred, maximum payload; proto.md,
    /// `NBD_INFO_BLOCK_SIZE`): requests must be multiples of the minimum.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let i = &self.shared.info;
        (i.min_block, i.preferred_block, i.max_block)
    }

    /// The server as messages name it.
    pub fn name(&self) -> &str {
        &self.shared.cfg.name
    }

    /// Whether writes are refused (opened read-only, or a read-only export).
    pub fn read_only(&self) -> bool {
        self.shared.read_only || self.shared.info.has(FLAG_READ_ONLY)
    }

    /// The commands `op` becomes, or the errno it fails with before anything is sent.
    fn plan(&self, op: &RemoteOp) -> Result<Plan, i32> {
        let info = &self.shared.info;
        let aligned = |offset: u64, len: u64| {
            let min = u64::from(info.min_block);
            offset.is_multiple_of(min) && len.is_multiple_of(min)
        };
        // A range past the end: EINVAL, or ENOSPC for what writes (proto.md, "Error values").
        let in_export = |offset: u64, len: u64, past_end: i32| match offset.checked_add(len) {
            Some(end) if end <= info.size => Ok(()),
            _ => Err(past_end),
        };
        match *op {
            RemoteOp::Readv {
                offset,
                iov,
                iovcnt,
            }
            | RemoteOp::Writev {
                offset,
                iov,
                iovcnt,
            } => {
                let write = matches!(op, RemoteOp::Writev { .. });
                if write && self.read_only() {
                    return Err(libc::EROFS);
                }
                // SAFETY: the iovec array is valid until completion (submit's contract).
                let total = crate::iov::total_len(unsafe { op.iovecs() });
                in_export(
                    offset,
                    total,
                    if write { libc::ENOSPC } else { libc::EINVAL },
                )?;
                if !aligned(offset, total) {
                    return Err(libc::EINVAL);
                }
                Ok(Plan {
                    bufs: Bufs::Guest {
                        iov,
                        cnt: iovcnt as usize,
                    },
                    kind: if write { CMD_WRITE } else { CMD_READ },
                    flags: 0,
                    offset,
                    len: total,
                    chunk: info.max_transfer().into(),
                    success: total.min(i32::MAX as u64) as i32,
                })
            }
            // Without NBD_FLAG_SEND_FLUSH the client must not send a flush (proto.md,
            // "NBD_CMD_FLUSH"): the server says it has no volatile cache, every write it
            // acknowledged is already stable, so there is nothing to do. (A server that
            // caches writes without offering flush loses them on a crash whatever a client
            // does.)
            RemoteOp::Flush if info.has(FLAG_SEND_FLUSH) => Ok(Plan {
                kind: CMD_FLUSH,
                len: 1,
                ..Plan::nothing()
            }),
            RemoteOp::Flush => Ok(Plan::nothing()),
            RemoteOp::Zeroes { offset, len, op } => {
                if self.read_only() {
                    return Err(libc::EROFS);
                }
                let discard = op == ZeroOp::Discard;
                in_export(
                    offset,
                    len,
                    if discard { libc::EINVAL } else { libc::ENOSPC },
                )?;
                if !aligned(offset, len) {
                    return Err(libc::EINVAL);
                }
                let plan = Plan {
                    offset,
                    len,
                    chunk: ZERO_CHUNK,
                    ..Plan::nothing()
                };
                Ok(match op {
                    // Discard is advisory: a server without trim keeps the data, which is
                    // what a discard may do anyway.
                    ZeroOp::Discard if !info.has(FLAG_SEND_TRIM) => Plan::nothing(),
                    ZeroOp::Discard => Plan {
                        kind: CMD_TRIM,
                        ..plan
                    },
                    ZeroOp::WriteZeroes { unmap } if info.has(FLAG_SEND_WRITE_ZEROES) => Plan {
                        kind: CMD_WRITE_ZEROES,
                        flags: if unmap { 0 } else { CMD_FLAG_NO_HOLE },
                        ..plan
                    },
                    // No write-zeroes: write zeroes, a payload at a time.
                    ZeroOp::WriteZeroes { .. } => Plan {
                        bufs: Bufs::Zeroes,
                        kind: CMD_WRITE,
                        chunk: info.max_transfer().into(),
                        ..plan
                    },
                })
            }
        }
    }
}

/// How an operation is sent: `len` bytes from `offset` as commands of `kind` of at most
/// `chunk` bytes (a flush: one command, `len` 1 standing for it).
struct Plan {
    bufs: Bufs,
    kind: u16,
    flags: u16,
    offset: u64,
    len: u64,
    chunk: u64,
    success: i32,
}

impl Plan {
    /// Nothing to send: the operation succeeds at once.
    fn nothing() -> Plan {
        Plan {
            bufs: Bufs::None,
            kind: 0,
            flags: 0,
            offset: 0,
            len: 0,
            chunk: 1,
            success: 0,
        }
    }
}

impl RemoteStore for NbdClient {
    fn driver(&self) -> &'static str {
        "nbd"
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.shared.info.size)
    }

    fn min_block(&self) -> u64 {
        u64::from(self.shared.info.min_block)
    }

    fn grow_to(&self, size: u64) -> io::Result<()> {
        if size <= self.shared.info.size {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: NBD exports cannot grow (the export has {} bytes, {size} were asked for); \
                 resize it on the server and reopen it",
                self.shared.cfg.name, self.shared.info.size
            ),
        ))
    }

    unsafe fn submit(&self, op: RemoteOp, done: Completion) {
        let plan = match self.plan(&op) {
            Ok(p) => p,
            Err(errno) => return done.complete(-errno),
        };
        if plan.len == 0 {
            return done.complete(plan.success);
        }
        if plan.kind == CMD_FLUSH {
            let parent = Parent::new(Bufs::None, 1, 0, done);
            let cmd = Cmd {
                kind: CMD_FLUSH,
                flags: 0,
                offset: 0,
                len: 0,
                at: 0,
                parent,
            };
            return self.shared.dispatch(cmd);
        }
        let parts = plan.len.div_ceil(plan.chunk);
        let parent = Parent::new(plan.bufs, parts as usize, plan.success, done);
        let mut at = 0;
        while at < plan.len {
            let len = plan.chunk.min(plan.len - at);
            let cmd = Cmd {
                kind: plan.kind,
                flags: plan.flags,
                offset: plan.offset + at,
                len: len as u32,
                at,
                parent: parent.clone(),
            };
            self.shared.dispatch(cmd);
            at += len;
        }
    }
}

impl Drop for NbdClient {
    /// Fail what waits, leave the server politely when connected (`NBD_CMD_DISC`), and stop
    /// and join the threads; the reader fails what was in flight with EIO as it goes.
    fn drop(&mut self) {
        let (conn, waiting) = {
            let mut st = self.shared.lock();
            let old = std::mem::replace(&mut st.phase, Phase::Closing);
            self.shared.notify();
            let conn = match old {
                Phase::Connected(c) => Some(c),
                _ => None,
            };
            (conn, std::mem::take(&mut st.waiting))
        };
        for cmd in waiting {
            cmd.finish(libc::EIO);
        }
        self.shared.attempt.abort();
        if let Some(conn) = conn {
            conn.disconnect();
        }
        if let Some(h) = self.supervisor.take() {
            let _ = h.join();
        }
    }
}

/// The first connection: retried once a second until `open_timeout` passes (QEMU's
/// `open-timeout`; 0: one try).
fn first_connection(cfg: &Config) -> Result<(transport::Wire, ExportInfo), NbdClientError> {
    let timeout = cfg.spec.open_timeout;
    let deadline = Instant::now() + timeout;
    let attempt = Attempt::default();
    loop {
        match establish(cfg, &attempt) {
            Ok(c) => return Ok(c),
            Err(e) => {
                let now = Instant::now();
                if timeout.is_zero() {
                    return Err(e);
                }
                if now >= deadline {
                    return Err(NbdClientError::OpenTimeout {
                        secs: timeout.as_secs(),
                        last: Box::new(e),
                    });
                }
                log::debug!("{e}; retrying (open-timeout={} s)", timeout.as_secs());
                std::thread::sleep(
                    RETRY_INTERVAL
                        .min(deadline - now)
                        .max(Duration::from_millis(1)),
                );
            }
        }
    }
}
