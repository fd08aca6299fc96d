//! Creating qcow2 images: a plain image, or metadata for a raw data file.
//!
//! For a raw data file the metadata is preallocated with the identity mapping, the way QEMU
//! does for `data_file_raw`: every guest cluster is allocated at its own offset in the data
//! file, so `qemu-img map` shows the whole disk as data at identical offsets. An existing data
//! file is adopted as it is: vubd never writes to it, truncates it or changes its size.

use std::fs::{self, File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::entry::{encode_normal, COPIED};
use super::header::{self, autoclear, extension, incompatible, Header};
use super::refcount::write_entry;
use super::units::HostOffset;
use crate::block::file::{FileNode, FileOptions};
use crate::block::lock::LockRequest;
use crate::block::remote::location::RemoteSpec;
use crate::block::BlockError;

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size; for an existing data file, its size (and `size`, if given, must match).
    pub size: Option<u64>,
    pub cluster_size: u64,
    /// External raw data file: adopted if it exists, created (sparse) otherwise.
    pub data_file: Option<PathBuf>,
}

/// What was created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    pub size: u64,
    /// The data file name stored in the image.
    pub stored_data_file: Option<String>,
    /// The stored name does not lead to the data file from the image's directory, so serving
    /// needs `--data-file`.
    pub needs_data_file_option: bool,
    /// The data file existed and was adopted untouched.
    pub adopted: bool,
}

#[derive(Debug, Error)]
pub enum CreateError {
    #[error("{0}: already exists; vubd create never overwrites an image (remove it first)")]
    Exists(PathBuf),
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("--cluster-size {0}: must be a power of two from 512 to 2M")]
    ClusterSize(u64),
    #[error("--size is required for a new image")]
    NoSize,
    #[error("{path}: the data file is {actual} bytes, but --size asks for {requested}; its size is the disk size")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        requested: u64,
    },
    #[error("{0}: the virtual size must not be zero")]
    ZeroSize(PathBuf),
    #[error("the disk is too large for {0}-byte clusters (the L1 table would exceed 32 MiB)")]
    TooLarge(u64),
    /// A remote store (RBD, NBD) could not be opened.
    #[error(transparent)]
    Remote(#[from] BlockError),
}

/// Where a new image's bytes go: a new local file, or a remote store that already exists (an
/// RBD image made with `rbd create`; it grows as the image is written).
enum Target {
    Local(File),
    Remote(FileNode),
}

impl Target {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Target::Local(f) => f.write_all_at(buf, offset),
            Target::Remote(node) => node.write_all_at(buf, offset),
        }
    }

    fn sync(&self) -> io::Result<()> {
        match self {
            Target::Local(f) => f.sync_all(),
            Target::Remote(node) => node.sync_data(),
        }
    }
}

fn is_remote(path: &Path) -> bool {
    path.to_str().and_then(RemoteSpec::parse).is_some()
}

/// Open the remote store `path` names for a new image: writable and locked, and refused if
/// it already holds a qcow2 image.
fn open_remote_target(path: &Path) -> Result<Target, CreateError> {
    let node = FileNode::open(
        path,
        FileOptions {
            read_only: false,
            direct: false,
            lock: Some(LockRequest::for_access(false)),
        },
    )?;
    let mut magic = [0u8; 4];
    if node.size() >= 4 {
        node.read_exact_at(&mut magic, 0).map_err(io_err(path))?;
        if magic == header::MAGIC.to_be_bytes() {
            return Err(CreateError::Exists(path.to_path_buf()));
        }
    }
    Ok(Target::Remote(node))
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> CreateError + '_ {
    move |source| CreateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Create the image at `path`.
pub fn create(path: &Path, options: &CreateOptions) -> Result<Created, CreateError> {
    let cs = options.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(CreateError::ClusterSize(cs));
    }
    if !is_remote(path) && fs::symlink_metadata(path).is_ok() {
        return Err(CreateError::Exists(path.to_path_buf()));
    }
    let (size, adopted) = match &options.data_file {
        Some(data) => data_file_size(data, options.size)?,
        None => (options.size.ok_or(CreateError::NoSize)?, false),
    };
    if size == 0 {
        return Err(CreateError::ZeroSize(path.to_path_buf()));
    }
    let (stored, needs_option) = match &options.data_file {
        Some(data) => {
            let (name, reachable) = data_file_name(path, data);
            (Some(name), !reachable)
        }
        None => (None, false),
    };

    let file = if is_remote(path) {
        open_remote_target(path)?
    } else {
        let file = FsOpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path))?;
        Target::Local(file)
    };
    let result = write_image(&file, size, cs, stored.as_deref());
    if let Err(e) = result {
        if let Target::Local(file) = file {
            drop(file);
            let _ = fs::remove_file(path);
        }
        return Err(match e {
            WriteError::Io(source) => CreateError::Io {
                path: path.to_path_buf(),
                source,
            },
            WriteError::TooLarge => CreateError::TooLarge(cs),
        });
    }
    file.sync().map_err(io_err(path))?;
    Ok(Created {
        size,
        stored_data_file: stored,
        needs_data_file_option: needs_option,
        adopted,
    })
}

/// The disk size for a data file: its own size if it exists (untouched), else `size` (the file
/// is created sparse).
fn data_file_size(data: &Path, size: Option<u64>) -> Result<(u64, bool), CreateError> {
    let existing = if is_remote(data) {
        // A remote data file must exist: vubd makes no RBD images or NBD exports.
        let options = FileOptions {
            read_only: true,
            ..FileOptions::default()
        };
        Ok(FileNode::open(data, options)?.size())
    } else {
        fs::metadata(data).map(|m| m.len())
    };
    match existing {
        Ok(actual) => {
            if let Some(requested) = size.filter(|s| *s != actual) {
                return Err(CreateError::SizeMismatch {
                    path: data.to_path_buf(),
                    actual,
                    requested,
                });
            }
            Ok((actual, true))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let size = size.ok_or(CreateError::NoSize)?;
            let f = FsOpenOptions::new()
                .write(true)
                .create_new(true)
                .open(data)
                .map_err(io_err(data))?;
            f.set_len(size).map_err(io_err(data))?;
            Ok((size, false))
        }
        Err(e) => Err(io_err(data)(e)),
    }
}

/// The data file name to store: relative to the image's directory when the data file lies in
/// it or below (then both vubd and QEMU's tools run from that directory find it), else the
/// name as given. Returns the name and whether it leads to the data file from the image.
fn data_file_name(image: &Path, data: &Path) -> (String, bool) {
    let dir = image
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let (Ok(dir), Ok(data_abs)) = (dir.canonicalize(), data.canonicalize()) {
        if let Ok(rel) = data_abs.strip_prefix(&dir) {
            if let Some(name) = rel.to_str() {
                return (name.to_string(), true);
            }
        }
    }
    (data.to_string_lossy().into_owned(), false)
}

enum WriteError {
    Io(io::Error),
    TooLarge,
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> Self {
        WriteError::Io(e)
    }
}

/// Lay out and write the image: header, refcount table, refcount blocks, L1 table and (with a
/// data file) L2 tables mapping every cluster to itself.
fn write_image(
    file: &Target,
    size: u64,
    cs: u64,
    data_file: Option<&str>,
) -> Result<(), WriteError> {
    let cluster_bits = cs.trailing_zeros();
    let l2_entries = cs / 8;
    let guest_clusters = size.div_ceil(cs);
    let l1_size = guest_clusters.div_ceil(l2_entries);
    if l1_size * 8 > header::MAX_L1_BYTES {
        return Err(WriteError::TooLarge);
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let l2_tables = if data_file.is_some() { l1_size } else { 0 };

    // Refcount structures must count themselves: iterate to a fixed point.
    let refcount_order = 4u32;
    let block_entries = cs * 8 / 16;
    let (mut rt_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + blocks + l1_clusters + l2_tables;
        let need_blocks = total.div_ceil(block_entries);
        let need_rt = (need_blocks * 8).div_ceil(cs);
        if need_blocks == blocks && need_rt == rt_clusters {
            break;
        }
        blocks = need_blocks.max(blocks);
        rt_clusters = need_rt.max(rt_clusters);
    }
    let rt_offset = cs;
    let blocks_offset = rt_offset + rt_clusters * cs;
    let l1_offset = blocks_offset + blocks * cs;
    let l2_offset = l1_offset + l1_clusters * cs;
    let total_clusters = 1 + rt_clusters + blocks + l1_clusters + l2_tables;

    let mut h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_offset,
        refcount_table_offset: rt_offset,
        refcount_table_clusters: rt_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order,
        header_length: 112,
        compression_type: 0,
        unknown_fields: vec![0; 7],
        extensions: Vec::new(),
        backing_file: None,
    };
    if let Some(name) = data_file {
        h.incompatible_features |= incompatible::DATA_FILE;
        h.autoclear_features |= autoclear::DATA_FILE_RAW;
        h.set_extension(extension::DATA_FILE, Some(name.as_bytes().to_vec()));
    }
    h.set_extension(extension::FEATURE_NAMES, Some(header::feature_name_table()));
    let bytes = h.serialize().map_err(|_| WriteError::TooLarge)?;
    let mut cluster0 = vec![0u8; cs as usize];
    cluster0[..bytes.len()].copy_from_slice(&bytes);
    file.write_all_at(&cluster0, 0)?;

    let mut table = vec![0u8; (rt_clusters * cs) as usize];
    for b in 0..blocks {
        let at = (b * 8) as usize;
        table[at..at + 8].copy_from_slice(&(blocks_offset + b * cs).to_be_bytes());
    }
    file.write_all_at(&table, rt_offset)?;
    for b in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        for i in 0..block_entries {
            let cluster = b * block_entries + i;
            if cluster < total_clusters {
                write_entry(&mut block, refcount_order, i, 1);
            }
        }
        file.write_all_at(&block, blocks_offset + b * cs)?;
    }

    let mut l1 = vec![0u8; (l1_clusters * cs) as usize];
    for t in 0..l2_tables {
        let entry = (l2_offset + t * cs) | COPIED;
        l1[(t * 8) as usize..(t * 8 + 8) as usize].copy_from_slice(&entry.to_be_bytes());
    }
    file.write_all_at(&l1, l1_offset)?;
    for t in 0..l2_tables {
        let mut l2 = vec![0u8; cs as usize];
        for i in 0..l2_entries {
            let guest_cluster = t * l2_entries + i;
            if guest_cluster >= guest_clusters {
                break;
            }
            let entry = encode_normal(HostOffset(guest_cluster * cs), true);
            l2[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&entry.to_be_bytes());
        }
        file.write_all_at(&l2, l2_offset + t * cs)?;
    }
    Ok(())
}
