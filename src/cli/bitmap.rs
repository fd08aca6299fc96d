//! `vubd bitmap`: manage the persistent dirty bitmaps of an image no process is serving.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};
use serde_json::json;

use super::{parse_size, Failure};
use crate::bitmap::{Action, BitmapManager, Persistence, WriteGate};
use crate::block::qcow2::Qcow2Node;
use crate::block::{BlockDriver, Locking, OpenOptions};

#[derive(Debug, Args)]
pub struct BitmapArgs {
    /// The qcow2 image.
    image: PathBuf,
    /// The external data file, if the image's stored name cannot be followed.
    #[arg(long, value_name = "PATH", global = true)]
    data_file: Option<PathBuf>,
    /// list and dump: read even if another process is writing the image (like qemu-img's
    /// -U; what is read may be stale).
    #[arg(short = 'U', long, global = true)]
    force_share: bool,
    #[command(subcommand)]
    op: Op,
}

#[derive(Debug, Subcommand)]
enum Op {
    /// List the bitmaps.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a persistent bitmap (recording unless --disabled).
    Add {
        name: String,
        /// Bytes per bit: a power of two from 512 to 2G (default: the cluster size).
        #[arg(long, value_parser = parse_size)]
        granularity: Option<u64>,
        #[arg(long)]
        disabled: bool,
    },
    /// Remove a bitmap (also an inconsistent one).
    Remove { name: String },
    /// Clear every bit.
    Clear { name: String },
    /// Start recording writes.
    Enable { name: String },
    /// Stop recording writes.
    Disable { name: String },
    /// Set in B every bit set in A.
    Merge {
        #[arg(long = "from", value_name = "A")]
        from: String,
        #[arg(long = "into", value_name = "B")]
        into: String,
    },
    /// Print the dirty extents (offset, length): what an incremental backup copies.
    Dump {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: BitmapArgs) -> Result<i32, Failure> {
    let read_only = matches!(args.op, Op::List { .. } | Op::Dump { .. });
    if args.force_share && !read_only {
        return Err(Failure::msg(
            "--force-share (-U) only goes with list and dump: changing the bitmaps of \
             an image another process is writing would corrupt it",
        ));
    }
    let node = Arc::new(Qcow2Node::open(
        &args.image,
        &OpenOptions {
            read_only,
            data_file: args.data_file.clone(),
            locking: if args.force_share {
                Locking::Off
            } else {
                Locking::On
            },
            ..OpenOptions::default()
        },
    )?);
    let store = node.clone().bitmap_store();
    let manager = BitmapManager::open(
        "disk",
        node.size(),
        store,
        read_only,
        Persistence::CrashConsistent,
        Arc::new(WriteGate::new(0)),
    )
    .map_err(|e| Failure::at(&args.image, &e))?;
    let action = match args.op {
        Op::List { json } => {
            list(&manager, json)?;
            return Ok(0);
        }
        Op::Dump { name, json } => {
            dump(&manager, &name, json)?;
            return Ok(0);
        }
        Op::Add {
            name,
            granularity,
            disabled,
        } => Action::Add {
            name,
            granularity,
            persistent: true,
            disabled,
        },
        Op::Remove { name } => Action::Remove { name },
        Op::Clear { name } => Action::Clear { name },
        Op::Enable { name } => Action::Enable { name },
        Op::Disable { name } => Action::Disable { name },
        Op::Merge { from, into } => Action::Merge {
            target: into,
            sources: vec![from],
        },
    };
    let applied = manager.apply(action);
    // Store the bitmaps (and clear `in_use`) whether or not the action succeeded.
    let closed = manager.close();
    applied.map_err(|e| Failure::at(&args.image, &e))?;
    closed.map_err(|e| Failure::at(&args.image, &e))?;
    node.flush_metadata()?;
    Ok(0)
}

fn list(manager: &BitmapManager, as_json: bool) -> Result<(), Failure> {
    let infos = manager.infos();
    if as_json {
        let v: Vec<_> = infos
            .iter()
            .map(|b| {
                json!({
                    "name": b.name,
                    "granularity": b.granularity,
                    "count": b.count,
                    "recording": b.recording,
                    "persistent": b.persistent,
                    "inconsistent": b.inconsistent,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if infos.is_empty() {
        println!("no bitmaps");
        return Ok(());
    }
    println!(
        "{:<24} {:>12} {:>14} {:>10} {:>13}",
        "NAME", "GRANULARITY", "DIRTY BYTES", "RECORDING", "INCONSISTENT"
    );
    for b in infos {
        println!(
            "{:<24} {:>12} {:>14} {:>10} {:>13}",
            b.name,
            b.granularity,
            if b.inconsistent {
                "-".to_string()
            } else {
                b.count.to_string()
            },
            b.recording,
            b.inconsistent
        );
    }
    Ok(())
}

fn dump(manager: &BitmapManager, name: &str, as_json: bool) -> Result<(), Failure> {
    let (granularity, extents) = manager.extents(name)?;
    if as_json {
        let v = json!({
            "name": name,
            "granularity": granularity,
            "extents": extents.iter().map(|(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (offset, len) in extents {
            println!("{offset} {len}");
        }
    }
    Ok(())
}
