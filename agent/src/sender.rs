//! The producers' side of the outbox: append a message (durably) and wake the channel.
//!
//! When the outbox is full (the server has been unreachable for long), `send` waits
//! for acknowledgements instead of dropping anything, and says so once in the log:
//! the producer (the kernel's output pump) is slowed down, nothing is lost.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbagent_protocol::Message;
use tokio::sync::Notify;
use tracing::warn;

use crate::outbox::{Attachment, Outbox, OutboxError};

/// The outbox shared between producers and the channel task.
#[derive(Debug)]
pub struct Shared {
    outbox: Mutex<Outbox>,
    /// Signalled after an append (the channel's writer waits on it).
    pub(crate) appended: Notify,
    /// Signalled after an ack released entries (producers waiting for space, and
    /// `drained` waiters).
    pub(crate) released: Notify,
    /// Send instants of unacked messages, when latency probing is on.
    probe: Option<Mutex<LatencyProbe>>,
}

/// Append-to-ack latency samples (benchmarks).
#[derive(Debug, Default)]
pub struct LatencyProbe {
    pending: VecDeque<(u64, Instant)>,
    /// Completed samples.
    pub samples: Vec<Duration>,
}

/// Errors of [`Sender::send`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The outbox refused the message for a reason waiting cannot fix.
    #[error("outbox refused the message")]
    Outbox(#[from] OutboxError),
}

impl Shared {
    /// Wraps an opened outbox.
    pub fn new(outbox: Outbox, probe_latency: bool) -> Arc<Self> {
        Arc::new(Self {
            outbox: Mutex::new(outbox),
            appended: Notify::new(),
            released: Notify::new(),
            probe: probe_latency.then(|| Mutex::new(LatencyProbe::default())),
        })
    }

    /// Locks the outbox. A poisoned lock is recovered: the outbox's on-disk state is
    /// the truth and every operation leaves it consistent.
    pub fn outbox(&self) -> MutexGuard<'_, Outbox> {
        match self.outbox.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Applies a cumulative ack from the server.
    pub(crate) fn ack(&self, upto: u64) -> Result<u64, OutboxError> {
        let released = self.outbox().ack(upto)?;
        if released > 0 {
            if let Some(p) = &self.probe {
                let now = Instant::now();
                let mut p = lock(p);
                while p.pending.front().is_some_and(|(s, _)| *s <= upto) {
                    if let Some((_, t)) = p.pending.pop_front() {
                        p.samples.push(now - t);
                    }
                }
            }
            self.released.notify_waiters();
        }
        Ok(released)
    }

    /// Applies the server's `welcome.acked` at the start of a session (it may also move
    /// the numbering past what the server has, see [`Outbox::on_welcome`]).
    pub(crate) fn on_welcome(&self, acked: u64) -> Result<u64, OutboxError> {
        let released = self.outbox().on_welcome(acked)?;
        if released > 0 {
            self.released.notify_waiters();
        }
        Ok(released)
    }

    /// Takes the latency samples collected so far.
    pub fn take_latency_samples(&self) -> Vec<Duration> {
        match &self.probe {
            Some(p) => std::mem::take(&mut lock(p).samples),
            None => Vec::new(),
        }
    }

    /// Waits until every appended message is acknowledged.
    pub async fn drained(&self) {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outbox().pending_count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Fsyncs the attachments appended since the last call, then the outbox's active
/// segment, without holding the outbox lock, on a blocking thread: producers and the
/// channel go on meanwhile.
pub async fn sync_outbox(shared: &Shared) -> Result<(), OutboxError> {
    let (attachments, segment) = {
        let mut outbox = shared.outbox();
        (outbox.take_unsynced(), outbox.sync_handle()?)
    };
    if attachments.is_empty() && segment.is_none() {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || {
        crate::outbox::sync_attachments(&attachments)?;
        if let Some(file) = segment {
            file.sync_data().map_err(|source| OutboxError::Io {
                op: "syncing",
                path: "outbox segment".into(),
                source,
            })?;
        }
        Ok(())
    })
    .await
    .map_err(|e| OutboxError::Io {
        op: "syncing",
        path: "outbox".into(),
        source: std::io::Error::other(e),
    })?
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A cloneable handle for producers.
#[derive(Debug, Clone)]
pub struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// A sender appending to `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Durably appends a sequenced message and returns its sequence number. Waits for
    /// acknowledgements while the outbox is full.
    pub async fn send(&self, msg: &Message, payload: &Bytes) -> Result<u64, SendError> {
        self.append_waiting(|outbox| outbox.append(msg, payload))
            .await
    }

    /// Appends one message per part whose payloads are ranges of a prepared or held
    /// attachment ([`Outbox::append_attached`]); returns the last sequence number.
    /// Waits while the outbox is full.
    pub async fn send_attached(
        &self,
        att: &mut Attachment,
        parts: &[(Message, u64, u32)],
    ) -> Result<u64, SendError> {
        self.append_waiting(|outbox| outbox.append_attached(att, parts))
            .await
    }

    /// Runs `append` on the outbox until it is not full; returns the last number.
    async fn append_waiting(
        &self,
        mut append: impl FnMut(&mut Outbox) -> Result<u64, OutboxError>,
    ) -> Result<u64, SendError> {
        let mut warned = false;
        loop {
            let notified = self.shared.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let r = append(&mut self.shared.outbox());
            match r {
                Ok(seq) => {
                    if let Some(p) = &self.shared.probe {
                        lock(p).pending.push_back((seq, Instant::now()));
                    }
                    self.shared.appended.notify_one();
                    return Ok(seq);
                }
                Err(OutboxError::Full {
                    pending_bytes,
                    max_bytes,
                }) => {
                    if !warned {
                        warn!(
                            pending_bytes,
                            max_bytes,
                            "outbox full: the server has not acknowledged for a while; \
                             holding new output until it does (nothing is dropped)"
                        );
                        warned = true;
                    }
                    notified.await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
