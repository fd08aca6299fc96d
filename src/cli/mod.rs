//! The command line: `vubd serve`, the image tools (`create`, `info`, `check`), and the
//! qemu-storage-daemon compatible form (`vubd --blockdev ... --export ...`).

mod bitmap;
mod image;
pub(crate) mod keyval;
mod qsd;
mod resize;
mod serve;
mod spec;

use std::io::Write as _;

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::Chain;

/// vhost-user-blk backend daemon: serves a disk image to a VMM over a UNIX socket.
#[derive(Debug, Parser)]
#[command(name = "vubd", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// What to log: a level (error, warn, info, debug, trace), or levels per module as in
    /// RUST_LOG (`info,vubd::vhost=debug`). Default: RUST_LOG if set, else `info`.
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    /// Log lines as text, or as JSON objects (one per line: ts, level, target, msg).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve an image as a vhost-user-blk device.
    Serve(Box<serve::ServeArgs>),
    /// Create a qcow2 image, or qcow2 metadata for a raw data file.
    Create(image::CreateArgs),
    /// Show an image's format and properties, like `qemu-img info`.
    Info(image::InfoArgs),
    /// Check an image's consistency, like `qemu-img check` (exit 0 clean, 2 errors, 3 leaks).
    Check(image::CheckArgs),
    /// Manage the dirty bitmaps of an image no process is serving.
    Bitmap(bitmap::BitmapArgs),
    /// Grow an image no process is serving, with its data file and bitmaps, like `qemu-img
    /// resize` (a served disk grows with QMP `block_resize`).
    Resize(resize::ResizeArgs),
}

/// An error the command line reports, with the exit code to use.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: i32,
}

impl Failure {
    /// A failure worded here.
    pub fn msg(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 1,
        }
    }

    /// An error about `path`, with its causes.
    pub fn at(path: &std::path::Path, e: &dyn std::error::Error) -> Self {
        Failure::msg(format!("{}: {}", path.display(), Chain(e)))
    }
}

/// Any error, with its causes, on one line.
impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::msg(Chain(&e).to_string())
    }
}

/// Options qemu-storage-daemon takes that start its compatible form.
const QSD_OPTIONS: [&str; 5] = [
    "--blockdev",
    "--export",
    "--object",
    "--chardev",
    "--monitor",
];

/// Run the command line; returns the process exit code.
pub fn main() -> i32 {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `vubd --blockdev ... --export ...` is `vubd serve --blockdev ...`, so that a
    // qemu-storage-daemon command line runs unchanged with only the program name replaced.
    if args.get(1).and_then(|a| a.to_str()).is_some_and(|a| {
        QSD_OPTIONS
            .iter()
            .any(|o| a == *o || a.starts_with(&format!("{o}=")))
    }) {
        args.insert(1, "serve".into());
    }
    let cli = Cli::parse_from(args);
    init_logging(cli.log.as_deref(), cli.log_format);
    if !matches!(cli.command, Command::Serve(_)) {
        // The offline tools print reports: piped into `head`, they should end quietly the way
        // Unix tools do, not panic on EPIPE. (The daemon keeps SIGPIPE ignored: a frontend
        // that goes away must not kill it.)
        // SAFETY: restoring the default disposition of SIGPIPE, before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Create(args) => image::create(args),
        Command::Info(args) => image::info(args),
        Command::Check(args) => image::check(args),
        Command::Bitmap(args) => bitmap::run(args),
        Command::Resize(args) => resize::run(args),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("vubd: error: {}", f.message);
            f.code
        }
    }
}

/// Logging to stderr: `--log`, else RUST_LOG, else `info`. Nothing is logged per request at
/// `info`; what guests cause is logged rate-limited (`ratelimit`).
fn init_logging(filter: Option<&str>, format: LogFormat) {
    // virtio-queue logs guest-triggered conditions at error level on every kick; vubd reports
    // those itself, rate-limited.
    let default = "info,virtio_queue=off";
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    if let Some(filter) = filter {
        builder.parse_filters(default).parse_filters(filter);
    }
    match format {
        LogFormat::Text => {
            builder.format_target(false);
        }
        LogFormat::Json => {
            builder.format(|buf, record| {
                let line = serde_json::json!({
                    "ts": buf.timestamp_micros().to_string(),
                    "level": record.level().as_str(),
                    "target": record.target(),
                    "msg": record.args().to_string(),
                });
                writeln!(buf, "{line}")
            });
        }
    }
    builder.init();
}

/// Parse a byte size: a number with an optional K, M, G, T (powers of 1024) suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        Some('T') => (&s[..s.len() - 1], 40),
        Some('B') => (&s[..s.len() - 1], 0),
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("'{s}' is not a size (a number with an optional K, M, G or T)"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
