//! `kuwa`: the controller host binary. See `kuwa --help`.

fn main() -> std::process::ExitCode {
    kuwa_host::cli::main()
}
