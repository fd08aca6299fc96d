//! Backup jobs: `blockdev-backup` with `sync: none` puts a copy-before-write filter over the
//! disk, copying into the target (the fleecing node) what the guest is about to overwrite,
//! until `block-job-cancel`. Started inside a `transaction` with the checkpoint's bitmap
//! actions, in the same drained section of the write gate: the view and the bitmaps split
//! the guest's writes at one point.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::options::BackupSpec;
use super::{AddedKind, Graph, GraphError, State};
use crate::bitmap::{Action, BitmapError};
use crate::block::cbw::{CopyBeforeWrite, ReadGuard};
use crate::block::filter::FilterNode;
use crate::export::Export;

/// Copy granularity when the target has no allocation unit of its own (QEMU's block-copy
/// default).
const DEFAULT_CLUSTER: u64 = 64 << 10;

/// The copy-before-write state a node's readers must respect while it is a backup target.
#[derive(Debug, Default)]
pub struct ViewGuard(Mutex<Option<Arc<CopyBeforeWrite>>>);

impl ViewGuard {
    /// Register a read of `[offset, offset + len)` of the node, if a backup writes into it.
    pub fn reading(&self, offset: u64, len: u64) -> Option<ReadGuard> {
        let cbw = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        cbw.map(|c| c.reading(offset, len))
    }

    fn set(&self, cbw: Option<Arc<CopyBeforeWrite>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = cbw;
    }
}

/// A running backup.
pub struct BackupJob {
    device: String,
    target: String,
    /// The device's export, where the filter sits.
    export: Arc<Export>,
    cbw: Arc<CopyBeforeWrite>,
    view: Arc<ViewGuard>,
}

/// What `query-block-jobs` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInfo {
    pub id: String,
    pub device: String,
    pub len: u64,
    pub offset: u64,
}

/// A backup checked and ready to start.
struct Prepared {
    id: String,
    /// The device's export.
    export: Arc<Export>,
    spec: BackupSpec,
    cbw: Arc<CopyBeforeWrite>,
    view: Arc<ViewGuard>,
}

impl Graph {
    /// Check a `blockdev-backup` against the graph.
    fn prepare_backup(&self, state: &State, spec: BackupSpec) -> Result<Prepared, GraphError> {
        if state.jobs.contains_key(&spec.job_id) {
            return Err(GraphError::JobExists(spec.job_id));
        }
        let Some(disk) = state.disks.get(&spec.device) else {
            // Only a served disk takes guest writes worth protecting.
            self.format_node(state, &spec.device)?;
            return Err(GraphError::Invalid(format!(
                "blockdev-backup: device '{}' is not a served disk (a vhost-user-blk export's node)",
                spec.device
            )));
        };
        let export = disk.export().clone();
        if let Some(job) = state.jobs.values().find(|j| j.device == spec.device) {
            return Err(GraphError::NodeBusy {
                node: job.device.clone(),
                reason: "block device is in use by block job: backup".into(),
            });
        }
        let (target, view) = match state.nodes.get(&spec.target).map(|n| &n.kind) {
            Some(AddedKind::Format { driver, view, .. }) => (driver.clone(), view.clone()),
            _ => {
                // The disk itself, its protocol nodes or a file node cannot be targets.
                self.format_node(state, &spec.target)?;
                return Err(GraphError::Invalid(format!(
                    "blockdev-backup: target '{}' must be a node added with blockdev-add",
                    spec.target
                )));
            }
        };
        if target.read_only() {
            return Err(GraphError::Invalid(format!(
                "blockdev-backup: target '{}' is read-only",
                spec.target
            )));
        }
        if target.size() != export.size() {
            return Err(GraphError::SizeMismatch);
        }
        let cluster = target.allocation_unit().unwrap_or(DEFAULT_CLUSTER);
        let cbw = CopyBeforeWrite::new(target, export.size(), cluster).ok_or_else(|| {
            GraphError::Invalid(format!(
                "blockdev-backup: a disk of {} bytes needs more than {} MiB to track {cluster}-byte \
                 clusters; create the fleecing image with a larger cluster_size",
                export.size(),
                crate::block::cbw::MAX_MAP_BYTES >> 20
            ))
        })?;
        Ok(Prepared {
            id: spec.job_id.clone(),
            cbw: Arc::new(cbw),
            view,
            export,
            spec,
        })
    }

    /// `transaction`: bitmap actions (each on the disk it names) and backups, all or nothing,
    /// at one point of every disk's write stream.
    ///
    /// Each disk's actions are checked first, then applied with every disk involved drained at
    /// once (their write gates closed in node-name order, nested), and the backup filters go in
    /// while all are drained. Only an I/O error storing one disk's bitmaps can fail a
    /// transaction after the check; the disks before it keep their changes, and the error
    /// names the disk.
    pub fn transaction(
        &self,
        actions: &[(String, Action)],
        backups: Vec<BackupSpec>,
    ) -> Result<(), GraphError> {
        let mut state = self.lock();
        let mut prepared = Vec::with_capacity(backups.len());
        for spec in backups {
            if prepared.iter().any(|p: &Prepared| p.id == spec.job_id) {
                return Err(GraphError::JobExists(spec.job_id));
            }
            if prepared
                .iter()
                .any(|p: &Prepared| p.spec.device == spec.device)
            {
                return Err(GraphError::NodeBusy {
                    node: spec.device,
                    reason: "block device is in use by block job: backup".into(),
                });
            }
            prepared.push(self.prepare_backup(&state, spec)?);
        }
        // Every disk involved, with its actions, in node-name order.
        let mut groups: BTreeMap<String, (Arc<Export>, Vec<Action>)> = BTreeMap::new();
        for p in &prepared {
            groups
                .entry(p.spec.device.clone())
                .or_insert_with(|| (p.export.clone(), Vec::new()));
        }
        for (node, action) in actions {
            let export = match groups.get(node) {
                Some((export, _)) => export.clone(),
                None => self.disk_locked(&state, node)?,
            };
            groups
                .entry(node.clone())
                .or_insert_with(|| (export, Vec::new()))
                .1
                .push(action.clone());
        }
        for (export, actions) in groups.values() {
            export.bitmaps().check(actions)?;
        }
        let groups: Vec<(Arc<Export>, Vec<Action>)> = groups.into_values().collect();
        apply_nested(&groups, &mut || {
            for p in &prepared {
                let filter = FilterNode::new(p.cbw.clone(), p.export.disk().clone());
                p.export.set_root(Arc::new(filter));
                p.view.set(Some(p.cbw.clone()));
            }
        })?;
        for p in prepared {
            let user = format!("job {}", p.id);
            state.add_user(&p.spec.target, user.clone());
            state.add_user(&p.spec.device, user);
            state.jobs.insert(
                p.id,
                BackupJob {
                    device: p.spec.device,
                    target: p.spec.target,
                    export: p.export,
                    cbw: p.cbw,
                    view: p.view,
                },
            );
        }
        Ok(())
    }

    /// `block-job-cancel`: the disk is served without the filter again (once no write is in
    /// flight), and the target is free.
    pub fn cancel_job(&self, id: &str) -> Result<(), GraphError> {
        let mut state = self.lock();
        self.cancel_job_locked(&mut state, id)
    }

    pub(super) fn cancel_job_locked(&self, state: &mut State, id: &str) -> Result<(), GraphError> {
        let Some(job) = state.jobs.get(id) else {
            return Err(GraphError::JobNotFound(id.to_string()));
        };
        let export = &job.export;
        export
            .bitmaps()
            .transaction_with(&[], || export.set_root(export.disk().clone()))?;
        job.view.set(None);
        let (target, device) = (job.target.clone(), job.device.clone());
        state.jobs.remove(id);
        let user = format!("job {id}");
        state.remove_user(&target, &user);
        state.remove_user(&device, &user);
        Ok(())
    }

    /// `query-block-jobs`.
    pub fn jobs(&self) -> Vec<JobInfo> {
        self.lock()
            .jobs
            .iter()
            .map(|(id, job)| JobInfo {
                id: id.clone(),
                device: job.device.clone(),
                len: job.export.size(),
                offset: job.cbw.copied_bytes(),
            })
            .collect()
    }
}

/// Apply each disk's actions inside the previous disk's drained section, and `then` inside
/// the last: with every disk drained.
fn apply_nested(
    groups: &[(Arc<Export>, Vec<Action>)],
    then: &mut dyn FnMut(),
) -> Result<(), GraphError> {
    let Some(((export, actions), rest)) = groups.split_first() else {
        then();
        return Ok(());
    };
    let mut inner: Result<(), GraphError> = Ok(());
    export
        .bitmaps()
        .transaction_with(actions, || inner = apply_nested(rest, then))
        .map_err(|e| in_disk(export, e))?;
    inner
}

/// A bitmap error of one disk among several, naming it.
fn in_disk(export: &Export, e: BitmapError) -> GraphError {
    match e {
        BitmapError::Io(msg) => {
            BitmapError::Io(format!("{}: {msg}", export.node_names().format)).into()
        }
        e => e.into(),
    }
}
