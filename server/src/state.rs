//! State shared by every connection of a running server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, RwLock};

use crate::blobs::BlobStore;
use crate::config::ServerConfig;
use crate::pki::CertificateAuthority;
use crate::store::Store;

/// Shared server state.
#[derive(Debug)]
pub struct ServerState {
    /// Configuration.
    pub config: ServerConfig,
    /// Database.
    pub store: Store,
    /// Blob store.
    pub blobs: Arc<BlobStore>,
    /// Certificate authority (replaced by a secrets reset).
    pub ca: RwLock<CertificateAuthority>,
    /// Live data sessions, one per agent.
    pub sessions: SessionRegistry,
    /// Rung when a command is queued for an agent.
    pub bells: Mutex<HashMap<String, Arc<Notify>>>,
    /// Bumped after every committed batch of agent messages, so that waiters (a
    /// notebook run waiting for its cells) wake up instead of polling.
    pub stored_events: tokio::sync::watch::Sender<u64>,
}

/// Errors of [`ServerState::submit`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The message is not a command (server to agent, sequenced).
    #[error("{0} is not a command")]
    NotACommand(&'static str),
    /// Storage failed.
    #[error("cannot queue the command")]
    Store(#[from] crate::store::StoreError),
}

impl ServerState {
    /// Tells waiters that new agent messages were committed.
    pub fn notify_stored(&self) {
        self.stored_events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The notifier rung when a command is queued for `agent`.
    pub fn command_bell(&self, agent: &str) -> Arc<Notify> {
        let mut m = match self.bells.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(agent.to_owned()).or_default().clone()
    }

    /// Queues a command for `agent` (stored first, so it survives a server restart
    /// and is resent until acknowledged) and wakes its session. Returns its number.
    pub async fn submit(
        &self,
        agent: &str,
        msg: &nbagent_protocol::Message,
    ) -> Result<u64, SubmitError> {
        if !msg.is_sequenced() || msg.direction() != nbagent_protocol::Direction::ToAgent {
            return Err(SubmitError::NotACommand(msg.kind()));
        }
        let body = match serde_json::to_string(msg) {
            Ok(b) => b,
            Err(e) => unreachable!("serialising a message failed: {e}"),
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let seq = self
            .store
            .enqueue_command(agent, msg.kind(), &body, now)
            .await?;
        self.command_bell(agent).notify_one();
        Ok(seq)
    }
}

/// At most one live data session per agent: a new connection of the same agent
/// (a reconnect after a network failure, a restarted agent) replaces the old one.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    live: Mutex<HashMap<String, Arc<Notify>>>,
}

impl SessionRegistry {
    /// Registers a new session of `agent` and tells its predecessor, if any, to close.
    /// Returns the notifier the new session must watch.
    pub fn register(&self, agent: &str) -> Arc<Notify> {
        let fresh = Arc::new(Notify::new());
        let old = match self.live.lock() {
            Ok(mut m) => m.insert(agent.to_owned(), fresh.clone()),
            Err(poisoned) => poisoned
                .into_inner()
                .insert(agent.to_owned(), fresh.clone()),
        };
        if let Some(old) = old {
            old.notify_one();
        }
        fresh
    }

    /// Tells every live session to close (a server going away).
    pub fn close_all(&self) {
        let live = match self.live.lock() {
            Ok(m) => m.values().cloned().collect::<Vec<_>>(),
            Err(p) => p.into_inner().values().cloned().collect(),
        };
        for n in live {
            n.notify_one();
        }
    }

    /// Number of agents with a live session.
    pub fn len(&self) -> usize {
        match self.live.lock() {
            Ok(m) => m.len(),
            Err(p) => p.into_inner().len(),
        }
    }

    /// Whether no agent has a session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
