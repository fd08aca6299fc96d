//! The daemon's block graph: the served disks and everything around them.
//!
//! - Disks ([`disk`]): format nodes served by a vhost-user-blk export, each with its own
//!   socket, queues, dirty bitmaps and statistics — from the command line (`--export`,
//!   `--disk`) or QMP (`block-export-add` of a node added with `blockdev-add`).
//! - Nodes added at runtime (`blockdev-add`): fleecing images over a disk, or nodes to export.
//! - Backup jobs ([`job`]: `blockdev-backup` with `sync: none`, copy-before-write over a
//!   disk) and NBD exports ([`nbd`]) of any node with a disk's dirty bitmaps. Together they
//!   are QEMU's pull-mode backup, in QEMU's command shapes (docs/backup.md).
//!
//! Every node and disk records who uses it (a format node its file and backing, a job its
//! device and target, an NBD export its node), so that nothing in use is deleted. The graph's
//! lock is taken by control commands only; the request path reaches its disk's export
//! directly.

pub mod disk;
pub mod job;
pub mod nbd;
pub mod options;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use crate::bitmap::BitmapError;
use crate::block::{open_image, BackingChoice, BlockDriver, Locking, OpenOptions};
use crate::error::Chain;
use crate::export::ExportError;
use disk::{Disk, ExportSettings};
use job::{BackupJob, ViewGuard};
use options::{BackingRef, FileRef, FileSpec, NodeKind, NodeSpec};

/// Errors of graph commands, worded as QEMU words them where it has the same error.
#[derive(Debug, Error)]
pub enum GraphError {
    #[error("Cannot find device='' nor node-name='{0}'")]
    NodeNotFound(String),
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateNode(String),
    #[error("Node {0} is in use")]
    NodeInUse(String),
    #[error("Node '{node}' is busy: {reason}")]
    NodeBusy { node: String, reason: String },
    #[error("Job ID '{0}' already in use")]
    JobExists(String),
    #[error("Block job '{0}' not found")]
    JobNotFound(String),
    #[error("Source and target image have different sizes")]
    SizeMismatch,
    #[error("{node}: {cause}")]
    Open { node: String, cause: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Nbd(String),
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

impl GraphError {
    /// The QMP error class.
    pub fn class(&self) -> &'static str {
        match self {
            GraphError::JobNotFound(_) => "DeviceNotActive",
            _ => "GenericError",
        }
    }
}

impl From<crate::cli::Failure> for GraphError {
    fn from(f: crate::cli::Failure) -> Self {
        GraphError::Invalid(f.message)
    }
}

/// A node added at runtime.
struct Added {
    kind: AddedKind,
    /// Names of the nodes, jobs and exports that use it.
    users: BTreeSet<String>,
}

enum AddedKind {
    /// A `file` node: a name for a file until a format node opens it.
    File(FileSpec),
    Format {
        driver: Arc<dyn BlockDriver>,
        filename: PathBuf,
        /// The nodes it uses by name (`file`, `data-file`, `backing`): they are not deleted
        /// before it.
        children: Vec<String>,
        /// Its `file` and `data-file` children's node names, if given by name.
        file_node: Option<String>,
        data_file_node: Option<String>,
        backing_name: Option<String>,
        /// Readers of this node wait for copy-before-write while it is a backup's target.
        view: Arc<ViewGuard>,
    },
}

/// A format node and, for added ones, the guard its readers take while it is a backup target.
type FormatNode = (Arc<dyn BlockDriver>, Option<Arc<ViewGuard>>);

/// What `query-named-block-nodes` reports of an added node.
#[derive(Clone, Debug)]
pub struct AddedNodeInfo {
    pub name: String,
    pub driver: &'static str,
    pub filename: PathBuf,
    pub read_only: bool,
    pub size: u64,
    pub backing: Option<String>,
}

#[derive(Default)]
struct State {
    /// Served disks, by format node name.
    disks: BTreeMap<String, Disk>,
    nodes: BTreeMap<String, Added>,
    jobs: BTreeMap<String, BackupJob>,
    nbd: nbd::NbdState,
}

impl State {
    /// The disk one of whose nodes (format, `file`, `data-file`) is `name`.
    fn disk_of_node(&self, name: &str) -> Option<&Disk> {
        self.disks.values().find(|d| d.has_node(name))
    }

    /// Who uses node `name` (an added node or a disk's format node).
    fn users_mut(&mut self, name: &str) -> Option<&mut BTreeSet<String>> {
        match self.nodes.get_mut(name) {
            Some(n) => Some(&mut n.users),
            None => self.disks.get_mut(name).map(|d| &mut d.users),
        }
    }

    fn add_user(&mut self, name: &str, user: String) {
        if let Some(users) = self.users_mut(name) {
            users.insert(user);
        }
    }

    fn remove_user(&mut self, name: &str, user: &str) {
        if let Some(users) = self.users_mut(name) {
            users.remove(user);
        }
    }

    /// Whether `id` names a block export of any type.
    fn export_id_taken(&self, id: &str) -> bool {
        self.nbd.has_export(id) || self.disks.values().any(|d| d.id == id)
    }
}

/// The served disks and everything added around them at runtime.
pub struct Graph {
    settings: ExportSettings,
    state: Mutex<State>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let disks: Vec<String> = self.lock().disks.keys().cloned().collect();
        f.debug_struct("Graph").field("disks", &disks).finish()
    }
}

impl Graph {
    /// An empty graph; disks served by it are built with `settings`.
    pub fn new(settings: ExportSettings) -> Arc<Graph> {
        Arc::new(Graph {
            settings,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A format node by name: a disk, or an added one.
    fn format_node(&self, state: &State, name: &str) -> Result<FormatNode, GraphError> {
        if let Some(disk) = state.disks.get(name) {
            return Ok((disk.export().disk().clone(), None));
        }
        match state.nodes.get(name).map(|n| &n.kind) {
            Some(AddedKind::Format { driver, view, .. }) => {
                Ok((driver.clone(), Some(view.clone())))
            }
            Some(AddedKind::File(_)) => Err(GraphError::Invalid(format!(
                "Node '{name}' is a file node; use a format node (qcow2, raw) over it"
            ))),
            None => match state.disk_of_node(name) {
                Some(disk) => Err(GraphError::Invalid(format!(
                    "Node '{name}' is a protocol node; use the format node '{}'",
                    disk.node()
                ))),
                None => Err(GraphError::NodeNotFound(name.to_string())),
            },
        }
    }

    /// A file node given by name, for a format node being added: it must be unused.
    fn take_file_node(
        &self,
        state: &State,
        name: &str,
        parent: &str,
    ) -> Result<FileSpec, GraphError> {
        match state.nodes.get(name).map(|n| (&n.kind, &n.users)) {
            Some((AddedKind::File(f), users)) if users.is_empty() => Ok(f.clone()),
            Some((AddedKind::File(_), _)) => Err(GraphError::NodeInUse(name.to_string())),
            Some(_) => Err(GraphError::Invalid(format!(
                "blockdev-add: the file children of '{parent}' must be file nodes"
            ))),
            None if state.disk_of_node(name).is_some() => {
                Err(GraphError::NodeInUse(name.to_string()))
            }
            None => Err(GraphError::NodeNotFound(name.to_string())),
        }
    }

    /// `blockdev-add`.
    pub fn add_node(&self, spec: NodeSpec) -> Result<(), GraphError> {
        let mut state = self.lock();
        if state.disk_of_node(&spec.name).is_some() || state.nodes.contains_key(&spec.name) {
            return Err(GraphError::DuplicateNode(spec.name));
        }
        let kind = match spec.kind {
            NodeKind::File(file) => AddedKind::File(file),
            NodeKind::Format {
                format,
                file,
                data_file,
                backing,
                read_only,
            } => {
                let mut children = Vec::new();
                let (file_spec, file_node) = match file {
                    FileRef::Inline(f) => (f, None),
                    FileRef::Node(name) => {
                        let f = self.take_file_node(&state, &name, &spec.name)?;
                        children.push(name.clone());
                        (f, Some(name))
                    }
                };
                let (data_spec, data_file_node) = match data_file {
                    None => (None, None),
                    Some(FileRef::Inline(f)) => (Some(f), None),
                    Some(FileRef::Node(name)) => {
                        let f = self.take_file_node(&state, &name, &spec.name)?;
                        children.push(name.clone());
                        (Some(f), Some(name))
                    }
                };
                let (backing_choice, backing_name) = match &backing {
                    BackingRef::FromImage => (BackingChoice::FromImage, None),
                    BackingRef::None => (BackingChoice::Disabled, None),
                    BackingRef::Node(name) => {
                        let (node, _) = self.format_node(&state, name)?;
                        children.push(name.clone());
                        (BackingChoice::Node(node), Some(name.clone()))
                    }
                };
                let locking = file_spec.locking && data_spec.as_ref().is_none_or(|d| d.locking);
                let options = OpenOptions {
                    read_only: read_only
                        || file_spec.read_only
                        || data_spec.as_ref().is_some_and(|d| d.read_only),
                    direct: file_spec.direct || data_spec.as_ref().is_some_and(|d| d.direct),
                    data_file: data_spec.map(|d| d.filename),
                    backing: backing_choice,
                    locking: if locking { Locking::On } else { Locking::Off },
                    ..OpenOptions::default()
                };
                let driver = open_image(&file_spec.filename, format, &options).map_err(|e| {
                    GraphError::Open {
                        node: spec.name.clone(),
                        cause: Chain(&e).to_string(),
                    }
                })?;
                for child in &children {
                    state.add_user(child, spec.name.clone());
                }
                AddedKind::Format {
                    driver,
                    filename: file_spec.filename,
                    children,
                    file_node,
                    data_file_node,
                    backing_name,
                    view: Arc::new(ViewGuard::default()),
                }
            }
        };
        state.nodes.insert(
            spec.name,
            Added {
                kind,
                users: BTreeSet::new(),
            },
        );
        Ok(())
    }

    /// `blockdev-del`.
    pub fn delete_node(&self, name: &str) -> Result<(), GraphError> {
        let mut state = self.lock();
        if state.disk_of_node(name).is_some() {
            return Err(GraphError::NodeInUse(name.to_string()));
        }
        let added = state
            .nodes
            .get(name)
            .ok_or_else(|| GraphError::NodeNotFound(name.to_string()))?;
        if !added.users.is_empty() {
            return Err(GraphError::NodeInUse(name.to_string()));
        }
        let Some(added) = state.nodes.remove(name) else {
            return Err(GraphError::NodeNotFound(name.to_string()));
        };
        if let AddedKind::Format {
            children, driver, ..
        } = &added.kind
        {
            for child in children {
                state.remove_user(child, name);
            }
            if let Err(e) = driver.flush_metadata() {
                log::warn!("blockdev-del {name}: {}", Chain(&e));
            }
        }
        Ok(())
    }

    /// The added nodes, for `query-named-block-nodes`.
    pub fn added_nodes(&self) -> Vec<AddedNodeInfo> {
        let state = self.lock();
        state
            .nodes
            .iter()
            // A file node under an exported disk is listed with the disk's nodes.
            .filter(|(name, _)| state.disk_of_node(name).is_none())
            .map(|(name, n)| match &n.kind {
                AddedKind::File(f) => AddedNodeInfo {
                    name: name.clone(),
                    driver: protocol_driver(&f.filename),
                    filename: f.filename.clone(),
                    read_only: f.read_only,
                    size: std::fs::metadata(&f.filename).map_or(0, |m| m.len()),
                    backing: None,
                },
                AddedKind::Format {
                    driver,
                    filename,
                    backing_name,
                    ..
                } => AddedNodeInfo {
                    name: name.clone(),
                    driver: driver.format(),
                    filename: filename.clone(),
                    read_only: driver.read_only(),
                    size: driver.size(),
                    backing: backing_name.clone(),
                },
            })
            .collect()
    }

    /// Stop everything: NBD exports and server, jobs (disks are served without filters
    /// again), vhost-user exports (every frontend disconnected, its I/O completed), then close
    /// the disks (bitmaps stored, everything flushed) and the added nodes. The clean-shutdown
    /// path; the first disk that fails to close is the error, after all were tried.
    pub fn shutdown(&self) -> Result<(), ExportError> {
        let mut state = self.lock();
        self.stop_nbd_locked(&mut state);
        let jobs: Vec<String> = state.jobs.keys().cloned().collect();
        for id in jobs {
            if let Err(e) = self.cancel_job_locked(&mut state, &id) {
                log::warn!("cancelling job {id}: {}", Chain(&e));
            }
        }
        let mut result = Ok(());
        for (_, disk) in std::mem::take(&mut state.disks) {
            if let Err(e) = disk.close() {
                log::error!("{}", Chain(&e));
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        for (name, added) in std::mem::take(&mut state.nodes) {
            if let AddedKind::Format { driver, .. } = added.kind {
                if let Err(e) = driver.flush_metadata() {
                    log::warn!("closing node {name}: {}", Chain(&e));
                }
            }
        }
        result
    }
}

/// The protocol driver a file node's name opens, as QEMU names it (`file`, `rbd`, `nbd`).
fn protocol_driver(filename: &std::path::Path) -> &'static str {
    use crate::block::remote::location::RemoteSpec;
    match filename.to_str().and_then(RemoteSpec::parse) {
        Some(Ok(RemoteSpec::Rbd(_))) => "rbd",
        Some(Ok(RemoteSpec::Nbd(_))) => "nbd",
        _ => "file",
    }
}
