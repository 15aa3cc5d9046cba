//! Tracing setup: human-readable logs on stderr by default, JSON lines with
//! `--log-format json`; the level comes from `RUST_LOG` (default `info`), as a level and
//! per-target levels (`info,nbsupervisor=debug`): a `Targets` filter, which needs no
//! regular expressions (the supervisor stays small in memory); span and field filters
//! are not supported here.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use tracing_subscriber::filter::Targets;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // The builder's own default is INFO; `filter` decides.
        .with_max_level(tracing::level_filters::LevelFilter::TRACE);
    let _ = match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .with(filter)
            .try_init(),
        LogFormat::Json => builder.json().finish().with(filter).try_init(),
    };
}
