//! Opening an image: the header, the children (image file, data file, backing node), the
//! stored-name policy, and what must happen before the first write.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use super::cache::TableCache;
use super::entry::EntryFormat;
use super::header::{autoclear, extension, incompatible, Header, MAX_CLUSTER_BITS};
use super::identity::IdentityMap;
use super::refcount::Refcounts;
use super::units::{be64_entries, HostOffset};
use super::{check, layout, snapshot, Backing, Meta, Qcow2Error, Qcow2Node};
use crate::block::file::{FileNode, FileOptions};
use crate::block::remote::location::RemoteSpec;
use crate::block::{
    open_image, BackingChoice, BlockDriver, BlockError, FileId, Format, OpenOptions,
};

/// Deepest backing chain vubd follows (a loop in names would otherwise never end).
const MAX_BACKING_DEPTH: usize = 16;
/// Refcount blocks kept in memory.
pub(super) const REFCOUNT_CACHE_TABLES: usize = 64;
/// Default upper bound of the L2 cache.
const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;

/// A name stored in an image (data file, backing file) as a path next to the image, or an
/// error if vubd must not follow it on its own.
pub fn resolve_stored_name(
    image: &Path,
    name: &str,
    what: &'static str,
    option: &'static str,
) -> Result<PathBuf, BlockError> {
    let refuse = |why: &'static str| {
        Qcow2Error::StoredName {
            what,
            name: name.to_string(),
            why,
            option,
        }
        .at(image)
    };
    if name.is_empty() {
        return Err(refuse("empty name"));
    }
    if image.to_str().and_then(RemoteSpec::parse).is_some() {
        // A remote image has no directory for its names to stay in.
        return Err(refuse("the image is on a remote store"));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Err(refuse("absolute path"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(refuse("it contains '..'"));
    }
    let prefix_end = name.find(':');
    let slash = name.find('/').unwrap_or(usize::MAX);
    if let Some(colon) = prefix_end.filter(|c| *c < slash) {
        let prefix = &name[..colon];
        if prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+.-_".contains(c))
        {
            return Err(refuse("a json: or protocol prefix"));
        }
    }
    Ok(image_dir(image).join(p))
}

impl Qcow2Node {
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Qcow2Node, BlockError> {
        Self::open_at_depth(path, options, 0)
    }

    fn open_at_depth(
        path: &Path,
        options: &OpenOptions,
        depth: usize,
    ) -> Result<Qcow2Node, BlockError> {
        let wrap = |e: Qcow2Error| e.at(path);
        let beneath = options.beneath.as_deref();
        let meta_file = Arc::new(
            FileNode::open_in(
                beneath,
                path,
                FileOptions {
                    read_only: options.read_only,
                    direct: false,
                    lock: options.lock_request(),
                },
            )?
            .with_fault(options.fault.clone()),
        );
        let header = read_header(&meta_file).map_err(wrap)?;
        if header.incompatible_features & incompatible::CORRUPT != 0
            && !options.read_only
            && !options.repair
        {
            return Err(wrap(Qcow2Error::MarkedCorrupt));
        }
        let cluster_bits = header.cluster_bits;
        let data_file = Self::open_data_file(path, &header, options, &meta_file)?;
        let mut files = vec![meta_file.clone()];
        let data_fid = if Arc::ptr_eq(&data_file, &meta_file) {
            0
        } else {
            files.push(data_file.clone());
            1
        };

        let backing = Self::open_backing(path, &header, options, depth, files.len())?;
        if let Some(b) = &backing {
            files.extend(b.node.files().iter().cloned());
        }

        let l1 = read_l1(&meta_file, &header).map_err(wrap)?;
        let snapshots = snapshot::read_table(
            &meta_file,
            header.snapshots_offset,
            header.nb_snapshots,
            cluster_bits,
        )
        .map_err(|e| wrap(e.into()))?;
        let file_size = meta_file.current_size().map_err(|e| wrap(e.into()))?;
        let map = layout::active_metadata(&header, &l1, &snapshots, file_size);
        let refcounts = Refcounts::load(
            &meta_file,
            cluster_bits,
            header.refcount_order,
            HostOffset(header.refcount_table_offset),
            u64::from(header.refcount_table_clusters),
            REFCOUNT_CACHE_TABLES,
            map,
        )
        .map_err(wrap)?;
        let cluster_size = 1u64 << cluster_bits;
        let l2_tables_for_disk = header
            .size
            .div_ceil(cluster_size)
            .div_ceil(cluster_size / 8);
        let l2_cache_bytes = options
            .l2_cache_bytes
            .unwrap_or(DEFAULT_L2_CACHE_BYTES.min(l2_tables_for_disk * cluster_size));
        let l2 = TableCache::new(
            cluster_size as usize,
            (l2_cache_bytes / cluster_size).max(2) as usize,
            "l2_update",
        );
        let external = header.has_data_file();
        let node = Qcow2Node {
            path: path.to_path_buf(),
            files,
            meta_file,
            data_file,
            data_fid,
            backing,
            size: AtomicU64::new(header.size),
            cluster_bits,
            format: EntryFormat {
                cluster_bits,
                version: header.version,
                external_data: external,
            },
            compression: header.compression(),
            read_only: options.read_only,
            fast: header
                .data_file_raw()
                .then(|| IdentityMap::new(header.size, cluster_bits)),
            meta: Mutex::new(Meta {
                header,
                l1,
                l2,
                refcounts,
                pending_free: Vec::new(),
                unsynced: false,
            }),
            in_flight: AtomicUsize::new(0),
            corrupt: AtomicBool::new(false),
            header_unknown: AtomicBool::new(false),
        };
        {
            let mut meta = node.lock();
            node.register_bitmaps(&mut meta);
        }
        if !options.read_only {
            node.prepare_for_writing().map_err(wrap)?;
        }
        node.prefill_identity_map().map_err(wrap)?;
        Ok(node)
    }

    /// Where guest data lives: the external data file (the one given, or the one the image
    /// names), or the image file itself (a second, O_DIRECT handle with `--cache none`).
    fn open_data_file(
        path: &Path,
        header: &Header,
        options: &OpenOptions,
        meta_file: &Arc<FileNode>,
    ) -> Result<Arc<FileNode>, BlockError> {
        if !header.has_data_file() {
            if options.data_file.is_some() {
                return Err(Qcow2Error::NoExternalDataFile.at(path));
            }
            // A remote store has no page cache to bypass, and one handle holds its lock.
            if !options.direct || meta_file.remote().is_some() {
                return Ok(meta_file.clone());
            }
            let direct = FileNode::open_in(
                options.beneath.as_deref(),
                path,
                FileOptions {
                    read_only: options.read_only,
                    direct: true,
                    // The same file as `meta_file`, which holds the lock.
                    lock: None,
                },
            )?;
            return Ok(Arc::new(direct));
        }
        // A name the image stores is opened beneath the image's directory; a path the user
        // gave is followed as given.
        let (data_path, beneath) = match &options.data_file {
            Some(p) => (p.clone(), None),
            None => {
                let name = header
                    .string_extension(extension::DATA_FILE)
                    .ok_or_else(|| Qcow2Error::DataFileUnnamed.at(path))?;
                let resolved = resolve_stored_name(path, &name, "data file", "--data-file")?;
                (resolved, Some(image_dir(path)))
            }
        };
        // Guest data written into the image file would land on its metadata (checked before
        // opening too: the second open would fail on the image's own lock first).
        if std::fs::metadata(&data_path).is_ok_and(|m| meta_file.is_inode(m.dev(), m.ino())) {
            return Err(Qcow2Error::DataFileIsImage.at(&data_path));
        }
        let file = FileNode::open_in(
            beneath.as_deref(),
            &data_path,
            FileOptions {
                read_only: options.read_only,
                direct: options.direct,
                lock: options.lock_request(),
            },
        )?;
        if file.same_file(meta_file) {
            return Err(Qcow2Error::DataFileIsImage.at(&data_path));
        }
        let file = file.with_fault(options.fault.clone());
        if file.size() < header.size {
            return Err(Qcow2Error::DataFileTooSmall {
                data_size: file.size(),
                image: path.to_path_buf(),
                disk_size: header.size,
            }
            .at(&data_path));
        }
        Ok(Arc::new(file))
    }

    fn open_backing(
        path: &Path,
        header: &Header,
        options: &OpenOptions,
        depth: usize,
        first_file: FileId,
    ) -> Result<Option<Backing>, BlockError> {
        let wrap = |e: Qcow2Error| e.at(path);
        let (backing_path, format, beneath) = match (&options.backing, &header.backing_file) {
            (BackingChoice::Node(node), _) => {
                if header.data_file_raw() {
                    return Err(wrap(Qcow2Error::BackingWithRawDataFile));
                }
                return Ok(Some(Backing {
                    node: node.clone(),
                    first_file,
                    size: node.size(),
                }));
            }
            (BackingChoice::Use(p, f), _) => (p.clone(), *f, None),
            (BackingChoice::Disabled, _) | (BackingChoice::FromImage, None) => return Ok(None),
            (BackingChoice::FromImage, Some(name)) => {
                let resolved = resolve_stored_name(path, name, "backing file", "--backing")?;
                let format = match header.string_extension(extension::BACKING_FORMAT) {
                    Some(f) => Format::from_name(&f)
                        .ok_or_else(|| wrap(Qcow2Error::BackingFormatUnsupported(f)))?,
                    None => return Err(wrap(Qcow2Error::BackingFormatUnknown(name.clone()))),
                };
                (resolved, format, Some(image_dir(path)))
            }
        };
        if header.data_file_raw() {
            return Err(wrap(Qcow2Error::BackingWithRawDataFile));
        }
        if depth >= MAX_BACKING_DEPTH {
            return Err(wrap(Qcow2Error::BackingTooDeep(MAX_BACKING_DEPTH)));
        }
        let backing_options = OpenOptions {
            read_only: true,
            direct: options.direct,
            beneath,
            ..OpenOptions::default()
        };
        let node: Arc<dyn BlockDriver> = match format {
            Format::Qcow2 => Arc::new(Qcow2Node::open_at_depth(
                &backing_path,
                &backing_options,
                depth + 1,
            )?),
            Format::Raw => open_image(&backing_path, Format::Raw, &backing_options)?,
        };
        let size = node.size();
        Ok(Some(Backing {
            node,
            first_file,
            size,
        }))
    }

    /// Before the first write: repair lazy refcounts and clear unknown autoclear bits.
    fn prepare_for_writing(&self) -> Result<(), Qcow2Error> {
        let mut meta = self.lock();
        if meta.header.incompatible_features & incompatible::DIRTY != 0 {
            log::warn!(
                "{}: the image was not closed cleanly with lazy refcounts; rebuilding refcounts",
                self.path.display()
            );
            check::repair_refcounts(self, &mut meta)?;
            meta.header.incompatible_features &= !incompatible::DIRTY;
            self.write_header(&mut meta)?;
        }
        let unknown = meta.header.autoclear_features & !autoclear::KNOWN;
        if unknown != 0 {
            meta.header.autoclear_features &= autoclear::KNOWN;
            self.write_header(&mut meta)?;
        }
        Ok(())
    }

    /// Clear the corrupt bit after a successful repair.
    pub fn clear_corrupt_flag(&self) -> Result<(), Qcow2Error> {
        let mut meta = self.lock();
        meta.header.incompatible_features &= !incompatible::CORRUPT;
        self.write_header(&mut meta)
    }
}

/// The directory names stored in the image at `path` are relative to.
fn image_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Read and parse the header from the start of the image.
fn read_header(file: &FileNode) -> Result<Header, Qcow2Error> {
    let len = file.current_size()?.min(1 << MAX_CLUSTER_BITS) as usize;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(Header::parse(&buf)?)
}

fn read_l1(file: &FileNode, header: &Header) -> Result<Vec<u64>, Qcow2Error> {
    // The header bounded the size (32 MiB); the table must also lie inside the file.
    let bytes = u64::from(header.l1_size) * 8;
    let size = file.current_size()?;
    if header.l1_table_offset.saturating_add(bytes) > size {
        return Err(Qcow2Error::L1Unreadable(std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof,
        )));
    }
    let mut raw = vec![0u8; bytes as usize];
    file.read_exact_at(&mut raw, header.l1_table_offset)
        .map_err(Qcow2Error::L1Unreadable)?;
    Ok(be64_entries(&raw).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_are_followed_only_next_to_the_image() {
        let img = Path::new("/srv/vm/meta.qcow2");
        assert_eq!(
            resolve_stored_name(img, "disk.raw", "data file", "--data-file").unwrap(),
            PathBuf::from("/srv/vm/disk.raw")
        );
        assert_eq!(
            resolve_stored_name(img, "sub/disk.raw", "data file", "--data-file").unwrap(),
            PathBuf::from("/srv/vm/sub/disk.raw")
        );
        for bad in [
            "/etc/passwd",
            "../x.raw",
            "a/../../b",
            "json:{}",
            "nbd://host/x",
            "file:x",
            "",
        ] {
            assert!(
                resolve_stored_name(img, bad, "data file", "--data-file").is_err(),
                "{bad}"
            );
        }
    }
}
