use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = nbagent::config::AgentArgs::parse();
    nbagent::telemetry::init(args.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(nbagent::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, cause = ?std::error::Error::source(&e).map(|c| c.to_string()), "nbagent failed");
            std::process::ExitCode::FAILURE
        }
    }
}
