use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = nbserver::cli::Cli::parse();
    // The demo prints its own report; its logs (and its agent's) stay at warnings
    // unless RUST_LOG says otherwise.
    let default_level = match cli.command {
        nbserver::cli::Command::Demo(_) => "warn",
        _ => "info",
    };
    nbserver::cli::init_logging(cli.log_format, default_level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nbserver: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(nbserver::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nbserver: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
