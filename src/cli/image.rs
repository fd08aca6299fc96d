//! Image tools: `vubd create`, `vubd info`, `vubd check`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use super::{parse_size, Failure};
use crate::block::file::{FileNode, FileOptions};
use crate::block::qcow2::check::{self, CheckReport};
use crate::block::qcow2::create::{self, CreateOptions};
use crate::block::qcow2::header::{self, compatible, extension, incompatible, Header};
use crate::block::qcow2::Qcow2Node;
use crate::block::{Locking, OpenOptions};
use crate::error::Chain;

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The qcow2 image to create (never overwritten).
    image: PathBuf,
    /// Virtual size (K, M, G, T suffixes); an existing data file's size is the disk size.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Cluster size, a power of two from 512 to 2M.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    cluster_size: u64,
    /// Keep guest data in this raw file (adopted untouched if it exists), with the qcow2 image
    /// holding only metadata (`data_file_raw`).
    #[arg(long, value_name = "PATH")]
    data_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    image: PathBuf,
    /// Print JSON shaped like `qemu-img info --output=json`.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    image: PathBuf,
    /// Fix leaks and errors (refcounts, COPIED flags).
    #[arg(long)]
    repair: bool,
    /// The external data file, if the image's stored name cannot be followed.
    #[arg(long, value_name = "PATH")]
    data_file: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Check even if another process is writing the image (like qemu-img's -U; the result
    /// may then be inconsistent). Not with --repair.
    #[arg(short = 'U', long, conflicts_with = "repair")]
    force_share: bool,
}

pub fn create(args: CreateArgs) -> Result<i32, Failure> {
    let created = create::create(
        &args.image,
        &CreateOptions {
            size: args.size,
            cluster_size: args.cluster_size,
            data_file: args.data_file.clone(),
        },
    )?;
    match (&args.data_file, &created.stored_data_file) {
        (Some(data), Some(stored)) => {
            println!(
                "created {}: qcow2 metadata for the raw data file {} ({} bytes{}), stored as '{stored}'",
                args.image.display(),
                data.display(),
                created.size,
                if created.adopted {
                    ", adopted unchanged"
                } else {
                    ", new sparse file"
                },
            );
            if created.needs_data_file_option {
                println!(
                    "note: the data file is not in or below the image's directory, so vubd will \
                     not follow the stored name on its own: serve with --data-file {}",
                    data.display()
                );
            }
        }
        _ => println!(
            "created {}: qcow2, {} bytes",
            args.image.display(),
            created.size
        ),
    }
    Ok(0)
}

fn read_qcow2_header(node: &FileNode, path: &Path) -> Result<Option<Header>, Failure> {
    let len = node.size().min(1 << header::MAX_CLUSTER_BITS) as usize;
    let mut buf = vec![0u8; len];
    node.read_exact_at(&mut buf, 0)
        .map_err(|e| Failure::at(path, &e))?;
    if buf.len() < 4 || buf[..4] != header::MAGIC.to_be_bytes() {
        return Ok(None);
    }
    Header::parse(&buf)
        .map(Some)
        .map_err(|e| Failure::at(path, &e))
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.3} {}", UNITS[unit]).replace(".000", "")
    }
}

pub fn info(args: InfoArgs) -> Result<i32, Failure> {
    let path = &args.image;
    // No lock (a look, as qemu-img info -U takes): a file, or a remote store by its name.
    let node = peek(path)?;
    // The space a host file takes; remote stores do not say (qemu-img: "unavailable").
    let actual = match node.remote() {
        Some(_) => None,
        None => Some(
            std::fs::metadata(path)
                .map_err(|e| Failure::at(path, &e))?
                .blocks()
                * 512,
        ),
    };
    let disk_size = actual.map_or_else(|| "unavailable".to_string(), human_size);
    // Display only: the format shown is read from the file, but nothing is opened on its
    // say-so (serving always takes the format from the command line).
    let header = read_qcow2_header(&node, path)?;
    let Some(h) = header else {
        if args.json {
            let mut v = json!({
                "virtual-size": node.size(),
                "filename": path.display().to_string(),
                "format": "raw",
                "dirty-flag": false,
            });
            if let Some(actual) = actual {
                v["actual-size"] = json!(actual);
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("image: {}", path.display());
            println!("file format: raw");
            println!(
                "virtual size: {} ({} bytes)",
                human_size(node.size()),
                node.size()
            );
            println!("disk size: {disk_size}");
        }
        return Ok(0);
    };
    let compat = if h.version >= 3 { "1.1" } else { "0.10" };
    let compression = match h.compression() {
        header::CompressionType::Zlib => "zlib",
        header::CompressionType::Zstd => "zstd",
    };
    let lazy = h.compatible_features & compatible::LAZY_REFCOUNTS != 0;
    let corrupt = h.incompatible_features & incompatible::CORRUPT != 0;
    let data_file = h.string_extension(extension::DATA_FILE);
    let backing_format = h.string_extension(extension::BACKING_FORMAT);
    if args.json {
        let mut specific = json!({
            "compat": compat,
            "compression-type": compression,
            "lazy-refcounts": lazy,
            "refcount-bits": 1u32 << h.refcount_order,
            "corrupt": corrupt,
            "extended-l2": false,
        });
        if let Some(d) = &data_file {
            specific["data-file"] = json!(d);
            specific["data-file-raw"] = json!(h.data_file_raw());
        }
        let mut v = json!({
            "virtual-size": h.size,
            "filename": path.display().to_string(),
            "cluster-size": h.cluster_size(),
            "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": specific},
            "dirty-flag": h.incompatible_features & incompatible::DIRTY != 0,
        });
        if let Some(actual) = actual {
            v["actual-size"] = json!(actual);
        }
        if let Some(b) = &h.backing_file {
            v["backing-filename"] = json!(b);
            if let Some(f) = &backing_format {
                v["backing-filename-format"] = json!(f);
            }
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("image: {}", path.display());
    println!("file format: qcow2");
    println!("virtual size: {} ({} bytes)", human_size(h.size), h.size);
    println!("disk size: {disk_size}");
    println!("cluster_size: {}", h.cluster_size());
    if let Some(b) = &h.backing_file {
        println!("backing file: {b}");
        if let Some(f) = &backing_format {
            println!("backing file format: {f}");
        }
    }
    println!("Format specific information:");
    println!("    compat: {compat}");
    println!("    compression type: {compression}");
    println!("    lazy refcounts: {lazy}");
    println!("    refcount bits: {}", 1u32 << h.refcount_order);
    if let Some(d) = &data_file {
        println!("    data file: {d}");
        println!("    data file raw: {}", h.data_file_raw());
    }
    println!("    corrupt: {corrupt}");
    println!("    extended l2: false");
    Ok(0)
}

/// A look at `path` without a lock, for the commands that only read its header.
fn peek(path: &Path) -> Result<FileNode, Failure> {
    let options = FileOptions {
        read_only: true,
        ..FileOptions::default()
    };
    FileNode::open(path, options).map_err(Failure::from)
}

pub fn check(args: CheckArgs) -> Result<i32, Failure> {
    if read_qcow2_header(&peek(&args.image)?, &args.image)?.is_none() {
        return Err(Failure::msg(format!(
            "{}: not a qcow2 image (a raw image has no metadata to check)",
            args.image.display()
        )));
    }
    let options = OpenOptions {
        read_only: !args.repair,
        repair: args.repair,
        data_file: args.data_file.clone(),
        locking: if args.force_share {
            Locking::Off
        } else {
            Locking::On
        },
        ..OpenOptions::default()
    };
    let node = Qcow2Node::open(&args.image, &options)?;
    let report = check::check(&node, args.repair).map_err(|e| {
        Failure::msg(format!(
            "{}: check failed: {}",
            args.image.display(),
            Chain(&e)
        ))
    })?;
    if args.repair && report.corruptions_fixed == report.corruptions && report.corruptions > 0 {
        node.clear_corrupt_flag()
            .map_err(|e| Failure::at(&args.image, &e))?;
    }
    if args.json {
        print_check_json(&args.image, &report)?;
    } else {
        print_check(&report, args.repair);
    }
    Ok(report.exit_code())
}

fn print_check(r: &CheckReport, repair: bool) {
    for m in &r.messages {
        println!("{m}");
    }
    if repair && (r.corruptions_fixed > 0 || r.leaks_fixed > 0) {
        println!("The following inconsistencies were found and repaired:\n");
        println!("    {} leaked clusters", r.leaks_fixed);
        println!("    {} corruptions\n", r.corruptions_fixed);
    }
    let corruptions = r.corruptions - r.corruptions_fixed;
    let leaks = r.leaks - r.leaks_fixed;
    if corruptions == 0 && leaks == 0 {
        println!("No errors were found on the image.");
    }
    if corruptions > 0 {
        println!("\n{corruptions} errors were found on the image.");
        println!("Data may be corrupted, or further writes to the image may corrupt it.");
    }
    if leaks > 0 {
        println!("\n{leaks} leaked clusters were found on the image.");
        println!("This means waste of disk space, but no harm to data.");
    }
    if r.total_clusters > 0 {
        let pct = |n: u64| n as f64 * 100.0 / r.total_clusters as f64;
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters),
            pct(r.fragmented_clusters),
            pct(r.compressed_clusters)
        );
    }
    println!("Image end offset: {}", r.image_end_offset);
}

fn print_check_json(image: &Path, r: &CheckReport) -> Result<(), Failure> {
    let v = json!({
        "filename": image.display().to_string(),
        "format": "qcow2",
        "check-errors": 0,
        "corruptions": r.corruptions - r.corruptions_fixed,
        "leaks": r.leaks - r.leaks_fixed,
        "corruptions-fixed": r.corruptions_fixed,
        "leaks-fixed": r.leaks_fixed,
        "allocated-clusters": r.allocated_clusters,
        "total-clusters": r.total_clusters,
        "compressed-clusters": r.compressed_clusters,
        "fragmented-clusters": r.fragmented_clusters,
        "image-end-offset": r.image_end_offset,
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_read_like_qemu_img() {
        assert_eq!(human_size(67108864), "64 MiB");
        assert_eq!(human_size(266240), "260 KiB");
        assert_eq!(human_size(100), "100 B");
    }
}
