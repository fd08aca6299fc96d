//! What to serve, however the command line spelled it: [`ServeSpec`], built by
//! [`ServeSpec::from_flags`] from vubd's own options (`--image`, `--socket`, ...) or by
//! [`super::qsd::parse`] from a qemu-storage-daemon command line.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::Failure;
use crate::block::{BackingChoice, Format, Locking, NodeNames, OpenOptions};
use crate::vhost::daemon::SocketOptions;

/// Everything needed to serve one export.
#[derive(Debug)]
pub struct ServeSpec {
    pub image: PathBuf,
    pub format: Format,
    pub open: OpenOptions,
    pub socket: SocketOptions,
    pub num_queues: u16,
    pub logical_block_size: u32,
    pub node_names: NodeNames,
    pub control: Option<PathBuf>,
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
}

impl NativeArgs {
    /// Whether any option of this form was given (it excludes the qemu-storage-daemon form).
    pub fn any_graph_option(&self) -> bool {
        self.image.is_some()
            || self.socket.is_some()
            || self.data_file.is_some()
            || self.backing.is_some()
    }
}

impl ServeSpec {
    /// The spec of `--image ... --socket ...`, with the socket file's mode.
    pub fn from_flags(args: &NativeArgs, socket_mode: u32) -> Result<ServeSpec, Failure> {
        let (Some(image), Some(socket)) = (args.image.clone(), args.socket.clone()) else {
            return Err(Failure::msg(
                "--socket and --image are required (or --blockdev and --export)",
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
        Ok(ServeSpec {
            image,
            format: args.format.into(),
            open: OpenOptions {
                read_only: args.readonly,
                direct: args.cache == CacheMode::None,
                data_file: args.data_file.clone(),
                backing,
                l2_cache_bytes: args.l2_cache_size,
                repair: false,
                locking: args.locking.into(),
                beneath: None,
                fault: None,
            },
            socket: SocketOptions {
                path: socket,
                mode: socket_mode,
            },
            num_queues: args.num_queues,
            logical_block_size: args.logical_block_size,
            node_names: NodeNames::derived(&args.node_name),
            control: None,
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
