//! `vubd resize`: grow a disk no process is serving, as `qemu-img resize` does — the image,
//! its raw data file and every persistent bitmap together, in one switch on disk.

use std::path::PathBuf;

use clap::Args;

use super::spec::FormatArg;
use super::{parse_size, Failure};
use crate::bitmap::Persistence;
use crate::block::io::EngineKind;
use crate::block::{open_image, NodeNames, OpenOptions};
use crate::export::{Export, ExportOptions};

#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The image to grow (raw, or qcow2 with or without a raw data file).
    image: PathBuf,
    /// The new size, or `+SIZE` to grow by (K, M, G, T suffixes). Disks only grow.
    #[arg(allow_hyphen_values = true)]
    size: String,
    /// The image format (never guessed from the file's content).
    #[arg(long, short = 'f', value_enum, default_value_t = FormatArg::Raw)]
    format: FormatArg,
    /// qcow2: the external data file, if the image's stored name cannot be followed.
    #[arg(long, value_name = "PATH")]
    data_file: Option<PathBuf>,
}

pub fn run(args: ResizeArgs) -> Result<i32, Failure> {
    let (grow_by, text) = match args.size.strip_prefix('+') {
        Some(rest) => (true, rest),
        None if args.size.starts_with('-') => {
            return Err(Failure::msg(format!(
                "{}: vubd resize only grows disks; shrinking would drop guest data",
                args.image.display()
            )))
        }
        None => (false, args.size.as_str()),
    };
    let amount = parse_size(text).map_err(|e| Failure::msg(format!("SIZE: {e}")))?;
    let driver = open_image(
        &args.image,
        args.format.into(),
        &OpenOptions {
            data_file: args.data_file.clone(),
            ..OpenOptions::default()
        },
    )?;
    let old = driver.size();
    let size = if grow_by {
        old.checked_add(amount)
            .ok_or_else(|| Failure::msg("SIZE: the new size overflows"))?
    } else {
        amount
    };
    if !size.is_multiple_of(512) {
        return Err(Failure::msg(format!(
            "{}: {size} bytes is not a multiple of 512; a disk is served in 512-byte sectors",
            args.image.display()
        )));
    }
    if size < old {
        return Err(Failure::msg(format!(
            "{}: {size} bytes is smaller than the disk's {old}; vubd resize only grows disks",
            args.image.display()
        )));
    }
    // The bitmaps are handled as while serving, crash-consistently: an interruption at any
    // point leaves the old disk or the new one, each with usable bitmaps.
    let export = Export::new(
        driver,
        ExportOptions {
            id: "resize".into(),
            read_only: false,
            writers: 1,
            engine: EngineKind::Sync,
            poll: crate::vhost::poll::PollPolicy::OFF,
            node_names: NodeNames::derived("disk"),
            bitmaps: Persistence::CrashConsistent,
        },
    )?;
    let resized = export.resize(size);
    let closed = export.close();
    resized?;
    closed?;
    println!(
        "resized {} from {old} to {size} bytes",
        args.image.display()
    );
    Ok(0)
}
