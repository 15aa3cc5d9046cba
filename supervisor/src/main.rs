use clap::Parser;

fn main() -> std::process::ExitCode {
    let config = nbsupervisor::Config::parse();
    nbsupervisor::telemetry::init(config.log_format);
    match nbsupervisor::run(config) {
        Ok(outcome) => std::process::ExitCode::from(outcome.code()),
        Err(e) => {
            tracing::error!(
                error = %e,
                cause = ?std::error::Error::source(&e).map(|c| c.to_string()),
                "nbsupervisor failed"
            );
            std::process::ExitCode::FAILURE
        }
    }
}
