//! Power-loss tests in one process: a qcow2 graph opened with a fault injector, driven the way
//! the queue executor drives it (mark the bitmaps, wait for their group commit, then write the
//! data), and a model of what the bitmaps must hold — exactly enough to tell an operation that
//! happened from one that did not, and from one half done.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vubd::bitmap::{Action, BitmapCursor, Persistence};
use vubd::block::fault::FaultInjector;
use vubd::block::{
    open_image, BlockDriver, Format, GuestIo, Locking, Mapping, NodeNames, OpenOptions, ZeroOp,
};
use vubd::export::{Export, ExportOptions};

/// What one bitmap must hold: every granule in `required`, none outside `possible`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelBitmap {
    pub granularity: u64,
    pub recording: bool,
    /// Granules of writes whose data reached the disk while it recorded.
    pub required: BTreeSet<u64>,
    /// Granules of every write attempted while it recorded (marks may land without the data).
    pub possible: BTreeSet<u64>,
}

/// The bitmaps by name.
pub type Model = BTreeMap<String, ModelBitmap>;

fn granules(offset: u64, len: u64, granularity: u64) -> impl Iterator<Item = u64> {
    offset / granularity..=(offset + len - 1) / granularity
}

/// Apply `action` to `model`, as vubd applies it.
pub fn apply(model: &mut Model, action: &Action) {
    match action {
        Action::Add {
            name,
            granularity,
            disabled,
            ..
        } => {
            model.insert(
                name.clone(),
                ModelBitmap {
                    granularity: granularity.unwrap_or(65536),
                    recording: !disabled,
                    ..ModelBitmap::default()
                },
            );
        }
        Action::Remove { name } => {
            model.remove(name);
        }
        Action::Clear { name } => {
            if let Some(b) = model.get_mut(name) {
                b.required.clear();
                b.possible.clear();
            }
        }
        Action::Enable { name } | Action::Disable { name } => {
            if let Some(b) = model.get_mut(name) {
                b.recording = matches!(action, Action::Enable { .. });
            }
        }
        Action::Merge { target, sources } => {
            let (mut required, mut possible) = (BTreeSet::new(), BTreeSet::new());
            let g = model.get(target).map_or(1, |t| t.granularity);
            for s in sources {
                if let Some(b) = model.get(s) {
                    for set in [(&b.required, &mut required), (&b.possible, &mut possible)] {
                        for gr in set.0 {
                            set.1.extend(granules(gr * b.granularity, b.granularity, g));
                        }
                    }
                }
            }
            if let Some(t) = model.get_mut(target) {
                t.required.extend(required);
                t.possible.extend(possible);
            }
        }
    }
}

/// A graph served crash-consistently, with the model of its bitmaps.
pub struct Harness {
    pub export: Arc<Export>,
    cursor: BitmapCursor,
    pub model: Model,
    /// The model before the operation in progress, if one was cut short.
    pub before: Option<Model>,
}

/// Open `image` (qcow2) with `fault` watching its files.
pub fn open(image: &Path, fault: Option<Arc<FaultInjector>>) -> Result<Harness, String> {
    let root = open_image(
        image,
        Format::Qcow2,
        &OpenOptions {
            locking: Locking::Off,
            fault,
            ..OpenOptions::default()
        },
    )
    .map_err(|e| vubd::error::Chain(&e).to_string())?;
    let export = Export::new(
        root,
        ExportOptions {
            id: "disk".into(),
            read_only: false,
            writers: 1,
            engine: vubd::block::io::EngineKind::Sync,
            poll: vubd::vhost::poll::PollPolicy::OFF,
            node_names: NodeNames::derived("disk"),
            bitmaps: Persistence::CrashConsistent,
        },
    )
    .map_err(|e| vubd::error::Chain(&e).to_string())?;
    let cursor = export.bitmaps().cursor();
    Ok(Harness {
        export: Arc::new(export),
        cursor,
        model: Model::new(),
        before: None,
    })
}

impl Harness {
    /// A guest write of `len` bytes of `byte` at `offset`: mark, wait for the marks to be on
    /// disk, then write the data straight to the file (as the I/O engine does, past the fault
    /// injector: guest data counts as having reached the disk). Returns whether the data was
    /// written.
    pub fn write(&mut self, offset: u64, len: u64, byte: u8) -> bool {
        self.change(offset, len, |root| {
            let mut data = vec![byte; len as usize];
            let iov = [libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            }];
            // SAFETY: the iovec names `data`, alive and unused elsewhere for the call.
            let guest = unsafe { GuestIo::new(&iov) };
            let mut extents = Vec::new();
            let Ok(ticket) = root.map_write(offset, len, guest, &mut extents) else {
                return false;
            };
            let mut at = 0usize;
            let mut ok = true;
            for extent in &extents {
                if let Mapping::Data { file, offset } = extent.mapping {
                    let piece = &data[at..at + extent.len as usize];
                    ok &= pwrite(root.files()[file].fd().expect("a host file"), piece, offset);
                }
                at += extent.len as usize;
            }
            root.release(ticket, ok);
            ok
        })
    }

    /// A guest discard: marked like a write, then the node's metadata, then the host files.
    pub fn discard(&mut self, offset: u64, len: u64) -> bool {
        self.change(offset, len, |root| {
            let mut ops = Vec::new();
            if root
                .map_zeroes(offset, len, ZeroOp::Discard, &mut ops)
                .is_err()
            {
                return false;
            }
            ops.iter().all(|op| {
                let fd = root.files()[op.file].fd().expect("a host file");
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // SAFETY: fallocate on a descriptor the graph holds open.
                unsafe { libc::fallocate(fd, mode, op.offset as i64, op.len as i64) == 0 }
            })
        })
    }

    /// Mark `[offset, offset + len)` as the executor does (waiting for the group commit of
    /// first marks, failing if it did not make them durable), then `apply` the change.
    fn change(
        &mut self,
        offset: u64,
        len: u64,
        apply: impl FnOnce(&Arc<dyn BlockDriver>) -> bool,
    ) -> bool {
        for b in self.model.values_mut().filter(|b| b.recording) {
            b.possible.extend(granules(offset, len, b.granularity));
        }
        let export = self.export.clone();
        let bitmaps = export.bitmaps();
        assert!(bitmaps.gate().try_enter(0));
        let mut landed = false;
        if let Some(pending) = bitmaps.mark(&mut self.cursor, offset, len) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !bitmaps.committed(pending.epoch) {
                assert!(
                    Instant::now() < deadline,
                    "group commit {} never completed",
                    pending.epoch
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            if bitmaps.confirm(&mut self.cursor, std::iter::once((offset, len)), pending) {
                landed = apply(&export.root());
            }
        } else {
            landed = apply(&export.root());
        }
        bitmaps.gate().exit(0);
        if landed {
            for b in self.model.values_mut().filter(|b| b.recording) {
                b.required.extend(granules(offset, len, b.granularity));
            }
        }
        landed
    }

    /// A bitmap transaction; the model moves on if it succeeded, and keeps both states if it
    /// was cut short.
    pub fn transaction(&mut self, actions: &[Action]) -> bool {
        let mut after = self.model.clone();
        for a in actions {
            apply(&mut after, a);
        }
        match self.export.bitmaps().transaction(actions) {
            Ok(()) => {
                self.model = after;
                self.before = None;
                true
            }
            Err(_) => {
                self.before = Some(std::mem::replace(&mut self.model, after));
                false
            }
        }
    }

    /// Flush the graph (guest flush).
    pub fn flush(&self) -> bool {
        self.export.flush().is_ok()
    }

    /// Close the export as a clean shutdown does (it may fail under a fault).
    pub fn close(self) -> bool {
        self.export.close().is_ok()
    }
}

fn pwrite(fd: std::os::fd::RawFd, buf: &[u8], offset: u64) -> bool {
    // SAFETY: pwrite from a live buffer on a descriptor the graph holds open.
    let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset as i64) };
    n == buf.len() as isize
}

/// The bitmaps an image holds, as vubd loads them: name → (recording, in_use, granules).
pub fn stored_bitmaps(image: &Path) -> BTreeMap<String, (bool, bool, BTreeSet<u64>)> {
    let root = open_image(
        image,
        Format::Qcow2,
        &OpenOptions {
            read_only: true,
            locking: Locking::Off,
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("reopening {}: {}", image.display(), vubd::error::Chain(&e)));
    let store = root.clone().bitmap_store().expect("qcow2 stores bitmaps");
    store
        .load_bitmaps()
        .expect("load bitmaps")
        .into_iter()
        .map(|b| {
            let mut set = BTreeSet::new();
            if let Some(data) = &b.data {
                for (i, byte) in data.iter().enumerate() {
                    for bit in 0..8 {
                        if byte & (1 << bit) != 0 {
                            set.insert(i as u64 * 8 + bit);
                        }
                    }
                }
            }
            (b.name, (b.recording, b.inconsistent, set))
        })
        .collect()
}

/// Whether what the image holds is what `model` allows: the same bitmaps, recording as the
/// model says, consistent, each holding every required granule and no granule it could not.
pub fn matches(
    stored: &BTreeMap<String, (bool, bool, BTreeSet<u64>)>,
    model: &Model,
) -> Result<(), String> {
    let names: Vec<&String> = stored.keys().collect();
    let expected: Vec<&String> = model.keys().collect();
    if names != expected {
        return Err(format!("bitmaps {names:?}, expected {expected:?}"));
    }
    for (name, (recording, inconsistent, set)) in stored {
        let m = &model[name];
        if *inconsistent {
            return Err(format!("{name} is in use or inconsistent"));
        }
        if *recording != m.recording {
            return Err(format!(
                "{name}: recording {recording}, expected {}",
                m.recording
            ));
        }
        if let Some(g) = m.required.difference(set).next() {
            return Err(format!(
                "{name}: granule {g} of a write that reached the disk is not marked"
            ));
        }
        if let Some(g) = set.difference(&m.possible).next() {
            return Err(format!(
                "{name}: granule {g} is marked though no write could have marked it"
            ));
        }
    }
    Ok(())
}
