//! The `rbd` protocol node: a Ceph RBD image through librbd's asynchronous API.
//!
//! Guest transfers go to `rbd_aio_readv`/`rbd_aio_writev` on the guest's own iovecs (no copy
//! in vubd), flushes to `rbd_aio_flush`, discards and write-zeroes to their aio calls; librbd
//! completes them on its own threads, which hand the result to the submitting queue's
//! [`Completion`]. The library is loaded at run time ([`ffi`]).
//!
//! **Durability.** A write librbd completes is on every OSD of its placement group
//! (replicated, journalled) unless librbd's writeback cache (`rbd_cache`, on unless
//! `cache.direct`, as QEMU sets it) still holds it; `rbd_aio_flush` returns once everything
//! completed before it is on the OSDs. vubd's crash consistency (bitmap marks committed
//! before writes, guest flushes) therefore holds on RBD exactly as on a local file with
//! `fdatasync`. Until a guest first flushes, librbd keeps the cache writethrough
//! (`rbd_cache_writethrough_until_flush`), so a guest that never flushes loses nothing.
//!
//! **Exclusion.** A writable image is opened with librbd's exclusive lock taken explicitly
//! (`rbd_lock_acquire`): librbd then refuses to hand it to another client, so two daemons (or
//! a daemon and QEMU) never write one image. Images without the `exclusive-lock` feature are
//! refused unless locking is off.

mod ffi;
mod status;

use std::ffi::{c_int, c_void, CString};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use thiserror::Error;

use super::location::RbdSpec;
use super::{Completion, RemoteOp, RemoteStore};
use crate::block::error::ErrorKind;
use crate::block::ZeroOp;
use ffi::Lib;

/// How long connecting to the cluster may take before opening fails (Ceph's own default,
/// `client_mount_timeout`, is 5 minutes), unless the options set it.
const MOUNT_TIMEOUT_SECS: &str = "30";

/// Why an RBD image cannot be opened.
#[derive(Debug, Error)]
pub enum RbdError {
    #[error("{0}")]
    Library(String),
    #[error("invalid name or option: {0}")]
    BadName(String),
    #[error("cannot read the Ceph configuration {conf}: {err}")]
    Conf { conf: String, err: io::Error },
    #[error("Ceph option {key}={value}: {err}")]
    Option {
        key: String,
        value: String,
        err: io::Error,
    },
    #[error(
        "cannot connect to the Ceph cluster as client.{user}: {err}; check the monitors \
         (mon_host in the configuration file) and the keyring"
    )]
    Connect { user: String, err: io::Error },
    #[error("no pool '{pool}' ({err}); create it with 'ceph osd pool create' and 'rbd pool init'")]
    Pool { pool: String, err: io::Error },
    #[error("cannot open the image: {err}; create it with 'rbd create --size SIZE POOL/IMAGE'")]
    Open { err: io::Error },
    #[error(
        "the image lacks the exclusive-lock feature, which keeps a second writer out; enable \
         it ('rbd feature enable POOL/IMAGE exclusive-lock') or open with locking off"
    )]
    NoExclusiveLock,
    #[error(
        "in use by another client (it holds the image's exclusive lock: {err}); stop it first, \
         or override with locking off"
    )]
    Locked { err: io::Error },
    #[error("{what}: {err}")]
    Io { what: &'static str, err: io::Error },
}

impl RbdError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RbdError::Library(_) | RbdError::NoExclusiveLock => ErrorKind::Unsupported,
            RbdError::BadName(_) | RbdError::Option { .. } => ErrorKind::Refused,
            RbdError::Locked { .. } => ErrorKind::Locked,
            _ => ErrorKind::Io,
        }
    }
}

/// A librbd return code as a result.
fn check(ret: c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret))
    } else {
        Ok(())
    }
}

fn cstring(s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::BadName(format!("'{s}' contains a NUL byte")))
}

/// The cluster connection, pool context and image, released in reverse order.
struct Handles {
    lib: &'static Lib,
    cluster: ffi::RadosT,
    ioctx: ffi::IoctxT,
    image: ffi::ImageT,
}

impl Drop for Handles {
    fn drop(&mut self) {
        // SAFETY: each handle is null or was returned by its create/open call and is released
        // once, image before context before cluster. rbd_close waits for the image's
        // in-flight operations (none remain: every queue drained before the graph closed).
        unsafe {
            if !self.image.is_null() {
                (self.lib.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.lib.rados_shutdown)(self.cluster);
            }
        }
    }
}

/// An open RBD image.
pub struct RbdImage {
    h: Handles,
    read_only: bool,
    /// The image's size as last read or set.
    size: AtomicU64,
    /// Serialises growing, so that concurrent writers past the end resize once.
    resize: Mutex<()>,
}

// SAFETY: librbd image handles are thread-safe (librbd serialises internally), and the
// cluster and context handles are only used at open and close.
unsafe impl Send for RbdImage {}
// SAFETY: as above.
unsafe impl Sync for RbdImage {}

impl fmt::Debug for RbdImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RbdImage")
            .field("read_only", &self.read_only)
            .field("size", &self.size)
            .finish()
    }
}

/// How an image is opened.
#[derive(Clone, Copy, Debug)]
pub struct RbdOpen {
    pub read_only: bool,
    /// Take the exclusive lock (writable images).
    pub lock: bool,
    /// librbd's writeback cache (`rbd_cache`): off for `cache.direct`.
    pub cache: bool,
}

impl RbdImage {
    pub fn open(spec: &RbdSpec, how: RbdOpen) -> Result<RbdImage, RbdError> {
        let lib = ffi::lib().map_err(RbdError::Library)?;
        let mut h = Handles {
            lib,
            cluster: std::ptr::null_mut(),
            ioctx: std::ptr::null_mut(),
            image: std::ptr::null_mut(),
        };
        let user = spec.user.clone().unwrap_or_else(|| "admin".into());
        let client = cstring(&format!("client.{user}"))?;
        // SAFETY: valid out-pointer and NUL-terminated names.
        check(unsafe { (lib.rados_create2)(&mut h.cluster, c"ceph".as_ptr(), client.as_ptr(), 0) })
            .map_err(|err| RbdError::Io {
                what: "rados_create2",
                err,
            })?;
        match &spec.conf {
            Some(conf) => {
                let path = cstring(&conf.display().to_string())?;
                // SAFETY: a live cluster handle and a NUL-terminated path.
                check(unsafe { (lib.rados_conf_read_file)(h.cluster, path.as_ptr()) }).map_err(
                    |err| RbdError::Conf {
                        conf: conf.display().to_string(),
                        err,
                    },
                )?;
            }
            // Ceph's default search ($CEPH_CONF, /etc/ceph/ceph.conf, ...); options may make
            // up for a missing file, as QEMU allows.
            // SAFETY: a live cluster handle; NULL asks for the default search.
            None => drop(unsafe { (lib.rados_conf_read_file)(h.cluster, std::ptr::null()) }),
        }
        let mut options = vec![
            (
                "rbd_cache",
                if how.cache { "true" } else { "false" }.to_string(),
            ),
            ("client_mount_timeout", MOUNT_TIMEOUT_SECS.to_string()),
        ];
        options.retain(|(k, _)| !spec.options.contains_key(*k));
        let options = options
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain(spec.options.clone());
        for (key, value) in options {
            let (k, v) = (cstring(&key)?, cstring(&value)?);
            // SAFETY: a live cluster handle and NUL-terminated strings.
            check(unsafe { (lib.rados_conf_set)(h.cluster, k.as_ptr(), v.as_ptr()) })
                .map_err(|err| RbdError::Option { key, value, err })?;
        }
        // SAFETY: a configured cluster handle.
        check(unsafe { (lib.rados_connect)(h.cluster) })
            .map_err(|err| RbdError::Connect { user, err })?;
        let pool = cstring(&spec.pool)?;
        // SAFETY: a connected cluster, a NUL-terminated name, a valid out-pointer.
        check(unsafe { (lib.rados_ioctx_create)(h.cluster, pool.as_ptr(), &mut h.ioctx) })
            .map_err(|err| RbdError::Pool {
                pool: spec.pool.clone(),
                err,
            })?;
        if let Some(ns) = &spec.namespace {
            let ns = cstring(ns)?;
            // SAFETY: a live context and a NUL-terminated name (copied by librados).
            unsafe { (lib.rados_ioctx_set_namespace)(h.ioctx, ns.as_ptr()) };
        }
        let name = cstring(&spec.image)?;
        let snap = spec.snapshot.as_deref().map(cstring).transpose()?;
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        // A snapshot is read-only whatever was asked.
        let read_only = how.read_only || spec.snapshot.is_some();
        let open = if read_only {
            lib.rbd_open_read_only
        } else {
            lib.rbd_open
        };
        // SAFETY: a live context, NUL-terminated names (or NULL), a valid out-pointer.
        check(unsafe { open(h.ioctx, name.as_ptr(), &mut h.image, snap_ptr) })
            .map_err(|err| RbdError::Open { err })?;
        if how.lock && !read_only {
            let mut features = 0u64;
            // SAFETY: an open image and a valid out-pointer.
            check(unsafe { (lib.rbd_get_features)(h.image, &mut features) }).map_err(|err| {
                RbdError::Io {
                    what: "rbd_get_features",
                    err,
                }
            })?;
            if features & ffi::FEATURE_EXCLUSIVE_LOCK == 0 {
                return Err(RbdError::NoExclusiveLock);
            }
            // SAFETY: an open image.
            check(unsafe { (lib.rbd_lock_acquire)(h.image, ffi::LOCK_MODE_EXCLUSIVE) })
                .map_err(|err| RbdError::Locked { err })?;
        }
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        check(unsafe { (lib.rbd_get_size)(h.image, &mut size) }).map_err(|err| RbdError::Io {
            what: "rbd_get_size",
            err,
        })?;
        Ok(RbdImage {
            h,
            read_only,
            size: AtomicU64::new(size),
            resize: Mutex::new(()),
        })
    }

    fn lib(&self) -> &'static Lib {
        self.h.lib
    }

    /// Start `op` with `completion` (already created); the return code of the aio call.
    ///
    /// # Safety
    /// `completion` is live and not yet used; `op`'s pointers stay valid until it fires.
    unsafe fn start(&self, op: RemoteOp, completion: ffi::CompletionT) -> c_int {
        let (lib, image) = (self.lib(), self.h.image);
        // SAFETY: an open image, a fresh completion, and iovecs valid until it fires.
        unsafe {
            match op {
                RemoteOp::Readv {
                    offset,
                    iov,
                    iovcnt,
                } => (lib.rbd_aio_readv)(image, iov, iovcnt as c_int, offset, completion),
                RemoteOp::Writev {
                    offset,
                    iov,
                    iovcnt,
                } => (lib.rbd_aio_writev)(image, iov, iovcnt as c_int, offset, completion),
                RemoteOp::Flush => (lib.rbd_aio_flush)(image, completion),
                RemoteOp::Zeroes {
                    offset,
                    len,
                    op: ZeroOp::Discard,
                } => (lib.rbd_aio_discard)(image, offset, len, completion),
                RemoteOp::Zeroes {
                    offset,
                    len,
                    op: ZeroOp::WriteZeroes { unmap },
                } => {
                    let flags = if unmap {
                        0
                    } else {
                        ffi::WRITE_ZEROES_FLAG_THICK_PROVISION
                    };
                    (lib.rbd_aio_write_zeroes)(image, offset, len as usize, completion, flags, 0)
                }
            }
        }
    }
}

/// What an operation's librbd completion carries to [`on_complete`].
struct Job {
    lib: &'static Lib,
    done: Completion,
    /// For reads: the guest iovecs and their length, to zero what lies past the image's end.
    read: Option<(*const libc::iovec, u32, usize)>,
}

/// librbd's completion callback, on one of librbd's threads.
unsafe extern "C" fn on_complete(c: ffi::CompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is the `Job` leaked for this completion in `submit`, reclaimed once here.
    let job = unsafe { Box::from_raw(arg.cast::<Job>()) };
    // SAFETY: `c` is the completion firing; released once, after its value is read.
    let ret = unsafe { (job.lib.rbd_aio_get_return_value)(c) };
    // SAFETY: as above.
    unsafe { (job.lib.rbd_aio_release)(c) };
    if let (Some((iov, iovcnt, len)), true) = (job.read, ret >= 0) {
        let got = ret as usize;
        if got < len {
            // Past the image's end reads as zeroes, as QEMU's rbd driver has it.
            // SAFETY: the request's iovecs, valid until `done` completes below.
            let iovecs = unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) };
            // SAFETY: guest buffers the request owns, not otherwise accessed meanwhile.
            unsafe { crate::block::io::transfer::fill_zero_from(iovecs, got) };
        }
    }
    let result = if ret < 0 {
        i32::try_from(ret).unwrap_or(-libc::EIO)
    } else {
        0
    };
    job.done.complete(result);
}

impl RemoteStore for RbdImage {
    fn driver(&self) -> &'static str {
        "rbd"
    }

    fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        check(unsafe { (self.lib().rbd_get_size)(self.h.image, &mut size) })?;
        self.size.store(size, Ordering::Release);
        Ok(size)
    }

    fn grow_to(&self, size: u64) -> io::Result<()> {
        let _serial = self.resize.lock().unwrap_or_else(|e| e.into_inner());
        if self.size()? >= size {
            return Ok(());
        }
        // SAFETY: an open image.
        check(unsafe { (self.lib().rbd_resize)(self.h.image, size) })?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<(u64, bool)> {
        self.scan_allocation(offset, len)
    }

    unsafe fn submit(&self, op: RemoteOp, done: Completion) {
        if self.read_only && !matches!(op, RemoteOp::Readv { .. } | RemoteOp::Flush) {
            return done.complete(-libc::EROFS);
        }
        // SAFETY: the op's pointers are valid (forwarded contract).
        let len: usize = unsafe { op.iovecs() }.iter().map(|v| v.iov_len).sum();
        if let RemoteOp::Writev { offset, .. } = op {
            // A format node allocating past the end (qcow2 growing its image): librbd refuses
            // writes beyond the image, so grow it first, as a file would grow.
            let end = offset.saturating_add(len as u64);
            if end > self.size.load(Ordering::Acquire) {
                if let Err(e) = self.grow_to(end) {
                    return done.complete(-e.raw_os_error().unwrap_or(libc::EIO));
                }
            }
        }
        let read = match op {
            RemoteOp::Readv { iov, iovcnt, .. } => Some((iov, iovcnt, len)),
            _ => None,
        };
        let job = Box::into_raw(Box::new(Job {
            lib: self.lib(),
            done,
            read,
        }));
        let mut completion: ffi::CompletionT = std::ptr::null_mut();
        // SAFETY: `job` is a live allocation that the callback reclaims; a valid out-pointer.
        let ret = unsafe {
            (self.lib().rbd_aio_create_completion)(job.cast(), on_complete, &mut completion)
        };
        let ret = if ret < 0 {
            ret
        } else {
            // SAFETY: a fresh completion; the op's pointers are valid until it fires
            // (forwarded contract).
            let ret = unsafe { self.start(op, completion) };
            if ret < 0 {
                // Not started: the callback will not fire.
                // SAFETY: the completion was created above and is released once.
                unsafe { (self.lib().rbd_aio_release)(completion) };
            }
            ret
        };
        if ret < 0 {
            // SAFETY: the callback will not run for this job: reclaim it here, once.
            let job = unsafe { Box::from_raw(job) };
            job.done.complete(ret);
        }
    }
}
