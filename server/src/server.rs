//! The agent listener: one TCP port for enrolment and data sessions, TLS or (legacy)
//! plaintext, told apart by the first byte.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{RwLock, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::blobs::BlobStore;
use crate::config::ServerConfig;
use crate::conn::{self, ConnError, Peer};
use crate::pki::{self, CertificateAuthority};
use crate::state::{ServerState, SessionRegistry};
use crate::store::Store;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or migrated.
    #[error("cannot open the database")]
    Store(#[from] crate::store::StoreError),
    /// The blob store could not be opened.
    #[error("cannot open the blob store")]
    Blobs(#[from] crate::blobs::BlobError),
    /// The certificate authority or server certificate failed.
    #[error("cannot set up TLS")]
    Pki(#[from] pki::PkiError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Shared state (database, blobs).
    pub state: Arc<ServerState>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// Stops accepting connections and waits for the accept loop to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Stops accepting and ends every live session too, as if the server went away
    /// (tests of outages; what was committed stays committed).
    pub async fn kill(self) {
        self.state.sessions.close_all();
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        self.state.sessions.close_all();
    }

    /// Waits until the accept loop ends (it runs until shutdown).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Opens the server's state and starts accepting agents.
pub async fn start(config: ServerConfig) -> Result<RunningServer, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = match &config.database_url {
        Some(url) => Store::open(url).await?,
        None => Store::open_in(&config.data_dir).await?,
    };
    let blobs = Arc::new(
        BlobStore::open(config.blob_dir())?
            .with_max_size(config.max_blob_bytes)
            .with_fsync(config.fsync_blobs),
    );
    let ca = CertificateAuthority::load_or_create(&config.pki_dir())?;
    let server_cert = pki::load_or_issue_server_cert(&config.pki_dir(), &ca, &config.server_names)?;
    let tls = TlsAcceptor::from(pki::server_config(&ca, &server_cert)?);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    info!(
        %addr,
        backend = ?store.backend(),
        data_dir = %config.data_dir.display(),
        force_agent_tls = config.force_agent_tls,
        ca_fingerprint = %ca.fingerprint(),
        "nbserver listening for agents"
    );
    let state = Arc::new(ServerState {
        config,
        store,
        blobs,
        ca: RwLock::new(ca),
        sessions: SessionRegistry::default(),
        bells: Default::default(),
        stored_events: tokio::sync::watch::channel(0).0,
    });
    let (shutdown, mut stop) = watch::channel(false);
    let st = state.clone();
    let task = tokio::spawn(async move {
        let mut conn_id: u64 = 0;
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: log and keep serving the others.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => break,
            };
            conn_id += 1;
            let st = st.clone();
            let tls = tls.clone();
            let span = info_span!("conn", id = conn_id, peer = %remote);
            tokio::spawn(
                async move {
                    match accept(tcp, remote, tls, st).await {
                        Ok(()) => debug!("connection closed"),
                        Err(ConnError::Refused { code, message }) => {
                            warn!(%code, %message, "connection refused")
                        }
                        Err(e) => info!(error = %e, cause = ?std::error::Error::source(&e), "connection ended"),
                    }
                }
                .instrument(span),
            );
        }
        info!("listener stopped");
    });
    Ok(RunningServer {
        addr,
        state,
        shutdown,
        task,
    })
}

async fn accept(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: TlsAcceptor,
    state: Arc<ServerState>,
) -> Result<(), ConnError> {
    let _ = tcp.set_nodelay(true);
    let timeout = state.config.handshake_timeout;
    let mut first = [0u8; 1];
    let n = match tokio::time::timeout(timeout, tcp.peek(&mut first)).await {
        Err(_) => return Err(ConnError::Timeout(timeout)),
        Ok(r) => r.map_err(|e| ConnError::Io(e.into()))?,
    };
    if n == 0 {
        return Ok(());
    }
    if first[0] == 0x16 {
        let stream = match tokio::time::timeout(timeout, tls.accept(tcp)).await {
            Err(_) => return Err(ConnError::Timeout(timeout)),
            Ok(Err(e)) => {
                // The detailed reason (expired, unknown CA) is in the error; the agent
                // receives the matching TLS alert.
                warn!(error = %e, "TLS handshake failed");
                return Err(ConnError::Io(e.into()));
            }
            Ok(Ok(s)) => s,
        };
        let cert_agent = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(pki::peer_agent_name);
        let peer = Peer {
            addr: remote.to_string(),
            tls: true,
            cert_agent,
        };
        conn::serve(stream, peer, state).await
    } else {
        let peer = Peer {
            addr: remote.to_string(),
            tls: false,
            cert_agent: None,
        };
        conn::serve(tcp, peer, state).await
    }
}
