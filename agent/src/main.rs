use clap::Parser;

fn main() -> std::process::ExitCode {
    // The kernel's init (PID 1 of its PID namespace), started by the agent itself: no
    // CLI parsing, no tokio.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(nbagent::kernel::init::INIT_ARG))
    {
        return nbagent::kernel::init::main(std::env::args_os().skip(2).collect());
    }
    // A command line that does not parse is a configuration error: exit with
    // EX_CONFIG so that nbsupervisor does not restart the agent in a loop.
    let args = match nbagent::config::AgentArgs::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() {
                nbagent::config::EXIT_CONFIG
            } else {
                0
            };
            let _ = e.print();
            return std::process::ExitCode::from(code);
        }
    };
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
