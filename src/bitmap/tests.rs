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
}

const MOCK_CLUSTER: u64 = 512;

impl BitmapStore for MockStore {
    fn load_bitmaps(&self) -> Result<Vec<StoredBitmap>, BitmapError> {
        Ok(Vec::new())
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
        self.store_bitmaps(entries, preallocate)
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

/// Mark as the write path does: wait for the commit a first touch needs, then ask again.
/// Returns whether the write may go to the disk.
fn mark_durably(m: &BitmapManager, cursor: &mut BitmapCursor, offset: u64, len: u64) -> bool {
    let Some(epoch) = m.mark(cursor, offset, len) else {
        return true;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !m.committed(epoch) {
        assert!(std::time::Instant::now() < deadline, "commit {epoch} hangs");
        std::thread::sleep(Duration::from_millis(1));
    }
    m.mark(cursor, offset, len).is_none()
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
