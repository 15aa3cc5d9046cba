//! Decoding what the kernel sends, without sockets: the JSON parts of a (signature
//! checked) Jupyter message to an [`Incoming`], iopub content to an [`ExecEvent`], and
//! the replies the client reads.
//!
//! Everything here takes untrusted input: a missing field or a value of the wrong type
//! is a [`DecodeError`], never a panic. MIME bundles and metadata are kept as the JSON
//! the kernel sent (no typed round trip that could drop unknown MIME types).

use bytes::Bytes;
use nbagent_protocol::{CellStatus, KernelState, OutputContent};
use serde_json::{Map, Value};

/// A kernel message that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Framing, delimiter or HMAC signature check failed.
    #[error("bad framing or signature")]
    Frame(#[source] jupyter_zmq_client::RuntimeError),
    /// Fewer than the four JSON parts (header, parent header, metadata, content).
    #[error("message has {0} json parts, expected at least 4")]
    Parts(usize),
    /// A part is not JSON.
    #[error("the {part} is not valid json")]
    Json {
        /// Which part.
        part: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A field is missing or has the wrong type.
    #[error("field {field} is missing or has the wrong type")]
    Field {
        /// The field, as a dotted path.
        field: &'static str,
    },
    /// A field has a value outside the protocol.
    #[error("field {field} has an unexpected value {value:?}")]
    Value {
        /// The field.
        field: &'static str,
        /// What it held.
        value: String,
    },
}

/// The parts of a kernel message the client looks at.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Incoming {
    /// `header.msg_type`.
    pub msg_type: String,
    /// `header.msg_id`.
    pub msg_id: String,
    /// `parent_header.msg_id`, when the message has a parent.
    pub parent_id: Option<String>,
    /// The content, as sent.
    pub content: Value,
    /// The header, as sent (the parent of an answer to this message).
    pub header: Value,
}

impl Incoming {
    /// Whether this is a reply of `msg_type` to the request `id`.
    pub fn answers(&self, msg_type: &str, id: &str) -> bool {
        self.msg_type == msg_type && self.parent_id.as_deref() == Some(id)
    }
}

fn json(part: &'static str, bytes: &Bytes) -> Result<Value, DecodeError> {
    serde_json::from_slice(bytes).map_err(|source| DecodeError::Json { part, source })
}

/// Decodes the JSON parts (after the signature) of a message.
pub(crate) fn decode(jparts: &[Bytes]) -> Result<Incoming, DecodeError> {
    let [header, parent, _metadata, content, ..] = jparts else {
        return Err(DecodeError::Parts(jparts.len()));
    };
    let header = json("header", header)?;
    let parent = json("parent header", parent)?;
    let content = json("content", content)?;
    let msg_type = header
        .get("msg_type")
        .and_then(Value::as_str)
        .ok_or(DecodeError::Field {
            field: "header.msg_type",
        })?
        .to_owned();
    let msg_id = header
        .get("msg_id")
        .and_then(Value::as_str)
        .ok_or(DecodeError::Field {
            field: "header.msg_id",
        })?
        .to_owned();
    let parent_id = parent
        .get("msg_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if !content.is_object() {
        return Err(DecodeError::Field { field: "content" });
    }
    Ok(Incoming {
        msg_type,
        msg_id,
        parent_id,
        content,
        header,
    })
}

/// What happens during one execution, in the order the kernel published it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ExecEvent {
    /// The kernel's execution state for this request (`busy` first, `idle` last).
    Status(KernelState),
    /// The kernel started running the code (`execute_input`), with its counter.
    Input {
        /// The execution counter the kernel assigned, if any.
        execution_count: Option<u64>,
    },
    /// One output, exactly as the kernel emitted it (stream chunks are not merged).
    Output(OutputContent),
    /// An iopub message for this request that could not be decoded; it was skipped.
    Malformed {
        /// Its `msg_type`.
        msg_type: String,
        /// Why it was rejected.
        reason: String,
    },
}

fn field<'a>(content: &'a Value, field: &'static str) -> Result<&'a Value, DecodeError> {
    content.get(field).ok_or(DecodeError::Field { field })
}

fn string(content: &Value, name: &'static str) -> Result<String, DecodeError> {
    field(content, name)?
        .as_str()
        .map(str::to_owned)
        .ok_or(DecodeError::Field { field: name })
}

/// A text value: a string, or (nbformat style) a list of strings.
fn text(content: &Value, name: &'static str) -> Result<String, DecodeError> {
    match field(content, name)? {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(Value::as_str)
            .collect::<Option<Vec<_>>>()
            .map(|p| p.concat())
            .ok_or(DecodeError::Field { field: name }),
        _ => Err(DecodeError::Field { field: name }),
    }
}

fn object(content: &Value, name: &'static str) -> Result<Value, DecodeError> {
    match field(content, name)? {
        v @ Value::Object(_) => Ok(v.clone()),
        _ => Err(DecodeError::Field { field: name }),
    }
}

/// Metadata is optional; absent or null is an empty object.
fn metadata(content: &Value) -> Result<Value, DecodeError> {
    match content.get("metadata") {
        None | Some(Value::Null) => Ok(Value::Object(Map::new())),
        Some(v @ Value::Object(_)) => Ok(v.clone()),
        Some(_) => Err(DecodeError::Field { field: "metadata" }),
    }
}

fn display_id(content: &Value) -> Result<Option<String>, DecodeError> {
    match content.get("transient").and_then(|t| t.get("display_id")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(DecodeError::Field {
            field: "transient.display_id",
        }),
    }
}

fn count(content: &Value) -> Result<Option<u64>, DecodeError> {
    match content.get("execution_count") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(DecodeError::Field {
            field: "execution_count",
        }),
    }
}

/// Maps one iopub message (already known to belong to the running request) to an
/// event. `Ok(None)` means the message type is not one the client reports (comms,
/// welcome, unknown types...).
pub(crate) fn iopub_event(
    msg_type: &str,
    content: &Value,
) -> Result<Option<ExecEvent>, DecodeError> {
    let output = match msg_type {
        "status" => {
            let state = string(content, "execution_state")?;
            return Ok(match state.as_str() {
                "busy" => Some(ExecEvent::Status(KernelState::Busy)),
                "idle" => Some(ExecEvent::Status(KernelState::Idle)),
                "starting" => Some(ExecEvent::Status(KernelState::Starting)),
                _ => None,
            });
        }
        "execute_input" => {
            return Ok(Some(ExecEvent::Input {
                execution_count: count(content)?,
            }));
        }
        "stream" => OutputContent::Stream {
            name: string(content, "name")?,
            text: text(content, "text")?,
        },
        "display_data" => OutputContent::DisplayData {
            data: object(content, "data")?,
            metadata: metadata(content)?,
            display_id: display_id(content)?,
        },
        "update_display_data" => OutputContent::UpdateDisplayData {
            data: object(content, "data")?,
            metadata: metadata(content)?,
            display_id: display_id(content)?.ok_or(DecodeError::Field {
                field: "transient.display_id",
            })?,
        },
        "execute_result" => OutputContent::ExecuteResult {
            execution_count: count(content)?.ok_or(DecodeError::Field {
                field: "execution_count",
            })?,
            data: object(content, "data")?,
            metadata: metadata(content)?,
        },
        "error" => OutputContent::Error {
            ename: string(content, "ename")?,
            evalue: string(content, "evalue")?,
            traceback: field(content, "traceback")?
                .as_array()
                .and_then(|lines| {
                    lines
                        .iter()
                        .map(|l| l.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or(DecodeError::Field { field: "traceback" })?,
        },
        "clear_output" => OutputContent::ClearOutput {
            wait: match content.get("wait") {
                None | Some(Value::Null) => false,
                Some(v) => v.as_bool().ok_or(DecodeError::Field { field: "wait" })?,
            },
        },
        _ => return Ok(None),
    };
    Ok(Some(ExecEvent::Output(output)))
}

/// The `status` of a reply, with `ename`/`evalue` when it is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplyStatus {
    pub status: CellStatus,
    pub ename: Option<String>,
    pub evalue: Option<String>,
}

pub(crate) fn reply_status(content: &Value) -> Result<ReplyStatus, DecodeError> {
    let status = match string(content, "status")?.as_str() {
        "ok" => CellStatus::Ok,
        "error" => CellStatus::Error,
        "aborted" => CellStatus::Aborted,
        other => {
            return Err(DecodeError::Value {
                field: "status",
                value: other.to_owned(),
            });
        }
    };
    let opt = |name| content.get(name).and_then(Value::as_str).map(str::to_owned);
    Ok(ReplyStatus {
        status,
        ename: opt("ename"),
        evalue: opt("evalue"),
    })
}

/// The fields of an `execute_reply` the client reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExecuteReply {
    pub status: ReplyStatus,
    pub execution_count: Option<u64>,
}

pub(crate) fn execute_reply(content: &Value) -> Result<ExecuteReply, DecodeError> {
    Ok(ExecuteReply {
        status: reply_status(content)?,
        execution_count: count(content)?,
    })
}

/// What the kernel says about itself in `kernel_info_reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KernelInfo {
    /// Jupyter messaging protocol version (`5.3`...).
    pub protocol_version: String,
    /// Kernel implementation (`ipython`).
    pub implementation: String,
    /// Its version.
    pub implementation_version: String,
    /// `language_info.name` (`python`).
    pub language: String,
    /// `language_info.version`.
    pub language_version: String,
}

pub(crate) fn kernel_info(content: &Value) -> Result<KernelInfo, DecodeError> {
    let language_info = field(content, "language_info")?;
    let opt = |v: &Value, name| {
        v.get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    Ok(KernelInfo {
        protocol_version: string(content, "protocol_version")?,
        implementation: opt(content, "implementation"),
        implementation_version: opt(content, "implementation_version"),
        language: string(language_info, "name").map_err(|_| DecodeError::Field {
            field: "language_info.name",
        })?,
        language_version: opt(language_info, "version"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parts(header: Value, parent: Value, content: Value) -> Vec<Bytes> {
        [header, parent, json!({}), content]
            .iter()
            .map(|v| Bytes::from(v.to_string()))
            .collect()
    }

    #[test]
    fn decodes_header_and_parent() {
        let m = decode(&parts(
            json!({"msg_type": "stream", "msg_id": "a"}),
            json!({"msg_id": "p"}),
            json!({"name": "stdout", "text": "x"}),
        ))
        .expect("decodes");
        assert_eq!(m.msg_type, "stream");
        assert_eq!(m.parent_id.as_deref(), Some("p"));
        assert!(m.answers("stream", "p"));
        let m = decode(&parts(
            json!({"msg_type": "iopub_welcome", "msg_id": "a"}),
            json!({}),
            json!({}),
        ))
        .expect("decodes");
        assert_eq!(m.parent_id, None);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(matches!(decode(&[]), Err(DecodeError::Parts(0))));
        let bad = vec![Bytes::from_static(b"{"); 4];
        assert!(matches!(
            decode(&bad),
            Err(DecodeError::Json { part: "header", .. })
        ));
        let no_type = parts(json!({"msg_id": "a"}), json!({}), json!({}));
        assert!(matches!(
            decode(&no_type),
            Err(DecodeError::Field {
                field: "header.msg_type"
            })
        ));
        let not_object = parts(
            json!({"msg_type": "x", "msg_id": "a"}),
            json!({}),
            json!([]),
        );
        assert!(decode(&not_object).is_err());
    }

    #[test]
    fn maps_every_output_kind() {
        let ev = |t, c| iopub_event(t, &c).expect("valid").expect("reported");
        assert_eq!(
            ev("stream", json!({"name": "stderr", "text": ["a", "b"]})),
            ExecEvent::Output(OutputContent::Stream {
                name: "stderr".into(),
                text: "ab".into()
            })
        );
        assert_eq!(
            ev(
                "display_data",
                json!({"data": {"text/plain": "x"}, "transient": {"display_id": "d"}})
            ),
            ExecEvent::Output(OutputContent::DisplayData {
                data: json!({"text/plain": "x"}),
                metadata: json!({}),
                display_id: Some("d".into())
            })
        );
        assert_eq!(
            ev(
                "update_display_data",
                json!({"data": {}, "metadata": {"a": 1}, "transient": {"display_id": "d"}})
            ),
            ExecEvent::Output(OutputContent::UpdateDisplayData {
                data: json!({}),
                metadata: json!({"a": 1}),
                display_id: "d".into()
            })
        );
        assert_eq!(
            ev(
                "execute_result",
                json!({"execution_count": 3, "data": {"text/plain": "2"}, "metadata": {}})
            ),
            ExecEvent::Output(OutputContent::ExecuteResult {
                execution_count: 3,
                data: json!({"text/plain": "2"}),
                metadata: json!({})
            })
        );
        assert_eq!(
            ev(
                "error",
                json!({"ename": "E", "evalue": "v", "traceback": ["t"]})
            ),
            ExecEvent::Output(OutputContent::Error {
                ename: "E".into(),
                evalue: "v".into(),
                traceback: vec!["t".into()]
            })
        );
        assert_eq!(
            ev("clear_output", json!({"wait": true})),
            ExecEvent::Output(OutputContent::ClearOutput { wait: true })
        );
        assert_eq!(
            ev("status", json!({"execution_state": "idle"})),
            ExecEvent::Status(KernelState::Idle)
        );
        assert_eq!(
            ev("execute_input", json!({"code": "1", "execution_count": 7})),
            ExecEvent::Input {
                execution_count: Some(7)
            }
        );
    }

    #[test]
    fn skips_unknown_and_rejects_malformed() {
        assert_eq!(iopub_event("comm_msg", &json!({})).expect("ok"), None);
        assert_eq!(iopub_event("no_such_type", &json!({})).expect("ok"), None);
        assert_eq!(
            iopub_event("status", &json!({"execution_state": "restarting"})).expect("ok"),
            None
        );
        for (t, c) in [
            ("stream", json!({"name": "stdout"})),
            ("stream", json!({"name": "stdout", "text": 5})),
            ("display_data", json!({"data": "x"})),
            ("update_display_data", json!({"data": {}})),
            ("execute_result", json!({"data": {}, "execution_count": -1})),
            (
                "error",
                json!({"ename": "E", "evalue": "v", "traceback": [1]}),
            ),
            ("clear_output", json!({"wait": "yes"})),
            ("status", json!({})),
        ] {
            assert!(iopub_event(t, &c).is_err(), "{t} {c}");
        }
    }

    #[test]
    fn reads_replies() {
        let r = execute_reply(&json!({"status": "error", "execution_count": 2, "ename": "E", "evalue": "v", "traceback": []}))
            .expect("valid");
        assert_eq!(r.status.status, CellStatus::Error);
        assert_eq!(r.execution_count, Some(2));
        assert_eq!(r.status.ename.as_deref(), Some("E"));
        let r = execute_reply(&json!({"status": "aborted"})).expect("valid");
        assert_eq!(r.status.status, CellStatus::Aborted);
        assert_eq!(r.execution_count, None);
        assert!(execute_reply(&json!({"status": "weird"})).is_err());
        let k = kernel_info(&json!({
            "status": "ok", "protocol_version": "5.3", "implementation": "ipython",
            "implementation_version": "9", "language_info": {"name": "python", "version": "3.11"}
        }))
        .expect("valid");
        assert_eq!(k.language, "python");
        assert!(kernel_info(&json!({"protocol_version": "5.3"})).is_err());
    }
}
