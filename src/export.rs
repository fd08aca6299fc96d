//! An export: the root of a block graph as one consumer serves it, with the root node's dirty
//! bitmaps, how its queues move data, and how it is made durable.
//!
//! The export is what the vhost-user side (queue workers) and the control socket (QMP) share.
//! It knows nothing of virtio: the vhost-user-blk device built on it (`vhost::device`)
//! adds the guest-visible geometry.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use thiserror::Error;

use crate::bitmap::{BitmapError, BitmapManager, Persistence, WriteGate};
use crate::block::io::EngineKind;
use crate::block::{BlockDriver, BlockError, NodeNames};
use crate::stats::prometheus::ExportMetrics;
use crate::stats::ExportStats;
use crate::vhost::poll::PollPolicy;

/// How an export is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportOptions {
    /// The block export's id: names it in statistics and QMP.
    pub id: String,
    /// Refuse writes, whatever the graph allows.
    pub read_only: bool,
    /// How many queues write through the export (each gets its own slot in the write gate).
    pub writers: u16,
    pub engine: EngineKind,
    /// How queue threads busy-poll their ring and I/O completions before sleeping
    /// (`--poll-us`, `--poll-grow`, `--poll-shrink`).
    pub poll: PollPolicy,
    /// Node names for the control socket.
    pub node_names: NodeNames,
    /// How persistent bitmaps reach the disk while served.
    pub bitmaps: Persistence,
}

/// Why an export cannot be opened or closed.
#[derive(Debug, Error)]
pub enum ExportError {
    #[error("{}: flushing", path.display())]
    Flush {
        path: PathBuf,
        #[source]
        source: BlockError,
    },
    #[error("{}: dirty bitmaps", path.display())]
    Bitmaps {
        path: PathBuf,
        #[source]
        source: BitmapError,
    },
    #[error("{}: resizing", path.display())]
    Resize {
        path: PathBuf,
        #[source]
        source: BitmapError,
    },
    #[error("{}: the export is read-only; it cannot be resized", path.display())]
    ResizeReadOnly { path: PathBuf },
}

/// A queue's cached view of an export's root (see [`Export::current_root`]).
pub struct RootCursor {
    generation: u64,
    root: Arc<dyn BlockDriver>,
}

/// A served graph root.
#[derive(Debug)]
pub struct Export {
    /// The disk: the format node the export was opened on, owner of the bitmaps.
    disk: Arc<dyn BlockDriver>,
    /// Where requests enter: the disk, or a filter inserted over it while a job runs
    /// (copy-before-write during a backup). Swapped only with the write gate drained.
    root: ArcSwap<Arc<dyn BlockDriver>>,
    /// Moves after every swap of `root`, so that queues re-read it only then.
    root_generation: AtomicU64,
    bitmaps: BitmapManager,
    options: ExportOptions,
    /// Every queue's I/O statistics.
    stats: ExportStats,
}

impl Export {
    /// Load the root's persistent bitmaps and get ready to serve.
    pub fn new(root: Arc<dyn BlockDriver>, options: ExportOptions) -> Result<Self, ExportError> {
        let read_only = options.read_only || root.read_only();
        let gate = Arc::new(WriteGate::new(usize::from(options.writers)));
        let bitmaps = BitmapManager::open(
            &options.node_names.format,
            root.size(),
            root.clone().bitmap_store(),
            read_only,
            options.bitmaps,
            gate,
        )
        .map_err(|source| ExportError::Bitmaps {
            path: root_path(&*root),
            source,
        })?;
        Ok(Export {
            root: ArcSwap::from_pointee(root.clone()),
            root_generation: AtomicU64::new(0),
            disk: root,
            bitmaps,
            options: ExportOptions {
                read_only,
                ..options
            },
            stats: ExportStats::with_queues(usize::from(options.writers)),
        })
    }

    /// The block export's id.
    pub fn id(&self) -> &str {
        &self.options.id
    }

    /// The I/O statistics of the export's queues.
    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }

    /// What the Prometheus endpoint reports of the export.
    pub fn metrics(&self) -> ExportMetrics {
        ExportMetrics {
            name: self.options.id.clone(),
            node: self.options.node_names.format.clone(),
            queues: self.stats.per_queue(),
            bitmaps: self
                .bitmaps
                .infos()
                .into_iter()
                .map(|b| (b.name, b.count))
                .collect(),
        }
    }

    /// The graph's root node, where requests enter: the disk, or a filter over it.
    pub fn root(&self) -> Arc<dyn BlockDriver> {
        Arc::clone(&self.root.load())
    }

    /// The disk's format node, under any filter: its files are the export's files.
    pub fn disk(&self) -> &Arc<dyn BlockDriver> {
        &self.disk
    }

    /// Put `root` (a filter over the disk, or the disk itself) where requests enter. Callers
    /// hold the write gate drained, so that no write is between its mapping and its I/O
    /// with the old root's hooks skipped.
    pub fn set_root(&self, root: Arc<dyn BlockDriver>) {
        self.root.store(Arc::new(root));
        self.root_generation.fetch_add(1, Ordering::Release);
    }

    /// A queue's view of the root, for [`Export::current_root`].
    pub fn root_cursor(&self) -> RootCursor {
        RootCursor {
            generation: self.root_generation.load(Ordering::Acquire),
            root: self.root(),
        }
    }

    /// The root as `cursor` last saw it, re-read only if it was swapped since: one atomic load
    /// on the request path, as the disk alone cost before filters could be swapped in.
    #[inline]
    pub fn current_root<'a>(&self, cursor: &'a mut RootCursor) -> &'a Arc<dyn BlockDriver> {
        if self.root_generation.load(Ordering::Acquire) != cursor.generation {
            *cursor = self.root_cursor();
        }
        &cursor.root
    }

    /// The root node's dirty bitmaps.
    pub fn bitmaps(&self) -> &BitmapManager {
        &self.bitmaps
    }

    pub fn node_names(&self) -> &NodeNames {
        &self.options.node_names
    }

    /// Whether writes are refused (asked for, or the graph cannot write).
    pub fn read_only(&self) -> bool {
        self.options.read_only
    }

    pub fn size(&self) -> u64 {
        self.disk.size()
    }

    pub fn engine(&self) -> EngineKind {
        self.options.engine
    }

    pub fn poll_policy(&self) -> PollPolicy {
        self.options.poll
    }

    /// The file that names the export in messages: the root's first protocol node.
    pub fn path(&self) -> PathBuf {
        root_path(&*self.disk)
    }

    /// Make everything written so far durable: metadata, then every file.
    pub fn flush(&self) -> Result<(), BlockError> {
        if self.options.read_only {
            return Ok(());
        }
        self.disk.flush_metadata()?;
        for file in self.disk.files() {
            if !file.read_only() {
                file.sync_data()?;
            }
        }
        Ok(())
    }

    /// Grow the disk to `size` bytes, with every bitmap: the image's metadata, its raw data
    /// file and the bitmaps' stored tables together, with no write in flight. Never shrinks.
    pub fn resize(&self, size: u64) -> Result<(), ExportError> {
        if self.options.read_only {
            return Err(ExportError::ResizeReadOnly { path: self.path() });
        }
        self.bitmaps
            .resize(size, &*self.disk)
            .map_err(|source| ExportError::Resize {
                path: self.path(),
                source,
            })
    }

    /// Store the bitmaps and make everything durable: the clean-shutdown path.
    pub fn close(&self) -> Result<(), ExportError> {
        let flush = |path: &Path| {
            self.flush().map_err(|source| ExportError::Flush {
                path: path.to_path_buf(),
                source,
            })
        };
        let path = self.path();
        flush(&path)?;
        self.bitmaps
            .close()
            .map_err(|source| ExportError::Bitmaps {
                path: path.clone(),
                source,
            })?;
        flush(&path)
    }
}

/// The file that names a graph in messages: its first protocol node.
pub(crate) fn root_path(root: &dyn BlockDriver) -> PathBuf {
    root.files()
        .first()
        .map(|f| f.path().to_path_buf())
        .unwrap_or_default()
}
