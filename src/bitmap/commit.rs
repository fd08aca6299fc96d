//! Group commit of first marks: one thread per node writes the blocks of bitmap data that
//! writes newly dirtied (4 KiB each, in place), syncs once, and lets every write that waited go
//! on.
//!
//! Epochs: a writer that needs its marks on disk asks for one ([`Committer::request`]) and is
//! given `started + 1`, the next commit to begin; once `completed` reaches it, its marks are
//! durable — which the writer confirms by asking its bitmaps again (a commit that failed leaves
//! them not durable, and the write fails rather than reach the disk unrecorded). The thread
//! begins a commit by taking `started + 1` under the lock (after which new writers are given
//! the one after), then takes the flagged blocks, writes them, syncs, records them as
//! durable, publishes `completed`, and wakes the queues. Every writer that asked while a commit
//! was being prepared shares its one sync. A failed write or sync flags the blocks again, so a
//! later commit retries them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::{BitmapList, BitmapStore, WriteGate};

#[derive(Default)]
struct State {
    /// The highest epoch a writer waits for.
    requested: u64,
    /// The epoch being (or last) committed.
    started: u64,
    stop: bool,
}

/// What the writers and the commit thread share.
#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    completed: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The group-commit thread of one node's bitmaps.
pub(super) struct Committer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Start the thread, which commits the flagged blocks of the bitmaps in `list` to
    /// `store` and wakes the queues registered with `gate`.
    ///
    /// A commit holds `store_lock` while it writes in place: whoever switches the bitmap
    /// directory takes it too, so no mark is ever written into a cluster a switch frees.
    pub fn start(
        list: Arc<Mutex<BitmapList>>,
        store: Arc<dyn BitmapStore>,
        gate: Arc<WriteGate>,
        store_lock: Arc<Mutex<()>>,
    ) -> std::io::Result<Committer> {
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        let thread = crate::thread::spawn_quiet("vubd-bitmaps", move || {
            run(&thread_shared, &list, &*store, &gate, &store_lock)
        })?;
        Ok(Committer {
            shared,
            thread: Some(thread),
        })
    }

    /// Ask for the marks made so far to reach the disk; returns the epoch to wait for.
    pub fn request(&self) -> u64 {
        let mut state = self.shared.lock();
        let target = state.started + 1;
        state.requested = state.requested.max(target);
        drop(state);
        self.shared.cond.notify_one();
        target
    }

    /// The last epoch whose marks are on disk.
    #[inline]
    pub fn completed(&self) -> u64 {
        self.shared.completed.load(Ordering::Acquire)
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.cond.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    shared: &Shared,
    list: &Mutex<BitmapList>,
    store: &dyn BitmapStore,
    gate: &WriteGate,
    store_lock: &Mutex<()>,
) {
    loop {
        let epoch = {
            let mut state = shared.lock();
            while !state.stop && state.requested <= shared.completed.load(Ordering::Acquire) {
                state = shared.cond.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.requested <= shared.completed.load(Ordering::Acquire) {
                // Stopping, and no writer waits.
                return;
            }
            state.started += 1;
            state.started
        };
        let stored = store_lock.lock().unwrap_or_else(|p| p.into_inner());
        let bitmaps = list.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut written = Vec::new();
        for bitmap in bitmaps.iter() {
            let Some(track) = bitmap.track() else {
                continue;
            };
            for c in track.take_flush() {
                let Some((offset, bytes, generation)) = track.block(bitmap, c) else {
                    continue;
                };
                match store.write_data_cluster(offset, &bytes) {
                    Ok(()) => written.push((track.clone(), c, generation)),
                    Err(e) => {
                        log::error!("bitmap '{}': writing its marks: {e}", bitmap.name());
                        track.flag(c);
                    }
                }
            }
        }
        if !written.is_empty() {
            match store.sync_bitmaps() {
                Ok(()) => {
                    for (track, c, generation) in &written {
                        track.set_durable(*c, *generation);
                    }
                }
                Err(e) => {
                    log::error!("syncing bitmap marks: {e}");
                    for (track, c, _) in &written {
                        track.flag(*c);
                    }
                }
            }
        }
        drop(stored);
        shared.completed.store(epoch, Ordering::Release);
        gate.wake_all();
    }
}
