use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = nbserver::cli::Cli::parse();
    nbserver::cli::init_logging(cli.log_format);
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
