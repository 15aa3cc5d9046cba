//! What the kernel does, as protocol messages through the durable outbox.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use nbagent_protocol::{CellStatus, CheckpointEvent, Feature, KernelState, Message, OutputContent};

use crate::outputs::extract_blobs;
use crate::sender::{SendError, Sender};

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The kernel side's handle on the outbox.
#[derive(Debug, Clone)]
pub struct Reporter {
    sender: Sender,
}

impl Reporter {
    /// A reporter appending through `sender`.
    pub fn new(sender: Sender) -> Self {
        Self { sender }
    }

    async fn send(&self, msg: Message) -> Result<u64, SendError> {
        self.sender.send(&msg, &Bytes::new()).await
    }

    /// The capability report.
    pub async fn capabilities(&self, features: Vec<Feature>) -> Result<(), SendError> {
        self.send(Message::Capabilities { features })
            .await
            .map(drop)
    }

    /// A kernel state change.
    pub async fn status(&self, state: KernelState, detail: &str) -> Result<(), SendError> {
        self.send(Message::KernelStatus {
            state,
            detail: detail.to_owned(),
        })
        .await
        .map(drop)
    }

    /// The kernel died.
    pub async fn died(
        &self,
        exit_code: Option<i32>,
        signal: Option<i32>,
        log_tail: String,
    ) -> Result<(), SendError> {
        self.send(Message::KernelDied {
            exit_code,
            signal,
            log_tail,
        })
        .await
        .map(drop)
    }

    /// A cell started.
    pub async fn cell_started(&self, request: &str, cell: &str) -> Result<(), SendError> {
        self.send(Message::CellStarted {
            request: request.to_owned(),
            cell: cell.to_owned(),
            started_ms: now_ms(),
        })
        .await
        .map(drop)
    }

    /// One output. Binary and oversized values of MIME bundles are uploaded first as
    /// content-addressed blobs and referenced from the output by hash.
    pub async fn output(
        &self,
        request: &str,
        cell: &str,
        mut output: OutputContent,
    ) -> Result<(), SendError> {
        let blobs = match &mut output {
            OutputContent::DisplayData { data, .. }
            | OutputContent::UpdateDisplayData { data, .. }
            | OutputContent::ExecuteResult { data, .. } => extract_blobs(data),
            _ => Vec::new(),
        };
        for blob in blobs {
            for (msg, payload) in blob.chunks() {
                self.sender.send(&msg, &payload).await?;
            }
        }
        self.send(Message::Output {
            request: request.to_owned(),
            cell: cell.to_owned(),
            output,
        })
        .await
        .map(drop)
    }

    /// A cell finished.
    pub async fn cell_finished(
        &self,
        request: &str,
        cell: &str,
        status: CellStatus,
        execution_count: Option<u64>,
        duration_ms: u64,
    ) -> Result<(), SendError> {
        self.send(Message::CellFinished {
            request: request.to_owned(),
            cell: cell.to_owned(),
            status,
            execution_count,
            duration_ms,
        })
        .await
        .map(drop)
    }

    /// Outputs may be missing.
    pub async fn gap(&self, cell: Option<&str>, reason: &str) -> Result<(), SendError> {
        self.send(Message::OutputGap {
            cell: cell.map(str::to_owned),
            reason: reason.to_owned(),
        })
        .await
        .map(drop)
    }

    /// A checkpoint event.
    pub async fn checkpoint(
        &self,
        cell: &str,
        checkpoint: &str,
        event: CheckpointEvent,
        bytes: u64,
        duration_ms: u64,
        reason: &str,
    ) -> Result<(), SendError> {
        self.send(Message::Checkpoint {
            cell: cell.to_owned(),
            checkpoint: checkpoint.to_owned(),
            event,
            bytes,
            duration_ms,
            reason: reason.to_owned(),
        })
        .await
        .map(drop)
    }
}
