//! The `collector` binary. Everything lives in the library; see `collector::cli`.

fn main() -> std::process::ExitCode {
    collector::cli::main()
}
