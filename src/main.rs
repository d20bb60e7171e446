//! The `keybroker` command: the sidecar (`serve`), its admin tools (`config check`, `keys`),
//! and a small client (`encrypt`, `decrypt`, `datakey`) for scripts and debugging.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = keybroker::cli::Cli::parse();
    keybroker::cli::run(cli)
}
