//! The block-driver graph.
//!
//! A guest request enters at a *format* node ([`raw`], and qcow2 later), which decides where
//! each byte lives, and reaches *protocol* nodes ([`file::FileNode`]) that hold the bytes. A node
//! knows only its children. Format nodes do not move data themselves: they translate a guest
//! range into [`Extent`]s on files, and the queue thread's [`io::Engine`] performs the data I/O.
//! That split keeps the fast path free of locks: mapping is a short, in-memory step and the
//! data transfer runs without holding anything.

pub mod cbw;
pub mod error;
pub mod fault;
pub mod file;
pub mod filter;
pub mod io;
pub mod lock;
pub mod qcow2;
pub mod raw;
pub mod remote;

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use crate::iov::Cursor;
pub use error::{BlockError, ErrorKind};
use file::{FileNode, FileOptions};

/// Index of a protocol node in [`BlockDriver::files`].
pub type FileId = usize;

/// Where a stretch of guest data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// At `offset` in protocol node `file`.
    Data { file: FileId, offset: u64 },
    /// Nowhere: the range reads as zeroes.
    Zero,
    /// Already transferred by the driver itself, through [`GuestIo`] (compressed clusters,
    /// copy-on-write allocations): nothing left to do.
    Filled,
}

/// Returned by mapping calls and handed back through [`BlockDriver::release`] when the
/// request's data I/O is over: what the nodes on the request's path asked to be told then.
///
/// Drivers that may free and reuse the host clusters a request maps to (qcow2) count the
/// request as in flight, to defer reuse until no I/O can still land there. Filters that act
/// after a write ([`filter::Filter::after_write`]) note the written range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct IoTicket {
    /// A format node counted the request as in flight.
    pub tracked: bool,
    /// A filter wants to hear when the write of `(offset, len)` is over.
    pub written: Option<(u64, u64)>,
}

impl IoTicket {
    /// Nothing to be told.
    pub const NONE: IoTicket = IoTicket {
        tracked: false,
        written: None,
    };
}

/// The guest buffers of one request, for drivers that copy data themselves.
#[derive(Clone, Copy)]
pub struct GuestIo<'a> {
    iovecs: &'a [libc::iovec],
    /// Where this view starts within the request's bytes.
    base: u64,
}

impl<'a> GuestIo<'a> {
    /// # Safety
    /// Every iovec must name memory valid for reads and writes during `'a`, which nothing else
    /// in this process accesses meanwhile except through the same `GuestIo`.
    pub unsafe fn new(iovecs: &'a [libc::iovec]) -> Self {
        GuestIo { iovecs, base: 0 }
    }

    /// No buffers (requests that carry no data).
    pub fn none() -> GuestIo<'static> {
        GuestIo {
            iovecs: &[],
            base: 0,
        }
    }

    /// The same buffers seen from byte `at` on.
    pub fn offset(&self, at: u64) -> GuestIo<'a> {
        GuestIo {
            iovecs: self.iovecs,
            base: self.base + at,
        }
    }

    /// Visit the pieces of `[at, at + len)` as (pointer, length, position in the range).
    fn pieces(&self, at: u64, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
        let mut cursor = Cursor::new(self.iovecs);
        cursor.skip(self.base + at);
        let mut done = 0usize;
        cursor.take(len as u64, |iov| {
            f(iov.iov_base.cast(), iov.iov_len, done);
            done += iov.iov_len;
        });
    }

    /// Copy `buf` into the guest buffers at byte `at` of the request.
    pub fn write(&self, at: u64, buf: &[u8]) {
        self.pieces(at, buf.len(), |ptr, n, done| {
            // SAFETY: `ptr..ptr + n` is inside a valid guest buffer (see `new`), and `buf` has
            // `n` bytes at `done`.
            unsafe { std::ptr::copy_nonoverlapping(buf[done..].as_ptr(), ptr, n) };
        });
    }

    /// Copy guest bytes at byte `at` of the request into `buf`.
    pub fn read(&self, at: u64, buf: &mut [u8]) {
        let len = buf.len();
        self.pieces(at, len, |ptr, n, done| {
            // SAFETY: as in `write`, in the other direction.
            unsafe { std::ptr::copy_nonoverlapping(ptr, buf[done..].as_mut_ptr(), n) };
        });
    }
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

/// What a range of a node holds, as NBD's `base:allocation` context reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Data is stored (it may still read as zeroes).
    Data,
    /// Reads as zeroes, with storage allocated.
    Zero,
    /// Reads as zeroes, nothing allocated (a hole, an unallocated cluster with no backing).
    Hole,
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

    /// Map `[offset, offset + len)` for reading into `guest`. Appends extents covering the
    /// range in order.
    fn map_read(
        &self,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<IoTicket, BlockError>;

    /// Map `[offset, offset + len)` for writing from `guest`, allocating where needed. Extents
    /// are [`Mapping::Data`] or [`Mapping::Filled`].
    fn map_write(
        &self,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<IoTicket, BlockError>;

    /// The data I/O of a request whose mapping returned `ticket` is over; `ok` says whether
    /// all of it succeeded.
    fn release(&self, _ticket: IoTicket, _ok: bool) {}

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

    /// The allocation unit of formats that have one (qcow2's cluster size).
    fn allocation_unit(&self) -> Option<u64> {
        None
    }

    /// The external data file, for formats that keep guest data apart from metadata.
    fn data_file(&self) -> Option<&Arc<FileNode>> {
        None
    }

    /// Grow the virtual disk to `size` bytes (at least its size now): what an online resize
    /// does below the bitmaps. A node whose format stores bitmaps has the bitmap layer resize
    /// it instead, through [`crate::bitmap::BitmapStore::store_bitmaps`], so that the new size
    /// and the bitmaps sized for it are switched to at once.
    fn grow(&self, size: u64) -> Result<(), BlockError> {
        let _ = size;
        Err(BlockError::new(
            ErrorKind::Unsupported,
            format!("a {} node cannot be resized", self.format()),
        ))
    }

    /// Where this node stores persistent dirty bitmaps, if its format can.
    fn bitmap_store(self: Arc<Self>) -> Option<Arc<dyn crate::bitmap::BitmapStore>> {
        None
    }

    /// What the range starting at `offset` holds: the allocation of its first byte and how
    /// many bytes from `offset` on (at least 1, at most `len`) share it. Reports the whole
    /// chain (a backing node answers for clusters its overlay does not have). The default
    /// says every byte is data, which is always true.
    fn block_status(&self, _offset: u64, len: u64) -> Result<(u64, Allocation), BlockError> {
        Ok((len, Allocation::Data))
    }

    /// Write `buf` at `offset` synchronously (copy-before-write targets, tools), allocating
    /// where needed; the data is durable only after a flush.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let iov = [libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec names `buf`, borrowed for this call; a write mapping only reads
        // from the guest buffers.
        let guest = unsafe { GuestIo::new(&iov) };
        let mut extents = Vec::new();
        let ticket = self.map_write(offset, buf.len() as u64, guest, &mut extents)?;
        let mut at = 0usize;
        let mut result = Ok(());
        for extent in &extents {
            let piece = &buf[at..at + extent.len as usize];
            if let Mapping::Data { file, offset } = extent.mapping {
                let node = &self.files()[file];
                if let Err(e) = node.write_all_at(piece, offset) {
                    result = Err(BlockError::from(e)
                        .with_path(node.path())
                        .with_offset(offset));
                    break;
                }
            }
            at += extent.len as usize;
        }
        self.release(ticket, result.is_ok());
        result
    }

    /// Read `buf.len()` bytes at `offset` synchronously (copy-on-write sources, tools).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec names `buf`, exclusively borrowed for this call.
        let guest = unsafe { GuestIo::new(&iov) };
        let mut extents = Vec::new();
        let ticket = self.map_read(offset, buf.len() as u64, guest, &mut extents)?;
        let mut at = 0usize;
        let mut result = Ok(());
        for extent in &extents {
            let piece = &mut buf[at..at + extent.len as usize];
            match extent.mapping {
                Mapping::Data { file, offset } => {
                    let node = &self.files()[file];
                    if let Err(e) = node.read_exact_at(piece, offset) {
                        result = Err(BlockError::from(e)
                            .with_path(node.path())
                            .with_offset(offset));
                        break;
                    }
                }
                Mapping::Zero => piece.fill(0),
                Mapping::Filled => {}
            }
            at += extent.len as usize;
        }
        self.release(ticket, result.is_ok());
        result
    }
}

/// The image formats vubd serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The format named `name` as QEMU spells it.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

/// The names of the graph's nodes, as QMP reports and addresses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNames {
    /// The exported (format) node, which owns the dirty bitmaps.
    pub format: String,
    /// Its `file` child.
    pub file: String,
    /// Its external data file, if any.
    pub data_file: Option<String>,
}

impl NodeNames {
    /// Names for a graph built from `--image`: `NAME`, `NAME-file`, `NAME-data-file`.
    pub fn derived(format_node: &str) -> NodeNames {
        NodeNames {
            format: format_node.to_string(),
            file: format!("{format_node}-file"),
            data_file: Some(format!("{format_node}-data-file")),
        }
    }
}

/// Which backing file a qcow2 node uses.
#[derive(Clone, Debug, Default)]
pub enum BackingChoice {
    /// The one the image names (subject to the stored-name policy), in its recorded format.
    #[default]
    FromImage,
    /// None, even if the image names one (`backing=null`).
    Disabled,
    /// This file, in this format, whatever the image names.
    Use(std::path::PathBuf, Format),
    /// A node already in the graph (QMP `blockdev-add` with `"backing": NODE`): a fleecing
    /// image over the disk it takes a point-in-time view of.
    Node(Arc<dyn BlockDriver>),
}

/// How to open an image and the nodes under it.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// `O_DIRECT` for guest data (`--cache none`).
    pub direct: bool,
    /// qcow2: the external data file to use instead of the one named in the image.
    pub data_file: Option<std::path::PathBuf>,
    /// qcow2: which backing file to use.
    pub backing: BackingChoice,
    /// qcow2: bytes of L2 tables to cache (default: enough for the whole disk, up to 32 MiB).
    pub l2_cache_bytes: Option<u64>,
    /// qcow2: open an image marked corrupt read-write, to repair it.
    pub repair: bool,
    /// Whether the files are locked against conflicting users, as QEMU locks them.
    pub locking: Locking,
    /// The image's path is a name stored in another image in this directory: it is opened
    /// beneath it, never following `..` or a symbolic link out of it.
    pub beneath: Option<std::path::PathBuf>,
    /// Crash tests: a fault injector watching the image file and the data file.
    pub fault: Option<Arc<fault::FaultInjector>>,
}

/// Image locking (QEMU's `locking=on|off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// Lock every file the graph opens: writers exclude other writers and readers, readers
    /// exclude writers.
    #[default]
    On,
    /// Take no locks and check none (another process may be writing the image).
    Off,
}

impl OpenOptions {
    /// The lock a file opened with these options takes.
    pub fn lock_request(&self) -> Option<lock::LockRequest> {
        (self.locking == Locking::On).then(|| lock::LockRequest::for_access(self.read_only))
    }
}

/// Open `path` as a format node of `format` over a `file` protocol node.
pub fn open_image(
    path: &Path,
    format: Format,
    options: &OpenOptions,
) -> Result<Arc<dyn BlockDriver>, BlockError> {
    match format {
        Format::Raw => {
            let file = FileNode::open_in(
                options.beneath.as_deref(),
                path,
                FileOptions {
                    read_only: options.read_only,
                    direct: options.direct,
                    lock: options.lock_request(),
                },
            )?
            .with_fault(options.fault.clone());
            Ok(Arc::new(raw::RawNode::new(Arc::new(file))))
        }
        Format::Qcow2 => Ok(Arc::new(qcow2::Qcow2Node::open(path, options)?)),
    }
}
