//! The block-driver graph.
//!
//! A guest request enters at a *format* node ([`raw`], and qcow2 later), which decides where
//! each byte lives, and reaches *protocol* nodes ([`file::FileNode`]) that hold the bytes. A node
//! knows only its children. Format nodes do not move data themselves: they translate a guest
//! range into [`Extent`]s on files, and the queue thread's [`io::Engine`] performs the data I/O.
//! That split keeps the fast path free of locks: mapping is a short, in-memory step and the
//! data transfer runs without holding anything.

pub mod file;
pub mod io;
pub mod raw;

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use file::{FileError, FileNode, FileOptions};

/// Index of a protocol node in [`BlockDriver::files`].
pub type FileId = usize;

/// Where a stretch of guest data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// At `offset` in protocol node `file`.
    Data { file: FileId, offset: u64 },
    /// Nowhere: the range reads as zeroes.
    Zero,
}

/// A run of guest bytes with one mapping. A request's extents cover it in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub mapping: Mapping,
}

/// What a discard or write-zeroes asks of a protocol node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroOp {
    /// Deallocate if possible; the contents become unspecified.
    Discard,
    /// Make the range read as zeroes; with `unmap`, deallocating is allowed.
    WriteZeroes { unmap: bool },
}

/// One operation on a protocol node for a discard or write-zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostZeroOp {
    pub file: FileId,
    pub offset: u64,
    pub len: u64,
    pub op: ZeroOp,
}

/// Errors of the block layer.
#[derive(Debug, Error)]
pub enum BlockError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// A format node: what the guest sees as its disk.
pub trait BlockDriver: Send + Sync + Debug {
    /// The format's name as QEMU spells it (`raw`, `qcow2`).
    fn format(&self) -> &'static str;

    /// Virtual disk size in bytes.
    fn size(&self) -> u64;

    fn read_only(&self) -> bool;

    /// The protocol nodes under this node; [`Mapping::Data`] names them by index.
    fn files(&self) -> &[Arc<FileNode>];

    /// Map `[offset, offset + len)` for reading. Appends extents covering the range in order.
    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BlockError>;

    /// Map `[offset, offset + len)` for writing, allocating where needed. Every extent returned
    /// is [`Mapping::Data`].
    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BlockError>;

    /// Translate a discard or write-zeroes of `[offset, offset + len)` into protocol node
    /// operations, updating the node's own metadata first.
    fn map_zeroes(
        &self,
        offset: u64,
        len: u64,
        op: ZeroOp,
        out: &mut Vec<HostZeroOp>,
    ) -> Result<(), BlockError>;

    /// Write back cached metadata; called before the files are synced on a guest flush and on
    /// shutdown.
    fn flush_metadata(&self) -> Result<(), BlockError> {
        Ok(())
    }

    /// The smallest unit a discard can free, in bytes.
    fn discard_granularity(&self) -> u64;
}

/// The image formats vubd serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
}

/// Open `path` as a format node of `format` over a `file` protocol node.
pub fn open_image(
    path: &Path,
    format: Format,
    options: FileOptions,
) -> Result<Arc<dyn BlockDriver>, BlockError> {
    let file = Arc::new(FileNode::open(path, options)?);
    match format {
        Format::Raw => Ok(Arc::new(raw::RawNode::new(file))),
    }
}
