//! `nbagent`: the in-container notebook agent.
//!
//! - [`channel`]: the TLS connection to nbserver (enrolment, mutual TLS, resend, acks,
//!   heartbeats, reconnection).
//! - [`files`]: the notebook's attached files (FUSE mount backed by the server, or a
//!   copy), set up before the kernel starts.
//! - [`outbox`]: the durable on-disk log every data message goes through.
//! - [`sender`]: the producers' handle on the outbox, with backpressure.
//! - [`identity`]: the agent's key and certificates, and TLS client configuration.
//! - [`kernel`]: the Jupyter kernel: kernelspecs, the confined launch (own PID
//!   namespace, notebook user, no capabilities), its init, and the ZeroMQ client.
//! - [`runtime`]: the task that owns the kernel: runs cells, reports outputs, handles
//!   interrupt, restart, death, shutdown, and adoption after an agent restart.
//! - [`users`]: who may run kernels; [`capabilities`]: what this container allows.
//! - [`workload`]: a synthetic workload for channel tests and benchmarks.
//! - [`config`], [`telemetry`]: command line and logging.

pub mod capabilities;
pub mod channel;
pub mod config;
pub mod files;
pub mod identity;
pub mod kernel;
pub mod outbox;
pub mod outputs;
pub mod runtime;
pub mod sender;
pub mod telemetry;
pub mod users;
pub mod workload;

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::channel::{Backoff, ChannelConfig, ChannelStatus, TokenSource};
use crate::config::AgentArgs;
use crate::identity::ServerTrust;
use crate::outbox::{FsyncPolicy, Outbox, OutboxConfig};
use crate::sender::{Sender, Shared};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The state directory could not be prepared.
    #[error("cannot prepare state directory {path}")]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The outbox could not be opened.
    #[error("cannot open the outbox")]
    Outbox(#[from] outbox::OutboxError),
    /// Sending failed.
    #[error("cannot queue a message")]
    Send(#[from] sender::SendError),
    /// Signal handling could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// Creates `dir` (and parents) with mode 0700.
pub fn private_dir(dir: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| AgentError::StateDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

/// Builds the channel configuration from the command line.
pub fn channel_config(args: &AgentArgs) -> ChannelConfig {
    let trust = match (&args.server_ca, &args.server_ca_sha256) {
        (Some(f), _) => Some(ServerTrust::CaFile(f.clone())),
        (None, Some(h)) => Some(ServerTrust::Fingerprint(h.clone())),
        (None, None) => None,
    };
    ChannelConfig {
        server: args.server.clone(),
        server_name: args.server_name.clone(),
        identity_dir: args.state_dir.join("identity"),
        trust,
        token: TokenSource {
            value: args.token.clone(),
            file: args.token_file.clone(),
        },
        plaintext: args.plaintext,
        backoff: Backoff {
            max: Duration::from_secs(args.max_backoff_secs.max(1)),
            ..Backoff::default()
        },
        window_bytes: args.window_bytes.max(64 * 1024),
        connect_timeout: Duration::from_secs(10),
        command_log: args.state_dir.join("commands.received"),
    }
}

/// Where scripts/criu.sh installs CRIU.
pub const DEFAULT_CRIU: &str = "/opt/nbagent/criu/bin/criu";

/// Builds the kernel runtime's configuration from the command line.
pub fn runtime_config(args: &AgentArgs) -> runtime::RuntimeConfig {
    let venv = args
        .kernel_path
        .first()
        .and_then(|bin| bin.parent())
        .map(std::path::Path::to_path_buf);
    let mut search =
        kernel::spec::SpecSearch::standard(|k| std::env::var(k).ok(), None, venv.as_deref());
    let mut dirs = args.kernelspec_path.clone();
    dirs.append(&mut search.dirs);
    search.dirs = dirs;
    // The kernel runs in its user's home: paths handed to it must not be relative.
    let runtime_dir = std::path::absolute(&args.runtime_dir).unwrap_or(args.runtime_dir.clone());
    runtime::RuntimeConfig {
        state_dir: args.state_dir.clone(),
        kernel_name: args.kernel.clone(),
        spec_search: search,
        kernel_user: args.kernel_user.clone(),
        policy: users::UserPolicy {
            authorized: args.authorized_users.clone(),
            unauthorized: args.unauthorized_users.clone(),
            allow_sudoers: args.allow_sudoers,
            ..users::UserPolicy::default()
        },
        kernel_path: args.kernel_path.clone(),
        init_exe: "/proc/self/exe".into(),
        runtime_dir: runtime_dir.clone(),
        supervisor_run_dir: std::env::var_os("NBSUPERVISOR_RUN_DIR").map(Into::into),
        start_timeout: Duration::from_secs(args.kernel_start_secs.max(1)),
        proc_root: "/proc".into(),
        criu: args.criu.clone().or_else(|| {
            let p = std::path::PathBuf::from(DEFAULT_CRIU);
            p.exists().then_some(p)
        }),
        checkpoints: !args.no_checkpoints,
        checkpoint_dir: args
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| runtime_dir.join("checkpoints")),
        checkpoint_budget: args.checkpoint_budget_mb.saturating_mul(1 << 20),
        lazy_restore: args.lazy_restore,
        dev_fuse: args.dev_fuse.clone(),
    }
}

/// Builds the attached files' configuration from the command line (`None`: off).
pub fn files_config(args: &AgentArgs) -> Option<files::FilesConfig> {
    if args.files_mode == files::FilesMode::Off {
        return None;
    }
    let (uid, gid) = args
        .kernel_user
        .as_deref()
        .and_then(|u| nix::unistd::User::from_name(u).ok().flatten())
        .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
        .unwrap_or_else(|| {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        });
    let fuse = capabilities::probe_fuse_mount(&capabilities::ProbeConfig {
        dev_fuse: args.dev_fuse.clone(),
        ..capabilities::ProbeConfig::default()
    });
    let fuse_unavailable = match args.files_mode {
        files::FilesMode::Auto if !fuse.enabled => Some(format!(
            "{}; to mount them: {}",
            fuse.detail, fuse.how_to_enable
        )),
        _ => None,
    };
    Some(files::FilesConfig {
        mode: args.files_mode,
        notebook_dir: args.notebook_files.clone(),
        workspace_dir: args.workspace_files.clone(),
        work_dir: args.state_dir.join("files"),
        uid,
        gid,
        timeout: Duration::from_secs(args.files_timeout_secs.max(1)),
        max_file_size: args.files_max_size,
        ttl: Duration::from_secs(args.files_ttl_secs.max(1)),
        busy_poll: Duration::from_micros(args.files_busy_poll_us),
        fuse_unavailable,
    })
}

/// Opens the agent's outbox under `state_dir`.
pub fn open_outbox(args: &AgentArgs) -> Result<Outbox, AgentError> {
    let fsync = if args.outbox_fsync_ms == 0 {
        FsyncPolicy::EveryAppend
    } else {
        FsyncPolicy::Periodic
    };
    let mut config = OutboxConfig::new(args.state_dir.join("outbox"));
    config.max_bytes = args.outbox_max_bytes;
    config.fsync = fsync;
    Ok(Outbox::open(config)?)
}

/// Runs the agent until it is told to stop (or, with `--exit-when-drained`, until its
/// workload is delivered).
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    private_dir(&args.state_dir)?;
    let outbox = open_outbox(&args)?;
    let window = outbox.window();
    info!(
        stream = %outbox.stream_id(),
        last_seq = window.last_assigned(),
        acked = window.acked(),
        pending = outbox.pending_count(),
        "outbox opened"
    );
    let shared = Shared::new(outbox, false);
    let sender = Sender::new(shared.clone());
    let (cmd_tx, mut cmd_rx) = mpsc::channel(64);
    let (status_tx, mut status_rx) = watch::channel(ChannelStatus::Disconnected);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (queries, queries_rx) = channel::Queries::new(256);
    let channel = tokio::spawn(channel::run_with_queries(
        channel_config(&args),
        shared.clone(),
        cmd_tx,
        queries_rx,
        status_tx,
        stop_rx,
    ));
    if args.outbox_fsync_ms > 0 {
        let shared = shared.clone();
        let every = Duration::from_millis(args.outbox_fsync_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = sender::sync_outbox(&shared).await {
                    warn!(error = %e, "outbox fsync failed");
                }
            }
        });
    }
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    // The attached files are in place before the kernel starts.
    let attached = match files_config(&args) {
        Some(cfg) if args.runs_kernel() => Some(
            files::AttachedFiles::attach(&cfg, queries.clone(), sender.clone(), shared.clone())
                .await,
        ),
        _ => {
            let (sender, shared) = (sender.clone(), shared.clone());
            tokio::spawn(async move { files::upload_held(&sender, &shared).await });
            None
        }
    };
    let (kernel_stop, kernel_stop_rx) = runtime::StopHandle::new();
    let mut runtime = if args.runs_kernel() {
        let rt = runtime::Runtime::new(
            runtime_config(&args),
            runtime::Reporter::new(sender.clone()),
        );
        let shutdown = shutdown_tx.clone();
        Some(tokio::spawn(async move {
            let exit = rt.run(cmd_rx, kernel_stop_rx).await;
            if let runtime::RuntimeExit::Shutdown { reason } = &exit {
                info!(%reason, "server asked us to shut down");
                let _ = shutdown.send(true);
            }
            exit
        }))
    } else {
        let cmd_shutdown = shutdown_tx.clone();
        tokio::spawn(async move {
            while let Some(frame) = cmd_rx.recv().await {
                match &frame.envelope.msg {
                    nbagent_protocol::Message::Shutdown { reason, .. } => {
                        info!(%reason, "server asked us to shut down");
                        let _ = cmd_shutdown.send(true);
                    }
                    other => info!(
                        kind = other.kind(),
                        "command received (no kernel in this agent)"
                    ),
                }
            }
        });
        None
    };
    tokio::spawn(async move {
        while status_rx.changed().await.is_ok() {
            let s = status_rx.borrow().clone();
            if let ChannelStatus::Stuck(reason) = s {
                warn!(%reason, "channel needs operator action");
            }
        }
    });

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(AgentError::Signals)?;

    let work = async {
        if let Some(w) = &args.workload {
            let already = shared.outbox().window().last_assigned();
            let total = w.plan().len() as u64;
            if already > 0 {
                info!(already, total, "resuming workload after restart");
            }
            let sent = workload::run(w, &sender, already, |p| {
                info!(done = p.done, total = p.total, "workload progress");
            })
            .await?;
            info!(sent, total, "workload queued; waiting for acknowledgements");
            if args.exit_when_drained {
                shared.drained().await;
                info!("everything acknowledged");
                return Ok::<bool, AgentError>(true);
            }
        }
        std::future::pending::<()>().await;
        Ok(false)
    };
    let drain_first = tokio::select! {
        r = work => { r?; false }
        _ = sigterm.recv() => { info!("SIGTERM: stopping the kernel, then draining the outbox"); kernel_stop.stop("the agent received SIGTERM"); true }
        _ = sigint.recv() => { info!("SIGINT: stopping the kernel, then draining the outbox"); kernel_stop.stop("the agent received SIGINT"); true }
        _ = shutdown_rx.changed() => true,
    };
    if drain_first && let Some(rt) = runtime.take() {
        // An orderly stop: the kernel is stopped (its record removed, its last status
        // in the outbox) before the outbox is drained. Only a crash of the agent leaves
        // the kernel running for adoption.
        match tokio::time::timeout(runtime::STOP_DEADLINE, rt).await {
            Ok(Ok(exit)) => info!(?exit, "kernel runtime finished"),
            Ok(Err(e)) => warn!(error = %e, "kernel runtime failed"),
            Err(_) => warn!("the kernel did not stop in time; nbsupervisor kills what is left"),
        }
    }
    if let Some(files) = attached {
        // Unmount, or upload what changed in a copy, before draining the outbox.
        files.detach().await;
    }
    if drain_first {
        let deadline = args.drain();
        if tokio::time::timeout(deadline, shared.drained())
            .await
            .is_err()
        {
            warn!(
                pending = shared.outbox().pending_count(),
                "drain deadline passed; unacknowledged messages stay in the outbox for the next start"
            );
        }
    }
    let _ = stop_tx.send(true);
    let _ = channel.await;
    if let Some(rt) = runtime {
        // The channel is closed, so the runtime's command stream ends: it returns
        // (leaving the kernel running for the next agent).
        match tokio::time::timeout(Duration::from_secs(10), rt).await {
            Ok(Ok(exit)) => info!(?exit, "kernel runtime finished"),
            Ok(Err(e)) => warn!(error = %e, "kernel runtime failed"),
            Err(_) => warn!("kernel runtime did not finish in time"),
        }
    }
    if let Err(e) = shared.outbox().sync() {
        warn!(error = %e, "final outbox fsync failed");
    }
    info!("nbagent stopped");
    Ok(())
}
