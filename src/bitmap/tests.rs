//! Bitmap management, and crash-consistent persistence against a mock store.

use super::*;

fn manager() -> BitmapManager {
    BitmapManager::open(
        "disk",
        1 << 30,
        None,
        false,
        Persistence::default(),
        Arc::new(WriteGate::new(2)),
    )
    .unwrap()
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

/// An image in memory: what a store wrote, what a sync made durable, and switches to fail.
#[derive(Default)]
struct MockStore {
    state: Mutex<MockState>,
    fail_store: std::sync::atomic::AtomicBool,
    fail_write: std::sync::atomic::AtomicBool,
    /// What `load_bitmaps` returns.
    loaded: Vec<StoredBitmap>,
    /// Set: a grow switches (grows this node), then fails, as freeing the old structures can.
    fail_after_switch: Mutex<Option<Arc<dyn crate::block::BlockDriver>>>,
}

#[derive(Default)]
struct MockState {
    next_cluster: u64,
    /// The stored set: (name, recording, in_use, whether data was given).
    entries: Vec<(String, bool, bool, bool)>,
    written: std::collections::HashMap<u64, Vec<u8>>,
    durable: std::collections::HashMap<u64, Vec<u8>>,
    /// The disk's size once grown (1 MiB before).
    grown: Option<u64>,
    /// The data given in the last store, by name.
    data: std::collections::HashMap<String, Vec<u8>>,
    /// The layouts the last store returned.
    layouts: Vec<Vec<u64>>,
}

const MOCK_CLUSTER: u64 = 512;

impl BitmapStore for MockStore {
    fn load_bitmaps(&self) -> Result<Vec<StoredBitmap>, BitmapError> {
        Ok(self.loaded.clone())
    }

    fn store_bitmaps(
        &self,
        entries: &[StoreEntry],
        preallocate: bool,
    ) -> Result<Vec<Vec<u64>>, BitmapError> {
        if self.fail_store.load(Ordering::SeqCst) {
            return Err(BitmapError::Io("mock: store failed".into()));
        }
        let mut state = self.state.lock().unwrap();
        state.entries = entries
            .iter()
            .map(|e| {
                let data = matches!(e.data, StoreData::Data(_));
                (e.name.to_string(), e.recording, e.in_use, data)
            })
            .collect();
        state.data = entries
            .iter()
            .filter_map(|e| match e.data {
                StoreData::Data(d) => Some((e.name.to_string(), d.to_vec())),
                StoreData::Keep => None,
            })
            .collect();
        let mut layouts = Vec::new();
        for e in entries {
            let mut clusters = Vec::new();
            if preallocate && e.recording {
                let disk = state.grown.unwrap_or(1 << 20);
                let bytes = (disk >> e.granularity_bits).div_ceil(8);
                for _ in 0..bytes.div_ceil(MOCK_CLUSTER) {
                    state.next_cluster += 1;
                    clusters.push(state.next_cluster * MOCK_CLUSTER);
                }
            }
            layouts.push(clusters);
        }
        state.layouts = layouts.clone();
        Ok(layouts)
    }

    fn grow_with_bitmaps(
        &self,
        disk_size: u64,
        entries: &[StoreEntry],
        preallocate: bool,
    ) -> Result<Vec<Vec<u64>>, BitmapError> {
        if self.fail_store.load(Ordering::SeqCst) {
            return Err(BitmapError::Io("mock: store failed".into()));
        }
        self.state.lock().unwrap().grown = Some(disk_size);
        let layouts = self.store_bitmaps(entries, preallocate)?;
        if let Some(node) = self.fail_after_switch.lock().unwrap().as_ref() {
            node.grow(disk_size).unwrap();
            return Err(BitmapError::Io(
                "mock: freeing the old structures failed".into(),
            ));
        }
        Ok(layouts)
    }

    fn write_data_cluster(&self, offset: u64, data: &[u8]) -> Result<(), BitmapError> {
        if self.fail_write.load(Ordering::SeqCst) {
            return Err(BitmapError::Io("mock: write failed".into()));
        }
        self.state
            .lock()
            .unwrap()
            .written
            .insert(offset, data.to_vec());
        Ok(())
    }

    fn sync_bitmaps(&self) -> Result<(), BitmapError> {
        let mut state = self.state.lock().unwrap();
        let written = std::mem::take(&mut state.written);
        state.durable.extend(written);
        Ok(())
    }

    fn cannot_store(&self) -> Option<String> {
        None
    }

    fn cluster_size(&self) -> u64 {
        MOCK_CLUSTER
    }
}

/// A 1 MiB disk served crash-consistently from `store`, with persistent bitmap "p" (4 KiB
/// granules: 256 bits, one 512-byte data cluster).
fn served(store: &Arc<MockStore>) -> BitmapManager {
    let m = BitmapManager::open(
        "disk",
        1 << 20,
        Some(store.clone()),
        false,
        Persistence::CrashConsistent,
        Arc::new(WriteGate::new(1)),
    )
    .unwrap();
    m.apply(Action::Add {
        name: "p".into(),
        granularity: Some(4096),
        persistent: true,
        disabled: false,
    })
    .unwrap();
    m
}

/// Mark as the write path does: wait for the commit a first touch needs, then confirm.
/// Returns whether the write may go to the disk.
fn mark_durably(m: &BitmapManager, cursor: &mut BitmapCursor, offset: u64, len: u64) -> bool {
    let Some(pending) = m.mark(cursor, offset, len) else {
        return true;
    };
    wait_for(m, pending.epoch);
    m.confirm(cursor, std::iter::once((offset, len)), pending)
}

fn wait_for(m: &BitmapManager, epoch: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !m.committed(epoch) {
        assert!(std::time::Instant::now() < deadline, "commit {epoch} hangs");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn after_close_no_write_goes_ahead_unrecorded() {
    let store = Arc::new(MockStore::default());
    let m = served(&store);
    let mut cursor = m.cursor();
    assert!(
        mark_durably(&m, &mut cursor, 0, 4096),
        "served: a first touch is committed"
    );
    m.close().unwrap();
    assert!(
        !mark_durably(&m, &mut cursor, 8192, 4096),
        "sealed: a write that still came fails"
    );
    assert!(
        !mark_durably(&m, &mut cursor, 0, 4096),
        "even to a granule on disk: nothing tracks the disk any more"
    );
}

#[test]
fn a_first_touch_waits_for_its_mark_to_be_synced_then_marks_are_free() {
    let store = Arc::new(MockStore::default());
    let m = served(&store);
    {
        let state = store.state.lock().unwrap();
        assert_eq!(
            state.entries,
            vec![("p".into(), true, false, true)],
            "never in_use"
        );
    }
    let mut cursor = m.cursor();
    assert!(
        m.mark(&mut cursor, 8192, 4096).is_some(),
        "granule 2 is new"
    );
    assert!(mark_durably(&m, &mut cursor, 8192, 4096));
    let state = store.state.lock().unwrap();
    let cluster = state
        .durable
        .get(&MOCK_CLUSTER)
        .expect("the data cluster was synced");
    assert_eq!(cluster[0], 0b100);
    drop(state);
    assert!(
        m.mark(&mut cursor, 8192, 100).is_none(),
        "durable: no commit"
    );
}

#[test]
fn a_failed_commit_fails_the_write_and_a_later_one_retries() {
    let store = Arc::new(MockStore::default());
    let m = served(&store);
    let mut cursor = m.cursor();
    store.fail_write.store(true, Ordering::SeqCst);
    assert!(
        !mark_durably(&m, &mut cursor, 0, 4096),
        "the mark is not on disk"
    );
    store.fail_write.store(false, Ordering::SeqCst);
    assert!(mark_durably(&m, &mut cursor, 0, 4096));
    assert_eq!(store.state.lock().unwrap().durable[&MOCK_CLUSTER][0], 1);
}

#[test]
fn after_a_failed_store_writes_fail_until_a_store_succeeds() {
    let store = Arc::new(MockStore::default());
    let m = served(&store);
    let mut cursor = m.cursor();
    assert!(mark_durably(&m, &mut cursor, 0, 4096));
    store.fail_store.store(true, Ordering::SeqCst);
    let err = m.apply(Action::Clear { name: "p".into() }).unwrap_err();
    assert!(
        err.to_string().contains("writes to node 'disk' fail"),
        "{err}"
    );
    // Where the bitmap lives on disk is unknown now: not even a granule that was durable may
    // be written.
    assert!(!mark_durably(&m, &mut cursor, 0, 4096));
    assert!(!mark_durably(&m, &mut cursor, 65536, 4096));
    store.fail_store.store(false, Ordering::SeqCst);
    // Any operation stores again, rewriting every bitmap's data.
    m.apply(add("scratch", false)).unwrap();
    assert_eq!(
        store.state.lock().unwrap().entries,
        vec![("p".into(), true, false, true)]
    );
    assert!(mark_durably(&m, &mut cursor, 65536, 4096));
}

#[test]
fn a_store_rewrites_the_data_of_a_bitmap_whose_marks_did_not_all_reach_the_disk() {
    let store = Arc::new(MockStore::default());
    let m = served(&store);
    let mut cursor = m.cursor();
    store.fail_write.store(true, Ordering::SeqCst);
    assert!(
        !mark_durably(&m, &mut cursor, 0, 4096),
        "in memory, not on disk"
    );
    // Another write asks for one more commit: let it fail too before the disk works again,
    // or it may make the mark durable before the operation below, which then has nothing to
    // rewrite.
    if let Some(pending) = m.mark(&mut cursor, 0, 4096) {
        wait_for(&m, pending.epoch);
        assert!(!m.confirm(&mut cursor, std::iter::once((0, 4096)), pending));
    }
    store.fail_write.store(false, Ordering::SeqCst);
    // An operation that changes nothing of "p" still stores its data: the new track will take
    // what memory holds as durable, so the disk must hold it.
    m.apply(Action::Add {
        name: "q".into(),
        granularity: Some(65536),
        persistent: true,
        disabled: true,
    })
    .unwrap();
    assert_eq!(
        store.state.lock().unwrap().entries,
        vec![
            ("p".into(), true, false, true),
            ("q".into(), false, false, true)
        ]
    );
    assert!(m.mark(&mut cursor, 0, 4096).is_none(), "durable now");
    // With memory and disk in step, the next store keeps the data where it is.
    m.apply(Action::Remove { name: "q".into() }).unwrap();
    assert_eq!(
        store.state.lock().unwrap().entries,
        vec![("p".into(), true, false, false)]
    );
}

// Resizing: `BitmapManager::resize` grows every bitmap with the disk.

const MIB: u64 = 1 << 20;

/// A raw disk over a scratch file, the node `resize` grows when no store does it.
struct ScratchDisk {
    path: std::path::PathBuf,
    node: Arc<dyn crate::block::BlockDriver>,
}

impl ScratchDisk {
    fn new(name: &str, size: u64) -> ScratchDisk {
        use crate::block::file::{FileNode, FileOptions};
        let path = std::env::temp_dir().join(format!(
            "vubd-bitmap-resize-{}-{name}.raw",
            std::process::id()
        ));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let options = FileOptions {
            read_only: false,
            direct: false,
            lock: None,
        };
        let file = FileNode::open(&path, options).unwrap();
        let node = Arc::new(crate::block::raw::RawNode::new(Arc::new(file)));
        ScratchDisk { path, node }
    }

    fn file_len(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().len()
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A bitmap's name, count and extents.
type Contents = (String, u64, Vec<(u64, u64)>);

/// Every bitmap's name, count and extents.
fn contents(m: &BitmapManager) -> Vec<Contents> {
    m.infos()
        .into_iter()
        .map(|i| {
            let extents = m.extents(&i.name).unwrap().1;
            (i.name, i.count, extents)
        })
        .collect()
}

#[test]
fn resize_keeps_every_bit_leaves_the_new_range_clean_and_marks_go_to_the_new_layout() {
    let store = Arc::new(MockStore::default());
    let disk = ScratchDisk::new("keep", MIB);
    let m = served(&store);
    m.apply(Action::Add {
        name: "mem".into(),
        granularity: Some(4096),
        persistent: false,
        disabled: false,
    })
    .unwrap();
    let mut cursor = m.cursor();
    // Granules 0, 2 and the last (255) of "p": one 512-byte data cluster at MOCK_CLUSTER.
    for offset in [0, 8192, MIB - 100] {
        assert!(mark_durably(&m, &mut cursor, offset, 100));
    }
    let before = contents(&m);
    let old_cluster = store.state.lock().unwrap().durable[&MOCK_CLUSTER].clone();
    assert_eq!((old_cluster[0], old_cluster[31]), (0b101, 0x80));

    // 32 MiB of 4 KiB granules: 1024 bytes of data, two clusters.
    m.resize(32 * MIB, &*disk.node).unwrap();
    assert_eq!(m.disk_size(), 32 * MIB);
    assert_eq!(
        contents(&m),
        before,
        "the same bits, nothing beyond the old end"
    );
    let (c0, c1) = {
        let state = store.state.lock().unwrap();
        assert_eq!(state.grown, Some(32 * MIB));
        assert_eq!(state.entries, vec![("p".into(), true, false, true)]);
        let data = &state.data["p"];
        assert_eq!(data.len(), 1024, "data sized for the new disk");
        assert_eq!(data[..32], old_cluster[..32], "the old bits");
        assert!(data[32..].iter().all(|&b| b == 0), "the new range clean");
        assert_eq!(state.layouts[0].len(), 2);
        (state.layouts[0][0], state.layouts[0][1])
    };
    assert!(c0 != MOCK_CLUSTER && c1 != MOCK_CLUSTER, "fresh clusters");
    // What the store was given is durable: marking it again needs no commit.
    assert!(m.mark(&mut cursor, 0, 4096).is_none());
    assert!(m.mark(&mut cursor, MIB - 4096, 4096).is_none());
    // A mark past the old end lands, in the second new cluster.
    assert!(m.mark(&mut cursor, 20 * MIB, 4096).is_some(), "new granule");
    assert!(mark_durably(&m, &mut cursor, 20 * MIB, 4096));
    // A new mark in the old range goes to the first new cluster, which keeps the old bits.
    assert!(mark_durably(&m, &mut cursor, 4096, 1));
    let state = store.state.lock().unwrap();
    assert_eq!(state.durable[&c1][(20 * MIB / 4096 / 8 - 512) as usize], 1);
    assert_eq!(
        (state.durable[&c0][0], state.durable[&c0][31]),
        (0b111, 0x80)
    );
    assert_eq!(
        state.durable[&MOCK_CLUSTER], old_cluster,
        "the old cluster is left alone"
    );
    drop(state);
    let infos = m.infos();
    assert_eq!(infos[0].count, before[0].1 + 2 * 4096);
    assert_eq!(
        infos[1].count,
        before[1].1 + 2 * 4096,
        "memory bitmaps grew too"
    );
}

#[test]
fn a_busy_bitmap_refuses_the_resize() {
    let store = Arc::new(MockStore::default());
    let disk = ScratchDisk::new("busy", MIB);
    let m = served(&store);
    m.acquire("p").unwrap();
    let err = m.resize(8 * MIB, &*disk.node).unwrap_err();
    assert!(matches!(err, BitmapError::Busy(ref n) if n == "p"), "{err}");
    assert_eq!(m.disk_size(), MIB);
    assert_eq!(store.state.lock().unwrap().grown, None, "nothing stored");
    m.release("p");
    m.resize(8 * MIB, &*disk.node).unwrap();
    assert_eq!(m.disk_size(), 8 * MIB);
}

#[test]
fn an_inconsistent_bitmap_refuses_the_resize_until_removed() {
    let store = Arc::new(MockStore {
        loaded: vec![StoredBitmap {
            name: "bad".into(),
            granularity_bits: 16,
            recording: true,
            inconsistent: true,
            data: None,
        }],
        ..MockStore::default()
    });
    let disk = ScratchDisk::new("inconsistent", MIB);
    let m = BitmapManager::open(
        "disk",
        MIB,
        Some(store.clone()),
        false,
        Persistence::CrashConsistent,
        Arc::new(WriteGate::new(1)),
    )
    .unwrap();
    let err = m.resize(8 * MIB, &*disk.node).unwrap_err();
    assert!(matches!(err, BitmapError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("'bad' is inconsistent"), "{err}");
    assert_eq!(m.disk_size(), MIB);
    assert_eq!(store.state.lock().unwrap().grown, None);
    m.apply(Action::Remove { name: "bad".into() }).unwrap();
    m.resize(8 * MIB, &*disk.node).unwrap();
    assert_eq!(m.disk_size(), 8 * MIB);
}

#[test]
fn a_failing_store_leaves_the_old_size_and_bits_and_marks_go_on_in_place() {
    let store = Arc::new(MockStore::default());
    let disk = ScratchDisk::new("failing", MIB);
    let m = served(&store);
    let mut cursor = m.cursor();
    assert!(mark_durably(&m, &mut cursor, 0, 4096));
    let before = contents(&m);
    store.fail_store.store(true, Ordering::SeqCst);
    assert!(m.resize(32 * MIB, &*disk.node).is_err());
    assert_eq!(m.disk_size(), MIB);
    assert_eq!(contents(&m), before);
    assert_eq!(store.state.lock().unwrap().grown, None);
    // The switch never happened: the old data cluster is still the bitmap's.
    assert!(mark_durably(&m, &mut cursor, 3 * 4096, 1));
    assert_eq!(
        store.state.lock().unwrap().durable[&MOCK_CLUSTER][0],
        0b1001
    );
    // Past the old end there is nothing to mark.
    assert!(m.mark(&mut cursor, 20 * MIB, 4096).is_none());
    assert_eq!(m.infos()[0].count, 2 * 4096);
    store.fail_store.store(false, Ordering::SeqCst);
    m.resize(32 * MIB, &*disk.node).unwrap();
    assert_eq!(m.disk_size(), 32 * MIB);
    assert_eq!(m.infos()[0].count, 2 * 4096);
}

#[test]
fn a_failure_after_the_switch_keeps_the_new_size_and_refuses_marks_until_a_store() {
    let store = Arc::new(MockStore::default());
    let disk = ScratchDisk::new("after-switch", MIB);
    let m = served(&store);
    let mut cursor = m.cursor();
    assert!(mark_durably(&m, &mut cursor, 0, 4096));
    *store.fail_after_switch.lock().unwrap() = Some(disk.node.clone());
    assert!(m.resize(32 * MIB, &*disk.node).is_err());
    *store.fail_after_switch.lock().unwrap() = None;
    assert_eq!(m.disk_size(), 32 * MIB, "the disk is the new one");
    assert_eq!(m.infos()[0].count, 4096);
    // Where the bitmap lives is unknown: no write may go to the disk unrecorded.
    assert!(!mark_durably(&m, &mut cursor, 20 * MIB, 4096));
    assert!(!mark_durably(&m, &mut cursor, 4096, 4096));
    m.apply(add("scratch", false)).unwrap();
    assert!(mark_durably(&m, &mut cursor, 20 * MIB, 4096));
}

#[test]
fn without_persistent_bitmaps_the_node_grows_under_memory_bitmaps() {
    let disk = ScratchDisk::new("memory", MIB);
    let m = BitmapManager::open(
        "disk",
        MIB,
        None,
        false,
        Persistence::default(),
        Arc::new(WriteGate::new(1)),
    )
    .unwrap();
    m.apply(add("a", false)).unwrap();
    let mut cursor = m.cursor();
    m.mark(&mut cursor, MIB - 1, 1);
    m.resize(4 * MIB, &*disk.node).unwrap();
    assert_eq!((m.disk_size(), disk.file_len()), (4 * MIB, 4 * MIB));
    assert_eq!(m.extents("a").unwrap().1, vec![(MIB - 65536, 65536)]);
    m.mark(&mut cursor, 3 * MIB, 1);
    assert_eq!(m.infos()[0].count, 2 * 65536);
    // A bitmap added now covers the whole new disk.
    m.apply(add("b", false)).unwrap();
    m.mark(&mut cursor, 4 * MIB - 1, 1);
    assert_eq!(m.infos()[1].count, 65536);
    // A bitmap that would outgrow QEMU's limit refuses the resize, before the disk grows.
    m.apply(Action::Add {
        name: "fine".into(),
        granularity: Some(512),
        persistent: false,
        disabled: false,
    })
    .unwrap();
    let err = m.resize(4 << 40, &*disk.node).unwrap_err();
    assert!(err.to_string().contains("'fine'"), "{err}");
    assert_eq!((m.disk_size(), disk.file_len()), (4 * MIB, 4 * MIB));
}
