//! The `file` protocol node: a host file (or block device) that format nodes read and write.
//!
//! Data I/O on a file goes through the queue thread's [`crate::block::io::Engine`]; this module
//! owns the open file, its properties (size, direct I/O alignment), and the synchronous helpers
//! format drivers use for metadata and the rare fallbacks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use thiserror::Error;

use std::sync::Arc;

use super::error::{BlockError, ErrorKind};
use super::fault::FaultInjector;
use super::io::InlinePolicy;
use super::lock::{self, LockError, LockRequest};
use super::remote::location::RemoteSpec;
use super::remote::nbd::{client_creds, NbdClient};
use super::remote::rbd::{RbdImage, RbdOpen};
use super::remote::RemoteStore;
use super::ZeroOp;

/// How to open a file node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`), as `--cache none` asks.
    pub direct: bool,
    /// Lock the file against conflicting users, QEMU's way (none: a second descriptor of a
    /// file this process already holds, or locking turned off).
    pub lock: Option<LockRequest>,
}

/// Why a file node cannot be opened. The path is the [`BlockError`]'s context.
#[derive(Debug, Error)]
pub enum FileError {
    #[error(transparent)]
    Open(io::Error),
    #[error("not a regular file or block device")]
    NotAFile,
    #[error(
        "resolves outside {}, which a name stored in an image may not leave (through '..' or \
         a symbolic link); pass the file explicitly (--data-file, --backing) to use it",
        dir.display()
    )]
    OutsideDirectory { dir: PathBuf },
    #[error("the file system does not support direct I/O (O_DIRECT); use --cache writeback")]
    NoDirectIo,
    #[error(
        "in use by another process ({what}); stop it first, or override with \
         'vubd serve --locking off' or a read-only '-U' (--force-share)"
    )]
    Locked { what: String },
}

impl FileError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FileError::Open(_) => ErrorKind::Io,
            FileError::NotAFile | FileError::OutsideDirectory { .. } => ErrorKind::Refused,
            FileError::NoDirectIo => ErrorKind::Unsupported,
            FileError::Locked { .. } => ErrorKind::Locked,
        }
    }

    /// The error of opening `path`.
    pub fn at(self, path: &Path) -> BlockError {
        BlockError::new(self.kind(), self).with_path(path)
    }
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// What holds a node's bytes.
#[derive(Debug)]
enum Backend {
    /// A host file or block device: data I/O through the queue's io_uring.
    Local(File),
    /// A remote store (RBD, NBD): data I/O through its own asynchronous API.
    Remote(Arc<dyn RemoteStore>),
}

/// Where a node's data operations go.
#[derive(Clone, Copy, Debug)]
pub enum IoTarget<'a> {
    Fd(RawFd),
    Remote(&'a Arc<dyn RemoteStore>),
}

/// An open protocol node: a host file, or a remote store (see [`super::remote`]).
#[derive(Debug)]
pub struct FileNode {
    backend: Backend,
    path: PathBuf,
    options: FileOptions,
    /// The size at open, or as last grown ([`FileNode::grow_to`]).
    size: AtomicU64,
    /// Alignment of memory buffers, offsets and lengths that direct I/O needs (1 when cached);
    /// for a remote store, of offsets and lengths only (its minimum block).
    direct_align: u64,
    /// Whether transfers may complete inline in the queue thread.
    inline: InlinePolicy,
    /// `FALLOC_FL_ZERO_RANGE` was refused once; fall back straight away from then on.
    no_zero_range: AtomicBool,
    /// `FALLOC_FL_PUNCH_HOLE` was refused once.
    no_punch_hole: AtomicBool,
    /// Crash tests: sees every write, sync and metadata step made through this node.
    fault: Option<Arc<FaultInjector>>,
}

impl FileNode {
    /// Open `path` (a name the user gave: followed wherever it leads, and a remote store if
    /// it names one, see [`super::remote::location`]).
    pub fn open(path: &Path, options: FileOptions) -> Result<FileNode, BlockError> {
        if let Some(spec) = path.to_str().and_then(RemoteSpec::parse) {
            let spec = spec.map_err(|e| BlockError::new(ErrorKind::Refused, e))?;
            return Self::open_remote(&spec, path, options);
        }
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        // Non-blocking, so that a FIFO (or anything that waits for a peer) is refused instead
        // of hanging the open; cleared once the file is known to be a file or a device.
        open.custom_flags(libc::O_NONBLOCK | if options.direct { libc::O_DIRECT } else { 0 });
        let file = match open.open(path) {
            Ok(file) => file,
            Err(e) if options.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(FileError::NoDirectIo.at(path))
            }
            Err(e) => return Err(FileError::Open(e).at(path)),
        };
        Self::from_file(file, path, options)
    }

    /// Open `name`, a path relative to `dir` stored in an image, without ever leaving `dir`:
    /// the kernel resolves it beneath `dir` (`openat2` with `RESOLVE_BENEATH`), so neither
    /// `..` nor a symbolic link can lead out of it.
    pub fn open_beneath(
        dir: &Path,
        name: &Path,
        options: FileOptions,
    ) -> Result<FileNode, BlockError> {
        let path = dir.join(name);
        let dir_file = File::open(dir).map_err(|e| FileError::Open(e).at(dir))?;
        let c_name = std::ffi::CString::new(name.as_os_str().as_encoded_bytes())
            .map_err(|_| FileError::Open(io::ErrorKind::InvalidInput.into()).at(&path))?;
        let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        flags |= if options.read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        if options.direct {
            flags |= libc::O_DIRECT;
        }
        let how = OpenHow {
            flags: flags as u64,
            mode: 0,
            resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: openat2 with a valid directory fd, a NUL-terminated path and an `open_how`
        // whose size is passed with it; the returned fd (if any) is owned by nobody else.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir_file.as_raw_fd(),
                c_name.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOSYS) {
                // No openat2 (a kernel before 5.6, valgrind, a seccomp filter): resolve the
                // path, check it stays beneath `dir`, and open what was resolved without
                // following a link at its last component.
                return Self::open_resolved_beneath(dir, &path, options);
            }
            return Err(match e.raw_os_error() {
                Some(libc::EXDEV) => FileError::OutsideDirectory {
                    dir: dir.to_path_buf(),
                }
                .at(&path),
                Some(libc::EINVAL) if options.direct => FileError::NoDirectIo.at(&path),
                _ => FileError::Open(e).at(&path),
            });
        }
        // SAFETY: `fd` was just returned by openat2 and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd as RawFd) };
        Self::from_file(file, &path, options)
    }

    /// [`FileNode::open_beneath`] without openat2: resolve, check, then open the resolved
    /// path with `O_NOFOLLOW`.
    fn open_resolved_beneath(
        dir: &Path,
        path: &Path,
        options: FileOptions,
    ) -> Result<FileNode, BlockError> {
        let base = std::fs::canonicalize(dir).map_err(|e| FileError::Open(e).at(dir))?;
        let real = std::fs::canonicalize(path).map_err(|e| FileError::Open(e).at(path))?;
        if !real.starts_with(&base) {
            return Err(FileError::OutsideDirectory {
                dir: dir.to_path_buf(),
            }
            .at(path));
        }
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        let direct = if options.direct { libc::O_DIRECT } else { 0 };
        open.custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | direct);
        let file = open.open(&real).map_err(|e| FileError::Open(e).at(path))?;
        Self::from_file(file, path, options)
    }

    /// Open `path`: beneath `dir` if it is a name stored in an image in `dir` (see
    /// [`FileNode::open_beneath`]), as given otherwise.
    pub fn open_in(
        dir: Option<&Path>,
        path: &Path,
        options: FileOptions,
    ) -> Result<FileNode, BlockError> {
        match dir {
            Some(dir) => {
                let name = path.strip_prefix(dir).unwrap_or(path);
                Self::open_beneath(dir, name, options)
            }
            None => Self::open(path, options),
        }
    }

    /// Open the remote store `spec` names (`path` is its name, for messages and queries).
    /// Its own exclusion stands in for file locks: RBD's exclusive lock for writers.
    pub fn open_remote(
        spec: &RemoteSpec,
        path: &Path,
        options: FileOptions,
    ) -> Result<FileNode, BlockError> {
        let at = |e: BlockError| e.with_path(Path::new(&spec.to_string()));
        let store: Arc<dyn RemoteStore> = match spec {
            RemoteSpec::Rbd(rbd) => {
                let how = RbdOpen {
                    read_only: options.read_only,
                    lock: options.lock.is_some(),
                    cache: !options.direct,
                };
                let image =
                    RbdImage::open(rbd, how).map_err(|e| at(BlockError::new(e.kind(), e)))?;
                Arc::new(image)
            }
            RemoteSpec::Nbd(nbd) => {
                // The client's own errors name the server.
                let tls = nbd.tls_creds.as_deref().and_then(client_creds);
                let client = NbdClient::connect(nbd, options.read_only, tls)
                    .map_err(|e| BlockError::new(ErrorKind::Io, e))?;
                Arc::new(client)
            }
        };
        let size = store
            .size()
            .map_err(|e| at(BlockError::new(ErrorKind::Io, e)))?;
        Ok(FileNode {
            path: path.to_path_buf(),
            options,
            size: AtomicU64::new(size),
            inline: InlinePolicy::Never,
            direct_align: store.min_block(),
            backend: Backend::Remote(store),
            no_zero_range: AtomicBool::new(false),
            no_punch_hole: AtomicBool::new(false),
            fault: None,
        })
    }

    /// The host file, for what only a host file can do.
    fn local(&self) -> io::Result<&File> {
        match &self.backend {
            Backend::Local(file) => Ok(file),
            Backend::Remote(_) => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    /// The remote store, if this node is one.
    pub fn remote(&self) -> Option<&Arc<dyn RemoteStore>> {
        match &self.backend {
            Backend::Remote(store) => Some(store),
            Backend::Local(_) => None,
        }
    }

    /// Check what was opened, lock it, and learn its properties.
    fn from_file(file: File, path: &Path, options: FileOptions) -> Result<FileNode, BlockError> {
        let err = |e| FileError::Open(e).at(path);
        let meta = file.metadata().map_err(err)?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(FileError::NotAFile.at(path));
        }
        // SAFETY: F_SETFL on our own fd with flags from F_GETFL minus O_NONBLOCK.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
        if let Some(request) = options.lock {
            lock::acquire(&file, path, request).map_err(|e| match e {
                LockError::Conflict { what } => FileError::Locked { what }.at(path),
                LockError::Io(e) => err(e),
            })?;
        }
        let size = if block_device {
            block_device_size(&file).map_err(err)?
        } else {
            meta.len()
        };
        let inline = if options.direct || meta.file_type().is_block_device() {
            InlinePolicy::Never
        } else if is_memory_backed(&file) {
            InlinePolicy::Always
        } else {
            InlinePolicy::NoWait
        };
        let mut node = FileNode {
            backend: Backend::Local(file),
            path: path.to_path_buf(),
            options,
            size: AtomicU64::new(size),
            inline,
            direct_align: 1,
            no_zero_range: AtomicBool::new(false),
            no_punch_hole: AtomicBool::new(false),
            fault: None,
        };
        if options.direct {
            node.direct_align = node.probe_direct_alignment();
        }
        Ok(node)
    }

    /// Whether `other` is the same file (device and inode), whatever the paths say.
    /// Remote stores compare by name.
    pub fn same_file(&self, other: &FileNode) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (&self.backend, &other.backend) {
            (Backend::Remote(_), Backend::Remote(_)) => self.path == other.path,
            (_, Backend::Local(file)) => file
                .metadata()
                .is_ok_and(|m| self.is_inode(m.dev(), m.ino())),
            _ => false,
        }
    }

    /// Whether this is the file with inode `ino` on device `dev`.
    pub fn is_inode(&self, dev: u64, ino: u64) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.local()
            .and_then(File::metadata)
            .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The host file's descriptor (`None` for a remote store).
    pub fn fd(&self) -> Option<RawFd> {
        self.local().ok().map(File::as_raw_fd)
    }

    /// Where this node's data operations go.
    pub fn io_target(&self) -> IoTarget<'_> {
        match &self.backend {
            Backend::Local(file) => IoTarget::Fd(file.as_raw_fd()),
            Backend::Remote(store) => IoTarget::Remote(store),
        }
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Make the file at least `size` bytes long (an online resize of the disk it holds), the
    /// new length durable before this returns. A block device cannot grow: it must already be
    /// as large.
    pub fn grow_to(&self, size: u64) -> io::Result<()> {
        if let Some(store) = self.remote() {
            store.grow_to(size)?;
            self.size.fetch_max(size, Ordering::AcqRel);
            return Ok(());
        }
        let file = self.local()?;
        if file.metadata()?.file_type().is_block_device() {
            let current = block_device_size(file)?;
            if current < size {
                return Err(io::Error::other(format!(
                    "the block device holds {current} bytes, fewer than {size}"
                )));
            }
            self.size.fetch_max(size, Ordering::AcqRel);
            return Ok(());
        }
        let current = self.current_size()?;
        if current < size {
            file.set_len(size)?;
            file.sync_all()?;
        }
        self.size.fetch_max(size.max(current), Ordering::AcqRel);
        Ok(())
    }

    /// The file's size now (it grows as a format driver allocates clusters).
    pub fn current_size(&self) -> io::Result<u64> {
        match &self.backend {
            Backend::Local(file) => file.metadata().map(|m| m.len()),
            Backend::Remote(store) => store.size(),
        }
    }

    pub fn read_only(&self) -> bool {
        self.options.read_only
    }

    pub fn is_direct(&self) -> bool {
        self.options.direct
    }

    /// How the I/O engine may complete this file's transfers inline.
    pub fn inline_policy(&self) -> InlinePolicy {
        self.inline
    }

    /// Alignment direct I/O needs for buffers, offsets and lengths (1 for cached files).
    pub fn direct_align(&self) -> u64 {
        self.direct_align
    }

    /// Find the smallest alignment direct reads accept, as QEMU's raw driver does: try
    /// 512-byte, then 4 KiB aligned reads at offset 0.
    fn probe_direct_alignment(&self) -> u64 {
        let size = self.size();
        if size == 0 {
            return 4096;
        }
        for align in [512usize, 4096] {
            let Ok(mut buf) = AlignedBuf::zeroed(align, align) else {
                break;
            };
            let len = align.min(size as usize);
            let Ok(file) = self.local() else { break };
            match file.read_at(&mut buf.as_mut_slice()[..len], 0) {
                Ok(_) => return align as u64,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
                Err(_) => break,
            }
        }
        4096
    }

    /// Read exactly `buf.len()` bytes at `offset` (for metadata; data goes through the engine).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.backend {
            Backend::Local(file) => file.read_exact_at(buf, offset),
            Backend::Remote(store) => store.read_at(buf, offset),
        }
    }

    /// Write all of `buf` at `offset` (for metadata; data goes through the engine).
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let file = match &self.backend {
            Backend::Local(file) => file,
            Backend::Remote(store) => return store.write_at(buf, offset),
        };
        if let Some(fault) = &self.fault {
            fault.before_write(file.as_raw_fd(), offset, buf)?;
        }
        file.write_all_at(buf, offset)
    }

    /// Whether the file stores data at `offset` (`false`: a hole, reading as zeroes) and for
    /// how many bytes from there on, at most `len`, asked with `SEEK_DATA`/`SEEK_HOLE`. A file
    /// system that cannot tell says data everywhere.
    pub fn allocation(&self, offset: u64, len: u64) -> io::Result<(u64, bool)> {
        let fd = match &self.backend {
            Backend::Local(file) => file.as_raw_fd(),
            Backend::Remote(store) => return store.allocation(offset, len),
        };
        let seek = |whence: libc::c_int| -> io::Result<Option<u64>> {
            let at = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: lseek on our own descriptor; it moves the file offset, which vubd never
            // uses (all I/O is positional).
            let r = unsafe { libc::lseek(fd, at, whence) };
            if r >= 0 {
                return Ok(Some(r as u64));
            }
            match io::Error::last_os_error() {
                // ENXIO: no data (SEEK_DATA) at or after offset, or offset past the end.
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => Err(e),
                e => Err(e),
            }
        };
        let end = offset.saturating_add(len);
        match seek(libc::SEEK_DATA) {
            Ok(Some(data)) if data > offset => Ok(((data - offset).min(len), false)),
            Ok(Some(_)) => {
                let hole = seek(libc::SEEK_HOLE)?.unwrap_or(end);
                Ok((hole.clamp(offset + 1, end) - offset, true))
            }
            Ok(None) => Ok((len, false)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                Ok((len, true))
            }
            Err(e) => Err(e),
        }
    }

    pub fn sync_data(&self) -> io::Result<()> {
        let file = match &self.backend {
            Backend::Local(file) => file,
            Backend::Remote(store) => return store.flush(),
        };
        if let Some(fault) = &self.fault {
            fault.before_sync(file.as_raw_fd())?;
        }
        file.sync_data()
    }

    /// A named metadata step is about to happen (fault injection's cut points; a no-op
    /// otherwise).
    #[inline]
    pub fn event(&self, name: &'static str) -> io::Result<()> {
        match &self.fault {
            Some(fault) => fault.event(name),
            None => Ok(()),
        }
    }

    /// Watch this node's writes and syncs with `fault` (crash tests).
    pub fn with_fault(mut self, fault: Option<Arc<FaultInjector>>) -> Self {
        self.fault = fault;
        self
    }

    /// The `fallocate` mode that zeroes a range, or `None` if the file has shown it cannot.
    pub fn zero_mode(&self, unmap: bool) -> Option<i32> {
        if unmap && !self.no_punch_hole.load(Ordering::Relaxed) {
            Some(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
        } else if !self.no_zero_range.load(Ordering::Relaxed) {
            Some(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
        } else {
            None
        }
    }

    /// The `fallocate` mode that deallocates a range, or `None` if the file cannot.
    pub fn discard_mode(&self) -> Option<i32> {
        (!self.no_punch_hole.load(Ordering::Relaxed))
            .then_some(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
    }

    /// Remember that `fallocate` refused `mode` with `errno`, if that means "not supported".
    pub fn note_fallocate_refusal(&self, mode: i32, errno: i32) -> bool {
        if !matches!(
            errno,
            libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY | libc::EINVAL
        ) {
            return false;
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            self.no_punch_hole.store(true, Ordering::Relaxed);
        }
        if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            self.no_zero_range.store(true, Ordering::Relaxed);
        }
        true
    }

    /// Zero `[offset, offset + len)` without `fallocate` zeroing support: deallocate and
    /// reallocate where holes are supported (keeping the range allocated as asked), else write
    /// zeroes.
    pub fn write_zeroes_fallback(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if let Some(store) = self.remote() {
            return store.zeroes(offset, len, ZeroOp::WriteZeroes { unmap });
        }
        if let Some(mode) = self.discard_mode() {
            match self.fallocate(mode, offset, len) {
                Ok(()) if unmap => return Ok(()),
                // Reallocate so that later writes cannot fail for lack of space, as a
                // non-unmapping write-zeroes promises; file systems without this keep the hole.
                Ok(()) => {
                    return self
                        .fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len)
                        .or(Ok(()))
                }
                Err(e) => {
                    self.note_fallocate_refusal(mode, e.raw_os_error().unwrap_or(0));
                }
            }
        }
        self.write_zero_buffer(offset, len)
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate takes no pointers; the fd is owned by self.
        let fd = self.local()?.as_raw_fd();
        // SAFETY: as above.
        let ret = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Write zeroes with plain writes, from an aligned buffer so that direct I/O accepts them.
    fn write_zero_buffer(&self, mut offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let zeroes = AlignedBuf::zeroed(CHUNK, 4096)?;
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(CHUNK as u64) as usize;
            self.local()?
                .write_all_at(&zeroes.as_slice()[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Whether the file lives in memory (tmpfs, ramfs, hugetlbfs), where reads and writes are memory
/// copies that never wait for a device.
fn is_memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: an all-zero statfs is a valid value for fstatfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs through a pointer to a live one; the fd is owned by
    // `file`.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    matches!(
        st.f_type as i64,
        TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC
    )
}

/// `BLKGETSIZE64`: the size of a block device in bytes.
fn block_device_size(file: &File) -> io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live u64.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// A zero-initialised heap buffer with a given alignment, for direct I/O.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes aligned to `align` (a power of two). `len` may be 0.
    pub fn zeroed(len: usize, align: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(AlignedBuf { ptr, layout })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_fallback_zeroes_and_keeps_size() {
        let dir = std::env::temp_dir().join(format!("vubd-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.raw");
        std::fs::write(&path, vec![0xabu8; 3 << 20]).unwrap();
        let node = FileNode::open(&path, FileOptions::default()).unwrap();
        node.write_zero_buffer(4096, (2 << 20) + 512).unwrap();
        node.write_zeroes_fallback(0, 512, false).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 3 << 20);
        assert!(data[..512].iter().all(|b| *b == 0));
        assert!(data[512..4096].iter().all(|b| *b == 0xab));
        assert!(data[4096..4096 + (2 << 20) + 512].iter().all(|b| *b == 0));
        assert!(data[4096 + (2 << 20) + 512..].iter().all(|b| *b == 0xab));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_resolve_beneath_their_directory_with_or_without_openat2() {
        let root = std::env::temp_dir().join(format!("vubd-beneath-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("vm/sub")).unwrap();
        std::fs::write(root.join("outside.raw"), [1u8; 512]).unwrap();
        std::fs::write(root.join("vm/sub/inside.raw"), [2u8; 512]).unwrap();
        std::os::unix::fs::symlink("../outside.raw", root.join("vm/out.raw")).unwrap();
        std::os::unix::fs::symlink("sub/inside.raw", root.join("vm/in.raw")).unwrap();
        let dir = root.join("vm");
        let options = FileOptions {
            read_only: true,
            ..FileOptions::default()
        };
        for (name, inside) in [
            ("out.raw", false),
            ("in.raw", true),
            ("sub/inside.raw", true),
        ] {
            let path = dir.join(name);
            let with = FileNode::open_beneath(&dir, Path::new(name), options);
            let without = FileNode::open_resolved_beneath(&dir, &path, options);
            for result in [with, without] {
                match result {
                    Ok(node) => {
                        assert!(inside, "{name} must be refused");
                        assert_eq!(node.size(), 512);
                    }
                    Err(e) => {
                        assert!(!inside, "{name}: {e:?}");
                        assert_eq!(e.kind(), ErrorKind::Refused);
                    }
                }
            }
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn directories_are_refused() {
        let options = FileOptions {
            read_only: true,
            ..FileOptions::default()
        };
        let err = FileNode::open(Path::new("/"), options).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused);
        let text = crate::error::Chain(&err).to_string();
        assert_eq!(text, "/: not a regular file or block device");
    }
}
