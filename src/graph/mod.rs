//! The runtime graph: what the control socket adds around the served disk while it runs —
//! nodes (`blockdev-add`: a fleecing image over the disk), backup jobs (`blockdev-backup`
//! with `sync: none`: copy-before-write over the disk), and NBD exports of any node with the
//! disk's dirty bitmaps. Together they are QEMU's pull-mode backup, in QEMU's command shapes
//! (docs/backup.md).
//!
//! The disk's own nodes (format node, `file`, `data-file`) come from the command line and
//! cannot be deleted. Every added node records who uses it (a format node its file and
//! backing, a job its target, an export its node), so that nothing in use is deleted.

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
use crate::export::Export;
use job::{BackupJob, ViewGuard};
use options::{BackingRef, FileRef, FileSpec, NodeKind, NodeSpec};

/// Errors of graph commands, worded as QEMU words them where it has the same error.
#[derive(Debug, Error)]
pub enum GraphError {
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NodeNotFound(String),
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateNode(String),
    #[error("Block device {0} is in use")]
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
        /// The added `file` node it opened, if given by name.
        file_node: Option<String>,
        /// The added node it is backed by, if any (the disk is not an added node).
        backing_node: Option<String>,
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
    nodes: BTreeMap<String, Added>,
    jobs: BTreeMap<String, BackupJob>,
    nbd: nbd::NbdState,
}

/// The served disk's export and everything added around it at runtime.
pub struct Graph {
    export: Arc<Export>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("disk", &self.export.node_names().format)
            .finish()
    }
}

impl Graph {
    pub fn new(export: Arc<Export>) -> Arc<Graph> {
        Arc::new(Graph {
            export,
            state: Mutex::new(State::default()),
        })
    }

    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `name` is one of the disk's own nodes.
    fn is_disk_node(&self, name: &str) -> bool {
        let names = self.export.node_names();
        names.format == name || names.file == name || names.data_file.as_deref() == Some(name)
    }

    /// A format node by name: the disk, or an added one.
    fn format_node(&self, state: &State, name: &str) -> Result<FormatNode, GraphError> {
        if name == self.export.node_names().format {
            return Ok((self.export.disk().clone(), None));
        }
        match state.nodes.get(name).map(|n| &n.kind) {
            Some(AddedKind::Format { driver, view, .. }) => {
                Ok((driver.clone(), Some(view.clone())))
            }
            Some(AddedKind::File(_)) => Err(GraphError::Invalid(format!(
                "Node '{name}' is a file node; use a format node (qcow2, raw) over it"
            ))),
            None if self.is_disk_node(name) => Err(GraphError::Invalid(format!(
                "Node '{name}' is a protocol node; use the format node '{}'",
                self.export.node_names().format
            ))),
            None => Err(GraphError::NodeNotFound(name.to_string())),
        }
    }

    /// `blockdev-add`.
    pub fn add_node(&self, spec: NodeSpec) -> Result<(), GraphError> {
        let mut state = self.lock();
        if self.is_disk_node(&spec.name) || state.nodes.contains_key(&spec.name) {
            return Err(GraphError::DuplicateNode(spec.name));
        }
        let kind = match spec.kind {
            NodeKind::File(file) => AddedKind::File(file),
            NodeKind::Format {
                format,
                file,
                backing,
                read_only,
            } => {
                let (file_spec, file_node) = match file {
                    FileRef::Inline(f) => (f, None),
                    FileRef::Node(name) => {
                        match state.nodes.get(&name).map(|n| (&n.kind, &n.users)) {
                            Some((AddedKind::File(f), users)) if users.is_empty() => {
                                (f.clone(), Some(name))
                            }
                            Some((AddedKind::File(_), _)) => {
                                return Err(GraphError::NodeInUse(name))
                            }
                            Some(_) => {
                                return Err(GraphError::Invalid(format!(
                                    "blockdev-add: 'file' of '{}' must be a file node",
                                    spec.name
                                )))
                            }
                            None => return Err(GraphError::NodeNotFound(name)),
                        }
                    }
                };
                let (backing_choice, backing_node, backing_name) = match &backing {
                    BackingRef::FromImage => (BackingChoice::FromImage, None, None),
                    BackingRef::None => (BackingChoice::Disabled, None, None),
                    BackingRef::Node(name) => {
                        let (node, _) = self.format_node(&state, name)?;
                        let added = state.nodes.contains_key(name).then(|| name.clone());
                        (BackingChoice::Node(node), added, Some(name.clone()))
                    }
                };
                let options = OpenOptions {
                    read_only: read_only || file_spec.read_only,
                    direct: file_spec.direct,
                    backing: backing_choice,
                    locking: if file_spec.locking {
                        Locking::On
                    } else {
                        Locking::Off
                    },
                    ..OpenOptions::default()
                };
                let driver = open_image(&file_spec.filename, format, &options).map_err(|e| {
                    GraphError::Open {
                        node: spec.name.clone(),
                        cause: Chain(&e).to_string(),
                    }
                })?;
                if let Some(f) = &file_node {
                    if let Some(n) = state.nodes.get_mut(f) {
                        n.users.insert(spec.name.clone());
                    }
                }
                if let Some(b) = &backing_node {
                    if let Some(n) = state.nodes.get_mut(b) {
                        n.users.insert(spec.name.clone());
                    }
                }
                AddedKind::Format {
                    driver,
                    filename: file_spec.filename,
                    file_node,
                    backing_node,
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
        if self.is_disk_node(name) {
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
            file_node,
            backing_node,
            driver,
            ..
        } = &added.kind
        {
            for user_of in [file_node, backing_node].into_iter().flatten() {
                if let Some(n) = state.nodes.get_mut(user_of) {
                    n.users.remove(name);
                }
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
            .map(|(name, n)| match &n.kind {
                AddedKind::File(f) => AddedNodeInfo {
                    name: name.clone(),
                    driver: "file",
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

    /// Stop everything added at runtime: NBD exports and server, then jobs (the disk is
    /// served without filters again), then nodes. The clean-shutdown path.
    pub fn shutdown(&self) {
        let mut state = self.lock();
        state.nbd.stop_all(&self.export);
        let jobs: Vec<String> = state.jobs.keys().cloned().collect();
        for id in jobs {
            if let Err(e) = self.cancel_job_locked(&mut state, &id) {
                log::warn!("cancelling job {id}: {}", Chain(&e));
            }
        }
        for (name, added) in std::mem::take(&mut state.nodes) {
            if let AddedKind::Format { driver, .. } = added.kind {
                if let Err(e) = driver.flush_metadata() {
                    log::warn!("closing node {name}: {}", Chain(&e));
                }
            }
        }
    }
}
