//! The command line: parsing, logging setup, and one file per command.

mod config;
mod credentials;
mod fleet;
mod module;
mod module_fleet;
mod ops;
mod rollout;
#[cfg(feature = "sandbox")]
mod run;
#[cfg(feature = "sandbox")]
mod test;
mod trust;

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
    #[cfg(feature = "sandbox")]
    Run(Box<run::RunArgs>),
    #[cfg(feature = "sandbox")]
    Test(test::TestArgs),
    Module(module::ModuleArgs),
    Fleet(fleet::FleetArgs),
    Config(config::ConfigArgs),
    Rollout(rollout::RolloutArgs),
    Trust(trust::TrustArgs),
}

/// Parses the command line, runs the command, and maps its outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `test` prints its own report on stdout; guest warnings there are expected noise.
    // Operator commands print their own report; the NATS client's connection events
    // would only get in the way.
    init_logging(match &cli.command {
        #[cfg(feature = "sandbox")]
        Command::Test(_) => "error",
        Command::Fleet(_) | Command::Config(_) | Command::Rollout(_) => "warn",
        Command::Module(m) if m.talks_to_nats() => "warn",
        Command::Trust(t) if t.talks_to_nats() => "warn",
        _ => "info",
    });
    let result = match cli.command {
        #[cfg(feature = "sandbox")]
        Command::Run(args) => run::run(*args),
        #[cfg(feature = "sandbox")]
        Command::Test(args) => test::run(args),
        Command::Module(args) => module::run(args),
        Command::Fleet(args) => fleet::run(args).map(|()| ExitCode::SUCCESS),
        Command::Config(args) => config::run(args).map(|()| ExitCode::SUCCESS),
        Command::Rollout(args) => args.run().map(|()| ExitCode::SUCCESS),
        Command::Trust(args) => trust::run(args).map(|()| ExitCode::SUCCESS),
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

    #[test]
    fn fleet_commands_take_exactly_the_scopes_they_need() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["collector"], args].concat());
        assert!(parse(&["module", "rollout", "m", "7", "--group", "canary"]).is_ok());
        assert!(parse(&["module", "rollout", "m", "7", "--global"]).is_ok());
        let none = parse(&["module", "rollout", "m", "7"])
            .unwrap_err()
            .to_string();
        assert!(none.contains("--global"), "{none}");
        assert!(parse(&["module", "disable", "m", "--pc", "a", "--group", "g"]).is_err());
        assert!(parse(&["config", "set", "process_perf_top_n=5"]).is_ok());
        assert!(parse(&["config", "set", "x=1", "--pc", "a", "--group", "g"]).is_err());
        assert!(parse(&["config", "effective"]).is_err(), "--pc is required");
        assert!(
            parse(&["fleet", "status", "--stale-after", "5"]).is_err(),
            "unit needed"
        );
    }

    #[test]
    fn trust_sources_are_one_or_the_other() {
        let parses = |line: &str| {
            let args: Vec<&str> = line.split(' ').collect();
            Cli::try_parse_from([&["collector"], &args[..]].concat()).is_ok()
        };
        assert!(parses("module verify --trust k.pub b"));
        assert!(parses("module verify --trust-root v1.root b"));
        assert!(!parses("module verify b"), "one of them is required");
        assert!(!parses(
            "module verify --trust k.pub --trust-root v1.root b"
        ));
        assert!(!parses(
            "module verify --trust-root v1.root --threshold 2 b"
        ));
        assert!(parses("module inspect b"));
        assert!(parses("module inspect --trust-root v1.root b"));
        assert!(
            !parses("trust rotate v1.root --out v2.root"),
            "nothing to change"
        );
        assert!(parses(
            "trust rotate v1.root --out v2.root --root-threshold 2"
        ));
        assert!(
            !parses("trust verify v1.root --threshold 2"),
            "--threshold needs --trust"
        );
    }
}
