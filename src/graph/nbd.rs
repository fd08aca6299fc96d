//! NBD exports of graph nodes: `nbd-server-start`/`-stop`, `block-export-add`/`-del` with
//! `type: nbd`, and the TLS credentials objects the server uses. A [`NodeSource`] serves a
//! node — typically the fleecing view of a backup — with `base:allocation` from the node's
//! block status and `qemu:dirty-bitmap:NAME` from the disk's bitmaps, which stay busy (cannot
//! be changed or removed) while exported.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use super::job::ViewGuard;
use super::options::{Addr, BitmapRef, NbdExportSpec, NbdServerSpec, TlsCredsSpec, TlsEndpoint};
use super::{Added, AddedKind, Graph, GraphError, State};
use crate::bitmap::{BitmapError, DirtyBitmap};
use crate::block::file::AlignedBuf;
use crate::block::remote::nbd::{
    client_creds, register_client_creds, unregister_client_creds, TlsClientCreds,
};
use crate::block::{Allocation, BlockDriver};
use crate::error::Chain;
use crate::export::Export;
use crate::nbd::{ExportSource, ListenAddr, NbdServer, ServerOptions, TlsCreds};

/// Most extents one block-status answer carries (the client asks again for the rest).
const MAX_EXTENTS: usize = 65536;
/// Alignment of reads from nodes with O_DIRECT files.
const DIRECT_ALIGN: u64 = 4096;

/// The NBD side of the graph.
#[derive(Default)]
pub(super) struct NbdState {
    server: Option<NbdServer>,
    exports: BTreeMap<String, ExportRecord>,
    tls: BTreeMap<String, Arc<TlsCreds>>,
}

struct ExportRecord {
    name: String,
    node: String,
    /// Bitmaps taken busy for this export, with the disk that has them.
    bitmaps: Vec<(Arc<Export>, String)>,
}

/// Bitmaps taken busy for an export being added, given back if it is not.
#[derive(Default)]
struct Taken {
    bitmaps: Vec<(Arc<Export>, String, Arc<DirtyBitmap>)>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        for (disk, name, _) in &self.bitmaps {
            disk.bitmaps().release(name);
        }
    }
}

/// What `query-block-exports` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub id: String,
    pub node: String,
}

impl NbdState {
    /// Whether `id` is an NBD export's.
    pub(super) fn has_export(&self, id: &str) -> bool {
        self.exports.contains_key(id)
    }
}

/// A node served over NBD.
struct NodeSource {
    node: Arc<dyn BlockDriver>,
    view: Option<Arc<ViewGuard>>,
    bitmaps: Vec<(String, Arc<DirtyBitmap>)>,
    align: u64,
}

impl ExportSource for NodeSource {
    fn size(&self) -> u64 {
        self.node.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        // Readers of a backup's view hold copy-before-write back from the clusters they may
        // be reading from the disk.
        let _reading = self.view.as_ref().and_then(|v| v.reading(offset, len));
        let to_io = |e: crate::block::BlockError| io::Error::other(Chain(&e).to_string());
        if self.align <= 1 {
            return self.node.read_at(offset, buf).map_err(to_io);
        }
        let start = offset - offset % self.align;
        let end = (offset + len)
            .div_ceil(self.align)
            .saturating_mul(self.align)
            .min(self.node.size().div_ceil(self.align) * self.align);
        let mut bounce = AlignedBuf::zeroed((end - start) as usize, self.align as usize)?;
        let valid = (self.node.size().min(end) - start) as usize;
        self.node
            .read_at(start, &mut bounce.as_mut_slice()[..valid])
            .map_err(to_io)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_slice()[at..at + buf.len()]);
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.node.size());
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let (n, allocation) = self
                .node
                .block_status(pos, end - pos)
                .map_err(|e| io::Error::other(Chain(&e).to_string()))?;
            let n = n.clamp(1, end - pos);
            let flags = match allocation {
                Allocation::Data => 0,
                Allocation::Zero => 2,
                Allocation::Hole => 3,
            };
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += n,
                _ => out.push((n, flags)),
            }
            pos += n;
        }
        Ok(())
    }

    fn bitmaps(&self) -> Vec<String> {
        self.bitmaps.iter().map(|(n, _)| n.clone()).collect()
    }

    fn dirty(
        &self,
        index: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<(u64, u32)>,
    ) -> io::Result<()> {
        let Some((_, bitmap)) = self.bitmaps.get(index) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let mut runs = Vec::new();
        bitmap.runs(offset, len, MAX_EXTENTS, &mut runs);
        out.extend(runs.into_iter().map(|(n, dirty)| (n, u32::from(dirty))));
        Ok(())
    }
}

impl Graph {
    /// `object-add` / `--object` of `qom-type: tls-creds-x509`.
    /// Server credentials are the NBD server's; client credentials go to the process-wide
    /// table `nbd` nodes look theirs up in.
    pub fn add_tls_creds(&self, spec: TlsCredsSpec) -> Result<(), GraphError> {
        let mut state = self.lock();
        let duplicate =
            || GraphError::Invalid(format!("attempt to add duplicate object '{}'", spec.id));
        if state.nbd.tls.contains_key(&spec.id) || client_creds(&spec.id).is_some() {
            return Err(duplicate());
        }
        if spec.endpoint == TlsEndpoint::Client {
            let creds =
                TlsClientCreds::load(&spec.dir).map_err(|e| GraphError::Nbd(e.to_string()))?;
            if !register_client_creds(&spec.id, creds) {
                return Err(duplicate());
            }
            return Ok(());
        }
        let creds = TlsCreds::load_x509(&spec.dir, spec.verify_peer)
            .map_err(|e| GraphError::Nbd(e.to_string()))?;
        state.nbd.tls.insert(spec.id, Arc::new(creds));
        Ok(())
    }

    /// `object-del`.
    pub fn delete_object(&self, id: &str) -> Result<(), GraphError> {
        let mut state = self.lock();
        if state.nbd.tls.remove(id).is_some() || unregister_client_creds(id) {
            return Ok(());
        }
        Err(GraphError::Invalid(format!("object '{id}' not found")))
    }

    /// `nbd-server-start` / `--nbd-server`.
    pub fn start_nbd_server(&self, spec: NbdServerSpec) -> Result<(), GraphError> {
        let mut state = self.lock();
        if state.nbd.server.is_some() {
            return Err(GraphError::Nbd("NBD server already running".into()));
        }
        let tls =
            match &spec.tls_creds {
                None => None,
                Some(id) => Some(state.nbd.tls.get(id).cloned().ok_or_else(|| {
                    GraphError::Nbd(format!("No TLS credentials with id '{id}'"))
                })?),
            };
        let addr = match spec.addr {
            Addr::Unix(path) => ListenAddr::Unix(path),
            Addr::Inet { host, port } => ListenAddr::Tcp(host, port),
        };
        let server = NbdServer::start(
            addr,
            ServerOptions {
                tls,
                max_connections: spec.max_connections,
                ..ServerOptions::default()
            },
        )
        .map_err(|e| GraphError::Nbd(e.to_string()))?;
        state.nbd.server = Some(server);
        Ok(())
    }

    /// `nbd-server-stop`: every NBD export goes with the server, as in QEMU.
    pub fn stop_nbd_server(&self) -> Result<(), GraphError> {
        let mut state = self.lock();
        if state.nbd.server.is_none() {
            return Err(GraphError::Nbd("NBD server not running".into()));
        }
        self.stop_nbd_locked(&mut state);
        Ok(())
    }

    /// Remove every NBD export and stop the server.
    pub(super) fn stop_nbd_locked(&self, state: &mut State) {
        let ids: Vec<String> = state.nbd.exports.keys().cloned().collect();
        for id in ids {
            self.forget_export(state, &id);
        }
        if let Some(server) = state.nbd.server.take() {
            server.stop();
        }
    }

    /// `block-export-add` / `--export` with `type: nbd`.
    pub fn add_nbd_export(&self, spec: NbdExportSpec) -> Result<(), GraphError> {
        let mut state = self.lock();
        let Some(server) = &state.nbd.server else {
            return Err(GraphError::Nbd("NBD server not running".into()));
        };
        if state.export_id_taken(&spec.id) {
            return Err(GraphError::Nbd(format!(
                "Block export id '{}' is already in use",
                spec.id
            )));
        }
        let (node, view) = self.format_node(&state, &spec.node)?;
        let mut taken = Taken::default();
        for b in &spec.bitmaps {
            let (disk, bitmap) = self.exported_bitmap(&state, &spec.node, b)?;
            let recording = bitmap.is_recording();
            taken.bitmaps.push((disk, b.name.clone(), bitmap));
            // A recording bitmap would change under the client's feet (QEMU's check).
            if recording && !node.read_only() {
                return Err(GraphError::Nbd(format!(
                    "Enabled bitmap '{}' incompatible with readonly export",
                    b.name
                )));
            }
        }
        let align = if node.files().iter().any(|f| f.is_direct()) {
            DIRECT_ALIGN
        } else {
            1
        };
        let source = NodeSource {
            node,
            view,
            bitmaps: taken
                .bitmaps
                .iter()
                .map(|(_, name, b)| (name.clone(), b.clone()))
                .collect(),
            align,
        };
        server
            .add_export(&spec.name, spec.description.clone(), Arc::new(source))
            .map_err(|e| GraphError::Nbd(e.to_string()))?;
        // The export holds the bitmaps now; `forget_export` gives them back.
        let bitmaps = std::mem::take(&mut taken.bitmaps)
            .into_iter()
            .map(|(disk, name, _)| (disk, name))
            .collect();
        state.add_user(&spec.node, format!("export {}", spec.id));
        state.nbd.exports.insert(
            spec.id,
            ExportRecord {
                name: spec.name,
                node: spec.node,
                bitmaps,
            },
        );
        Ok(())
    }

    /// Take the bitmap an export of `node` names, busy: by name, on the first disk of `node`'s
    /// backing chain (`node` itself if a disk); or `{node, name}` with a disk's node.
    fn exported_bitmap(
        &self,
        state: &State,
        node: &str,
        b: &BitmapRef,
    ) -> Result<(Arc<Export>, Arc<DirtyBitmap>), GraphError> {
        let not_found = || GraphError::Nbd(format!("Bitmap '{}' is not found", b.name));
        let disk = match &b.node {
            Some(n) => match state.disks.get(n) {
                Some(d) => d.export().clone(),
                None => {
                    self.format_node(state, n)?;
                    return Err(not_found());
                }
            },
            None => self
                .backing_chain(state, node)
                .iter()
                .find_map(|n| state.disks.get(n))
                .map(|d| d.export().clone())
                .ok_or_else(not_found)?,
        };
        let bitmap = disk.bitmaps().acquire(&b.name).map_err(|e| match e {
            BitmapError::NotFound(_) => not_found(),
            e => e.into(),
        })?;
        Ok((disk, bitmap))
    }

    /// `block-export-del`: `hard` disconnects clients; otherwise an export with clients is
    /// refused.
    pub fn delete_nbd_export(&self, id: &str, hard: bool) -> Result<(), GraphError> {
        let mut state = self.lock();
        let Some(record) = state.nbd.exports.get(id) else {
            return Err(GraphError::Nbd(format!("Export '{id}' is not found")));
        };
        if let Some(server) = &state.nbd.server {
            server
                .remove_export(&record.name, hard)
                .map_err(|e| GraphError::Nbd(e.to_string()))?;
        }
        self.forget_export(&mut state, id);
        Ok(())
    }

    fn forget_export(&self, state: &mut State, id: &str) {
        if let Some(record) = state.nbd.exports.remove(id) {
            for (disk, b) in &record.bitmaps {
                disk.bitmaps().release(b);
            }
            if let Some(server) = &state.nbd.server {
                let _ = server.remove_export(&record.name, true);
            }
            state.remove_user(&record.node, &format!("export {id}"));
        }
    }

    /// `query-block-exports` (the NBD ones).
    pub fn nbd_exports(&self) -> Vec<ExportInfo> {
        self.lock()
            .nbd
            .exports
            .iter()
            .map(|(id, r)| ExportInfo {
                id: id.clone(),
                node: r.node.clone(),
            })
            .collect()
    }

    /// `name` and the nodes below it through `backing`.
    fn backing_chain(&self, state: &State, name: &str) -> Vec<String> {
        let mut chain = vec![name.to_string()];
        let mut current = name.to_string();
        while let Some(Added {
            kind:
                AddedKind::Format {
                    backing_name: Some(b),
                    ..
                },
            ..
        }) = state.nodes.get(&current)
        {
            if chain.contains(b) {
                break;
            }
            chain.push(b.clone());
            current = b.clone();
        }
        chain
    }
}
