//! The command line: `vubd serve` and the image tools.

mod serve;

use clap::{Parser, Subcommand};

/// vhost-user-blk backend daemon: serves a disk image to a VMM over a UNIX socket.
#[derive(Debug, Parser)]
#[command(name = "vubd", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve an image as a vhost-user-blk device.
    Serve(serve::ServeArgs),
}

/// Run the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vubd: error: {e}");
            1
        }
    }
}

fn init_logging() {
    // vhost-user-backend and virtio-queue log guest-triggered conditions at error level on
    // every kick; vubd reports those itself, rate-limited.
    let default = "info,virtio_queue=off,vhost_user_backend=warn";
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_target(false)
        .init();
}
