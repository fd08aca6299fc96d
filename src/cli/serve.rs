//! `vubd serve`: build the block graph and the device, then run the daemon.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, ValueEnum};

use super::keyval::parse_options;
use super::spec::{NativeArgs, ServeSpec};
use super::{qsd, Failure};
use crate::bitmap::Persistence;
use crate::block::io::EngineKind;
use crate::block::open_image;
use crate::export::{Export, ExportOptions};
use crate::graph::options::{NbdExportSpec, NbdServerSpec, TlsCredsSpec};
use crate::graph::Graph;
use crate::stats::endpoint::{MetricsAddr, MetricsEndpoint};
use crate::vhost::daemon;
use crate::vhost::device::{BlkDevice, DeviceOptions};
use crate::virtio_blk::ID_BYTES;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    native: NativeArgs,

    /// Largest virtqueue size the VMM may use (a power of two).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = parse_queue_size)]
    queue_size: u16,
    /// Device serial returned to the guest (up to 20 ASCII characters; default derived from
    /// the image path).
    #[arg(long, value_name = "STR", value_parser = parse_serial)]
    serial: Option<String>,
    /// Permission bits of the socket file, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,
    /// QMP control socket (mode 0600) for managing dirty bitmaps at runtime.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve statistics in Prometheus text format at GET /metrics, on a UNIX socket (mode
    /// 0600) or a TCP address.
    #[arg(long, value_name = "unix:PATH|tcp:ADDRESS:PORT",
          value_parser = |s: &str| s.parse::<MetricsAddr>())]
    metrics: Option<MetricsAddr>,
    /// I/O engine: io_uring, synchronous system calls, or io_uring when available.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    io_engine: EngineArg,
    /// Busy-poll each queue for up to this many microseconds after its last request or
    /// completion before sleeping: lower latency for a CPU core per busy queue (0: off).
    #[arg(long, value_name = "US", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    poll_us: u32,
    /// How persistent dirty bitmaps reach the image while served: `crash-consistent` keeps
    /// them consistent on disk at every moment (a kill or a power loss never forces a full
    /// backup); `on-close` stores them at shutdown only, as QEMU does.
    #[arg(long, value_enum, default_value_t = PersistenceArg::CrashConsistent)]
    bitmap_persistence: PersistenceArg,

    /// qemu-storage-daemon form: a block node (driver=file|raw|qcow2,node-name=...,...).
    #[arg(long, value_name = "OPTIONS")]
    blockdev: Vec<String>,
    /// qemu-storage-daemon form: the export (type=vhost-user-blk,node-name=...,addr.path=...).
    #[arg(long, value_name = "OPTIONS")]
    export: Vec<String>,
    /// qemu-storage-daemon form: objects (iothreads are accepted: every vubd queue has its own
    /// thread).
    #[arg(long, value_name = "OPTIONS")]
    object: Vec<String>,
    /// qemu-storage-daemon form: a socket chardev for --monitor.
    #[arg(long, value_name = "OPTIONS")]
    chardev: Vec<String>,
    /// qemu-storage-daemon form: a QMP monitor on a chardev (the control socket).
    #[arg(long, value_name = "OPTIONS")]
    monitor: Vec<String>,
    /// Start the NBD server for backups (addr.type=unix,addr.path=PATH or
    /// addr.type=inet,addr.host=H,addr.port=P [,tls-creds=ID][,max-connections=N]), as
    /// qemu-storage-daemon's --nbd-server; NBD exports are --export type=nbd,...
    #[arg(long, value_name = "OPTIONS")]
    nbd_server: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PersistenceArg {
    CrashConsistent,
    OnClose,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    Auto,
    IoUring,
    Sync,
}

pub fn run(args: ServeArgs) -> Result<i32, Failure> {
    // First, while vubd has a single thread: it reads and clears the environment.
    crate::systemd::take_activated_sockets();
    daemon::block_shutdown_signals()
        .map_err(|e| Failure::msg(format!("blocking SIGTERM and SIGINT: {e}")))?;
    let startup = Startup::parse(&args)?;
    let mut spec = if !args.blockdev.is_empty() || !startup.vhost_exports.is_empty() {
        if args.native.any_graph_option() {
            return Err(Failure::msg(
                "use either --image/--socket or --blockdev/--export, not both",
            ));
        }
        let mut spec = qsd::parse(
            &args.blockdev,
            &startup.vhost_exports,
            &startup.other_objects,
            args.socket_mode,
        )?;
        spec.control = qsd::monitor_socket(&args.chardev, &args.monitor)?;
        spec
    } else {
        ServeSpec::from_flags(&args.native, args.socket_mode)?
    };
    spec.control = spec.control.or(args.control.clone());
    if !crate::systemd::is_activated(&spec.socket.path) {
        crate::socket::check_free(&spec.socket.path, "--socket")?;
    }
    let driver = open_image(&spec.image, spec.format, &spec.open)?;
    let serial = args
        .serial
        .unwrap_or_else(|| default_serial(&spec.image))
        .into_bytes();
    let export = Export::new(
        driver,
        ExportOptions {
            read_only: spec.open.read_only,
            writers: spec.num_queues,
            engine: match args.io_engine {
                EngineArg::Auto => EngineKind::Auto,
                EngineArg::IoUring => EngineKind::IoUring,
                EngineArg::Sync => EngineKind::Sync,
            },
            poll: (args.poll_us > 0)
                .then(|| std::time::Duration::from_micros(u64::from(args.poll_us))),
            node_names: spec.node_names.clone(),
            bitmaps: match args.bitmap_persistence {
                PersistenceArg::CrashConsistent => Persistence::CrashConsistent,
                PersistenceArg::OnClose => Persistence::OnClose,
            },
        },
    )?;
    let device = BlkDevice::new(
        Arc::new(export),
        DeviceOptions {
            num_queues: spec.num_queues,
            queue_size: args.queue_size,
            serial,
            logical_block_size: spec.logical_block_size,
        },
    )?;
    let device = Arc::new(device);
    let graph = Graph::new(device.export().clone());
    startup.apply(&graph)?;
    let _metrics = match &args.metrics {
        Some(addr) => {
            let export = device.export().clone();
            let render = move || crate::stats::prometheus::render(&[export.metrics()]);
            Some(MetricsEndpoint::start(addr, render)?)
        }
        None => None,
    };
    daemon::serve(device, &spec.socket, spec.control.as_deref(), graph)?;
    Ok(0)
}

/// The NBD side of the command line: TLS objects, the server and its exports, started once
/// the disk is open (qemu-storage-daemon's `--object tls-creds-x509`, `--nbd-server`,
/// `--export type=nbd`).
struct Startup {
    vhost_exports: Vec<String>,
    other_objects: Vec<String>,
    tls: Vec<TlsCredsSpec>,
    server: Option<NbdServerSpec>,
    nbd_exports: Vec<NbdExportSpec>,
}

impl Startup {
    fn parse(args: &ServeArgs) -> Result<Startup, Failure> {
        let mut s = Startup {
            vhost_exports: Vec::new(),
            other_objects: Vec::new(),
            tls: Vec::new(),
            server: None,
            nbd_exports: Vec::new(),
        };
        for e in &args.export {
            let mut opts = parse_options("--export", e, Some("type"))?;
            if opts.get("type").map(String::as_str) == Some("nbd") {
                opts.remove("iothread");
                s.nbd_exports
                    .push(NbdExportSpec::parse("--export type=nbd", opts)?);
            } else {
                s.vhost_exports.push(e.clone());
            }
        }
        for o in &args.object {
            let mut opts = parse_options("--object", o, Some("qom-type"))?;
            if opts.get("qom-type").map(String::as_str) == Some("tls-creds-x509") {
                opts.remove("qom-type");
                s.tls
                    .push(TlsCredsSpec::parse("--object tls-creds-x509", opts)?);
            } else {
                s.other_objects.push(o.clone());
            }
        }
        if let Some(n) = &args.nbd_server {
            let opts = parse_options("--nbd-server", n, None)?;
            s.server = Some(NbdServerSpec::parse("--nbd-server", opts)?);
        }
        if !s.nbd_exports.is_empty() && s.server.is_none() {
            return Err(Failure::msg(
                "--export type=nbd needs --nbd-server addr.type=unix,addr.path=PATH (or inet)",
            ));
        }
        Ok(s)
    }

    fn apply(self, graph: &Graph) -> Result<(), Failure> {
        let fail = |what: &str, e: crate::graph::GraphError| Failure::msg(format!("{what}: {e}"));
        for t in self.tls {
            graph
                .add_tls_creds(t)
                .map_err(|e| fail("--object tls-creds-x509", e))?;
        }
        if let Some(server) = self.server {
            graph
                .start_nbd_server(server)
                .map_err(|e| fail("--nbd-server", e))?;
        }
        for e in self.nbd_exports {
            graph
                .add_nbd_export(e)
                .map_err(|e| fail("--export type=nbd", e))?;
        }
        Ok(())
    }
}

/// A serial that identifies the image stably: `vubd-` and a hash of its absolute path.
fn default_serial(image: &Path) -> String {
    let path = image.canonicalize().unwrap_or_else(|_| image.to_path_buf());
    let mut hasher = Fnv1a::default();
    hasher.write(path.as_os_str().as_encoded_bytes());
    let serial = format!("vubd-{:015x}", hasher.finish() & 0x0fff_ffff_ffff_ffff);
    debug_assert_eq!(serial.len(), ID_BYTES);
    serial
}

/// FNV-1a, a hash that, unlike std's, is the same in every build.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n.is_power_of_two() && (2..=32768).contains(&n) => Ok(n),
        _ => Err("must be a power of two from 2 to 32768".into()),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > ID_BYTES || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(format!(
            "must be at most {ID_BYTES} printable ASCII characters"
        ));
    }
    Ok(s.to_string())
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err("must be octal permission bits such as 0600".into()),
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
        assert_eq!(a.len(), ID_BYTES);
        assert!(a.starts_with("vubd-"));
    }

    #[test]
    fn option_parsers_reject_bad_values() {
        assert_eq!(parse_queue_size("256"), Ok(256));
        assert!(parse_queue_size("100").is_err());
        assert!(parse_queue_size("1").is_err());
        assert!(parse_queue_size("65536").is_err());
        assert!(parse_serial("012345678901234567890").is_err());
        assert!(parse_serial("bad\nserial").is_err());
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("01777").is_err());
    }
}
