//! What an RBD image holds where, for NBD's `base:allocation` (a backup of a raw disk on RBD
//! skips what was never written): librbd's `rbd_diff_iterate2` against the image's beginning,
//! object by object from the fast-diff map, as QEMU's rbd driver answers block status.
//!
//! Without a valid fast-diff map that would stat every object in the range, so the image then
//! says data everywhere, which is always true.

use std::ffi::{c_int, c_void};
use std::io;

use super::{check, ffi, RbdImage};

/// At most this much of the image is looked at per call (a bound on its time).
const MAX_SCAN: u64 = 1 << 30;

/// Stops the iteration once the answer is known (any negative value does; this one is ours).
const STOP: c_int = -9000;

/// What the iteration found: the first data extent, grown while the next one is contiguous.
struct Scan {
    data: Option<(u64, u64)>,
}

/// `rbd_diff_iterate2`'s callback, called for each extent with data, in order.
unsafe extern "C" fn on_extent(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Scan` `allocation` passes, alive and used by nobody else during
    // the call.
    let scan = unsafe { &mut *arg.cast::<Scan>() };
    if exists == 0 {
        return 0;
    }
    let len = len as u64;
    match &mut scan.data {
        None => {
            scan.data = Some((offset, len));
            0
        }
        Some((start, n)) if *start + *n == offset => {
            *n += len;
            0
        }
        Some(_) => STOP,
    }
}

impl RbdImage {
    /// [`crate::block::remote::RemoteStore::allocation`]: whether `offset` starts data, and
    /// for how many bytes (at most `len`).
    pub(super) fn scan_allocation(&self, offset: u64, len: u64) -> io::Result<(u64, bool)> {
        let lib = self.lib();
        let mut features = 0u64;
        let mut flags = 0u64;
        // SAFETY: an open image and valid out-pointers.
        check(unsafe { (lib.rbd_get_features)(self.h.image, &mut features) })?;
        // SAFETY: as above.
        check(unsafe { (lib.rbd_get_flags)(self.h.image, &mut flags) })?;
        if features & ffi::FEATURE_FAST_DIFF == 0 || flags & ffi::FLAG_FAST_DIFF_INVALID != 0 {
            return Ok((len, true));
        }
        let span = len.min(MAX_SCAN);
        let mut scan = Scan { data: None };
        // SAFETY: an open image, no snapshot name (NULL: from the beginning), and a callback
        // whose argument outlives the call.
        let ret = unsafe {
            (lib.rbd_diff_iterate2)(
                self.h.image,
                std::ptr::null(),
                offset,
                span,
                1,
                1,
                on_extent,
                (&mut scan as *mut Scan).cast(),
            )
        };
        if ret < 0 && ret != STOP {
            check(ret)?;
        }
        let end = offset + span;
        Ok(match scan.data {
            // Whole objects are reported: clip to the range asked about.
            Some((start, n)) if start <= offset && start + n > offset => {
                ((start + n).min(end) - offset, true)
            }
            Some((start, _)) if start > offset => (start.min(end) - offset, false),
            // Not what librbd reports; data is always a true answer.
            Some(_) => (span, true),
            None => (span, false),
        })
    }
}
