//! The agent's command line and environment.

use std::path::PathBuf;
use std::time::Duration;

use crate::files::FilesMode;
use crate::telemetry::LogFormat;
use crate::workload::Workload;

/// nbagent: the in-container notebook agent.
///
/// Connects to nbserver over mutual TLS (enrolling once with a single-use token),
/// keeps every data message in a durable on-disk outbox until the server acknowledges
/// it, and reconnects with backoff when the server goes away. Every flag can also be
/// set through the environment variable named in its help, as an orchestrator would.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "nbagent", version, about, long_about)]
pub struct AgentArgs {
    /// Server address for agents, HOST:PORT.
    #[arg(long, env = "NBAGENT_SERVER", default_value = "127.0.0.1:7443")]
    pub server: String,

    /// Name expected in the server's certificate [default: the host part of --server].
    #[arg(long, env = "NBAGENT_SERVER_NAME")]
    pub server_name: Option<String>,

    /// Directory for the agent's key, certificates and outbox (kept private: 0700).
    #[arg(long, env = "NBAGENT_STATE_DIR", default_value = "/var/lib/nbagent")]
    pub state_dir: PathBuf,

    /// Single-use enrolment token (needed only until the agent is enrolled).
    #[arg(long, env = "NBAGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File holding the enrolment token; re-read at every attempt, so a fresh token can
    /// be handed to a running agent (after the server's secrets were reset).
    #[arg(long, env = "NBAGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM file of the server's certificate authority (re-read at every connection).
    #[arg(long, env = "NBAGENT_SERVER_CA")]
    pub server_ca: Option<PathBuf>,

    /// SHA-256 (hex) of the server's CA certificate, instead of --server-ca.
    #[arg(long, env = "NBAGENT_SERVER_CA_SHA256", conflicts_with = "server_ca")]
    pub server_ca_sha256: Option<String>,

    /// Legacy plaintext mode: no TLS, the token authenticates every connection. Only
    /// for servers with force_agent_tls off.
    #[arg(long, env = "NBAGENT_PLAINTEXT")]
    pub plaintext: bool,

    /// Largest outbox on disk; at the limit new output waits for acknowledgements.
    #[arg(long, env = "NBAGENT_OUTBOX_MAX_BYTES", default_value_t = 1 << 30)]
    pub outbox_max_bytes: u64,

    /// How often the outbox is fsynced (0: after every append). Appends reach the page
    /// cache at once, so an agent crash loses nothing either way; this bounds what a
    /// power loss could lose.
    #[arg(long, env = "NBAGENT_OUTBOX_FSYNC_MS", default_value_t = 100)]
    pub outbox_fsync_ms: u64,

    /// Unacknowledged bytes allowed on the wire.
    #[arg(long, env = "NBAGENT_WINDOW_BYTES", default_value_t = 16 << 20)]
    pub window_bytes: usize,

    /// Largest delay between reconnection attempts, seconds.
    #[arg(long, env = "NBAGENT_MAX_BACKOFF_SECS", default_value_t = 30)]
    pub max_backoff_secs: u64,

    /// Synthetic workload to stream, e.g. `outputs=1000,blobs=4,blob_bytes=256k`
    /// (until a kernel produces real output).
    #[arg(long, env = "NBAGENT_WORKLOAD")]
    pub workload: Option<Workload>,

    /// Exit with status 0 once the workload is sent and acknowledged.
    #[arg(long)]
    pub exit_when_drained: bool,

    /// On SIGTERM, how long to wait for the server to acknowledge the outbox, seconds.
    #[arg(long, env = "NBAGENT_DRAIN_SECS", default_value_t = 10)]
    pub drain_secs: u64,

    /// Kernelspec to run (any installed Jupyter kernelspec, by name).
    #[arg(long, env = "NBAGENT_KERNEL", default_value = "python3")]
    pub kernel: String,

    /// The notebook user the kernel runs as. Required when the agent runs as root
    /// (kernels never run as root); without it an unprivileged agent runs the kernel
    /// as itself.
    #[arg(long, env = "KERNEL_USERNAME")]
    pub kernel_user: Option<String>,

    /// Users allowed to run kernels, comma-separated (empty: anyone not refused).
    #[arg(long, env = "NBAGENT_AUTHORIZED_USERS", value_delimiter = ',')]
    pub authorized_users: Vec<String>,

    /// Users never allowed to run kernels, comma-separated; checked before
    /// --authorized-users.
    #[arg(long, env = "NBAGENT_UNAUTHORIZED_USERS", value_delimiter = ',')]
    pub unauthorized_users: Vec<String>,

    /// Let users with sudo rights run kernels (refused by default: they could get
    /// root back).
    #[arg(long, env = "NBAGENT_ALLOW_SUDOERS")]
    pub allow_sudoers: bool,

    /// Directories put first on the kernel's PATH, comma-separated (the kernel's
    /// Python environment).
    #[arg(
        long,
        env = "NBAGENT_KERNEL_PATH",
        value_delimiter = ',',
        default_value = "/opt/nbagent/venv/bin"
    )]
    pub kernel_path: Vec<PathBuf>,

    /// Extra directories holding kernelspecs (`<dir>/<name>/kernel.json`), searched
    /// before the standard Jupyter locations, comma-separated [default: the
    /// `share/jupyter/kernels` of each --kernel-path entry's environment].
    #[arg(long, env = "NBAGENT_KERNELSPEC_PATH", value_delimiter = ',')]
    pub kernelspec_path: Vec<PathBuf>,

    /// The CRIU binary [default: /opt/nbagent/criu/bin/criu, else `criu` on PATH].
    #[arg(long, env = "NBAGENT_CRIU")]
    pub criu: Option<PathBuf>,

    /// Directory for per-kernel runtime files (connection files); created mode 0711
    /// so that the notebook user can reach its own kernel's directory.
    #[arg(long, env = "NBAGENT_RUNTIME_DIR", default_value = "/run/nbagent")]
    pub runtime_dir: PathBuf,

    /// Do not checkpoint the kernel after every cell (reactive re-runs then
    /// re-execute from the top).
    #[arg(long, env = "NBAGENT_NO_CHECKPOINTS")]
    pub no_checkpoints: bool,

    /// Where checkpoints are kept [default: <runtime-dir>/checkpoints, in memory when
    /// the runtime dir is a tmpfs like /run]. Must be reachable by the notebook user
    /// (CRIU runs as that user).
    #[arg(long, env = "NBAGENT_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,

    /// Most megabytes of checkpoint images kept; older ones off the notebook's current
    /// path are evicted first.
    #[arg(long, env = "NBAGENT_CHECKPOINT_BUDGET_MB", default_value_t = 2048)]
    pub checkpoint_budget_mb: u64,

    /// Restore checkpoints lazily where userfaultfd allows it: the kernel runs the
    /// next cell before all its memory is back, pages arrive on demand. Pays when the
    /// next cells touch little of a large heap (a 1 GiB kernel is back in ~0.1 s
    /// instead of ~0.6 s), costs when they touch all of it.
    #[arg(long, env = "NBAGENT_LAZY_RESTORE")]
    pub lazy_restore: bool,

    /// Do not start a kernel (only the channel; implied by --workload).
    #[arg(long, env = "NBAGENT_NO_KERNEL")]
    pub no_kernel: bool,

    /// How long a starting kernel may take to answer kernel_info, seconds.
    #[arg(long, env = "NBAGENT_KERNEL_START_SECS", default_value_t = 60)]
    pub kernel_start_secs: u64,

    /// How the notebook's attached files appear: `auto` mounts them with FUSE when the
    /// container allows it and copies them otherwise; `copy` always copies (changed
    /// notebook files are uploaded at shutdown); `off` attaches nothing.
    #[arg(long, env = "NBAGENT_FILES_MODE", value_enum, default_value_t = FilesMode::Auto)]
    pub files_mode: FilesMode,

    /// Where the notebook's files appear (read-write for the kernel).
    #[arg(
        long,
        env = "NBAGENT_NOTEBOOK_FILES",
        default_value = "/data/notebook_files"
    )]
    pub notebook_files: PathBuf,

    /// Where the workspace's files appear (read-only).
    #[arg(
        long,
        env = "NBAGENT_WORKSPACE_FILES",
        default_value = "/data/workspace_files"
    )]
    pub workspace_files: PathBuf,

    /// The FUSE device the capability probe checks. When it does not exist or cannot be
    /// opened, `--files-mode auto` copies the attached files instead of mounting them.
    #[arg(long, env = "NBAGENT_DEV_FUSE", default_value = "/dev/fuse")]
    pub dev_fuse: PathBuf,

    /// How long a listing or read of an attached file waits for the server before the
    /// kernel gets EIO, seconds.
    #[arg(long, env = "NBAGENT_FILES_TIMEOUT_SECS", default_value_t = 10)]
    pub files_timeout_secs: u64,

    /// Largest attached file the server may list, bytes: a bigger size is refused (the
    /// kernel gets EIO) rather than trusted (default 1 TiB).
    #[arg(long, env = "NBAGENT_FILES_MAX_SIZE", default_value_t = crate::files::DEFAULT_MAX_FILE_SIZE)]
    pub files_max_size: u64,

    /// How long the mounts believe a listing of the attached files (and a negative
    /// lookup) before asking the server again, seconds.
    #[arg(long, env = "NBAGENT_FILES_TTL_SECS", default_value_t = 60)]
    pub files_ttl_secs: u64,

    /// How long one FUSE worker keeps polling for the next request after a lookup,
    /// getattr, open or other metadata request, instead of sleeping, microseconds (0:
    /// never poll). A burst of `stat`s or small-file opens then skips the wakeup of an
    /// idle CPU on each round trip (about twice the operations per second on a VM);
    /// the cost is at most two such windows of one CPU after each burst.
    #[arg(long, env = "NBAGENT_FILES_BUSY_POLL_US", default_value_t = 200)]
    pub files_busy_poll_us: u64,

    /// Log format.
    #[arg(long, env = "NBAGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Exit status the agent uses for configuration errors (EX_CONFIG): nbsupervisor does
/// not restart an agent that exits with it.
pub const EXIT_CONFIG: u8 = 78;

impl AgentArgs {
    /// Whether this agent runs a kernel.
    pub fn runs_kernel(&self) -> bool {
        !self.no_kernel && self.workload.is_none()
    }

    /// Drain deadline on SIGTERM.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }
}
