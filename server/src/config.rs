//! Server configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `nbserver serve` needs; built from the CLI or by tests.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Data directory: database (SQLite default), blobs, certificate authority.
    pub data_dir: PathBuf,
    /// Address agents connect to.
    pub listen: SocketAddr,
    /// Database URL; `None` means the embedded SQLite file in `data_dir`.
    pub database_url: Option<String>,
    /// Refuse plaintext agents (on) or accept them with a warning (off).
    pub force_agent_tls: bool,
    /// DNS names and IP addresses in the server's TLS certificate.
    pub server_names: Vec<String>,
    /// Lifetime of the client certificates issued to agents.
    pub agent_cert_validity: Duration,
    /// Heartbeat interval announced to agents.
    pub heartbeat: Duration,
    /// Largest frame payload accepted from agents.
    pub max_payload: u32,
    /// Largest blob accepted.
    pub max_blob_bytes: u64,
    /// Fsync each completed blob before acknowledging it (power-loss durability).
    pub fsync_blobs: bool,
    /// How long a new connection may take to say anything.
    pub handshake_timeout: Duration,
}

impl ServerConfig {
    /// Defaults for a server keeping its state in `data_dir`, listening on `listen`.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            database_url: None,
            force_agent_tls: true,
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            agent_cert_validity: Duration::from_secs(24 * 3600),
            heartbeat: Duration::from_secs(10),
            max_payload: nbagent_protocol::codec::DEFAULT_MAX_PAYLOAD,
            max_blob_bytes: 1 << 30,
            fsync_blobs: true,
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Directory of the certificate authority and the server's certificate.
    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join("pki")
    }

    /// Directory of the blob store.
    pub fn blob_dir(&self) -> PathBuf {
        self.data_dir.join("blobs")
    }
}
