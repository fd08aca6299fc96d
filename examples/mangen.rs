//! Writes vubd's man pages from its command-line definition: `vubd.1`, and one page per
//! subcommand (`vubd-serve.1`, `vubd-create.1`, ...). `make deb` puts them in the package.
//!
//! usage: cargo run --example mangen -- DIR

use clap::CommandFactory;

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: mangen DIR");
        std::process::exit(2);
    };
    std::fs::create_dir_all(&dir)?;
    clap_mangen::generate_to(vubd::cli::Cli::command(), &dir)
}
