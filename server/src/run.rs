//! Running notebook cells on an agent and collecting what they produced.
//!
//! A run queues one [`Message::ExecuteCell`] command per cell (commands are stored, so
//! they survive a server restart and are resent until the agent acknowledges them),
//! then waits until the agent has reported a [`Message::CellFinished`] for every cell,
//! and reads back the outputs it stored, in the order the kernel emitted them.

use std::collections::HashMap;
use std::time::Duration;

use nbagent_protocol::{CellSource, CellStatus, Envelope, Message, OutputContent};
use tracing::{debug, info};

use crate::state::{ServerState, SubmitError};
use crate::store::{StoreError, StoredMessage};

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A command could not be queued.
    #[error("cannot queue the cells")]
    Submit(#[from] SubmitError),
    /// Reading results failed.
    #[error("cannot read the results")]
    Store(#[from] StoreError),
    /// The cells did not all finish in time.
    #[error("{finished} of {total} cells finished within {timeout:?}")]
    Timeout {
        /// Cells that finished.
        finished: usize,
        /// Cells queued.
        total: usize,
        /// The limit.
        timeout: Duration,
    },
}

/// What one cell produced.
#[derive(Debug, Clone, PartialEq)]
pub struct CellResult {
    /// The request id the cell ran under.
    pub request: String,
    /// The cell id.
    pub cell: String,
    /// How it ended.
    pub status: CellStatus,
    /// The kernel's execution counter.
    pub execution_count: Option<u64>,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
    /// Outputs in emission order.
    pub outputs: Vec<OutputContent>,
}

/// Request id of cell `index` of run `run`.
pub fn request_id(run: &str, index: usize) -> String {
    format!("{run}/{index}")
}

/// Queues `cells` for `agent` under run id `run`; returns the request ids in order.
pub async fn submit_cells(
    state: &ServerState,
    agent: &str,
    run: &str,
    cells: &[CellSource],
) -> Result<Vec<String>, RunError> {
    let mut requests = Vec::with_capacity(cells.len());
    for (i, c) in cells.iter().enumerate() {
        let request = request_id(run, i);
        state
            .submit(
                agent,
                &Message::ExecuteCell {
                    request: request.clone(),
                    cell: c.id.clone(),
                    code: c.code.clone(),
                },
            )
            .await?;
        requests.push(request);
    }
    info!(%agent, run, cells = cells.len(), "cells queued");
    Ok(requests)
}

fn decode(m: &StoredMessage) -> Option<Message> {
    match serde_json::from_str::<Envelope>(&m.header) {
        Ok(e) => Some(e.msg),
        Err(e) => {
            debug!(seq = m.seq, error = %e, "stored header does not decode");
            None
        }
    }
}

/// The cells of `agent` that have finished, without their outputs, in stored order.
async fn finished_cells(state: &ServerState, agent: &str) -> Result<Vec<CellResult>, RunError> {
    let mut out = Vec::new();
    for m in state.store.messages_of_kind(agent, "cell_finished").await? {
        if let Some(Message::CellFinished {
            request,
            cell,
            status,
            execution_count,
            duration_ms,
        }) = decode(&m)
        {
            out.push(CellResult {
                request,
                cell,
                status,
                execution_count,
                duration_ms,
                outputs: Vec::new(),
            });
        }
    }
    Ok(out)
}

/// Waits until every request in `requests` has finished, then returns their results in
/// the order of `requests`. `progress` is called once per newly finished cell.
pub async fn wait_for_cells(
    state: &ServerState,
    agent: &str,
    requests: &[String],
    timeout: Duration,
    mut progress: impl FnMut(&CellResult),
) -> Result<Vec<CellResult>, RunError> {
    let mut stored = state.stored_events.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    let wanted: HashMap<&str, usize> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.as_str(), i))
        .collect();
    let mut finished: Vec<Option<CellResult>> = vec![None; requests.len()];
    loop {
        stored.borrow_and_update();
        for mut r in finished_cells(state, agent).await? {
            if let Some(&i) = wanted.get(r.request.as_str())
                && finished[i].is_none()
            {
                r.outputs = outputs_of(state, agent, &r.request).await?;
                progress(&r);
                finished[i] = Some(r);
            }
        }
        let done = finished.iter().filter(|f| f.is_some()).count();
        if done == requests.len() {
            return Ok(finished.into_iter().flatten().collect());
        }
        match tokio::time::timeout_at(deadline, stored.changed()).await {
            Ok(Ok(())) => {}
            // The sender lives as long as the server state: treat its end as a timeout.
            Ok(Err(_)) | Err(_) => {
                return Err(RunError::Timeout {
                    finished: done,
                    total: requests.len(),
                    timeout,
                });
            }
        }
    }
}

/// The outputs stored for `request`, in emission order.
pub async fn outputs_of(
    state: &ServerState,
    agent: &str,
    request: &str,
) -> Result<Vec<OutputContent>, RunError> {
    let mut out = Vec::new();
    for m in state.store.messages_of_kind(agent, "output").await? {
        if let Some(Message::Output {
            request: r, output, ..
        }) = decode(&m)
            && r == request
        {
            out.push(output);
        }
    }
    Ok(out)
}

/// Queues `cells` and waits for all of them.
pub async fn run_cells(
    state: &ServerState,
    agent: &str,
    run: &str,
    cells: &[CellSource],
    timeout: Duration,
    progress: impl FnMut(&CellResult),
) -> Result<Vec<CellResult>, RunError> {
    let requests = submit_cells(state, agent, run, cells).await?;
    wait_for_cells(state, agent, &requests, timeout, progress).await
}

/// Reactive mode: asks the agent to bring its kernel to the state after
/// `cells[..from]` and run the rest, and waits until the last cell has finished.
/// Returns the results of the cells the agent executed (the ones after the checkpoint
/// it restored, or all of them if it re-executed from the top), in order.
pub async fn run_from(
    state: &ServerState,
    agent: &str,
    run: &str,
    cells: &[CellSource],
    from: usize,
    timeout: Duration,
) -> Result<Vec<CellResult>, RunError> {
    state
        .submit(
            agent,
            &Message::RunFrom {
                request: run.to_owned(),
                cells: cells.to_vec(),
                from: u32::try_from(from).unwrap_or(u32::MAX),
            },
        )
        .await?;
    let Some(last) = cells.len().checked_sub(1) else {
        return Ok(Vec::new());
    };
    wait_for_cells(state, agent, &[request_id(run, last)], timeout, |_| {}).await?;
    let prefix = format!("{run}/");
    let mut out = Vec::new();
    for mut r in finished_cells(state, agent).await? {
        if r.request.starts_with(&prefix) {
            r.outputs = outputs_of(state, agent, &r.request).await?;
            out.push(r);
        }
    }
    Ok(out)
}

/// A short human-readable rendering of one output, for the CLI.
pub fn render_output(o: &OutputContent) -> String {
    fn bundle(data: &serde_json::Value) -> String {
        let Some(map) = data.as_object() else {
            return data.to_string();
        };
        let mut parts = Vec::new();
        for (mime, v) in map {
            if let Some(hash) = v.get("blob").and_then(|h| h.as_str()) {
                let size = v.get("size").and_then(|s| s.as_u64()).unwrap_or(0);
                parts.push(format!(
                    "[{mime}: blob sha256:{}... {size} bytes]",
                    &hash[..hash.len().min(12)]
                ));
            } else if mime == "text/plain" {
                let t = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Array(a) => {
                        a.iter().filter_map(|x| x.as_str()).collect::<String>()
                    }
                    other => other.to_string(),
                };
                parts.push(t);
            } else {
                let len = v
                    .as_str()
                    .map(str::len)
                    .unwrap_or_else(|| v.to_string().len());
                parts.push(format!("[{mime}: {len} chars]"));
            }
        }
        parts.join("\n")
    }
    match o {
        OutputContent::Stream { name, text } => format!("{name}: {}", text.trim_end()),
        OutputContent::DisplayData { data, .. } => format!("display: {}", bundle(data)),
        OutputContent::UpdateDisplayData {
            data, display_id, ..
        } => format!("update {display_id}: {}", bundle(data)),
        OutputContent::ExecuteResult {
            execution_count,
            data,
            ..
        } => format!("Out[{execution_count}]: {}", bundle(data)),
        OutputContent::Error { ename, evalue, .. } => format!("error: {ename}: {evalue}"),
        OutputContent::ClearOutput { wait } => format!("clear_output(wait={wait})"),
        _ => "(unknown output kind)".to_owned(),
    }
}
