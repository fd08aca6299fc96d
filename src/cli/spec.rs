//! What to serve, however the command line spelled it: [`DiskSpec`]s, built by
//! [`DiskSpec::from_flags`] from vubd's own options (`--image`, `--socket`, ...), by
//! [`DiskSpec::from_disk_option`] from each `--disk`, or by [`super::qsd::parse`] from a
//! qemu-storage-daemon command line.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::keyval::{parse_options, Taker};
use super::Failure;
use crate::block::{BackingChoice, Format, Locking, NodeNames, OpenOptions};
use crate::graph::options::VhostExportSpec;

/// Everything needed to serve one disk: its graph and its vhost-user-blk export.
#[derive(Debug)]
pub struct DiskSpec {
    pub image: PathBuf,
    pub format: Format,
    pub open: OpenOptions,
    pub node_names: NodeNames,
    pub export: VhostExportSpec,
    /// The option that named the socket, for messages.
    pub socket_option: &'static str,
}

/// vubd's own form of the graph and the export.
#[derive(Debug, Args)]
pub struct NativeArgs {
    /// UNIX socket the VMM connects to.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Disk image to serve.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Image format (never guessed from the file's content).
    #[arg(long, value_enum, default_value_t = FormatArg::Raw)]
    format: FormatArg,
    /// qcow2: use this external data file instead of the one the image names.
    #[arg(long, value_name = "PATH")]
    data_file: Option<PathBuf>,
    /// qcow2: use this backing file instead of the one the image names.
    #[arg(long, value_name = "PATH", requires = "backing_format")]
    backing: Option<PathBuf>,
    /// qcow2: the format of --backing.
    #[arg(long, value_enum, value_name = "FORMAT")]
    backing_format: Option<FormatArg>,
    /// qcow2: bytes of L2 tables to cache (default: the whole disk's, up to 32M).
    #[arg(long, value_name = "SIZE", value_parser = super::parse_size)]
    l2_cache_size: Option<u64>,
    /// Serve the image read-only.
    #[arg(long)]
    readonly: bool,
    /// Number of virtqueues, each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,
    /// Logical block size presented to the guest.
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = parse_block_size)]
    logical_block_size: u32,
    /// Host page cache use: `none` opens the data file with O_DIRECT.
    #[arg(long, value_enum, default_value_t = CacheMode::Writeback)]
    cache: CacheMode,
    /// Lock the image files as QEMU does, so that QEMU, qemu-img and other vubd processes
    /// refuse to write them while served (`off`: no locks, no checks).
    #[arg(long, value_enum, default_value_t = LockingArg::On)]
    locking: LockingArg,
    /// Name of the exported node (QMP `node` arguments); its file child is NAME-file.
    #[arg(long, value_name = "NAME", default_value = "disk")]
    node_name: String,
    /// A disk to serve, one option per disk (repeat it to serve several): the options of the
    /// --image form as keys, e.g.
    /// image=vm1.qcow2,format=qcow2,data-file=vm1.raw,socket=vm1.sock,num-queues=2; also
    /// node-name (default diskN, N counting from 0), id (default: the node name) and serial.
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<String>,
}

impl NativeArgs {
    /// Whether any option of the `--image` form was given.
    pub fn any_graph_option(&self) -> bool {
        self.image.is_some()
            || self.socket.is_some()
            || self.data_file.is_some()
            || self.backing.is_some()
    }

    /// The `--disk` options given.
    pub fn disks(&self) -> &[String] {
        &self.disk
    }
}

impl DiskSpec {
    /// The spec of `--image ... --socket ...`, with the device serial if given.
    pub fn from_flags(args: &NativeArgs, serial: Option<String>) -> Result<DiskSpec, Failure> {
        let (Some(image), Some(socket)) = (args.image.clone(), args.socket.clone()) else {
            return Err(Failure::msg(
                "--socket and --image are required (or --disk, or --blockdev and --export)",
            ));
        };
        let backing = match (&args.backing, args.backing_format) {
            (Some(path), Some(format)) => BackingChoice::Use(path.clone(), format.into()),
            _ => BackingChoice::FromImage,
        };
        if args.format == FormatArg::Raw && (args.data_file.is_some() || args.backing.is_some()) {
            return Err(Failure::msg(
                "--data-file and --backing need --format qcow2",
            ));
        }
        Ok(DiskSpec {
            image,
            format: args.format.into(),
            open: OpenOptions {
                read_only: args.readonly,
                direct: args.cache == CacheMode::None,
                data_file: args.data_file.clone(),
                backing,
                l2_cache_bytes: args.l2_cache_size,
                locking: args.locking.into(),
                ..OpenOptions::default()
            },
            node_names: NodeNames::derived(&args.node_name),
            export: VhostExportSpec {
                id: args.node_name.clone(),
                node: args.node_name.clone(),
                socket,
                writable: !args.readonly,
                num_queues: args.num_queues,
                logical_block_size: args.logical_block_size,
                serial,
            },
            socket_option: "--socket",
        })
    }

    /// The spec of one `--disk image=PATH,socket=PATH[,...]`, the `index`th: the keys are
    /// the options of the `--image` form without their dashes, plus `serial` and `id`; the
    /// node name defaults to `disk<index>`.
    pub fn from_disk_option(text: &str, index: usize) -> Result<DiskSpec, Failure> {
        let what = "--disk";
        let mut t = Taker::new(what.into(), parse_options(what, text, Some("image"))?);
        let required = |t: &mut Taker, key: &str| {
            t.take(key)
                .ok_or_else(|| Failure::msg(format!("--disk {text}: '{key}' is required")))
        };
        let image = PathBuf::from(required(&mut t, "image")?);
        let socket = PathBuf::from(required(&mut t, "socket")?);
        let format = match t.take("format").as_deref() {
            None | Some("raw") => Format::Raw,
            Some("qcow2") => Format::Qcow2,
            Some(v) => {
                return Err(Failure::msg(format!(
                    "--disk format={v}: expected raw or qcow2"
                )))
            }
        };
        let data_file = t.take("data-file").map(PathBuf::from);
        let backing = match (t.take("backing"), t.take("backing-format").as_deref()) {
            (None, None) => BackingChoice::FromImage,
            (Some(path), Some("raw")) => BackingChoice::Use(path.into(), Format::Raw),
            (Some(path), Some("qcow2")) => BackingChoice::Use(path.into(), Format::Qcow2),
            _ => {
                return Err(Failure::msg(
                    "--disk: backing= needs backing-format=raw or backing-format=qcow2",
                ))
            }
        };
        if format == Format::Raw
            && (data_file.is_some() || !matches!(backing, BackingChoice::FromImage))
        {
            return Err(Failure::msg(
                "--disk: data-file and backing need format=qcow2",
            ));
        }
        let l2_cache_bytes = match t.take("l2-cache-size") {
            Some(v) => Some(
                super::parse_size(&v)
                    .map_err(|e| Failure::msg(format!("--disk l2-cache-size={v}: {e}")))?,
            ),
            None => None,
        };
        let read_only = t.take_bool("readonly")?.unwrap_or(false);
        let direct = match t.take("cache").as_deref() {
            None | Some("writeback") => false,
            Some("none") => true,
            Some(v) => {
                return Err(Failure::msg(format!(
                    "--disk cache={v}: expected none or writeback"
                )))
            }
        };
        let locking = match t.take("locking").as_deref() {
            None | Some("on") => Locking::On,
            Some("off") => Locking::Off,
            Some(v) => {
                return Err(Failure::msg(format!(
                    "--disk locking={v}: expected on or off"
                )))
            }
        };
        let node = t
            .take("node-name")
            .unwrap_or_else(|| format!("disk{index}"));
        // The export's own keys, in the form qemu-storage-daemon's --export takes them.
        let mut export = super::keyval::Opts::new();
        export.insert("node-name".into(), node.clone());
        export.insert("addr.path".into(), socket.display().to_string());
        export.insert(
            "writable".into(),
            if read_only { "off" } else { "on" }.into(),
        );
        for key in ["id", "num-queues", "logical-block-size", "serial"] {
            if let Some(v) = t.take(key) {
                export.insert(key.into(), v);
            }
        }
        t.finish()?;
        let export = VhostExportSpec::parse(what, export, false)?;
        Ok(DiskSpec {
            image,
            format,
            open: OpenOptions {
                read_only,
                direct,
                data_file,
                backing,
                l2_cache_bytes,
                locking,
                ..OpenOptions::default()
            },
            node_names: NodeNames::derived(&node),
            export,
            socket_option: "--disk socket",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheMode {
    None,
    Writeback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LockingArg {
    On,
    Off,
}

impl From<LockingArg> for Locking {
    fn from(l: LockingArg) -> Locking {
        match l {
            LockingArg::On => Locking::On,
            LockingArg::Off => Locking::Off,
        }
    }
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("must be 512 or 4096".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_are_512_or_4096() {
        assert_eq!(parse_block_size("4096"), Ok(4096));
        assert!(parse_block_size("1024").is_err());
    }
}
