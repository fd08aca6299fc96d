//! Dirty bitmaps: recorded in the write path, managed at runtime (QMP) and offline
//! (`vubd bitmap`), persisted in qcow2 images.
//!
//! * [`DirtyBitmap`] is one bitmap: lock-free marking, counting, extents.
//! * [`BitmapManager`] owns a node's bitmaps: loading them at open (marking persistent ones
//!   `in_use` on disk before the first guest write), the QMP operations and transactions,
//!   storing them on close. Storage goes through [`BitmapStore`], which the qcow2 driver
//!   implements.
//! * The write path reads the list through a per-queue [`BitmapCursor`] (no shared lock: a
//!   generation number tells when to refresh) and marks before submitting the write.
//! * Operations that change what writes record run in a drained section of the [`WriteGate`]:
//!   no write is between being marked and completing, so a checkpoint (add a bitmap, disable
//!   the old one) splits the writes exactly.

mod dirty;
mod gate;
mod store;
mod transaction;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;

pub use dirty::{DirtyBitmap, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS};
pub use gate::WriteGate;
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
}

type BitmapList = Arc<Vec<Arc<DirtyBitmap>>>;

/// The bitmaps of one node.
pub struct BitmapManager {
    node_name: String,
    disk_size: u64,
    store: Option<Arc<dyn BitmapStore>>,
    read_only: bool,
    generation: AtomicU64,
    list: Mutex<BitmapList>,
    gate: Arc<WriteGate>,
    /// Serialises management operations.
    ops: Mutex<()>,
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
    recording: Vec<Arc<DirtyBitmap>>,
}

impl BitmapManager {
    /// Load the node's stored bitmaps. On a writable node, mark every consistent stored bitmap
    /// `in_use` on disk before returning, so that a crash from now on leaves them flagged
    /// inconsistent rather than stale.
    pub fn open(
        node_name: &str,
        disk_size: u64,
        store: Option<Arc<dyn BitmapStore>>,
        read_only: bool,
        gate: Arc<WriteGate>,
    ) -> Result<BitmapManager, BitmapError> {
        let mut list = Vec::new();
        if let Some(store) = &store {
            for stored in store.load_bitmaps()? {
                let b = if stored.inconsistent {
                    DirtyBitmap::inconsistent(&stored.name, stored.granularity_bits, true)
                } else {
                    let b = DirtyBitmap::new(
                        &stored.name,
                        stored.granularity_bits,
                        disk_size,
                        stored.recording,
                        true,
                    );
                    if let Some(data) = &stored.data {
                        b.load_bytes(data);
                    }
                    b
                };
                list.push(Arc::new(b));
            }
        }
        let manager = BitmapManager {
            node_name: node_name.to_string(),
            disk_size,
            store,
            read_only,
            generation: AtomicU64::new(0),
            list: Mutex::new(Arc::new(list)),
            gate,
            ops: Mutex::new(()),
        };
        if !read_only && manager.snapshot().iter().any(|b| b.is_persistent()) {
            manager.persist(true, false)?;
        }
        Ok(manager)
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
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
                .cloned()
                .collect(),
        }
    }

    /// Mark `[offset, offset + len)` in every recording bitmap. Returns whether some granule
    /// became dirty for the first time. No lock is taken unless the list changed since the
    /// cursor last looked.
    #[inline]
    pub fn mark(&self, cursor: &mut BitmapCursor, offset: u64, len: u64) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        if generation != cursor.generation {
            *cursor = self.cursor();
        }
        let mut newly = false;
        for b in &cursor.recording {
            newly |= b.mark(offset, len);
        }
        newly
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
            })
            .collect()
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
        let stored: Vec<String> = store.load_bitmaps()?.into_iter().map(|b| b.name).collect();
        let datas: Vec<(Arc<DirtyBitmap>, Option<Vec<u8>>)> = list
            .iter()
            .filter(|b| b.is_persistent())
            .map(|b| {
                let fresh = !stored.iter().any(|n| n == b.name());
                let data = (with_data && !b.is_inconsistent() || fresh).then(|| b.to_bytes());
                (b.clone(), data)
            })
            .collect();
        let entries: Vec<StoreEntry> = datas
            .iter()
            .map(|(b, data)| StoreEntry {
                name: b.name(),
                granularity_bits: b.granularity_bits(),
                recording: b.is_recording(),
                // An inconsistent bitmap stays flagged until it is removed.
                in_use: in_use || b.is_inconsistent(),
                data: match data {
                    Some(d) => StoreData::Data(d),
                    None => StoreData::Keep,
                },
            })
            .collect();
        store.store_bitmaps(&entries)
    }

    /// Store every persistent bitmap with its data and `in_use` cleared (clean shutdown).
    pub fn close(&self) -> Result<(), BitmapError> {
        let _ops = self.lock_ops();
        self.persist(false, true)
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
mod tests {
    use super::*;

    fn manager() -> BitmapManager {
        BitmapManager::open("disk", 1 << 30, None, false, Arc::new(WriteGate::new(2))).unwrap()
    }

    fn add(name: &str, disabled: bool) -> Action {
        Action::Add {
            name: name.into(),
            granularity: None,
            persistent: false,
            disabled,
        }
    }

    #[test]
    fn checkpoint_transaction_splits_writes() {
        let m = manager();
        m.apply(add("b0", false)).unwrap();
        let mut cursor = m.cursor();
        m.mark(&mut cursor, 0, 4096);
        m.transaction(&[add("b1", false), Action::Disable { name: "b0".into() }])
            .unwrap();
        m.mark(&mut cursor, 1 << 20, 4096);
        let infos = m.infos();
        assert_eq!(infos[0].count, 65536, "b0 has only the write before");
        assert!(!infos[0].recording);
        assert_eq!(infos[1].count, 65536, "b1 has only the write after");
        assert!(infos[1].recording);
    }

    #[test]
    fn a_failing_action_applies_nothing() {
        let m = manager();
        m.apply(add("a", false)).unwrap();
        let err = m
            .transaction(&[
                add("b", false),
                Action::Clear {
                    name: "nope".into(),
                },
            ])
            .unwrap_err();
        assert!(matches!(err, BitmapError::NotFound(_)));
        assert_eq!(m.infos().len(), 1);
        assert!(matches!(
            m.apply(add("a", false)),
            Err(BitmapError::Exists(_))
        ));
    }

    #[test]
    fn merge_clear_enable_disable() {
        let m = manager();
        m.transaction(&[add("a", false), add("b", true)]).unwrap();
        let mut cursor = m.cursor();
        m.mark(&mut cursor, 0, 1);
        assert_eq!(m.infos()[1].count, 0, "disabled bitmaps record nothing");
        m.apply(Action::Merge {
            target: "b".into(),
            sources: vec!["a".into()],
        })
        .unwrap();
        assert_eq!(m.infos()[1].count, 65536);
        m.apply(Action::Clear { name: "a".into() }).unwrap();
        assert_eq!(m.infos()[0].count, 0);
        m.apply(Action::Enable { name: "b".into() }).unwrap();
        m.mark(&mut cursor, 1 << 20, 1);
        assert_eq!(m.infos()[1].count, 2 * 65536);
        m.apply(Action::Remove { name: "a".into() }).unwrap();
        assert_eq!(m.infos().len(), 1);
    }

    #[test]
    fn persistent_bitmaps_need_a_store_and_valid_parameters() {
        let m = manager();
        let err = m
            .apply(Action::Add {
                name: "p".into(),
                granularity: None,
                persistent: true,
                disabled: false,
            })
            .unwrap_err();
        assert!(err.to_string().contains("only qcow2"), "{err}");
        for g in [256, 3000, 1 << 32] {
            assert!(m
                .apply(Action::Add {
                    name: "g".into(),
                    granularity: Some(g),
                    persistent: false,
                    disabled: false
                })
                .is_err());
        }
        assert!(m.apply(add(&"x".repeat(1024), false)).is_err());
    }
}
