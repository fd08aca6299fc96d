//! Backup jobs: `blockdev-backup` with `sync: none` puts a copy-before-write filter over the
//! disk, copying into the target (the fleecing node) what the guest is about to overwrite,
//! until `block-job-cancel`. Started inside a `transaction` with the checkpoint's bitmap
//! actions, in the same drained section of the write gate: the view and the bitmaps split
//! the guest's writes at one point.

use std::sync::{Arc, Mutex};

use super::options::BackupSpec;
use super::{AddedKind, Graph, GraphError, State};
use crate::bitmap::Action;
use crate::block::cbw::{CopyBeforeWrite, ReadGuard};
use crate::block::filter::FilterNode;

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
        let disk = &self.export.node_names().format;
        if spec.device != *disk {
            // Only the served disk takes guest writes worth protecting.
            self.format_node(state, &spec.device)?;
            return Err(GraphError::Invalid(format!(
                "blockdev-backup: device '{}' is not the served disk '{disk}'",
                spec.device
            )));
        }
        if let Some(job) = state.jobs.values().next() {
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
        if target.size() != self.export.size() {
            return Err(GraphError::SizeMismatch);
        }
        let cluster = target.allocation_unit().unwrap_or(DEFAULT_CLUSTER);
        let cbw = CopyBeforeWrite::new(target, self.export.size(), cluster).ok_or_else(|| {
            GraphError::Invalid(format!(
                "blockdev-backup: a disk of {} bytes needs more than {} MiB to track {cluster}-byte \
                 clusters; create the fleecing image with a larger cluster_size",
                self.export.size(),
                crate::block::cbw::MAX_MAP_BYTES >> 20
            ))
        })?;
        Ok(Prepared {
            id: spec.job_id.clone(),
            cbw: Arc::new(cbw),
            view,
            spec,
        })
    }

    /// `transaction`: bitmap actions and backups, all or nothing, at one point of the write
    /// stream.
    pub fn transaction(
        &self,
        actions: &[Action],
        backups: Vec<BackupSpec>,
    ) -> Result<(), GraphError> {
        let mut state = self.lock();
        let mut prepared = Vec::with_capacity(backups.len());
        for spec in backups {
            if prepared.iter().any(|p: &Prepared| p.id == spec.job_id) {
                return Err(GraphError::JobExists(spec.job_id));
            }
            if !prepared.is_empty() {
                return Err(GraphError::NodeBusy {
                    node: spec.device,
                    reason: "block device is in use by block job: backup".into(),
                });
            }
            prepared.push(self.prepare_backup(&state, spec)?);
        }
        let export = &self.export;
        self.export.bitmaps().transaction_with(actions, || {
            for p in &prepared {
                let filter = FilterNode::new(p.cbw.clone(), export.disk().clone());
                export.set_root(Arc::new(filter));
                p.view.set(Some(p.cbw.clone()));
            }
        })?;
        for p in prepared {
            if let Some(n) = state.nodes.get_mut(&p.spec.target) {
                n.users.insert(format!("job {}", p.id));
            }
            state.jobs.insert(
                p.id,
                BackupJob {
                    device: p.spec.device,
                    target: p.spec.target,
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
        let export = &self.export;
        export
            .bitmaps()
            .transaction_with(&[], || export.set_root(export.disk().clone()))?;
        job.view.set(None);
        let target = job.target.clone();
        state.jobs.remove(id);
        if let Some(n) = state.nodes.get_mut(&target) {
            n.users.remove(&format!("job {id}"));
        }
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
                len: self.export.size(),
                offset: job.cbw.copied_bytes(),
            })
            .collect()
    }
}
