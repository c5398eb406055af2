//! The `collector` binary: the agent, the mock host, and the signing and fleet tools. A
//! thin layer over the runtime's crates; see `cli` for the commands.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
