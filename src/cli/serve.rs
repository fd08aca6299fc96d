//! `vubd serve`: build the block graph and the device, then run the daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, ValueEnum};

use super::keyval::parse_options;
use super::spec::{DiskSpec, NativeArgs};
use super::{qsd, Failure};
use crate::bitmap::Persistence;
use crate::block::io::{EngineKind, UringSetup};
use crate::block::open_image;
use crate::block::remote::nbd::{register_client_creds, TlsClientCreds};
use crate::graph::disk::ExportSettings;
use crate::graph::options::{NbdExportSpec, NbdServerSpec, TlsCredsSpec, TlsEndpoint};
use crate::graph::Graph;
use crate::stats::endpoint::{MetricsAddr, MetricsEndpoint};
use crate::vhost::daemon;
use crate::vhost::poll::PollPolicy;
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
    /// Have a kernel thread on this CPU poll each queue's io_uring submissions
    /// (IORING_SETUP_SQPOLL): no system call per submission, at the price of that thread
    /// spinning while I/O flows. Worth it with O_DIRECT on a fast device and a CPU to spare.
    #[arg(long, value_name = "CPU")]
    io_sqpoll: Option<u32>,
    /// Busy-poll each queue after its work for an adaptive window of up to this many
    /// microseconds before sleeping, as QEMU's iothreads do: the window grows while polling
    /// would catch the next request and drops when it would not, so an idle disk costs no CPU
    /// (0: never poll).
    #[arg(long, value_name = "US", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    poll_us: u32,
    /// Factor the polling window grows by (QEMU's poll-grow).
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(2..=64))]
    poll_grow: u32,
    /// Divisor the polling window shrinks by when polling would not have caught the next
    /// event; 0 stops polling at once (QEMU's poll-shrink).
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=64))]
    poll_shrink: u32,
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
    let mut startup = Startup::parse(&args)?;
    // `nbd` nodes find their TLS credentials when the disks open.
    startup.add_client_tls()?;
    let (disks, qsd_control) = disk_specs(&args, &startup)?;
    let control = qsd_control.or(args.control.clone());
    if disks.is_empty() && control.is_none() {
        return Err(Failure::msg(
            "nothing to serve: give --image and --socket, --disk, --blockdev and --export, or a \
             --control socket to add exports at runtime",
        ));
    }
    // Every socket is checked before any image is opened (and locked): a second daemon
    // started by mistake is told about the socket, the thing it got wrong.
    for (i, disk) in disks.iter().enumerate() {
        let socket = &disk.export.socket;
        let earlier = &disks[..i];
        if earlier.iter().any(|d| same_path(&d.export.socket, socket)) {
            return Err(Failure::msg(format!(
                "{} {}: given to two disks; each disk needs its own socket",
                disk.socket_option,
                socket.display()
            )));
        }
        // The option that gave the disk: --disk, --export (or --socket).
        let form = disk.socket_option.split(' ').next().unwrap_or("--disk");
        if earlier
            .iter()
            .any(|d| d.node_names.format == disk.node_names.format)
        {
            return Err(Failure::msg(format!(
                "{form}: node name '{}' is given to two disks; give each its own node-name=",
                disk.node_names.format
            )));
        }
        if earlier.iter().any(|d| d.export.id == disk.export.id) {
            return Err(Failure::msg(format!(
                "{form}: export id '{}' is given to two disks; give each its own id=",
                disk.export.id
            )));
        }
        if !crate::systemd::is_activated(socket) {
            crate::socket::check_free(socket, disk.socket_option)?;
        }
    }
    if let Some(cpu) = args.io_sqpoll {
        check_sqpoll(cpu, args.io_engine)?;
    }
    let graph = Graph::new(ExportSettings {
        engine: {
            let setup = UringSetup {
                sqpoll_cpu: args.io_sqpoll,
            };
            match args.io_engine {
                EngineArg::Auto => EngineKind::Auto(setup),
                EngineArg::IoUring => EngineKind::IoUring(setup),
                EngineArg::Sync => EngineKind::Sync,
            }
        },
        poll: PollPolicy {
            max: std::time::Duration::from_micros(u64::from(args.poll_us)),
            grow: args.poll_grow,
            shrink: args.poll_shrink,
        },
        bitmaps: match args.bitmap_persistence {
            PersistenceArg::CrashConsistent => Persistence::CrashConsistent,
            PersistenceArg::OnClose => Persistence::OnClose,
        },
        queue_size: args.queue_size,
        socket_mode: args.socket_mode,
    });
    // The disks served so far are closed cleanly (bitmaps stored) if a later one fails.
    let started = start(&graph, disks, startup, args.metrics.as_ref());
    let metrics = match started {
        Ok(metrics) => metrics,
        Err(e) => {
            if let Err(close) = graph.shutdown() {
                log::error!("{}", crate::error::Chain(&close));
            }
            return Err(e);
        }
    };
    daemon::run(graph, control.as_deref())?;
    drop(metrics);
    Ok(0)
}

/// Whether `a` and `b` name the same file, however spelled (`x.sock`, `./x.sock`, a path
/// through a symbolic link to its directory): their directories are compared resolved.
fn same_path(a: &Path, b: &Path) -> bool {
    fn resolved(p: &Path) -> Option<PathBuf> {
        let name = p.file_name()?;
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(dir.canonicalize().ok()?.join(name))
    }
    a == b || matches!((resolved(a), resolved(b)), (Some(x), Some(y)) if x == y)
}

/// The disks the command line names, in whichever form, and the qemu-storage-daemon form's
/// monitor socket.
fn disk_specs(
    args: &ServeArgs,
    startup: &Startup,
) -> Result<(Vec<DiskSpec>, Option<PathBuf>), Failure> {
    let qsd_form = !args.blockdev.is_empty() || !startup.vhost_exports.is_empty();
    let disk_form = !args.native.disks().is_empty();
    let image_form = args.native.any_graph_option();
    if [qsd_form, disk_form, image_form]
        .iter()
        .filter(|f| **f)
        .count()
        > 1
    {
        return Err(Failure::msg(
            "use one form: --image/--socket, --disk, or --blockdev/--export",
        ));
    }
    let control = qsd::monitor_socket(&args.chardev, &args.monitor)?;
    let disks = if qsd_form {
        qsd::parse(
            &args.blockdev,
            &startup.vhost_exports,
            &startup.other_objects,
        )?
    } else if disk_form {
        args.native
            .disks()
            .iter()
            .enumerate()
            .map(|(i, d)| DiskSpec::from_disk_option(d, i))
            .collect::<Result<_, _>>()?
    } else if image_form || (control.is_none() && args.control.is_none()) {
        vec![DiskSpec::from_flags(&args.native, args.serial.clone())?]
    } else {
        Vec::new()
    };
    if args.serial.is_some() && !image_form {
        return Err(Failure::msg(
            "--serial goes with --image; give serial= in each --disk or --export",
        ));
    }
    Ok((disks, control))
}

/// Open and serve every disk, then start what the command line adds around them: the NBD
/// side and the metrics endpoint.
fn start(
    graph: &Arc<Graph>,
    disks: Vec<DiskSpec>,
    startup: Startup,
    metrics: Option<&MetricsAddr>,
) -> Result<Option<MetricsEndpoint>, Failure> {
    for disk in disks {
        let driver = open_image(&disk.image, disk.format, &disk.open)?;
        graph.add_disk(driver, disk.node_names, &disk.export, disk.socket_option)?;
    }
    startup.apply(graph)?;
    match metrics {
        Some(addr) => {
            let graph = graph.clone();
            let render = move || {
                let exports: Vec<_> = graph.exports().iter().map(|e| e.metrics()).collect();
                crate::stats::prometheus::render(&exports)
            };
            Ok(Some(MetricsEndpoint::start(addr, render)?))
        }
        None => Ok(None),
    }
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

    /// Load and add the `endpoint=client` credentials, which the disks' `nbd` nodes need.
    fn add_client_tls(&mut self) -> Result<(), Failure> {
        let (client, server) = std::mem::take(&mut self.tls)
            .into_iter()
            .partition(|t| t.endpoint == TlsEndpoint::Client);
        self.tls = server;
        for t in client {
            let what = format!("--object tls-creds-x509,id={}", t.id);
            let creds =
                TlsClientCreds::load(&t.dir).map_err(|e| Failure::msg(format!("{what}: {e}")))?;
            if !register_client_creds(&t.id, creds) {
                return Err(Failure::msg(format!("{what}: the id is used twice")));
            }
        }
        Ok(())
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

/// `--io-sqpoll CPU` needs io_uring and a CPU that exists.
fn check_sqpoll(cpu: u32, engine: EngineArg) -> Result<(), Failure> {
    if matches!(engine, EngineArg::Sync) {
        return Err(Failure::msg(
            "--io-sqpoll polls io_uring submissions; it cannot go with --io-engine sync",
        ));
    }
    // SAFETY: sysconf reads a system constant.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    if cpus > 0 && i64::from(cpu) >= cpus {
        return Err(Failure::msg(format!(
            "--io-sqpoll {cpu}: this machine has CPUs 0 to {}; give one of them",
            cpus - 1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
