//! Served disks: format nodes exported over vhost-user-blk, each with its own socket, queues,
//! dirty bitmaps and statistics ([`Export`]).
//!
//! A disk comes from the command line (`--export type=vhost-user-blk`, `--disk`) or from QMP:
//! `block-export-add` of a format node added with `blockdev-add`, as in qemu-storage-daemon.
//! Exporting a node loads its persistent bitmaps; deleting the export stores them, and the
//! node is an ordinary added node again, for `blockdev-del` or another export. A disk in use
//! (a backup's device or a fleecing image's backing, exported over NBD) keeps its export.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use super::options::VhostExportSpec;
use super::{Added, AddedKind, Graph, GraphError, State};
use crate::bitmap::Persistence;
use crate::block::io::EngineKind;
use crate::block::{BlockDriver, NodeNames};
use crate::error::Chain;
use crate::export::{root_path, Export, ExportError, ExportOptions};
use crate::vhost::daemon::SocketOptions;
use crate::vhost::device::{BlkDevice, DeviceOptions};
use crate::vhost::export::VhostExport;
use crate::vhost::poll::PollPolicy;

/// How every disk of the daemon is served (the daemon-wide command-line options).
#[derive(Clone, Debug)]
pub struct ExportSettings {
    pub engine: EngineKind,
    /// How each queue busy-polls (`--poll-us`, `--poll-grow`, `--poll-shrink`).
    pub poll: PollPolicy,
    pub bitmaps: Persistence,
    /// Largest virtqueue size a VMM may use.
    pub queue_size: u16,
    /// Permission bits of the vhost-user sockets.
    pub socket_mode: u32,
}

/// A disk being served.
pub(super) struct Disk {
    /// The block export's id (QMP `block-export-del`).
    pub(super) id: String,
    /// Who uses its format node: backup jobs, fleecing images, NBD exports.
    pub(super) users: BTreeSet<String>,
    export: Arc<Export>,
    /// Its vhost-user-blk export (`None`: served by the caller, see [`Graph::add_export`]).
    vhost: Option<VhostExport>,
    /// The added node it was exported from (`None`: the command line's), given back when the
    /// export is deleted.
    added: Option<Added>,
}

/// What `query-block-exports` reports of a vhost-user-blk export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostExportInfo {
    pub id: String,
    pub node: String,
}

impl Disk {
    /// A disk `vhost` serves as `spec` says, exported from `added` if added at runtime.
    fn served(spec: &VhostExportSpec, vhost: VhostExport, added: Option<Added>) -> Disk {
        Disk {
            id: spec.id.clone(),
            users: BTreeSet::new(),
            export: vhost.device().export().clone(),
            vhost: Some(vhost),
            added,
        }
    }

    pub(super) fn export(&self) -> &Arc<Export> {
        &self.export
    }

    fn socket(&self) -> Option<&Path> {
        self.vhost.as_ref().map(VhostExport::socket)
    }

    /// Its format node's name.
    pub(super) fn node(&self) -> &str {
        &self.export().node_names().format
    }

    /// Whether `name` is one of its nodes: format, `file`, `data-file`.
    pub(super) fn has_node(&self, name: &str) -> bool {
        node_names(self.export().node_names()).any(|n| n == name)
    }

    /// Stop serving (every frontend disconnected, its I/O completed), store the bitmaps and
    /// make everything durable. Returns the node it was exported from, if added at runtime.
    pub(super) fn close(self) -> Result<Option<Added>, ExportError> {
        // A disk its caller serves is its caller's to close.
        if let Some(vhost) = self.vhost {
            vhost.stop();
            self.export.close()?;
        }
        Ok(self.added)
    }
}

/// Serve `driver` as `spec` says.
fn serve(
    driver: Arc<dyn BlockDriver>,
    node_names: NodeNames,
    spec: &VhostExportSpec,
    settings: &ExportSettings,
    option: &'static str,
) -> Result<VhostExport, GraphError> {
    let fail = |e: &dyn std::error::Error| GraphError::Invalid(Chain(e).to_string());
    if spec.writable && driver.read_only() {
        return Err(GraphError::Invalid(format!(
            "{option}: node '{}' is read-only; cannot export it writable",
            spec.node
        )));
    }
    let serial = spec
        .serial
        .clone()
        .unwrap_or_else(|| default_serial(&root_path(&*driver)));
    let export = Export::new(
        driver,
        ExportOptions {
            id: spec.id.clone(),
            read_only: !spec.writable,
            writers: spec.num_queues,
            engine: settings.engine,
            poll: settings.poll,
            node_names,
            bitmaps: settings.bitmaps,
        },
    )
    .map_err(|e| fail(&e))?;
    let export = Arc::new(export);
    let device = BlkDevice::new(
        export.clone(),
        DeviceOptions {
            num_queues: spec.num_queues,
            queue_size: settings.queue_size,
            serial: serial.into_bytes(),
            logical_block_size: spec.logical_block_size,
        },
    );
    let started = device.map_err(|e| fail(&e)).and_then(|device| {
        let socket = SocketOptions {
            path: spec.socket.clone(),
            mode: settings.socket_mode,
            option,
        };
        VhostExport::start(Arc::new(device), &socket).map_err(|e| fail(&e))
    });
    if started.is_err() {
        // The bitmaps were loaded (and marked in use): store them back.
        if let Err(e) = export.close() {
            log::warn!("{}", Chain(&e));
        }
    }
    started
}

impl Graph {
    /// Serve `driver`, the format node of a graph the command line built, as the
    /// vhost-user-blk export `spec`.
    pub fn add_disk(
        &self,
        driver: Arc<dyn BlockDriver>,
        node_names: NodeNames,
        spec: &VhostExportSpec,
        option: &'static str,
    ) -> Result<(), GraphError> {
        let mut state = self.lock();
        check_new_export(&state, spec, &node_names)?;
        let vhost = serve(driver, node_names, spec, &self.settings, option)?;
        state
            .disks
            .insert(spec.node.clone(), Disk::served(spec, vhost, None));
        Ok(())
    }

    /// Take `export` as a disk its caller serves (tests, fuzzing, an embedding program):
    /// every command works on it; the caller closes it (shutdown leaves it open).
    pub fn add_export(&self, export: Arc<Export>) -> Result<(), GraphError> {
        let mut state = self.lock();
        let names = export.node_names();
        check_id_and_names(&state, export.id(), names)?;
        if let Some(name) = node_names(names).find(|n| state.nodes.contains_key(*n)) {
            return Err(GraphError::DuplicateNode(name.clone()));
        }
        state.disks.insert(
            names.format.clone(),
            Disk {
                id: export.id().to_string(),
                users: BTreeSet::new(),
                export: export.clone(),
                vhost: None,
                added: None,
            },
        );
        Ok(())
    }

    /// `block-export-add` with `type: vhost-user-blk`: serve a format node added with
    /// `blockdev-add`, which no other node, job or export uses.
    pub fn add_vhost_export(&self, spec: &VhostExportSpec) -> Result<(), GraphError> {
        let mut state = self.lock();
        if state.export_id_taken(&spec.id) {
            return Err(GraphError::Invalid(format!(
                "Block export id '{}' is already in use",
                spec.id
            )));
        }
        if state.disks.contains_key(&spec.node) {
            return Err(GraphError::NodeBusy {
                node: spec.node.clone(),
                reason: "node is already exported over vhost-user-blk".into(),
            });
        }
        let (driver, names) = match state.nodes.get(&spec.node) {
            Some(Added {
                kind:
                    AddedKind::Format {
                        driver,
                        file_node,
                        data_file_node,
                        ..
                    },
                users,
            }) => {
                if let Some(user) = users.iter().next() {
                    return Err(GraphError::NodeBusy {
                        node: spec.node.clone(),
                        reason: format!("in use by {user}"),
                    });
                }
                let mut names = NodeNames::derived(&spec.node);
                if let Some(file) = file_node {
                    names.file = file.clone();
                }
                names.data_file = match data_file_node {
                    Some(name) => Some(name.clone()),
                    None => driver
                        .data_file()
                        .is_some()
                        .then(|| format!("{}-data-file", spec.node)),
                };
                (driver.clone(), names)
            }
            _ => {
                self.format_node(&state, &spec.node)?;
                return Err(GraphError::Invalid(format!(
                    "block-export-add: node '{}' cannot be exported",
                    spec.node
                )));
            }
        };
        check_new_export(&state, spec, &names)?;
        let vhost = serve(
            driver,
            names,
            spec,
            &self.settings,
            "block-export-add addr.path",
        )?;
        let added = state.nodes.remove(&spec.node);
        log::info!("{}: {}", spec.id, status_of(&vhost));
        state
            .disks
            .insert(spec.node.clone(), Disk::served(spec, vhost, added));
        Ok(())
    }

    /// `block-export-del` of a vhost-user-blk export; `Ok(false)` if `id` is not one. Its
    /// frontends are disconnected; without `hard` (QEMU's `safe` mode), an export with
    /// requests in flight is refused, as QEMU refuses it. The node stays, as an added node.
    pub fn delete_vhost_export(&self, id: &str, hard: bool) -> Result<bool, GraphError> {
        let mut state = self.lock();
        let Some(node) = state
            .disks
            .iter()
            .find(|(_, d)| d.id == id)
            .map(|(n, _)| n.clone())
        else {
            return Ok(false);
        };
        let Some(disk) = state.disks.get(&node) else {
            return Ok(false);
        };
        if let Some(user) = disk.users.iter().next() {
            return Err(GraphError::NodeBusy {
                node,
                reason: format!("in use by {user}; end that first"),
            });
        }
        if !hard && disk.export.stats().total().in_flight > 0 {
            return Err(GraphError::Invalid(format!(
                "export '{id}' still in use; use mode='hard' to force client disconnect"
            )));
        }
        let Some(disk) = state.disks.remove(&node) else {
            return Ok(false);
        };
        let driver = disk.export().disk().clone();
        let filename = root_path(&*driver);
        let added = disk
            .close()
            .map_err(|e| GraphError::Invalid(Chain(&e).to_string()))?;
        // The command line's node is an added node from now on, as in qemu-storage-daemon.
        let added = added.unwrap_or_else(|| Added {
            kind: AddedKind::Format {
                driver,
                filename,
                children: Vec::new(),
                file_node: None,
                data_file_node: None,
                backing_name: None,
                view: Arc::default(),
            },
            users: BTreeSet::new(),
        });
        state.nodes.insert(node, added);
        Ok(true)
    }

    /// `block_resize`: grow the disk whose format node is `node` to `size` bytes — image,
    /// data file and bitmaps together — and show its frontends the new capacity. Refused for a
    /// disk in use by a backup or an NBD export, and for a size that is not a multiple of
    /// the device's logical block size.
    pub fn resize_disk(&self, node: &str, size: u64) -> Result<(), GraphError> {
        let state = self.lock();
        let Some(disk) = state.disks.get(node) else {
            self.disk_locked(&state, node)?;
            return Err(GraphError::NodeNotFound(node.to_string()));
        };
        if let Some(user) = disk.users.iter().next() {
            return Err(GraphError::NodeBusy {
                node: node.to_string(),
                reason: format!("in use by {user}"),
            });
        }
        if let Some(vhost) = &disk.vhost {
            let block = u64::from(vhost.device().limits().logical_block_size);
            if size == 0 || !size.is_multiple_of(block) {
                return Err(GraphError::Invalid(format!(
                    "block_resize: the size must be a non-zero multiple of the logical block \
                     size, {block} bytes"
                )));
            }
        }
        let old = disk.export.size();
        disk.export
            .resize(size)
            .map_err(|e| GraphError::Invalid(Chain(&e).to_string()))?;
        let told = disk.vhost.as_ref().map_or(0, |v| v.device().grew());
        log::info!(
            "{}: resized from {old} to {size} bytes; {told} frontend(s) told",
            disk.id
        );
        Ok(())
    }

    /// The served disk whose format node is `node`, for commands on its bitmaps and
    /// statistics.
    pub fn disk(&self, node: &str) -> Result<Arc<Export>, GraphError> {
        self.disk_locked(&self.lock(), node)
    }

    pub(super) fn disk_locked(&self, state: &State, node: &str) -> Result<Arc<Export>, GraphError> {
        if let Some(disk) = state.disks.get(node) {
            return Ok(disk.export().clone());
        }
        if let Some(disk) = state.disk_of_node(node) {
            return Err(GraphError::Invalid(format!(
                "Node '{node}' is a protocol node; vubd keeps dirty bitmaps on the format node '{}'",
                disk.node()
            )));
        }
        if state.nodes.contains_key(node) {
            return Err(GraphError::Invalid(format!(
                "Node '{node}' is not exported; vubd keeps dirty bitmaps on exported disks \
                 (block-export-add type=vhost-user-blk)"
            )));
        }
        Err(GraphError::NodeNotFound(node.to_string()))
    }

    /// Every served disk's export, by node name.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.lock()
            .disks
            .values()
            .map(|d| d.export().clone())
            .collect()
    }

    /// The vhost-user-blk exports, for `query-block-exports`.
    pub fn vhost_exports(&self) -> Vec<VhostExportInfo> {
        self.lock()
            .disks
            .values()
            .map(|d| VhostExportInfo {
                id: d.id.clone(),
                node: d.node().to_string(),
            })
            .collect()
    }

    /// One line per disk: what it serves where.
    pub fn serving(&self) -> Vec<String> {
        self.lock().disks.values().map(Disk::serving).collect()
    }

    /// What systemd shows as the service's status.
    pub fn status_line(&self) -> String {
        let mut lines = self.serving();
        match lines.len() {
            0 => "serving no disks yet".to_string(),
            1 => lines.remove(0),
            n => format!("serving {n} disks"),
        }
    }
}

fn status_of(vhost: &VhostExport) -> String {
    let export = vhost.device().export();
    format!(
        "serving {} ({} bytes) on {}",
        export.path().display(),
        export.size(),
        vhost.socket().display()
    )
}

impl Disk {
    fn serving(&self) -> String {
        match &self.vhost {
            Some(vhost) => status_of(vhost),
            None => format!("serving {}", self.export().path().display()),
        }
    }
}

/// A disk's node names: format, `file`, `data-file`.
fn node_names(names: &NodeNames) -> impl Iterator<Item = &String> {
    [
        Some(&names.format),
        Some(&names.file),
        names.data_file.as_ref(),
    ]
    .into_iter()
    .flatten()
}

/// A new disk's export id and node names are not another disk's.
fn check_id_and_names(state: &State, id: &str, names: &NodeNames) -> Result<(), GraphError> {
    if state.export_id_taken(id) {
        return Err(GraphError::Invalid(format!(
            "Block export id '{id}' is already in use"
        )));
    }
    match node_names(names).find(|n| state.disk_of_node(n).is_some()) {
        Some(name) => Err(GraphError::DuplicateNode(name.clone())),
        None => Ok(()),
    }
}

/// A new export's id, node names and socket are not those of another disk.
fn check_new_export(
    state: &State,
    spec: &VhostExportSpec,
    names: &NodeNames,
) -> Result<(), GraphError> {
    check_id_and_names(state, &spec.id, names)?;
    if let Some(other) = state
        .disks
        .values()
        .find(|d| d.socket() == Some(spec.socket.as_path()))
    {
        return Err(GraphError::Invalid(format!(
            "socket {} is already served by export '{}'",
            spec.socket.display(),
            other.id
        )));
    }
    Ok(())
}

/// A serial that identifies the image stably: `vubd-` and a hash of its absolute path.
pub fn default_serial(image: &Path) -> String {
    use std::hash::Hasher as _;
    let path = image.canonicalize().unwrap_or_else(|_| image.to_path_buf());
    let mut hasher = Fnv1a::default();
    hasher.write(path.as_os_str().as_encoded_bytes());
    let serial = format!("vubd-{:015x}", hasher.finish() & 0x0fff_ffff_ffff_ffff);
    debug_assert_eq!(serial.len(), crate::virtio_blk::ID_BYTES);
    serial
}

/// FNV-1a, a hash that, unlike std's, is the same in every build.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_serial_is_stable_and_fits() {
        let a = default_serial(Path::new("/nonexistent/disk.raw"));
        let b = default_serial(Path::new("/nonexistent/disk.raw"));
        let c = default_serial(Path::new("/nonexistent/other.raw"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), crate::virtio_blk::ID_BYTES);
        assert!(a.starts_with("vubd-"));
    }
}
