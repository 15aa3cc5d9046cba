//! The `nbserver` command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::info;

use crate::config::ServerConfig;
use crate::pki::{CertificateAuthority, Token};
use crate::store::{NewToken, Store};

/// nbserver: the reference server for nbagent.
///
/// Accepts agents over TLS (mutual TLS after a one-time enrolment with a token), stores
/// everything they send exactly once (SQLite in the data directory by default, or
/// PostgreSQL), and keeps blobs in a content-addressed store.
#[derive(Debug, Parser)]
#[command(name = "nbserver", version, about, long_about)]
pub struct Cli {
    /// Data directory: database, blobs, certificate authority.
    #[arg(
        long,
        global = true,
        env = "NBSERVER_DATA_DIR",
        default_value = "nbserver-data"
    )]
    pub data_dir: PathBuf,

    /// Database URL (`postgres://...` or `sqlite://...`) [default: SQLite file in the
    /// data directory].
    #[arg(
        long,
        global = true,
        env = "NBSERVER_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// Log format.
    #[arg(long, global = true, env = "NBSERVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// JSON lines.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Enrolment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Replace the certificate authority (and the server certificate). Every agent
    /// must enrol again with a new token; agents keep their kernels and outboxes while
    /// they wait for one. Run it while the server is stopped.
    ResetSecrets,
    /// Print what the server has stored.
    Show {
        /// Number of recent messages to print per stream.
        #[arg(long, default_value_t = 5)]
        last: u32,
    },
    /// Attached files (the notebook's and the workspace's trees of an agent).
    #[command(subcommand)]
    Files(FilesCommand),
    /// The main job: start a server, enrol a local agent (under nbsupervisor) with a
    /// token, run a sample notebook on its kernel over mutual TLS, and print what the
    /// server stored.
    Demo(DemoArgs),
}

/// `nbserver serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address agents connect to.
    #[arg(long, env = "NBSERVER_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Refuse plaintext (legacy) agents. With `--force-agent-tls false` they are
    /// accepted and logged as unprotected.
    #[arg(long, env = "NBSERVER_FORCE_AGENT_TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub force_agent_tls: bool,
    /// Extra DNS names or IP addresses for the server certificate (localhost,
    /// 127.0.0.1 and ::1 are always included).
    #[arg(long = "server-name", env = "NBSERVER_NAMES", value_delimiter = ',')]
    pub server_names: Vec<String>,
    /// Lifetime of agent certificates, seconds.
    #[arg(long, env = "NBSERVER_AGENT_CERT_SECS", default_value_t = 24 * 3600)]
    pub agent_cert_secs: u64,
    /// Heartbeat interval announced to agents, milliseconds.
    #[arg(long, env = "NBSERVER_HEARTBEAT_MS", default_value_t = 10_000)]
    pub heartbeat_ms: u64,
    /// Fsync every completed blob before acknowledging it. Off keeps blobs safe across
    /// a server crash (the page cache survives it) but not across a power loss.
    #[arg(long, env = "NBSERVER_FSYNC_BLOBS", default_value_t = true, action = clap::ArgAction::Set)]
    pub fsync_blobs: bool,
    /// Largest frame payload accepted from agents, bytes.
    #[arg(long, env = "NBSERVER_MAX_PAYLOAD", default_value_t = nbagent_protocol::codec::DEFAULT_MAX_PAYLOAD)]
    pub max_payload: u32,
}

/// `nbserver token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a single-use enrolment token and print it.
    Create {
        /// Name the agent will have (its certificate's common name).
        #[arg(long, default_value = "agent-1")]
        agent: String,
        /// Lifetime, seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

/// Which attached-files tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RootArg {
    /// The notebook's files (the kernel may write them).
    Notebook,
    /// The workspace's files (read-only for the kernel).
    Workspace,
}

impl From<RootArg> for nbagent_protocol::FileRoot {
    fn from(r: RootArg) -> Self {
        match r {
            RootArg::Notebook => nbagent_protocol::FileRoot::Notebook,
            RootArg::Workspace => nbagent_protocol::FileRoot::Workspace,
        }
    }
}

/// `nbserver files ...`.
#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// Attach a local file (or a directory, recursively) to an agent's tree; the agent
    /// sees it at its next listing.
    Put {
        /// The agent.
        #[arg(long)]
        agent: String,
        /// The tree.
        #[arg(long, value_enum, default_value_t = RootArg::Notebook)]
        root: RootArg,
        /// The local file or directory.
        local: PathBuf,
        /// Path inside the tree [default: the local file name].
        dest: Option<String>,
    },
    /// List attached files.
    List {
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Print the current content of an attached file.
    Cat {
        /// The agent.
        #[arg(long)]
        agent: String,
        /// The tree.
        #[arg(long, value_enum, default_value_t = RootArg::Notebook)]
        root: RootArg,
        /// Path inside the tree.
        path: String,
    },
}

/// `nbserver demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The notebook to run.
    #[arg(long, default_value_os_t = crate::demo::default_notebook())]
    pub notebook: PathBuf,
    /// The nbagent binary [default: next to this executable].
    #[arg(long, env = "NBAGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
    /// The nbsupervisor binary [default: next to this executable].
    #[arg(long, env = "NBSUPERVISOR_BIN")]
    pub supervisor_bin: Option<PathBuf>,
    /// The notebook user the kernel runs as.
    #[arg(long, env = "KERNEL_USERNAME", default_value = "nbuser")]
    pub kernel_user: String,
    /// How long the whole notebook may take, seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

/// Runs the command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(ref a) => {
            let mut config = ServerConfig::new(cli.data_dir.clone(), a.listen);
            config.database_url = cli.database_url.clone();
            config.force_agent_tls = a.force_agent_tls;
            config.server_names.extend(a.server_names.iter().cloned());
            config.agent_cert_validity = Duration::from_secs(a.agent_cert_secs);
            config.heartbeat = Duration::from_millis(a.heartbeat_ms.max(100));
            config.max_payload = a.max_payload;
            config.fsync_blobs = a.fsync_blobs;
            let server = crate::start(config)
                .await
                .context("cannot start the server")?;
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            info!("shutting down");
            server.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Create {
            ref agent,
            ttl_secs,
        }) => {
            let store = open_store(&cli).await?;
            let token = create_token(&store, agent, Duration::from_secs(ttl_secs)).await?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::ResetSecrets => {
            let pki = cli.data_dir.join("pki");
            let ca = CertificateAuthority::reset(&pki)
                .context("cannot reset the certificate authority")?;
            println!(
                "new certificate authority: {}",
                pki.join("ca.crt").display()
            );
            println!("sha256 fingerprint: {}", ca.fingerprint());
            println!(
                "every agent must now enrol again: give each a new token \
                 (nbserver token create --agent NAME) and the new CA; \
                 agents keep their kernels and unsent output while they wait"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { last } => {
            let store = open_store(&cli).await?;
            print_summary(&store, &cli.data_dir, last).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Files(ref f) => files_command(&cli, f).await,
        Command::Demo(ref a) => crate::demo::demo(&cli, a).await,
    }
}

async fn files_command(cli: &Cli, command: &FilesCommand) -> anyhow::Result<ExitCode> {
    let store = open_store(cli).await?;
    let blobs = std::sync::Arc::new(crate::blobs::BlobStore::open(cli.data_dir.join("blobs"))?);
    match command {
        FilesCommand::Put {
            agent,
            root,
            local,
            dest,
        } => {
            let put = crate::files::put_path(
                &store,
                &blobs,
                agent,
                (*root).into(),
                local,
                dest.as_deref(),
            )
            .await
            .with_context(|| format!("cannot attach {}", local.display()))?;
            for f in put {
                println!(
                    "{} {}/{} {} bytes {}",
                    f.agent, f.root, f.path, f.size, f.version
                );
            }
        }
        FilesCommand::List { agent } => print_files(&store, agent.as_deref()).await?,
        FilesCommand::Cat { agent, root, path } => {
            match crate::files::read(&store, &blobs, agent, (*root).into(), path).await? {
                Some(bytes) => {
                    use std::io::Write;
                    std::io::stdout().write_all(&bytes)?;
                }
                None => anyhow::bail!("{path} is not an attached file of {agent}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the attached files (of `agent`, or of every agent).
pub async fn print_files(store: &Store, agent: Option<&str>) -> anyhow::Result<()> {
    for f in store.files(agent, None).await? {
        if f.kind == "dir" {
            println!("{:<16} {:<9} {}/", f.agent, f.root, f.path);
        } else {
            let short = f.version.get(..12).unwrap_or(&f.version);
            println!(
                "{:<16} {:<9} {}  {} bytes  sha256 {short}",
                f.agent, f.root, f.path, f.size
            );
        }
    }
    Ok(())
}

async fn open_store(cli: &Cli) -> anyhow::Result<Store> {
    std::fs::create_dir_all(&cli.data_dir)
        .with_context(|| format!("cannot create {}", cli.data_dir.display()))?;
    Ok(match &cli.database_url {
        Some(url) => Store::open(url).await?,
        None => Store::open_in(&cli.data_dir).await?,
    })
}

/// Creates and stores a single-use enrolment token for `agent`.
pub async fn create_token(store: &Store, agent: &str, ttl: Duration) -> anyhow::Result<Token> {
    let token = Token::generate();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    store
        .insert_token(&NewToken {
            id: token.id.clone(),
            secret_hash: token.secret_hash(),
            agent: agent.to_owned(),
            created_at: now,
            expires_at: now + ttl.as_secs() as i64,
        })
        .await?;
    Ok(token)
}

/// Prints the streams, message counts, recent messages and blobs.
pub async fn print_summary(store: &Store, data_dir: &Path, last: u32) -> anyhow::Result<()> {
    let streams = store.streams().await?;
    if streams.is_empty() {
        println!("nothing stored yet in {}", data_dir.display());
        return Ok(());
    }
    for s in &streams {
        println!(
            "agent {}  stream {}  stored up to seq {}  ({} messages)",
            s.agent, s.stream, s.stored, s.messages
        );
        for (kind, n) in store.count_by_kind(&s.agent).await? {
            println!("  {kind:<18} {n}");
        }
        let after = s.stored.saturating_sub(u64::from(last));
        for m in store.messages(&s.agent, &s.stream, after, last).await? {
            let mut h = m.header.clone();
            if h.len() > 160 {
                let mut cut = 157;
                while !h.is_char_boundary(cut) {
                    cut -= 1;
                }
                h.truncate(cut);
                h.push_str("...");
            }
            println!("  #{:<7} {h}", m.seq);
        }
    }
    Ok(())
}

/// Installs the log subscriber (stderr; level from `RUST_LOG`, else `default_level`).
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let _ = if format == LogFormat::Json {
        fmt.json().try_init()
    } else {
        fmt.try_init()
    };
}
