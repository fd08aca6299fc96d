//! The `qcow2` format node (docs/interop/qcow2.txt is the contract).
//!
//! Children: the image file (metadata, and data unless there is an external data file), the
//! external data file (always opened as raw), and an optional read-only backing node.
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

mod bitmaps;
mod cache;
pub mod check;
mod compress;
pub mod create;
mod entry;
pub mod header;
mod refcount;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use super::file::{FileNode, FileOptions};
use super::{
    open_image, BackingChoice, BlockDriver, BlockError, Extent, FileId, Format, GuestIo,
    HostZeroOp, IoTicket, Mapping, OpenOptions, ZeroOp,
};
use cache::TableCache;
use entry::{decode_l1, encode_normal, encode_zero, EntryFormat, L2Entry, COPIED};
use header::{autoclear, extension, incompatible, CompressionType, Header, HeaderError};
use refcount::Refcounts;

/// Deepest backing chain vubd follows (a loop in names would otherwise never end).
const MAX_BACKING_DEPTH: usize = 16;
/// Refcount blocks kept in memory.
const REFCOUNT_CACHE_TABLES: usize = 64;
/// Default upper bound of the L2 cache.
const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;

/// Errors of the qcow2 driver.
#[derive(Debug, Error)]
pub enum Qcow2Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Header(#[from] HeaderError),
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Child(Box<BlockError>),
}

impl Qcow2Error {
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Qcow2Error::Corrupt(msg.into())
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
    /// Host clusters that lose one reference once the L2 change dropping them is on disk.
    pending_free: Vec<u64>,
    /// Refcounts or copy-on-write data were written since the last sync.
    unsynced: bool,
}

/// Clusters of a raw external data file known to be allocated at their identical offset.
struct IdentityMap {
    cluster_bits: u32,
    words: Vec<AtomicU64>,
}

impl IdentityMap {
    fn new(size: u64, cluster_bits: u32) -> Self {
        let clusters = size.div_ceil(1 << cluster_bits);
        IdentityMap {
            cluster_bits,
            words: (0..clusters.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn is_set(&self, cluster: u64) -> bool {
        let word = &self.words[(cluster / 64) as usize];
        word.load(Ordering::Acquire) & (1 << (cluster % 64)) != 0
    }

    fn set(&self, cluster: u64) {
        self.words[(cluster / 64) as usize].fetch_or(1 << (cluster % 64), Ordering::Release);
    }

    /// Whether every cluster of `[offset, offset + len)` is mapped at its own offset.
    fn covers(&self, offset: u64, len: u64) -> bool {
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        (first..=last).all(|c| self.is_set(c))
    }
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
    size: u64,
    cluster_bits: u32,
    format: EntryFormat,
    compression: CompressionType,
    read_only: bool,
    fast: Option<IdentityMap>,
    meta: Mutex<Meta>,
    /// Requests mapped to clusters of the image file whose data I/O is still running.
    in_flight: AtomicUsize,
}

impl fmt::Debug for Qcow2Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Node")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("cluster_bits", &self.cluster_bits)
            .field("external_data", &self.format.external_data)
            .field("data_file_raw", &self.fast.is_some())
            .finish()
    }
}

/// One piece of a request within a single guest cluster.
#[derive(Clone, Copy, Debug)]
struct Piece {
    /// Guest cluster index.
    cluster: u64,
    /// Offset inside the cluster.
    within: u64,
    len: u64,
    /// Offset of the piece inside the request.
    at: u64,
}

fn pieces(offset: u64, len: u64, cluster_bits: u32) -> impl Iterator<Item = Piece> {
    let cluster_size = 1u64 << cluster_bits;
    let mut at = 0u64;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at;
        let within = pos & (cluster_size - 1);
        let n = (cluster_size - within).min(len - at);
        let piece = Piece {
            cluster: pos >> cluster_bits,
            within,
            len: n,
            at,
        };
        at += n;
        Some(piece)
    })
}

/// Append `extent`, merging it into the previous one when they continue each other.
fn push_extent(out: &mut Vec<Extent>, extent: Extent) {
    if let Some(last) = out.last_mut() {
        let merged = match (last.mapping, extent.mapping) {
            (Mapping::Data { file: a, offset: o }, Mapping::Data { file: b, offset: p }) => {
                a == b && o + last.len == p
            }
            (Mapping::Zero, Mapping::Zero) | (Mapping::Filled, Mapping::Filled) => true,
            _ => false,
        };
        if merged {
            last.len += extent.len;
            return;
        }
    }
    out.push(extent);
}

/// A name stored in an image (data file, backing file) as a path next to the image, or an
/// error if vubd must not follow it on its own.
pub fn resolve_stored_name(
    image: &Path,
    name: &str,
    what: &str,
    option: &str,
) -> Result<PathBuf, BlockError> {
    let refuse = |why: &str| BlockError::Invalid {
        path: image.display().to_string(),
        reason: format!(
            "the image names its {what} '{name}', which vubd does not follow ({why}); \
             pass {option} PATH to use a file explicitly"
        ),
    };
    if name.is_empty() {
        return Err(refuse("empty name"));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Err(refuse("absolute path"));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(refuse("it contains '..'"));
    }
    let prefix_end = name.find(':');
    let slash = name.find('/').unwrap_or(usize::MAX);
    if let Some(colon) = prefix_end.filter(|c| *c < slash) {
        let prefix = &name[..colon];
        if prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+.-_".contains(c))
        {
            return Err(refuse("a json: or protocol prefix"));
        }
    }
    Ok(image.parent().unwrap_or(Path::new(".")).join(p))
}

impl Qcow2Node {
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Qcow2Node, BlockError> {
        Self::open_at_depth(path, options, 0)
    }

    fn open_at_depth(
        path: &Path,
        options: &OpenOptions,
        depth: usize,
    ) -> Result<Qcow2Node, BlockError> {
        let wrap = |e: Qcow2Error| BlockError::Qcow2 {
            path: path.display().to_string(),
            source: e,
        };
        let meta_file = Arc::new(FileNode::open(
            path,
            FileOptions {
                read_only: options.read_only,
                direct: false,
                lock: options.lock_request(),
            },
        )?);
        let header = read_header(&meta_file).map_err(wrap)?;
        if header.incompatible_features & incompatible::CORRUPT != 0
            && !options.read_only
            && !options.repair
        {
            return Err(wrap(Qcow2Error::Unsupported(
                "the image is marked corrupt: serve it with --readonly, or repair it with \
                 'vubd check --repair'"
                    .into(),
            )));
        }
        let external = header.has_data_file();
        let data_raw = header.data_file_raw();
        let cluster_bits = header.cluster_bits;

        let data_file = if external {
            let data_path = match &options.data_file {
                Some(p) => p.clone(),
                None => {
                    let name = header
                        .string_extension(extension::DATA_FILE)
                        .ok_or_else(|| {
                            wrap(Qcow2Error::Unsupported(
                                "the image has an external data file but does not name it; pass \
                             --data-file PATH"
                                    .into(),
                            ))
                        })?;
                    resolve_stored_name(path, &name, "data file", "--data-file")?
                }
            };
            let file = FileNode::open(
                &data_path,
                FileOptions {
                    read_only: options.read_only,
                    direct: options.direct,
                    lock: options.lock_request(),
                },
            )?;
            if file.size() < header.size {
                return Err(BlockError::Invalid {
                    path: data_path.display().to_string(),
                    reason: format!(
                        "the data file ({} bytes) is smaller than the virtual disk of {} ({} bytes)",
                        file.size(),
                        path.display(),
                        header.size
                    ),
                });
            }
            Arc::new(file)
        } else {
            if options.data_file.is_some() {
                return Err(wrap(Qcow2Error::Unsupported(
                    "--data-file given, but the image has no external data file".into(),
                )));
            }
            if options.direct {
                Arc::new(FileNode::open(
                    path,
                    FileOptions {
                        read_only: options.read_only,
                        direct: true,
                        // The same file as `meta_file`, which holds the lock.
                        lock: None,
                    },
                )?)
            } else {
                meta_file.clone()
            }
        };

        let mut files = vec![meta_file.clone()];
        let data_fid = if Arc::ptr_eq(&data_file, &meta_file) {
            0
        } else {
            files.push(data_file.clone());
            1
        };

        let backing = Self::open_backing(path, &header, options, depth, files.len())?;
        if let Some(b) = &backing {
            files.extend(b.node.files().iter().cloned());
        }

        let l1 = read_l1(&meta_file, &header).map_err(wrap)?;
        let refcounts = Refcounts::load(
            &meta_file,
            cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters),
            REFCOUNT_CACHE_TABLES,
        )
        .map_err(wrap)?;
        let cluster_size = 1u64 << cluster_bits;
        let l2_tables_for_disk = header
            .size
            .div_ceil(cluster_size)
            .div_ceil(cluster_size / 8);
        let l2_cache_bytes = options
            .l2_cache_bytes
            .unwrap_or(DEFAULT_L2_CACHE_BYTES.min(l2_tables_for_disk * cluster_size));
        let l2 = TableCache::new(
            cluster_size as usize,
            (l2_cache_bytes / cluster_size).max(2) as usize,
        );
        let node = Qcow2Node {
            path: path.to_path_buf(),
            files,
            meta_file,
            data_file,
            data_fid,
            backing,
            size: header.size,
            cluster_bits,
            format: EntryFormat {
                cluster_bits,
                version: header.version,
                external_data: external,
            },
            compression: header.compression(),
            read_only: options.read_only,
            fast: data_raw.then(|| IdentityMap::new(header.size, cluster_bits)),
            meta: Mutex::new(Meta {
                header,
                l1,
                l2,
                refcounts,
                pending_free: Vec::new(),
                unsynced: false,
            }),
            in_flight: AtomicUsize::new(0),
        };
        if !options.read_only {
            node.prepare_for_writing().map_err(wrap)?;
        }
        node.prefill_identity_map().map_err(wrap)?;
        Ok(node)
    }

    fn open_backing(
        path: &Path,
        header: &Header,
        options: &OpenOptions,
        depth: usize,
        first_file: FileId,
    ) -> Result<Option<Backing>, BlockError> {
        let invalid = |reason: String| BlockError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let (backing_path, format) = match (&options.backing, &header.backing_file) {
            (BackingChoice::Use(p, f), _) => (p.clone(), *f),
            (BackingChoice::Disabled, _) | (BackingChoice::FromImage, None) => return Ok(None),
            (BackingChoice::FromImage, Some(name)) => {
                let resolved = resolve_stored_name(path, name, "backing file", "--backing")?;
                let format = match header.string_extension(extension::BACKING_FORMAT) {
                    Some(f) => Format::from_name(&f)
                        .ok_or_else(|| invalid(format!("unsupported backing file format '{f}'")))?,
                    None => {
                        return Err(invalid(format!(
                            "the backing file '{name}' has no recorded format and vubd never \
                             guesses one; pass --backing PATH --backing-format FORMAT"
                        )))
                    }
                };
                (resolved, format)
            }
        };
        if header.data_file_raw() {
            return Err(invalid(
                "a backing file conflicts with a raw external data file (data_file_raw)".into(),
            ));
        }
        if depth >= MAX_BACKING_DEPTH {
            return Err(invalid(format!(
                "backing chain deeper than {MAX_BACKING_DEPTH} images"
            )));
        }
        let backing_options = OpenOptions {
            read_only: true,
            direct: options.direct,
            ..OpenOptions::default()
        };
        let node: Arc<dyn BlockDriver> = match format {
            Format::Qcow2 => Arc::new(Qcow2Node::open_at_depth(
                &backing_path,
                &backing_options,
                depth + 1,
            )?),
            Format::Raw => open_image(&backing_path, Format::Raw, &backing_options)?,
        };
        let size = node.size();
        Ok(Some(Backing {
            node,
            first_file,
            size,
        }))
    }

    /// Before the first write: repair lazy refcounts and clear unknown autoclear bits.
    fn prepare_for_writing(&self) -> Result<(), Qcow2Error> {
        let mut meta = self.lock();
        if meta.header.incompatible_features & incompatible::DIRTY != 0 {
            log::warn!(
                "{}: the image was not closed cleanly with lazy refcounts; rebuilding refcounts",
                self.path.display()
            );
            check::repair_refcounts(self, &mut meta)?;
            meta.header.incompatible_features &= !incompatible::DIRTY;
            self.write_header(&mut meta)?;
        }
        let unknown = meta.header.autoclear_features & !autoclear::KNOWN;
        if unknown != 0 {
            meta.header.autoclear_features &= autoclear::KNOWN;
            self.write_header(&mut meta)?;
        }
        Ok(())
    }

    /// Clear the corrupt bit after a successful repair.
    pub fn clear_corrupt_flag(&self) -> Result<(), Qcow2Error> {
        let mut meta = self.lock();
        meta.header.incompatible_features &= !incompatible::CORRUPT;
        self.write_header(&mut meta)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Rewrite cluster 0's header, extensions and backing name from `meta.header`.
    pub(crate) fn write_header(&self, meta: &mut Meta) -> Result<(), Qcow2Error> {
        let (table_offset, table_clusters) = meta.refcounts.table_location();
        meta.header.refcount_table_offset = table_offset;
        meta.header.refcount_table_clusters = table_clusters as u32;
        let bytes = meta.header.serialize()?;
        self.meta_file.write_all_at(&bytes, 0)?;
        self.meta_file.sync_data()?;
        Ok(())
    }

    /// Load an L2 table into the cache; a dirty table evicted on the way is written after the
    /// refcounts and data it may depend on.
    fn load_l2(&self, meta: &mut Meta, offset: u64, fresh: bool) -> Result<usize, Qcow2Error> {
        let Meta {
            l2,
            refcounts,
            unsynced,
            ..
        } = meta;
        let meta_file = &self.meta_file;
        let data_file = &self.data_file;
        l2.load(meta_file, offset, fresh, &mut |off, data| {
            if refcounts.any_dirty() || *unsynced {
                refcounts.write_back(meta_file)?;
                data_file.sync_data()?;
                meta_file.sync_data()?;
                *unsynced = false;
            }
            meta_file.write_all_at(data, off)?;
            Ok(())
        })
    }

    /// The cache slot of the L2 table for `l1_index`: `None` if there is none and `allocate`
    /// is false. With `allocate`, a missing or shared table is (copied and) replaced by a new
    /// one owned by this L1 entry.
    fn l2_slot(
        &self,
        meta: &mut Meta,
        l1_index: u64,
        allocate: bool,
    ) -> Result<Option<usize>, Qcow2Error> {
        let raw = *meta
            .l1
            .get(l1_index as usize)
            .ok_or_else(|| Qcow2Error::corrupt("guest offset beyond the L1 table"))?;
        let (offset, copied) = decode_l1(raw, self.cluster_bits)
            .map_err(|e| Qcow2Error::corrupt(format!("invalid L1 entry {:#x}", e.0)))?;
        if offset != 0 && (copied || !allocate) {
            return self.load_l2(meta, offset, false).map(Some);
        }
        if !allocate {
            return Ok(None);
        }
        let old = if offset != 0 {
            let slot = self.load_l2(meta, offset, false)?;
            Some(meta.l2.bytes(slot).to_vec())
        } else {
            None
        };
        let new = meta.refcounts.allocate(&self.meta_file, 1)?;
        let slot = self.load_l2(meta, new, true)?;
        if let Some(old) = &old {
            meta.l2.bytes_mut(slot).copy_from_slice(old);
        }
        // The table and its refcount reach the disk before the L1 entry points to it.
        self.meta_file.write_all_at(meta.l2.bytes(slot), new)?;
        meta.refcounts.write_back(&self.meta_file)?;
        self.meta_file.sync_data()?;
        meta.l1[l1_index as usize] = new | COPIED;
        let l1_at = meta.header.l1_table_offset + l1_index * 8;
        self.meta_file
            .write_all_at(&(new | COPIED).to_be_bytes(), l1_at)?;
        if offset != 0 {
            meta.pending_free.push(offset);
        }
        self.load_l2(meta, new, false).map(Some)
    }

    /// The L2 entry of guest cluster `cluster`.
    fn l2_entry(&self, meta: &mut Meta, cluster: u64) -> Result<L2Entry, Qcow2Error> {
        let Some(slot) = self.l2_slot(meta, cluster / self.l2_entries(), false)? else {
            return Ok(L2Entry::Unallocated);
        };
        let raw = meta
            .l2
            .get_u64(slot, (cluster % self.l2_entries()) as usize);
        let entry = self.format.decode_l2(raw).map_err(|e| {
            Qcow2Error::corrupt(format!(
                "invalid L2 entry {:#x} for guest cluster {cluster}",
                e.0
            ))
        })?;
        // In an external data file every cluster lives at its own guest offset.
        if let L2Entry::Normal { host, .. }
        | L2Entry::Zero {
            host: Some(host), ..
        } = entry
        {
            if self.format.external_data && host != cluster << self.cluster_bits {
                return Err(Qcow2Error::corrupt(format!(
                    "L2 entry {raw:#x} maps guest cluster {cluster} elsewhere in the data file"
                )));
            }
        }
        Ok(entry)
    }

    /// Mark every cluster already mapped at its own offset in the raw data file, so that the
    /// fast path serves them without taking the lock. Skipped for very large metadata (the
    /// map then fills in as clusters are first used).
    fn prefill_identity_map(&self) -> Result<(), Qcow2Error> {
        const MAX_SCAN_BYTES: u64 = 64 << 20;
        let Some(fast) = &self.fast else {
            return Ok(());
        };
        let tables: Vec<(usize, u64)> = self
            .lock()
            .l1
            .iter()
            .enumerate()
            .filter_map(|(i, raw)| {
                let (offset, _) = decode_l1(*raw, self.cluster_bits).ok()?;
                (offset != 0).then_some((i, offset))
            })
            .collect();
        if tables.len() as u64 * self.cluster_size() > MAX_SCAN_BYTES {
            return Ok(());
        }
        let entries = self.l2_entries();
        let clusters = self.size.div_ceil(self.cluster_size());
        let mut buf = vec![0u8; self.cluster_size() as usize];
        for (l1_index, offset) in tables {
            self.meta_file.read_exact_at(&mut buf, offset)?;
            for (i, raw) in buf.chunks_exact(8).enumerate() {
                let cluster = l1_index as u64 * entries + i as u64;
                if cluster >= clusters {
                    break;
                }
                let raw = u64::from_be_bytes(raw.try_into().unwrap_or_default());
                if let Ok(L2Entry::Normal { host, .. }) = self.format.decode_l2(raw) {
                    if host == cluster << self.cluster_bits {
                        fast.set(cluster);
                    }
                }
            }
        }
        Ok(())
    }

    /// Set the raw L2 entry of guest cluster `cluster` (in the cache; written back later).
    fn set_l2_entry(&self, meta: &mut Meta, cluster: u64, raw: u64) -> Result<(), Qcow2Error> {
        let slot = self
            .l2_slot(meta, cluster / self.l2_entries(), true)?
            .ok_or_else(|| Qcow2Error::corrupt("L2 table allocation failed"))?;
        meta.l2
            .set_u64(slot, (cluster % self.l2_entries()) as usize, raw);
        Ok(())
    }

    /// Read the whole guest-visible content of a cluster whose L2 entry is `entry`.
    fn read_cluster(&self, entry: L2Entry, cluster: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let guest_offset = cluster << self.cluster_bits;
        match entry {
            L2Entry::Normal { host, .. } => read_up_to(&self.data_file, buf, host)?,
            L2Entry::Zero { .. } => buf.fill(0),
            L2Entry::Unallocated => match &self.backing {
                Some(b) if guest_offset < b.size => {
                    let n = (b.size - guest_offset).min(buf.len() as u64) as usize;
                    b.node.read_at(guest_offset, &mut buf[..n])?;
                    buf[n..].fill(0);
                }
                _ => buf.fill(0),
            },
            L2Entry::Compressed { host, len } => {
                let mut input = vec![0u8; len as usize];
                read_up_to(&self.meta_file, &mut input, host)?;
                compress::decompress(self.compression, &input, buf).ok_or_else(|| {
                    Qcow2Error::corrupt(format!(
                        "compressed cluster at {host:#x} does not decompress"
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Host clusters an entry holds a reference to (data file clusters are not refcounted).
    fn referenced_clusters(&self, entry: L2Entry) -> Vec<u64> {
        if self.format.external_data {
            return Vec::new();
        }
        match entry {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } => vec![host],
            L2Entry::Compressed { host, len } => {
                let first = host >> self.cluster_bits;
                let last = (host + len - 1) >> self.cluster_bits;
                (first..=last).map(|c| c << self.cluster_bits).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Map reads of unallocated clusters to the backing node (zeroes past its end).
    fn map_backing(
        &self,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<(), Qcow2Error> {
        let Some(b) = self.backing.as_ref().filter(|b| offset < b.size) else {
            push_extent(
                out,
                Extent {
                    len,
                    mapping: Mapping::Zero,
                },
            );
            return Ok(());
        };
        let n = (b.size - offset).min(len);
        let mut mapped = Vec::new();
        let ticket = b.node.map_read(offset, n, guest, &mut mapped)?;
        b.node.release(ticket, true);
        for mut extent in mapped {
            if let Mapping::Data { file, offset } = extent.mapping {
                extent.mapping = Mapping::Data {
                    file: file + b.first_file,
                    offset,
                };
            }
            push_extent(out, extent);
        }
        if n < len {
            push_extent(
                out,
                Extent {
                    len: len - n,
                    mapping: Mapping::Zero,
                },
            );
        }
        Ok(())
    }

    fn map_read_locked(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<bool, Qcow2Error> {
        let mut tracked = false;
        for p in pieces(offset, len, self.cluster_bits) {
            match self.l2_entry(meta, p.cluster)? {
                L2Entry::Normal { host, .. } => {
                    tracked |= self.map_allocated(&p, host, out);
                }
                L2Entry::Zero { .. } => push_extent(
                    out,
                    Extent {
                        len: p.len,
                        mapping: Mapping::Zero,
                    },
                ),
                L2Entry::Unallocated => {
                    self.map_backing(offset + p.at, p.len, guest.offset(p.at), out)?
                }
                entry @ L2Entry::Compressed { .. } => {
                    let mut buf = vec![0u8; self.cluster_size() as usize];
                    self.read_cluster(entry, p.cluster, &mut buf)?;
                    guest.write(p.at, &buf[p.within as usize..(p.within + p.len) as usize]);
                    push_extent(
                        out,
                        Extent {
                            len: p.len,
                            mapping: Mapping::Filled,
                        },
                    );
                }
            }
        }
        Ok(tracked)
    }

    fn map_write_locked(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<bool, Qcow2Error> {
        let mut tracked = false;
        for p in pieces(offset, len, self.cluster_bits) {
            let entry = self.l2_entry(meta, p.cluster)?;
            let in_place = match entry {
                L2Entry::Normal { host, copied } if copied || self.format.external_data => {
                    Some(host)
                }
                _ => None,
            };
            if let Some(host) = in_place {
                tracked |= self.map_allocated(&p, host, out);
                continue;
            }
            let mapping = self.allocating_write(meta, entry, p, guest.offset(p.at))?;
            push_extent(
                out,
                Extent {
                    len: p.len,
                    mapping,
                },
            );
        }
        Ok(tracked)
    }

    /// Write one piece to a guest cluster that cannot be written in place, allocating its host
    /// cluster (copy-on-write of the rest of the cluster included).
    fn allocating_write(
        &self,
        meta: &mut Meta,
        entry: L2Entry,
        p: Piece,
        guest: GuestIo,
    ) -> Result<Mapping, Qcow2Error> {
        let cluster_size = self.cluster_size();
        let guest_offset = p.cluster << self.cluster_bits;
        if self.fast.is_some() {
            // A raw data file already holds the disk's content at this offset: map it and let
            // the guest's write go there directly.
            self.set_l2_entry(meta, p.cluster, encode_normal(guest_offset, true))?;
            if let Some(fast) = &self.fast {
                fast.set(p.cluster);
            }
            return Ok(Mapping::Data {
                file: self.data_fid,
                offset: guest_offset + p.within,
            });
        }
        // The valid part of the cluster: the last one may extend past the disk's end.
        let valid = cluster_size.min(self.size - guest_offset) as usize;
        let mut buf = vec![0u8; cluster_size as usize];
        if p.len < valid as u64 {
            self.read_cluster(entry, p.cluster, &mut buf)?;
        }
        guest.read(0, &mut buf[p.within as usize..(p.within + p.len) as usize]);
        let (host, reused) = match entry {
            _ if self.format.external_data => (guest_offset, true),
            L2Entry::Zero {
                host: Some(host),
                copied: true,
            } => (host, true),
            _ => (meta.refcounts.allocate(&self.meta_file, 1)?, false),
        };
        if self.format.external_data {
            self.data_file.write_all_at(&buf[..valid], host)?;
        } else {
            // Copy-on-write data goes through the (buffered) image file handle: direct I/O
            // would need aligned buffers, and the kernel keeps both handles coherent.
            self.meta_file.write_all_at(&buf, host)?;
        }
        meta.unsynced = true;
        self.set_l2_entry(meta, p.cluster, encode_normal(host, true))?;
        if !reused {
            let freed = self.referenced_clusters(entry);
            meta.pending_free.extend(freed);
        }
        Ok(Mapping::Filled)
    }

    fn map_zeroes_locked(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
        op: ZeroOp,
        out: &mut Vec<HostZeroOp>,
    ) -> Result<(), Qcow2Error> {
        let cluster_size = self.cluster_size();
        for p in pieces(offset, len, self.cluster_bits) {
            let entry = self.l2_entry(meta, p.cluster)?;
            let guest_offset = p.cluster << self.cluster_bits;
            if self.fast.is_some() {
                // Raw data file: the data file itself must read as the disk does.
                if let L2Entry::Normal { host, .. } = entry {
                    out.push(HostZeroOp {
                        file: self.data_fid,
                        offset: host + p.within,
                        len: p.len,
                        op,
                    });
                }
                continue;
            }
            let whole = p.within == 0 && p.len == cluster_size.min(self.size - guest_offset);
            let has_zero_flag = self.format.version >= 3;
            let reads_zero = match entry {
                L2Entry::Zero { .. } => true,
                L2Entry::Unallocated => self.backing.is_none(),
                _ => false,
            };
            if whole && (has_zero_flag || self.backing.is_none()) {
                let raw = match (op, entry) {
                    (ZeroOp::Discard, _) if self.backing.is_none() => 0,
                    (ZeroOp::Discard, _) => encode_zero(None, false),
                    (
                        ZeroOp::WriteZeroes { unmap: false },
                        L2Entry::Normal { host, copied: true },
                    )
                    | (
                        ZeroOp::WriteZeroes { unmap: false },
                        L2Entry::Zero {
                            host: Some(host),
                            copied: true,
                        },
                    ) if has_zero_flag => {
                        // Keep the allocation, as a write-zeroes without unmap promises.
                        encode_zero(Some(host), true)
                    }
                    _ if has_zero_flag => encode_zero(None, false),
                    _ => 0,
                };
                let keeps = |host: u64| raw & entry::OFFSET_MASK == host && raw != 0;
                let freed: Vec<u64> = self
                    .referenced_clusters(entry)
                    .into_iter()
                    .filter(|h| !keeps(*h))
                    .collect();
                self.set_l2_entry(meta, p.cluster, raw)?;
                meta.pending_free.extend(freed);
                continue;
            }
            match op {
                // Discarding part of a cluster is advisory: leave it.
                ZeroOp::Discard => {}
                ZeroOp::WriteZeroes { .. } if reads_zero => {}
                ZeroOp::WriteZeroes { .. } => match entry {
                    L2Entry::Normal { host, copied } if copied || self.format.external_data => {
                        out.push(HostZeroOp {
                            file: self.data_fid,
                            offset: host + p.within,
                            len: p.len,
                            op,
                        });
                    }
                    _ => {
                        let zeroes = vec![0u8; p.len as usize];
                        let iov = [libc::iovec {
                            iov_base: zeroes.as_ptr() as *mut libc::c_void,
                            iov_len: zeroes.len(),
                        }];
                        // SAFETY: the iovec names `zeroes`, alive and only read for the call.
                        let source = unsafe { GuestIo::new(&iov) };
                        self.allocating_write(meta, entry, p, source)?;
                    }
                },
            }
        }
        Ok(())
    }

    /// Write back the metadata caches in crash-safe order; frees dropped clusters once no I/O
    /// can still reach them.
    pub(crate) fn write_back(&self, meta: &mut Meta) -> Result<(), Qcow2Error> {
        if meta.refcounts.any_dirty() || meta.unsynced {
            meta.refcounts.write_back(&self.meta_file)?;
            if !Arc::ptr_eq(&self.data_file, &self.meta_file) {
                self.data_file.sync_data()?;
            }
            self.meta_file.sync_data()?;
            meta.unsynced = false;
        }
        if meta.l2.any_dirty() {
            meta.l2.write_back(&self.meta_file)?;
        }
        if !meta.pending_free.is_empty() && self.in_flight.load(Ordering::Acquire) == 0 {
            // The L2 entries that dropped these clusters are on disk before their refcounts
            // fall: a crash in between leaks them, it never leaves them doubly used.
            self.meta_file.sync_data()?;
            for host in std::mem::take(&mut meta.pending_free) {
                meta.l2.discard(host);
                meta.refcounts
                    .adjust(&self.meta_file, host >> self.cluster_bits, -1)?;
            }
            meta.refcounts.write_back(&self.meta_file)?;
        }
        Ok(())
    }

    fn err(&self, e: Qcow2Error) -> BlockError {
        BlockError::Qcow2 {
            path: self.path.display().to_string(),
            source: e,
        }
    }

    /// Map a piece to its allocated cluster at `host`, noting identity-mapped clusters for the
    /// fast path. Returns whether the request must be tracked (internal data: the cluster
    /// could be freed while the I/O runs).
    fn map_allocated(&self, p: &Piece, host: u64, out: &mut Vec<Extent>) -> bool {
        if let Some(fast) = &self.fast {
            if host == p.cluster << self.cluster_bits {
                fast.set(p.cluster);
            }
        }
        let mapping = Mapping::Data {
            file: self.data_fid,
            offset: host + p.within,
        };
        push_extent(
            out,
            Extent {
                len: p.len,
                mapping,
            },
        );
        !self.format.external_data
    }

    /// The raw-data-file fast path: a range whose clusters are all identity-mapped goes to
    /// the same offset in the data file, with no lock and no table lookup.
    #[inline]
    fn map_identity(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> bool {
        let Some(fast) = &self.fast else {
            return false;
        };
        if len == 0 || !fast.covers(offset, len) {
            return false;
        }
        let mapping = Mapping::Data {
            file: self.data_fid,
            offset,
        };
        out.push(Extent { len, mapping });
        true
    }

    fn ticket(&self, tracked: bool) -> IoTicket {
        if tracked {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        IoTicket {
            tracked,
            written: None,
        }
    }
}

impl BlockDriver for Qcow2Node {
    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn files(&self) -> &[Arc<FileNode>] {
        &self.files
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
        if self.read_only {
            return Err(self.err(Qcow2Error::Unsupported("the image is read-only".into())));
        }
        if self.map_identity(offset, len, out) {
            return Ok(IoTicket::NONE);
        }
        let mut meta = self.lock();
        let tracked = self
            .map_write_locked(&mut meta, offset, len, guest, out)
            .map_err(|e| self.err(e))?;
        Ok(self.ticket(tracked))
    }

    fn release(&self, ticket: IoTicket, _ok: bool) {
        if ticket.tracked {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn map_zeroes(
        &self,
        offset: u64,
        len: u64,
        op: ZeroOp,
        out: &mut Vec<HostZeroOp>,
    ) -> Result<(), BlockError> {
        if self.read_only {
            return Err(self.err(Qcow2Error::Unsupported("the image is read-only".into())));
        }
        let mut meta = self.lock();
        self.map_zeroes_locked(&mut meta, offset, len, op, out)
            .map_err(|e| self.err(e))
    }

    fn flush_metadata(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        let mut meta = self.lock();
        self.write_back(&mut meta).map_err(|e| self.err(e))
    }

    fn data_file(&self) -> Option<&Arc<FileNode>> {
        self.format.external_data.then_some(&self.data_file)
    }

    fn bitmap_store(self: Arc<Self>) -> Option<Arc<dyn crate::bitmap::BitmapStore>> {
        Some(self)
    }

    fn discard_granularity(&self) -> u64 {
        if self.fast.is_some() {
            4096
        } else {
            self.cluster_size()
        }
    }
}

/// Read and parse the header from the start of the image.
fn read_header(file: &FileNode) -> Result<Header, Qcow2Error> {
    let len = file.current_size()?.min(1 << header::MAX_CLUSTER_BITS) as usize;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(Header::parse(&buf)?)
}

fn read_l1(file: &FileNode, header: &Header) -> Result<Vec<u64>, Qcow2Error> {
    let mut raw = vec![0u8; header.l1_size as usize * 8];
    file.read_exact_at(&mut raw, header.l1_table_offset)
        .map_err(|e| Qcow2Error::corrupt(format!("cannot read the L1 table: {e}")))?;
    Ok(raw
        .chunks_exact(8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
        .collect())
}

/// Read into `buf` at `offset`, zero-filling what lies past the end of the file.
fn read_up_to(file: &FileNode, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let end = file.current_size()?;
    let n = end.saturating_sub(offset).min(buf.len() as u64) as usize;
    file.read_exact_at(&mut buf[..n], offset)?;
    buf[n..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_cluster_boundaries() {
        let p: Vec<_> = pieces(1000, 70_000, 16)
            .map(|p| (p.cluster, p.within, p.len, p.at))
            .collect();
        assert_eq!(p, vec![(0, 1000, 64536, 0), (1, 0, 5464, 64536)]);
    }

    #[test]
    fn stored_names_are_followed_only_next_to_the_image() {
        let img = Path::new("/srv/vm/meta.qcow2");
        assert_eq!(
            resolve_stored_name(img, "disk.raw", "data file", "--data-file").unwrap(),
            PathBuf::from("/srv/vm/disk.raw")
        );
        assert_eq!(
            resolve_stored_name(img, "sub/disk.raw", "data file", "--data-file").unwrap(),
            PathBuf::from("/srv/vm/sub/disk.raw")
        );
        for bad in [
            "/etc/passwd",
            "../x.raw",
            "a/../../b",
            "json:{}",
            "nbd://host/x",
            "file:x",
            "",
        ] {
            assert!(
                resolve_stored_name(img, bad, "data file", "--data-file").is_err(),
                "{bad}"
            );
        }
    }
}
