//! The synchronous engine: runs each operation when it is pushed.

use std::collections::VecDeque;
use std::io;

use super::{run_sync, Op};

/// Runs operations inline and queues their results for [`SyncEngine::reap`].
#[derive(Default)]
pub struct SyncEngine {
    done: VecDeque<(u64, i32)>,
    /// The previous operation was linked and failed: cancel the next one, as io_uring does.
    cancel_next: bool,
    /// Bytes moved by the operations in `done`.
    done_bytes: u64,
}

impl SyncEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Run `op` now.
    ///
    /// # Safety
    /// Every pointer in `op` must be valid for the duration of the call.
    pub unsafe fn push(&mut self, op: Op, user_data: u64, link: bool) -> io::Result<()> {
        let result = if std::mem::take(&mut self.cancel_next) {
            -libc::ECANCELED
        } else {
            // SAFETY: forwarded contract.
            unsafe { run_sync(op) }
        };
        self.cancel_next = link && result < 0;
        self.done_bytes += u64::try_from(result).unwrap_or(0);
        self.done.push_back((user_data, result));
        Ok(())
    }

    /// Bytes moved by operations run and not yet reaped.
    pub fn done_bytes(&self) -> u64 {
        self.done_bytes
    }

    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) {
        self.done_bytes = 0;
        while let Some((user_data, result)) = self.done.pop_front() {
            f(user_data, result);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.done.len()
    }
}
