//! The command line: parsing, logging setup, and one file per command.

mod module;
mod run;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A WebAssembly-sandboxed telemetry collector.
///
/// The native agent owns all I/O and safety; a WebAssembly guest module owns every
/// decision (what to collect, how often, what to publish). Logs go to standard error;
/// set RUST_LOG (for instance RUST_LOG=debug) to change their detail.
#[derive(Debug, Parser)]
#[command(name = "collector", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(Box<run::RunArgs>),
    Test(test::TestArgs),
    Module(module::ModuleArgs),
}

/// Parses the command line, runs the command, and maps its outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `test` prints its own report on stdout; guest warnings there are expected noise.
    init_logging(match cli.command {
        Command::Test(_) => "error",
        _ => "info",
    });
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Test(args) => test::run(args),
        Command::Module(args) => module::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `default` detail unless RUST_LOG says otherwise.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // Catches clashing flags, such as `module sign --version` against the
        // propagated --version, which clap would otherwise only report at run time.
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "collector",
            "module",
            "sign",
            "--key",
            "k",
            "--name",
            "m",
            "--version",
            "7",
            "g.wasm",
            "--out",
            "b",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Module(_)));
    }
}
