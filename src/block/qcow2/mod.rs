//! The `qcow2` format node (docs/interop/qcow2.txt is the contract).
//!
//! Children: the image file (metadata, and data unless there is an external data file), the
//! external data file (always opened as raw), and an optional read-only backing node.
//!
//! One struct, [`Qcow2Node`], with its `impl` spread over files by concern, as in imago and in
//! QEMU's `block/qcow2-*.c`:
//!
//! | File | Concern |
//! | --- | --- |
//! | `open.rs` | opening: header, children, stored names, preparing for writes |
//! | `identity.rs` | the raw-data-file fast path (no lock, no table lookup) |
//! | `l2.rs` | L1/L2 tables: lookup, allocation of tables, the L2 cache |
//! | `map.rs` | mapping guest ranges for reads and in-place writes |
//! | `cow.rs` | allocating writes (copy-on-write), zeroes and discards, crash-ordered write-back |
//! | `header.rs`, `entry.rs`, `units.rs` | on-disk formats and typed units |
//! | `cache.rs`, `refcount.rs` | the table cache and host cluster refcounts |
//! | `bitmaps.rs`, `check.rs`, `create.rs`, `compress.rs` | bitmaps, check/repair, create, compression |
//!
//! Concurrency: everything that reads or changes metadata happens under one short lock
//! ([`Meta`]); data I/O happens outside it, in the queue threads. With a raw external data file
//! (`data_file_raw`) every allocated guest cluster lives at the identical offset of the data
//! file, and an atomic per-cluster bitmap of clusters known to be mapped that way lets reads
//! and writes skip the lock entirely: that is vubd's fast path.
//!
//! Crash ordering follows QEMU: a cluster's refcount and a copy-on-write cluster's data reach
//! the disk before the L2 entry that uses them, and a cluster is only freed once the L2 entry
//! that dropped it is on disk (and no request can still be doing I/O to it).

mod bitmap_store;
mod bitmaps;
mod cache;
pub mod check;
mod compress;
mod count;
mod cow;
pub mod create;
mod entry;
pub mod header;
mod identity;
mod l2;
mod layout;
mod map;
mod open;
mod overlap;
mod rebuild;
mod refcount;
mod resize;
mod snapshot;
mod status;
mod units;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use super::file::FileNode;
use super::{
    Allocation, BlockDriver, BlockError, ErrorKind, Extent, FileId, GuestIo, HostZeroOp, IoTicket,
    ZeroOp,
};
use cache::TableCache;
use entry::EntryFormat;
use header::{CompressionType, Header, HeaderError};
use identity::IdentityMap;
use refcount::Refcounts;
use units::{GuestCluster, HostCluster, HostOffset};

pub use open::resolve_stored_name;

/// Errors of the qcow2 driver. [`Qcow2Error::kind`] classifies them; the node adds its path
/// when it turns one into a [`BlockError`].
#[derive(Debug, Error)]
pub enum Qcow2Error {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("the image is marked corrupt: serve it with --readonly, or repair it with 'vubd check --repair'")]
    MarkedCorrupt,
    #[error("the image has an external data file but does not name it; pass --data-file PATH")]
    DataFileUnnamed,
    #[error("--data-file given, but the image has no external data file")]
    NoExternalDataFile,
    #[error("the data file ({data_size} bytes) is smaller than the virtual disk of {image} ({disk_size} bytes)")]
    DataFileTooSmall {
        data_size: u64,
        image: PathBuf,
        disk_size: u64,
    },
    #[error("the image names its {what} '{name}', which vubd does not follow ({why}); pass {option} PATH to use a file explicitly")]
    StoredName {
        what: &'static str,
        name: String,
        why: &'static str,
        option: &'static str,
    },
    #[error("the backing file '{0}' has no recorded format and vubd never guesses one; pass --backing PATH --backing-format FORMAT")]
    BackingFormatUnknown(String),
    #[error("unsupported backing file format '{0}'")]
    BackingFormatUnsupported(String),
    #[error("a backing file conflicts with a raw external data file (data_file_raw)")]
    BackingWithRawDataFile,
    #[error("backing chain deeper than {0} images")]
    BackingTooDeep(usize),
    #[error("the image is read-only")]
    ReadOnly,
    #[error("a header write failed, so the image holds either its old or its new header; writes are refused until it is opened again")]
    HeaderUnknown,
    #[error("cannot read the L1 table")]
    L1Unreadable(#[source] io::Error),
    #[error("guest offset beyond the L1 table (L1 index {0})")]
    BeyondL1(u64),
    #[error("invalid L1 entry {0:#x}")]
    InvalidL1Entry(u64),
    #[error("invalid L2 entry {raw:#x} for guest cluster {}", cluster.0)]
    InvalidL2Entry { raw: u64, cluster: GuestCluster },
    #[error("L2 entry {raw:#x} maps guest cluster {} elsewhere in the data file", cluster.0)]
    MisplacedExternalData { raw: u64, cluster: GuestCluster },
    #[error("compressed cluster at {:#x} does not decompress", .0 .0)]
    BadCompressedCluster(HostOffset),
    #[error("refcount block offset {0:#x} is not cluster aligned")]
    MisalignedRefcountBlock(u64),
    #[error("refcount of host cluster {} overflows", .0 .0)]
    RefcountOverflow(HostCluster),
    #[error("refcount of host cluster {} underflows", .0 .0)]
    RefcountUnderflow(HostCluster),
    #[error("no room for refcount block {0}")]
    NoRoomForRefcountBlock(u64),
    #[error("the refcount table at {0:#x} lies outside the image")]
    RefcountTableOutside(u64),
    #[error("refcount block at {0:#x} is not cluster aligned or lies outside the image")]
    InvalidRefcountBlock(u64),
    #[error("no free run of {0} clusters could be allocated")]
    AllocationFailed(u64),
    #[error("the refcount table would exceed QEMU's limit of 8 MiB")]
    RefcountTableFull,
    #[error("Preventing invalid write on metadata (overlaps with {kind}) at {offset:#x}; image marked as corrupt")]
    MetadataOverlap { offset: u64, kind: overlap::Kind },
    #[error("snapshot table")]
    Snapshots(#[from] snapshot::SnapshotError),
    #[error("the data file is the image file itself")]
    DataFileIsImage,
    #[error("bitmap directory")]
    BitmapDirectory(#[from] bitmaps::DirectoryError),
    #[error(transparent)]
    Resize(#[from] resize::ResizeError),
    /// An error of a child node, which names its own file.
    #[error(transparent)]
    Child(Box<BlockError>),
}

impl Qcow2Error {
    pub fn kind(&self) -> ErrorKind {
        use Qcow2Error::*;
        match self {
            Io(_) | L1Unreadable(_) => ErrorKind::Io,
            Header(HeaderError::ExtendedL2 | HeaderError::Encrypted)
            | Header(HeaderError::UnknownIncompatible(_) | HeaderError::Version(_))
            | Header(HeaderError::CompressionType(_))
            | BackingFormatUnsupported(_) => ErrorKind::Unsupported,
            Header(_)
            | BeyondL1(_)
            | InvalidL1Entry(_)
            | InvalidL2Entry { .. }
            | MisplacedExternalData { .. }
            | BadCompressedCluster(_)
            | MisalignedRefcountBlock(_)
            | RefcountOverflow(_)
            | RefcountUnderflow(_)
            | NoRoomForRefcountBlock(_)
            | RefcountTableOutside(_)
            | InvalidRefcountBlock(_)
            | AllocationFailed(_)
            | MetadataOverlap { .. }
            | Snapshots(_)
            | BitmapDirectory(_) => ErrorKind::Corrupt,
            RefcountTableFull => ErrorKind::Unsupported,
            MarkedCorrupt
            | DataFileUnnamed
            | NoExternalDataFile
            | DataFileTooSmall { .. }
            | StoredName { .. }
            | BackingFormatUnknown(_)
            | BackingWithRawDataFile
            | BackingTooDeep(_)
            | DataFileIsImage
            | Resize(_)
            | ReadOnly => ErrorKind::Refused,
            HeaderUnknown => ErrorKind::Io,
            Child(e) => e.kind(),
        }
    }

    /// The block error of image `path`.
    pub fn at(self, path: &Path) -> BlockError {
        match self {
            // The child named its own file; keep that.
            Qcow2Error::Child(e) => (*e).with_path(path),
            e => BlockError::new(e.kind(), e).with_path(path),
        }
    }
}

impl From<BlockError> for Qcow2Error {
    fn from(e: BlockError) -> Self {
        Qcow2Error::Child(Box::new(e))
    }
}

/// A read-only backing node and where its files sit in our file list.
struct Backing {
    node: Arc<dyn BlockDriver>,
    first_file: FileId,
    size: u64,
}

/// Metadata state, under the node's lock.
pub(crate) struct Meta {
    header: Header,
    /// Raw L1 entries.
    l1: Vec<u64>,
    l2: TableCache,
    refcounts: Refcounts,
    /// Host clusters that lose one reference once the L2 change dropping them is on disk, and
    /// what metadata they held (an L2 table), if any.
    pending_free: Vec<(HostCluster, overlap::Kind)>,
    /// Refcounts or copy-on-write data were written since the last sync.
    unsynced: bool,
}

/// A qcow2 image.
pub struct Qcow2Node {
    path: PathBuf,
    files: Vec<Arc<FileNode>>,
    meta_file: Arc<FileNode>,
    /// Where guest clusters live: the external data file, or the image file (opened with
    /// O_DIRECT when asked).
    data_file: Arc<FileNode>,
    data_fid: FileId,
    backing: Option<Backing>,
    /// The virtual disk's size: the header's, changed only by a resize (under the lock).
    size: AtomicU64,
    cluster_bits: u32,
    format: EntryFormat,
    compression: CompressionType,
    read_only: bool,
    /// The raw-data-file fast path's map of identity-mapped clusters.
    fast: Option<IdentityMap>,
    meta: Mutex<Meta>,
    /// Requests mapped to clusters of the image file whose data I/O is still running.
    in_flight: AtomicUsize,
    /// A write was refused for overlapping metadata: the image is marked corrupt and the node
    /// takes no more writes.
    corrupt: AtomicBool,
    /// A header switch failed to reach the disk: which header the file holds is unknown, so
    /// the node takes no more writes until the image is opened again.
    header_unknown: AtomicBool,
}

impl fmt::Debug for Qcow2Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Node")
            .field("path", &self.path)
            .field("size", &self.disk_size())
            .field("cluster_bits", &self.cluster_bits)
            .field("external_data", &self.format.external_data)
            .field("data_file_raw", &self.fast.is_some())
            .finish()
    }
}

impl Qcow2Node {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The virtual disk's size now.
    pub(crate) fn disk_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Entries per L2 table.
    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Rewrite cluster 0's header, extensions and backing name from `meta.header`.
    pub(crate) fn write_header(&self, meta: &mut Meta) -> Result<(), Qcow2Error> {
        let (table_offset, table_clusters) = meta.refcounts.table_location();
        meta.header.refcount_table_offset = table_offset.0;
        meta.header.refcount_table_clusters = table_clusters as u32;
        let bytes = meta.header.serialize()?;
        self.check_metadata_write(
            meta,
            HostOffset(0),
            bytes.len() as u64,
            overlap::Kind::Header,
        )?;
        self.meta_file.write_all_at(&bytes, 0)?;
        self.meta_file.sync_data()?;
        Ok(())
    }

    fn err(&self, e: Qcow2Error) -> BlockError {
        e.at(&self.path)
    }

    /// The error of a write path; a write refused for overlapping metadata marks the image
    /// corrupt and turns the node read-only, as QEMU does.
    fn write_err(&self, meta: &mut Meta, e: Qcow2Error) -> BlockError {
        if matches!(e, Qcow2Error::MetadataOverlap { .. }) {
            self.mark_corrupt(meta, &e);
        }
        self.err(e)
    }

    /// Set the corrupt bit on disk (only the incompatible-features field is written, so that
    /// a header cluster other structures claim is not rewritten) and refuse writes from now on.
    fn mark_corrupt(&self, meta: &mut Meta, why: &Qcow2Error) {
        if self.corrupt.swap(true, Ordering::AcqRel) {
            return;
        }
        log::error!("{}: {why}", self.path.display());
        if meta.header.version < 3 {
            return;
        }
        meta.header.incompatible_features |= header::incompatible::CORRUPT;
        let bytes = meta.header.incompatible_features.to_be_bytes();
        if let Err(e) = self
            .meta_file
            .write_all_at(&bytes, header::INCOMPATIBLE_FEATURES_OFFSET)
            .and_then(|()| self.meta_file.sync_data())
        {
            log::error!("{}: marking the image corrupt: {e}", self.path.display());
        }
    }

    /// Refuse writes once the image is marked corrupt.
    fn writable(&self) -> Result<(), Qcow2Error> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly);
        }
        if self.corrupt.load(Ordering::Acquire) {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        if self.header_unknown.load(Ordering::Acquire) {
            return Err(Qcow2Error::HeaderUnknown);
        }
        Ok(())
    }

    /// Refuse guest data written into metadata of the image file.
    fn check_data_write(&self, meta: &Meta, host: HostOffset, len: u64) -> Result<(), Qcow2Error> {
        if self.format.external_data {
            // The data file holds no metadata (it is never the image file: see open).
            return Ok(());
        }
        match meta.refcounts.map().data_overlap(host, len) {
            Some((cluster, kind)) => Err(Qcow2Error::MetadataOverlap {
                offset: cluster.offset(self.cluster_bits).0,
                kind,
            }),
            None => Ok(()),
        }
    }
}

impl BlockDriver for Qcow2Node {
    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.disk_size()
    }

    fn read_only(&self) -> bool {
        self.read_only
            || self.corrupt.load(Ordering::Acquire)
            || self.header_unknown.load(Ordering::Acquire)
    }

    fn files(&self) -> &[Arc<FileNode>] {
        &self.files
    }

    fn grow(&self, size: u64) -> Result<(), BlockError> {
        self.grow_disk(size, None)
            .map(drop)
            .map_err(|e| self.err(e))
    }

    fn map_read(
        &self,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<IoTicket, BlockError> {
        if self.map_identity(offset, len, out) {
            return Ok(IoTicket::NONE);
        }
        let mut meta = self.lock();
        // Count the request before unlocking, so a free cannot slip in between.
        let tracked = self
            .map_read_locked(&mut meta, offset, len, guest, out)
            .map_err(|e| self.err(e))?;
        Ok(self.ticket(tracked))
    }

    fn map_write(
        &self,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<IoTicket, BlockError> {
        self.writable().map_err(|e| self.err(e))?;
        if self.map_identity(offset, len, out) {
            return Ok(IoTicket::NONE);
        }
        let mut meta = self.lock();
        let tracked = match self.map_write_locked(&mut meta, offset, len, guest, out) {
            Ok(tracked) => tracked,
            Err(e) => return Err(self.write_err(&mut meta, e)),
        };
        Ok(self.ticket(tracked))
    }

    fn release(&self, ticket: IoTicket, _ok: bool) {
        if ticket.tracked {
            self.untrack();
        }
    }

    fn map_zeroes(
        &self,
        offset: u64,
        len: u64,
        op: ZeroOp,
        out: &mut Vec<HostZeroOp>,
    ) -> Result<(), BlockError> {
        self.writable().map_err(|e| self.err(e))?;
        let mut meta = self.lock();
        self.map_zeroes_locked(&mut meta, offset, len, op, out)
            .map_err(|e| self.write_err(&mut meta, e))
    }

    fn flush_metadata(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        let mut meta = self.lock();
        self.write_back(&mut meta)
            .map_err(|e| self.write_err(&mut meta, e))
    }

    fn data_file(&self) -> Option<&Arc<FileNode>> {
        self.format.external_data.then_some(&self.data_file)
    }

    fn bitmap_store(self: Arc<Self>) -> Option<Arc<dyn crate::bitmap::BitmapStore>> {
        Some(self)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(u64, Allocation), BlockError> {
        self.status(offset, len)
    }

    fn allocation_unit(&self) -> Option<u64> {
        Some(self.cluster_size())
    }

    fn discard_granularity(&self) -> u64 {
        if self.fast.is_some() {
            4096
        } else {
            self.cluster_size()
        }
    }
}
