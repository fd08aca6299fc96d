//! Bitmap operations and `transaction`: every action is checked against the state the
//! previous ones leave (nothing changes if one fails), then all are applied in one drained
//! section of the write gate, so a checkpoint splits the writes exactly.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{BitmapError, BitmapManager, DirtyBitmap, Persistence, DRAIN_TIMEOUT};
use super::{
    MAX_BITMAPS, MAX_BITMAP_BYTES, MAX_GRANULARITY_BITS, MAX_NAME_BYTES, MIN_GRANULARITY_BITS,
};

/// One action of a `transaction`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Add {
        name: String,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    },
    Remove {
        name: String,
    },
    Clear {
        name: String,
    },
    Enable {
        name: String,
    },
    Disable {
        name: String,
    },
    Merge {
        target: String,
        sources: Vec<String>,
    },
}

/// What a transaction changed among the persistent bitmaps.
#[derive(Default)]
struct Changes {
    /// Anything (their set, content or flags).
    any: bool,
    /// Their set (added or removed).
    set: bool,
    /// Names whose content changed (new, cleared, merged into).
    data: Vec<String>,
}

impl Changes {
    fn note(&mut self, b: &DirtyBitmap, set: bool, data: bool) {
        if !b.is_persistent() {
            return;
        }
        self.any = true;
        self.set |= set;
        if data {
            self.data.push(b.name().to_string());
        }
    }
}

impl BitmapManager {
    /// Run `actions` atomically: all of them or none, with no write in flight meanwhile.
    pub fn transaction(&self, actions: &[Action]) -> Result<(), BitmapError> {
        self.transaction_with(actions, || {})
    }

    /// Whether `actions` would be accepted now, without applying them (a transaction over
    /// several disks checks each before applying any).
    pub fn check(&self, actions: &[Action]) -> Result<(), BitmapError> {
        let _ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        self.stage(actions).map(drop)
    }

    /// [`Self::transaction`], then `then` once the actions are applied and stored, still with
    /// no write in flight: what a `transaction` that also starts a job (`blockdev-backup`)
    /// needs, so that the checkpoint and the job's start split the writes at one point.
    pub fn transaction_with(
        &self,
        actions: &[Action],
        then: impl FnOnce(),
    ) -> Result<(), BitmapError> {
        let _ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let staged = self.stage(actions)?;
        let _drained = self
            .gate
            .drain(DRAIN_TIMEOUT)
            .map_err(|_| BitmapError::Io("timed out waiting for writes in flight".into()))?;
        let changes = self.commit(actions, staged);
        match self.persistence {
            // Every change reaches the disk before the gate reopens, as one atomic switch.
            Persistence::CrashConsistent if changes.any || self.stale.load(Ordering::Acquire) => {
                self.persist_live(&changes.data)?
            }
            Persistence::OnClose if changes.set => self.persist(true, false)?,
            _ => {}
        }
        then();
        Ok(())
    }

    /// Check every action against the state the previous ones leave; returns the new bitmaps
    /// to create, by action index.
    fn stage(&self, actions: &[Action]) -> Result<Vec<Option<Arc<DirtyBitmap>>>, BitmapError> {
        // A lightweight model of the list: name -> (inconsistent, persistent).
        let list = self.snapshot();
        let mut model: Vec<(String, bool)> = list
            .iter()
            .map(|b| (b.name().to_string(), b.is_inconsistent()))
            .collect();
        let find =
            |model: &Vec<(String, bool)>, name: &str| model.iter().position(|(n, _)| n == name);
        let mut created = Vec::with_capacity(actions.len());
        for action in actions {
            let mut new = None;
            let require_usable = |model: &Vec<(String, bool)>, name: &str| match find(model, name) {
                None => Err(BitmapError::NotFound(name.to_string())),
                Some(i) if model[i].1 => Err(BitmapError::Inconsistent(name.to_string())),
                Some(_) => Ok(()),
            };
            match action {
                Action::Add {
                    name,
                    granularity,
                    persistent,
                    disabled,
                } => {
                    if find(&model, name).is_some() {
                        return Err(BitmapError::Exists(name.clone()));
                    }
                    let bitmap = self.new_bitmap(name, *granularity, *persistent, *disabled)?;
                    model.push((name.clone(), false));
                    new = Some(Arc::new(bitmap));
                }
                Action::Remove { name } => {
                    let i =
                        find(&model, name).ok_or_else(|| BitmapError::NotFound(name.clone()))?;
                    self.require_idle(name)?;
                    if self.read_only && list.iter().any(|b| b.name() == name && b.is_persistent())
                    {
                        return Err(BitmapError::Invalid(format!(
                            "Cannot remove persistent bitmap '{name}' from a read-only node"
                        )));
                    }
                    model.remove(i);
                }
                Action::Clear { name } | Action::Enable { name } | Action::Disable { name } => {
                    require_usable(&model, name)?;
                    self.require_idle(name)?;
                }
                Action::Merge { target, sources } => {
                    require_usable(&model, target)?;
                    self.require_idle(target)?;
                    for s in sources {
                        require_usable(&model, s)?;
                    }
                }
            }
            created.push(new);
        }
        Ok(created)
    }

    /// Refuse to change a bitmap an operation uses (QEMU's `BDRV_BITMAP_BUSY` check).
    fn require_idle(&self, name: &str) -> Result<(), BitmapError> {
        if self.is_busy(name) {
            return Err(BitmapError::Busy(name.to_string()));
        }
        Ok(())
    }

    fn new_bitmap(
        &self,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Result<DirtyBitmap, BitmapError> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(BitmapError::Invalid(format!(
                "Bitmap name must be 1 to {MAX_NAME_BYTES} bytes long"
            )));
        }
        let granularity = granularity.unwrap_or_else(|| self.default_granularity());
        let bits = granularity.trailing_zeros();
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&bits)
        {
            return Err(BitmapError::Invalid(
                "Granularity must be power of 2, and between 512 and 2147483648".into(),
            ));
        }
        let data_bytes = self.disk_size().div_ceil(granularity).div_ceil(8);
        if data_bytes > MAX_BITMAP_BYTES {
            return Err(BitmapError::Invalid(format!(
                "A bitmap of granularity {granularity} would need {data_bytes} bytes for this disk; use a larger granularity"
            )));
        }
        if persistent {
            if self.read_only {
                return Err(BitmapError::CannotStore(
                    self.node_name.clone(),
                    "the node is read-only".into(),
                ));
            }
            match &self.store {
                None => {
                    return Err(BitmapError::CannotStore(
                        self.node_name.clone(),
                        "only qcow2 images store bitmaps".into(),
                    ))
                }
                Some(s) => {
                    if let Some(why) = s.cannot_store() {
                        return Err(BitmapError::CannotStore(self.node_name.clone(), why));
                    }
                }
            }
            if self.snapshot().len() >= MAX_BITMAPS {
                return Err(BitmapError::Invalid("too many bitmaps".into()));
            }
        }
        Ok(DirtyBitmap::new(
            name,
            bits,
            self.disk_size(),
            !disabled,
            persistent,
        ))
    }

    /// Apply staged actions (they cannot fail now). Returns what changed among the persistent
    /// bitmaps.
    fn commit(&self, actions: &[Action], created: Vec<Option<Arc<DirtyBitmap>>>) -> Changes {
        let mut list: Vec<Arc<DirtyBitmap>> = self.snapshot().as_ref().clone();
        let mut changes = Changes::default();
        let get = |list: &Vec<Arc<DirtyBitmap>>, name: &str| {
            list.iter().find(|b| b.name() == name).cloned()
        };
        for (action, new) in actions.iter().zip(created) {
            match action {
                Action::Add { .. } => {
                    if let Some(b) = new {
                        changes.note(&b, true, true);
                        list.push(b);
                    }
                }
                Action::Remove { name } => {
                    if let Some(i) = list.iter().position(|b| b.name() == name) {
                        changes.note(&list[i], true, false);
                        list.remove(i);
                    }
                }
                Action::Clear { name } => {
                    if let Some(b) = get(&list, name) {
                        b.clear();
                        changes.note(&b, false, true);
                    }
                }
                Action::Enable { name } => {
                    if let Some(b) = get(&list, name) {
                        b.set_recording(true);
                        changes.note(&b, false, false);
                    }
                }
                Action::Disable { name } => {
                    if let Some(b) = get(&list, name) {
                        b.set_recording(false);
                        changes.note(&b, false, false);
                    }
                }
                Action::Merge { target, sources } => {
                    if let Some(t) = get(&list, target) {
                        for s in sources.iter().filter_map(|s| get(&list, s)) {
                            if !Arc::ptr_eq(&s, &t) {
                                t.merge_from(&s);
                            }
                        }
                        changes.note(&t, false, true);
                    }
                }
            }
        }
        self.publish(list);
        changes
    }
}
