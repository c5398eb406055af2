//! The `collector` binary. Everything lives in the library; see `collector_runtime::cli`.

fn main() -> std::process::ExitCode {
    collector_runtime::cli::main()
}
