//! cow-trace: what fork() and copy-on-write cost, per process, live.
//!
//! Argument handling and exit codes; the run itself is `run.rs`.

mod backend;
mod cli;
mod exporter;
mod kernel;
mod launch;
mod memcg;
mod preflight;
mod procfs;
mod run;
mod timings;

use std::{io, process::ExitCode};

fn main() -> ExitCode {
    timings::init();
    let args = match cli::Args::try_parse_args(std::env::args_os()) {
        Ok(a) => a,
        Err(cli::ArgsError::Info(e)) => e.exit(),
        Err(cli::ArgsError::Usage(line)) => {
            eprintln!("cow-trace: error: {line}");
            return ExitCode::from(2);
        }
    };
    // Options that cannot go together are usage errors too.
    if let Err(line) = args.mode() {
        eprintln!("cow-trace: error: {line}");
        return ExitCode::from(2);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_target(false)
        .init();
    match run::run(args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        // The reader went away (`cow-trace | head`): end quietly, as other
        // tools do; the run's programs were detached as it unwound.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cow-trace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
}
