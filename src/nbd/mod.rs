//! An NBD server for read-only exports: the protocol side of pull-mode backup.
//!
//! The block-graph side implements [`ExportSource`] (a point-in-time view of a disk, its
//! allocation and its dirty bitmaps); [`NbdServer`] listens on a UNIX or TCP socket and serves
//! every source added with [`NbdServer::add_export`] to clients such as nbdinfo, nbdcopy,
//! qemu-img and virtnbdbackup, following the NBD protocol
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>, "proto.md" below):
//!
//! * fixed newstyle handshake only, with `NBD_FLAG_NO_ZEROES` (`handshake.rs`);
//! * options `EXPORT_NAME`, `ABORT`, `LIST`, `STARTTLS`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//!   `LIST_META_CONTEXT`, `SET_META_CONTEXT` with the contexts `base:allocation` and
//!   `qemu:dirty-bitmap:NAME`; extended headers are not offered;
//! * commands `READ`, `DISC`, `FLUSH`, `CACHE`, `BLOCK_STATUS` with simple or structured
//!   replies; writes are refused with `EPERM` (`transmission.rs`);
//! * TLS with rustls from QEMU's `tls-creds-x509` directory layout (`tls.rs`);
//! * a thread per connection, a connection limit, a handshake deadline, and bounds on every
//!   length a client sends (`server.rs`).
//!
//! Clients are untrusted (network peers): every length is checked before it is used, nothing
//! is allocated by a size a client chose beyond the bounds in `proto.rs`, and a malformed
//! client only ends its own connection.

mod conn;
mod handshake;
mod proto;
mod server;
pub(crate) mod socket;
mod tls;
mod transmission;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

pub use conn::{serve_stream, Transcript, Transmission};
pub use server::{ListenAddr, NbdServer, ServerOptions};
pub use tls::TlsCreds;

/// Wire constants, public for tests and the fuzz target that speak the protocol by hand.
#[doc(hidden)]
pub mod wire {
    pub use super::proto::*;
}

/// What an export serves. Implemented by the graph side; tests implement it over memory.
///
/// Called from connection threads, several at once for a source exported to several clients.
pub trait ExportSource: Send + Sync + 'static {
    /// The export's size in bytes.
    fn size(&self) -> u64;
    /// Read exactly `buf.len()` bytes at `offset` (always within `size()`).
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// `base:allocation`: append `(length, flags)` extents starting at `offset`, covering at
    /// least 1 byte and at most `len` bytes, flags `NBD_STATE_HOLE` (1) | `NBD_STATE_ZERO` (2).
    fn allocation(&self, offset: u64, len: u64, out: &mut Vec<(u64, u32)>) -> io::Result<()>;
    /// Names of the dirty bitmaps exported ("NAME" → context "qemu:dirty-bitmap:NAME").
    fn bitmaps(&self) -> Vec<String>;
    /// Extents of bitmap number `index` (into `bitmaps()`), flags 1 = dirty, same covering
    /// rules as [`ExportSource::allocation`].
    fn dirty(
        &self,
        index: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<(u64, u32)>,
    ) -> io::Result<()>;
}

/// What the NBD server's management calls can fail with. Messages follow QEMU's wording
/// where QEMU has one.
#[derive(Debug, Error)]
pub enum NbdError {
    /// `add_export` with a name already exported.
    #[error("NBD server already has export named '{0}'")]
    ExportExists(String),
    /// An export name the protocol cannot carry (longer than 4096 bytes, or with a NUL).
    #[error("export name '{0}' is invalid: at most 4096 bytes and no NUL character")]
    InvalidName(String),
    /// `remove_export` / `connections` of a name not exported.
    #[error("Export '{0}' is not found")]
    NoSuchExport(String),
    /// `remove_export` in safe mode while clients are connected to it.
    #[error("export '{0}' still in use")]
    InUse(String),
    /// The listening socket could not be created.
    #[error("Failed to bind socket {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    /// A TCP host/port that does not resolve.
    #[error("address resolution failed for {addr}: {source}")]
    Resolve { addr: String, source: io::Error },
    /// A file of the TLS credentials directory is missing or unusable.
    #[error("TLS credentials {}: {reason}", path.display())]
    Tls { path: PathBuf, reason: String },
    /// A thread could not be started.
    #[error("cannot start the NBD server's {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: io::Error,
    },
}

/// An export as the registry keeps it.
pub(crate) struct ExportEntry {
    pub name: String,
    pub description: Option<String>,
    pub source: Arc<dyn ExportSource>,
}

#[cfg(test)]
mod tests;
