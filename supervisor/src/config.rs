//! The supervisor's command line and environment.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::policy::{Policy, RestartCap};
use crate::telemetry::LogFormat;

/// Exit statuses, shown after `--help`.
const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    orderly end: the agent exited 0 by itself, or after SIGTERM it ended within the
       shutdown deadline
  1    the supervisor failed (cannot set up, cannot start the agent) or gave up after
       --max-restarts
  78   the agent exited 78 (EX_CONFIG, configuration error) and was not restarted
  137  the shutdown deadline passed with the agent still running: it was SIGKILLed

Environment given to the agent: NBSUPERVISOR_PID (the supervisor's pid) and
NBSUPERVISOR_RUN_DIR (the run directory, for exit records).";

/// nbsupervisor: the notebook container's PID 1.
///
/// Starts the agent command as its child, reaps every process (as PID 1, or as a child
/// subreaper otherwise), forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2
/// to the agent, and restarts the agent with exponential backoff when it crashes,
/// leaving the processes it started (the notebook kernel) alone so the next agent can
/// adopt them. SIGTERM (and SIGINT when PID 1; otherwise SIGINT is only forwarded)
/// starts an orderly shutdown: SIGTERM to the agent, then to everything left once the
/// agent is gone, SIGKILL for whatever remains at the deadline, the --unmount paths
/// detached. An agent that exits 0 (or 78) ends the supervisor the same way, without
/// restart. Every flag can also be set through the environment variable named in its
/// help.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "nbsupervisor",
    version,
    about,
    long_about,
    after_long_help = EXIT_STATUS_HELP,
    override_usage = "nbsupervisor [OPTIONS] -- <AGENT COMMAND>..."
)]
pub struct Config {
    /// How long an orderly shutdown may take (after SIGTERM: the agent, then what it
    /// left behind; after the agent exited 0 or 78: what it left behind) before
    /// everything left is SIGKILLed, seconds.
    #[arg(
        long,
        env = "NBSUPERVISOR_SHUTDOWN_DEADLINE_SECS",
        default_value_t = 20
    )]
    pub shutdown_deadline_secs: u64,

    /// First restart delay after a crash, milliseconds (doubled after each crash, with
    /// jitter: each delay is drawn from [base/2, base]).
    #[arg(long, env = "NBSUPERVISOR_BACKOFF_INITIAL_MS", default_value_t = 200)]
    pub backoff_initial_ms: u64,

    /// Largest restart delay, milliseconds.
    #[arg(long, env = "NBSUPERVISOR_BACKOFF_MAX_MS", default_value_t = 30_000)]
    pub backoff_max_ms: u64,

    /// An agent that ran at least this long before crashing restarts after the initial
    /// delay again, seconds.
    #[arg(long, env = "NBSUPERVISOR_BACKOFF_RESET_SECS", default_value_t = 60)]
    pub backoff_reset_secs: u64,

    /// Give up (shut down, exit 1) when the agent crashes again after this many
    /// restarts within --restart-window-secs [default: restart forever].
    #[arg(long, env = "NBSUPERVISOR_MAX_RESTARTS")]
    pub max_restarts: Option<u32>,

    /// The sliding window for --max-restarts, seconds.
    #[arg(long, env = "NBSUPERVISOR_RESTART_WINDOW_SECS", default_value_t = 600)]
    pub restart_window_secs: u64,

    /// Directory for exit records (`watch/` and `exit/`), created with mode 0755.
    #[arg(
        long,
        env = "NBSUPERVISOR_RUN_DIR",
        default_value = "/run/nbsupervisor"
    )]
    pub run_dir: PathBuf,

    /// Mount point to detach (umount2 MNT_DETACH) at start, for stale mounts of a
    /// crashed agent, and at shutdown; repeatable (comma-separated in the environment).
    /// A path that is not mounted is fine.
    #[arg(
        long = "unmount",
        value_name = "PATH",
        env = "NBSUPERVISOR_UNMOUNT",
        value_delimiter = ','
    )]
    pub unmount: Vec<PathBuf>,

    /// Where the process table is read when the supervisor is not PID 1.
    #[arg(long, env = "NBSUPERVISOR_PROC_DIR", default_value = "/proc")]
    pub proc_dir: PathBuf,

    /// Log format.
    #[arg(long, env = "NBSUPERVISOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The agent command and its arguments, normally `nbagent ...`.
    #[arg(required = true, trailing_var_arg = true, value_name = "AGENT COMMAND")]
    pub command: Vec<OsString>,
}

impl Config {
    /// The restart and shutdown policy; `pid1` decides whether SIGINT stops.
    pub fn policy(&self, pid1: bool) -> Policy {
        Policy {
            shutdown_deadline: Duration::from_secs(self.shutdown_deadline_secs),
            backoff_initial: Duration::from_millis(self.backoff_initial_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            backoff_reset_after: Duration::from_secs(self.backoff_reset_secs),
            restart_cap: self.max_restarts.map(|max| RestartCap {
                max,
                window: Duration::from_secs(self.restart_window_secs),
            }),
            interrupt_stops: pid1,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_and_trailing_command() {
        let c =
            Config::try_parse_from(["nbsupervisor", "--", "nbagent", "--server", "x:1"]).unwrap();
        assert_eq!(c.shutdown_deadline_secs, 20);
        assert_eq!(c.backoff_initial_ms, 200);
        assert_eq!(c.backoff_max_ms, 30_000);
        assert_eq!(c.backoff_reset_secs, 60);
        assert_eq!(c.max_restarts, None);
        assert_eq!(c.run_dir, PathBuf::from("/run/nbsupervisor"));
        assert_eq!(c.command, ["nbagent", "--server", "x:1"]);
        assert!(c.policy(false).restart_cap.is_none());
    }

    #[test]
    fn unmount_repeats() {
        let c = Config::try_parse_from([
            "nbsupervisor",
            "--unmount",
            "/a",
            "--unmount=/b,/c",
            "--",
            "true",
        ])
        .unwrap();
        assert_eq!(c.unmount, [PathBuf::from("/a"), "/b".into(), "/c".into()]);
    }

    #[test]
    fn command_is_required() {
        assert!(Config::try_parse_from(["nbsupervisor"]).is_err());
    }

    #[test]
    fn help_names_the_exit_codes() {
        use clap::CommandFactory;
        let help = Config::command().render_long_help().to_string();
        assert!(help.contains("137"), "{help}");
        assert!(
            help.contains("NBSUPERVISOR_SHUTDOWN_DEADLINE_SECS"),
            "{help}"
        );
    }
}
