//! Dirty bitmaps: recorded in the write path, managed at runtime (QMP) and offline
//! (`vubd bitmap`), persisted in qcow2 images.
//!
//! * [`DirtyBitmap`] is one bitmap: lock-free marking, counting, extents.
//! * [`BitmapManager`] owns a node's bitmaps: loading them at open, the QMP operations and
//!   transactions, storing them. Storage goes through [`BitmapStore`], which the qcow2 driver
//!   implements.
//! * The write path reads the list through a per-queue [`BitmapCursor`] (no shared lock: a
//!   generation number tells when to refresh) and marks before submitting the write.
//! * Operations that change what writes record run in a drained section of the [`WriteGate`]:
//!   no write is between being marked and completing, so a checkpoint (add a bitmap, disable
//!   the old one) splits the writes exactly.
//!
//! Persistence ([`Persistence`]): crash-consistently by default — persistent bitmaps stay
//! consistent (not `in_use`) on disk while served, their data clusters preallocated; a write
//! whose granules are not yet durable waits for a group commit ([`commit`], [`durable`]) that
//! writes their clusters in place and syncs, so the disk always holds a superset of what
//! changed; every operation is one atomic switch of the bitmap directory. Or, as QEMU does, on
//! close: `in_use` while served, data stored at shutdown, inconsistent after a crash.

mod commit;
mod dirty;
mod durable;
mod gate;
mod marks;
mod resize;
mod store;
mod transaction;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;

use commit::Committer;
pub use dirty::{DirtyBitmap, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS};
use durable::DurableTrack;
pub use gate::WriteGate;
pub use marks::PendingMarks;
pub use store::{BitmapStore, StoreData, StoreEntry, StoredBitmap};
pub use transaction::Action;

/// Longest bitmap name (QEMU's limit, from the qcow2 specification's note).
pub const MAX_NAME_BYTES: usize = 1023;
/// Most bitmaps per image (QEMU's limit).
pub const MAX_BITMAPS: usize = 65535;
/// Most bitmap data per bitmap, 512 MiB (QEMU's `BME_MAX_PHYS_SIZE`).
pub const MAX_BITMAP_BYTES: u64 = 512 << 20;
/// How long a management operation waits for writes in flight to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of bitmap operations, worded for the user (QMP `desc`).
#[derive(Debug, Error)]
pub enum BitmapError {
    #[error("Bitmap '{0}' already exists")]
    Exists(String),
    #[error("Dirty bitmap '{0}' not found")]
    NotFound(String),
    #[error("Bitmap '{0}' is inconsistent and cannot be used; try block-dirty-bitmap-remove to delete this bitmap from disk")]
    Inconsistent(String),
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    Busy(String),
    #[error("{0}")]
    Invalid(String),
    #[error("Cannot store persistent bitmaps in node '{0}': {1}")]
    CannotStore(String, String),
    #[error("{0}")]
    Io(String),
}

/// What `query-named-block-nodes` reports of a bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub count: u64,
    pub granularity: u64,
    pub recording: bool,
    pub persistent: bool,
    pub inconsistent: bool,
    /// In use by an operation (an NBD export): it cannot be changed or removed.
    pub busy: bool,
}

type BitmapList = Arc<Vec<Arc<DirtyBitmap>>>;

/// How persistent bitmaps reach the disk while a node is served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Persistence {
    /// Consistent on disk at every moment: a kill or a power loss never leaves them `in_use`
    /// or missing a change.
    #[default]
    CrashConsistent,
    /// QEMU's way: `in_use` while served, stored at a clean shutdown.
    OnClose,
}

/// The bitmaps of one node.
pub struct BitmapManager {
    node_name: String,
    /// The disk's size, which every bitmap covers (grown by a resize).
    disk_size: AtomicU64,
    store: Option<Arc<dyn BitmapStore>>,
    read_only: bool,
    persistence: Persistence,
    generation: AtomicU64,
    list: Arc<Mutex<BitmapList>>,
    gate: Arc<WriteGate>,
    /// Serialises management operations.
    ops: Mutex<()>,
    /// Names of the bitmaps the image stores.
    stored: Mutex<HashSet<String>>,
    /// The group commit of first marks (crash-consistent persistence of a writable node).
    committer: Option<Committer>,
    /// The last store failed: the disk may lag memory, so the next one rewrites every
    /// bitmap's data.
    stale: AtomicBool,
    /// Held by a group commit writing marks in place, and by a store switching the directory.
    store_lock: Arc<Mutex<()>>,
    /// Bitmaps in use by operations (NBD exports), with how many use each.
    busy: Mutex<HashMap<String, usize>>,
}

impl std::fmt::Debug for BitmapManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitmapManager")
            .field("node_name", &self.node_name)
            .field("bitmaps", &self.snapshot().len())
            .finish()
    }
}

/// A queue's view of the recording bitmaps, refreshed when the generation moves (every
/// change of the list or of a bitmap's recording state publishes a new generation, and happens
/// while no write is being marked).
pub struct BitmapCursor {
    generation: u64,
    recording: Vec<(Arc<DirtyBitmap>, Option<Arc<DurableTrack>>)>,
}

impl BitmapManager {
    /// Load the node's stored bitmaps and get them ready for writes: crash-consistently, every
    /// consistent recording bitmap gets its data clusters preallocated (flags unchanged, not
    /// `in_use`); on close, every consistent one is marked `in_use` on disk before the first
    /// guest write, so that a crash leaves it flagged rather than stale.
    pub fn open(
        node_name: &str,
        disk_size: u64,
        store: Option<Arc<dyn BitmapStore>>,
        read_only: bool,
        persistence: Persistence,
        gate: Arc<WriteGate>,
    ) -> Result<BitmapManager, BitmapError> {
        let mut list = Vec::new();
        let mut stored = HashSet::new();
        if let Some(store) = &store {
            for bitmap in store.load_bitmaps()? {
                stored.insert(bitmap.name.clone());
                let b = if bitmap.inconsistent {
                    DirtyBitmap::inconsistent(&bitmap.name, bitmap.granularity_bits, true)
                } else {
                    let b = DirtyBitmap::new(
                        &bitmap.name,
                        bitmap.granularity_bits,
                        disk_size,
                        bitmap.recording,
                        true,
                    );
                    match &bitmap.data {
                        Some(data) => b.with_bytes(data),
                        None => b,
                    }
                };
                list.push(Arc::new(b));
            }
        }
        let list = Arc::new(Mutex::new(Arc::new(list)));
        let store_lock = Arc::new(Mutex::new(()));
        let committer = match (&store, persistence, read_only) {
            (Some(store), Persistence::CrashConsistent, false) => Some(
                Committer::start(
                    list.clone(),
                    store.clone(),
                    gate.clone(),
                    store_lock.clone(),
                )
                .map_err(|e| BitmapError::Io(format!("starting the bitmap commit thread: {e}")))?,
            ),
            _ => None,
        };
        let manager = BitmapManager {
            node_name: node_name.to_string(),
            disk_size: AtomicU64::new(disk_size),
            store,
            read_only,
            persistence,
            generation: AtomicU64::new(0),
            list,
            gate,
            ops: Mutex::new(()),
            stored: Mutex::new(stored),
            committer,
            stale: AtomicBool::new(false),
            store_lock,
            busy: Mutex::new(HashMap::new()),
        };
        if !read_only && manager.snapshot().iter().any(|b| b.is_persistent()) {
            match persistence {
                Persistence::CrashConsistent => manager.persist_live(&[])?,
                Persistence::OnClose => manager.persist(true, false)?,
            }
        }
        Ok(manager)
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The size of the disk the bitmaps cover.
    pub fn disk_size(&self) -> u64 {
        self.disk_size.load(Ordering::Acquire)
    }

    pub fn gate(&self) -> &Arc<WriteGate> {
        &self.gate
    }

    fn snapshot(&self) -> BitmapList {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish(&self, list: Vec<Arc<DirtyBitmap>>) {
        *self.list.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(list);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A cursor for a queue's write path.
    pub fn cursor(&self) -> BitmapCursor {
        let generation = self.generation.load(Ordering::Acquire);
        BitmapCursor {
            generation,
            recording: self
                .snapshot()
                .iter()
                .filter(|b| b.is_recording())
                .map(|b| (b.clone(), b.track()))
                .collect(),
        }
    }

    /// Every bitmap, as query commands report them.
    pub fn infos(&self) -> Vec<BitmapInfo> {
        self.snapshot()
            .iter()
            .map(|b| BitmapInfo {
                name: b.name().to_string(),
                count: b.dirty_bytes(),
                granularity: b.granularity(),
                recording: b.is_recording(),
                persistent: b.is_persistent(),
                inconsistent: b.is_inconsistent(),
                busy: self.is_busy(b.name()),
            })
            .collect()
    }

    /// Take `name` for an operation that reads it (an NBD export): until [`Self::release`],
    /// it cannot be removed, cleared, enabled, disabled or merged into. Returns the bitmap.
    pub fn acquire(&self, name: &str) -> Result<Arc<DirtyBitmap>, BitmapError> {
        let _ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let list = self.snapshot();
        let b = usable(&list, name)?.clone();
        *self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default() += 1;
        Ok(b)
    }

    /// Give back a bitmap taken with [`Self::acquire`].
    pub fn release(&self, name: &str) {
        let _ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = busy.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                busy.remove(name);
            }
        }
    }

    pub(super) fn is_busy(&self, name: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// The dirty extents of a bitmap (for `vubd bitmap dump`).
    pub fn extents(&self, name: &str) -> Result<(u64, Vec<(u64, u64)>), BitmapError> {
        let list = self.snapshot();
        let b = usable(&list, name)?;
        Ok((b.granularity(), b.extents()))
    }

    fn default_granularity(&self) -> u64 {
        match &self.store {
            Some(s) => s.cluster_size().clamp(4096, 1 << 21),
            None => 65536,
        }
    }

    /// Run one action.
    pub fn apply(&self, action: Action) -> Result<(), BitmapError> {
        self.transaction(&[action])
    }

    /// Write the persistent bitmaps' directory. `in_use` while serving (data kept as stored,
    /// except for bitmaps that have none yet); with `with_data`, the current data too.
    fn persist(&self, in_use: bool, with_data: bool) -> Result<(), BitmapError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        if self.read_only {
            return Ok(());
        }
        let list = self.snapshot();
        let stored = self
            .stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let datas: Vec<(Arc<DirtyBitmap>, Option<Vec<u8>>)> = list
            .iter()
            .filter(|b| b.is_persistent())
            .map(|b| {
                let fresh = !stored.contains(b.name());
                let data = (with_data && !b.is_inconsistent() || fresh).then(|| b.to_bytes());
                (b.clone(), data)
            })
            .collect();
        let entries: Vec<StoreEntry> = datas
            .iter()
            .map(|(b, data)| StoreEntry::of(b, in_use, data.as_deref()))
            .collect();
        store.store_bitmaps(&entries, false)?;
        *self.stored.lock().unwrap_or_else(|p| p.into_inner()) =
            datas.iter().map(|(b, _)| b.name().to_string()).collect();
        Ok(())
    }

    /// Store the persistent bitmaps for crash-consistent serving, as one atomic switch: not
    /// `in_use` (unless inconsistent), data written for those in `changed` and for bitmaps the
    /// image does not hold yet, data clusters of recording ones preallocated. Then track what
    /// is on disk. Runs with no write in flight (opening, or a drained operation).
    fn persist_live(&self, changed: &[String]) -> Result<(), BitmapError> {
        self.persist_live_then(changed, true)
    }

    /// [`Self::persist_live`]; then the stored bitmaps are tracked if `track`, or sealed.
    fn persist_live_then(&self, changed: &[String], track: bool) -> Result<(), BitmapError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        if self.read_only {
            return Ok(());
        }
        // No group commit writes in place while the directory switches.
        let _switching = self.store_lock.lock().unwrap_or_else(|p| p.into_inner());
        let list = self.snapshot();
        let persistent: Vec<&Arc<DirtyBitmap>> =
            list.iter().filter(|b| b.is_persistent()).collect();
        let stored = self
            .stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let rewrite_all = self.stale.load(Ordering::Acquire);
        let datas: Vec<Option<Vec<u8>>> = persistent
            .iter()
            .map(|b| {
                let fresh = !stored.contains(b.name());
                // Memory ahead of the disk (a commit pending or failed): the data is written,
                // since the new track takes what memory holds as durable.
                let behind = b.track().is_some_and(|t| t.behind());
                let changed = rewrite_all || behind || changed.iter().any(|n| n == b.name());
                ((fresh || changed) && !b.is_inconsistent()).then(|| b.to_bytes())
            })
            .collect();
        let entries: Vec<StoreEntry> = persistent
            .iter()
            .zip(&datas)
            .map(|(b, data)| StoreEntry::of(b, false, data.as_deref()))
            .collect();
        let layouts = match store.store_bitmaps(&entries, true) {
            Ok(layouts) => layouts,
            Err(e) => {
                self.refuse_marks(&persistent);
                return Err(BitmapError::Io(format!(
                    "{e}; writes to node '{}' fail until a bitmap operation stores the bitmaps",
                    self.node_name
                )));
            }
        };
        *self.stored.lock().unwrap_or_else(|p| p.into_inner()) =
            persistent.iter().map(|b| b.name().to_string()).collect();
        if track {
            self.install_tracks(store.as_ref(), &persistent, layouts);
        } else {
            self.seal(&persistent);
        }
        Ok(())
    }

    /// After the last store, on close: a write that still came would fail rather than go
    /// unrecorded (a track that nothing makes durable, which takes no memory until used).
    fn seal(&self, persistent: &[&Arc<DirtyBitmap>]) {
        for b in persistent {
            if b.is_recording() && !b.is_inconsistent() {
                b.set_track(Some(Arc::new(DurableTrack::unwritable())));
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// After a successful crash-consistent store: each recording persistent bitmap tracks
    /// what of it is durable in the data clusters `layouts` gives, in the order of
    /// `persistent`.
    fn install_tracks(
        &self,
        store: &dyn BitmapStore,
        persistent: &[&Arc<DirtyBitmap>],
        layouts: Vec<Vec<u64>>,
    ) {
        self.stale.store(false, Ordering::Release);
        let cluster_bits = store.cluster_size().trailing_zeros();
        for (b, clusters) in persistent.iter().zip(layouts) {
            let live = b.is_recording() && !b.is_inconsistent() && !clusters.is_empty();
            b.set_track(live.then(|| Arc::new(DurableTrack::new(cluster_bits, clusters))));
        }
        // Cursors pick up the new tracks.
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// After a failed store, the directory on disk may be the old one or the new one, and the
    /// old data clusters may be freed: no mark may be written in place any more, and none may
    /// be kept only in memory. Every recording persistent bitmap gets a track that nothing
    /// ever makes durable, so writes fail (never reach the disk unrecorded) until a store
    /// succeeds.
    fn refuse_marks(&self, persistent: &[&Arc<DirtyBitmap>]) {
        self.stale.store(true, Ordering::Release);
        for b in persistent {
            if b.is_recording() && !b.is_inconsistent() {
                b.set_track(Some(Arc::new(DurableTrack::unwritable())));
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Store every persistent bitmap with its data and `in_use` cleared (clean shutdown).
    pub fn close(&self) -> Result<(), BitmapError> {
        let _ops = self.lock_ops();
        match self.persistence {
            // Nothing writes any more: what is on disk need not be tracked (building the
            // tracks of 8 bitmaps over 1 TiB was most of the time to shut down).
            Persistence::CrashConsistent if self.committer.is_some() => {
                self.persist_live_then(&[], false)
            }
            _ => self.persist(false, true),
        }
    }

    fn lock_ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn usable<'a>(
    list: &'a [Arc<DirtyBitmap>],
    name: &str,
) -> Result<&'a Arc<DirtyBitmap>, BitmapError> {
    let b = list
        .iter()
        .find(|b| b.name() == name)
        .ok_or_else(|| BitmapError::NotFound(name.to_string()))?;
    if b.is_inconsistent() {
        return Err(BitmapError::Inconsistent(name.to_string()));
    }
    Ok(b)
}

#[cfg(test)]
mod tests;
