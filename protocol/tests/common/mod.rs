//! Shared helpers of the protocol's integration tests: proptest strategies for every
//! message, the list of message types as serde sees it, and a table of hand-written
//! instances.
#![allow(dead_code)]

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use nbagent_protocol::codec::encode_raw;
use nbagent_protocol::{
    CellSource, CellStatus, CheckpointEvent, Column, Direction, Envelope, ErrorCode, Feature,
    FileEntry, FileKind, FileRoot, Frame, KernelState, Message, OutputContent, RawFrame,
    VersionRange,
};
use proptest::prelude::*;
use serde_json::{Value, json};

// ----- variant lists, derived from the types themselves ------------------------------

/// Extracts the list of variant names from serde's "unknown variant" error, which
/// names every variant the derive knows. Adding a variant to an enum therefore adds it
/// here without anyone editing the tests.
fn variants_from_serde_error(err: &str) -> BTreeSet<String> {
    let (_, list) = err
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("serde error does not list variants: {err}"));
    list.split(", ")
        .filter_map(|v| {
            let v = v.trim();
            let v = v.strip_prefix('`')?;
            let end = v.find('`')?;
            Some(v[..end].to_owned())
        })
        .collect()
}

/// Every `"type"` tag of [`Message`], as the serde derive knows them.
pub fn all_message_types() -> BTreeSet<String> {
    let err = serde_json::from_str::<Message>(r#"{"type":"__no_such_type__"}"#)
        .expect_err("an unknown type must be refused");
    let kinds = variants_from_serde_error(&err.to_string());
    assert!(
        kinds.len() > 20,
        "suspiciously few message types: {kinds:?}"
    );
    kinds
}

/// Every [`ErrorCode`], as the serde derive knows them.
pub fn all_error_codes() -> BTreeSet<String> {
    let err = serde_json::from_str::<ErrorCode>(r#""__no_such_code__""#)
        .expect_err("an unknown code must be refused");
    variants_from_serde_error(&err.to_string())
}

/// Every [`OutputContent`] kind.
pub fn all_output_kinds() -> BTreeSet<String> {
    let err = serde_json::from_str::<OutputContent>(r#"{"kind":"__no_such_kind__"}"#)
        .expect_err("an unknown kind must be refused");
    variants_from_serde_error(&err.to_string())
}

/// The `"type"` field of a message's JSON form.
pub fn json_type(msg: &Message) -> String {
    let v = serde_json::to_value(msg).expect("a message serialises");
    v["type"].as_str().expect("type is a string").to_owned()
}

// ----- strategies ---------------------------------------------------------------------

/// Arbitrary unicode text, including control characters and astral-plane characters.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..12).prop_map(|c| c.into_iter().collect()),
        "[a-z0-9_./-]{0,12}",
        Just(String::new()),
    ]
}

/// Every finite `f64` as a JSON number: the protocol carries kernel data (dataset
/// cells, display metadata) whose floats must come back bit for bit.
fn json_float() -> impl Strategy<Value = Value> {
    (prop::num::f64::NORMAL
        | prop::num::f64::SUBNORMAL
        | prop::num::f64::ZERO
        | prop::num::f64::POSITIVE
        | prop::num::f64::NEGATIVE)
        .prop_filter_map("finite", |f| {
            serde_json::Number::from_f64(f).map(Value::Number)
        })
}

/// Arbitrary JSON values of bounded depth and size.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        json_float(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn versions() -> impl Strategy<Value = VersionRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(a, b)| VersionRange::new(a, b))
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::UnsupportedVersion,
        ErrorCode::TokenUnknown,
        ErrorCode::TokenExpired,
        ErrorCode::TokenUsed,
        ErrorCode::BadCsr,
        ErrorCode::PlaintextRefused,
        ErrorCode::Unauthenticated,
        ErrorCode::FrameTooLarge,
        ErrorCode::MalformedFrame,
        ErrorCode::UnexpectedMessage,
        ErrorCode::SequenceGap,
        ErrorCode::BlobMismatch,
        ErrorCode::FileRefused,
        ErrorCode::HeartbeatTimeout,
        ErrorCode::Internal,
    ])
}

fn kernel_state() -> impl Strategy<Value = KernelState> {
    prop::sample::select(vec![
        KernelState::Starting,
        KernelState::Idle,
        KernelState::Busy,
        KernelState::Restarting,
        KernelState::Restored,
        KernelState::Dead,
    ])
}

fn cell_status() -> impl Strategy<Value = CellStatus> {
    prop::sample::select(vec![
        CellStatus::Ok,
        CellStatus::Error,
        CellStatus::Aborted,
        CellStatus::KernelDied,
    ])
}

fn checkpoint_event() -> impl Strategy<Value = CheckpointEvent> {
    prop::sample::select(vec![
        CheckpointEvent::Created,
        CheckpointEvent::Evicted,
        CheckpointEvent::Restored,
        CheckpointEvent::Failed,
        CheckpointEvent::NotRestorable,
    ])
}

fn file_root() -> impl Strategy<Value = FileRoot> {
    prop::sample::select(vec![FileRoot::Notebook, FileRoot::Workspace])
}

fn file_kind() -> impl Strategy<Value = FileKind> {
    prop::sample::select(vec![FileKind::File, FileKind::Dir])
}

fn output_content() -> impl Strategy<Value = OutputContent> {
    prop_oneof![
        (text(), text()).prop_map(|(name, text)| OutputContent::Stream { name, text }),
        (json_value(), json_value(), prop::option::of(text())).prop_map(
            |(data, metadata, display_id)| OutputContent::DisplayData {
                data,
                metadata,
                display_id
            }
        ),
        (json_value(), json_value(), text()).prop_map(|(data, metadata, display_id)| {
            OutputContent::UpdateDisplayData {
                data,
                metadata,
                display_id,
            }
        }),
        (any::<u64>(), json_value(), json_value()).prop_map(|(execution_count, data, metadata)| {
            OutputContent::ExecuteResult {
                execution_count,
                data,
                metadata,
            }
        }),
        (text(), text(), prop::collection::vec(text(), 0..4)).prop_map(
            |(ename, evalue, traceback)| OutputContent::Error {
                ename,
                evalue,
                traceback
            }
        ),
        any::<bool>().prop_map(|wait| OutputContent::ClearOutput { wait }),
    ]
}

fn feature() -> impl Strategy<Value = Feature> {
    (text(), any::<bool>(), text(), text()).prop_map(|(name, enabled, detail, how_to_enable)| {
        Feature {
            name,
            enabled,
            detail,
            how_to_enable,
        }
    })
}

fn rows() -> impl Strategy<Value = Vec<Vec<Value>>> {
    prop::collection::vec(prop::collection::vec(json_value(), 0..4), 0..4)
}

/// Every variant of [`Message`] with arbitrary field values. `every_type_has_a_generator`
/// in `roundtrip.rs` fails if a variant is missing here.
pub fn message() -> BoxedStrategy<Message> {
    prop_oneof![
        (versions(), text(), text(), text()).prop_map(|(versions, token, csr_pem, software)| {
            Message::Enroll {
                versions,
                token,
                csr_pem,
                software,
            }
        }),
        (any::<u16>(), text(), text(), text(), any::<i64>()).prop_map(
            |(version, agent, certificate_pem, ca_pem, not_after)| Message::Enrolled {
                version,
                agent,
                certificate_pem,
                ca_pem,
                not_after,
            }
        ),
        (
            versions(),
            text(),
            text(),
            prop::option::of(text()),
            any::<u64>()
        )
            .prop_map(
                |(versions, stream, software, token, received)| Message::Hello {
                    versions,
                    stream,
                    software,
                    token,
                    received,
                }
            ),
        (
            any::<u16>(),
            text(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<bool>()
        )
            .prop_map(|(version, agent, acked, heartbeat_ms, max_payload, tls)| {
                Message::Welcome {
                    version,
                    agent,
                    acked,
                    heartbeat_ms,
                    max_payload,
                    tls,
                }
            }),
        text().prop_map(|csr_pem| Message::RenewCertificate { csr_pem }),
        (text(), any::<i64>()).prop_map(|(certificate_pem, not_after)| {
            Message::CertificateRenewed {
                certificate_pem,
                not_after,
            }
        }),
        any::<u64>().prop_map(|sent_ms| Message::Heartbeat { sent_ms }),
        any::<u64>().prop_map(|upto| Message::Ack { upto }),
        (error_code(), text(), any::<bool>()).prop_map(|(code, message, fatal)| {
            Message::Error {
                code,
                message,
                fatal,
            }
        }),
        text().prop_map(|reason| Message::Goodbye { reason }),
        (text(), text(), text()).prop_map(|(request, cell, code)| Message::ExecuteCell {
            request,
            cell,
            code
        }),
        (
            text(),
            prop::collection::vec((text(), text()), 0..4),
            any::<u32>()
        )
            .prop_map(|(request, cells, from)| Message::RunFrom {
                request,
                cells: cells
                    .into_iter()
                    .map(|(id, code)| CellSource { id, code })
                    .collect(),
                from,
            }),
        text().prop_map(|request| Message::Interrupt { request }),
        text().prop_map(|request| Message::RestartKernel { request }),
        (text(), any::<u64>()).prop_map(|(reason, deadline_ms)| Message::Shutdown {
            reason,
            deadline_ms
        }),
        prop::collection::vec(feature(), 0..4)
            .prop_map(|features| Message::Capabilities { features }),
        (kernel_state(), text())
            .prop_map(|(state, detail)| Message::KernelStatus { state, detail }),
        (
            prop::option::of(any::<i32>()),
            prop::option::of(any::<i32>()),
            text()
        )
            .prop_map(|(exit_code, signal, log_tail)| Message::KernelDied {
                exit_code,
                signal,
                log_tail,
            }),
        (text(), text(), any::<u64>()).prop_map(|(request, cell, started_ms)| {
            Message::CellStarted {
                request,
                cell,
                started_ms,
            }
        }),
        (text(), text(), output_content()).prop_map(|(request, cell, output)| Message::Output {
            request,
            cell,
            output
        }),
        (
            text(),
            text(),
            cell_status(),
            prop::option::of(any::<u64>()),
            any::<u64>()
        )
            .prop_map(|(request, cell, status, execution_count, duration_ms)| {
                Message::CellFinished {
                    request,
                    cell,
                    status,
                    execution_count,
                    duration_ms,
                }
            }),
        (prop::option::of(text()), text())
            .prop_map(|(cell, reason)| Message::OutputGap { cell, reason }),
        (text(), text(), any::<u64>(), any::<u64>()).prop_map(
            |(hash, media_type, offset, total)| Message::BlobChunk {
                hash,
                media_type,
                offset,
                total,
            }
        ),
        (
            text(),
            text(),
            prop::collection::vec((text(), text()), 0..4),
            any::<u64>(),
            rows(),
            rows()
        )
            .prop_map(|(cell, name, columns, total_rows, head, tail)| {
                Message::DatasetHeadTail {
                    cell,
                    name,
                    columns: columns
                        .into_iter()
                        .map(|(name, dtype)| Column { name, dtype })
                        .collect(),
                    total_rows,
                    head,
                    tail,
                }
            }),
        (
            text(),
            text(),
            checkpoint_event(),
            any::<u64>(),
            any::<u64>(),
            text()
        )
            .prop_map(|(cell, checkpoint, event, bytes, duration_ms, reason)| {
                Message::Checkpoint {
                    cell,
                    checkpoint,
                    event,
                    bytes,
                    duration_ms,
                    reason,
                }
            }),
        (file_root(), text(), text(), any::<u64>(), any::<u64>()).prop_map(
            |(root, path, base_version, offset, total)| Message::FileChunk {
                root,
                path,
                base_version,
                offset,
                total,
                version: String::new(),
            }
        ),
        (file_root(), text()).prop_map(|(root, path)| Message::FileMkdir { root, path }),
        (file_root(), text(), file_kind(), text()).prop_map(|(root, path, kind, base_version)| {
            Message::FileRemove {
                root,
                path,
                kind,
                base_version,
            }
        }),
        (file_root(), text(), text(), text(), text()).prop_map(
            |(root, from, to, base_version, replaced_version)| Message::FileRename {
                root,
                from,
                to,
                base_version,
                replaced_version,
            }
        ),
        (any::<u64>(), prop::collection::vec(text(), 0..4))
            .prop_map(|(request, hashes)| Message::BlobQuery { request, hashes }),
        (any::<u64>(), prop::collection::vec(text(), 0..4))
            .prop_map(|(request, present)| Message::BlobStatus { request, present }),
        (any::<u64>(), file_root()).prop_map(|(request, root)| Message::FileList { request, root }),
        (
            any::<u64>(),
            any::<bool>(),
            prop::collection::vec(
                (text(), file_kind(), any::<u64>(), any::<i64>(), text()),
                0..4
            )
        )
            .prop_map(|(request, writable, entries)| Message::FileListing {
                request,
                writable,
                entries: entries
                    .into_iter()
                    .map(|(path, kind, size, mtime_ms, version)| FileEntry {
                        path,
                        kind,
                        size,
                        mtime_ms,
                        version,
                    })
                    .collect(),
                error: None,
            }),
        (
            any::<u64>(),
            file_root(),
            text(),
            text(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(
                |(request, root, path, version, offset, len)| Message::FileRead {
                    request,
                    root,
                    path,
                    version,
                    offset,
                    len,
                }
            ),
        (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(request, offset, eof)| {
            Message::FileData {
                request,
                offset,
                eof,
                error: None,
            }
        }),
    ]
    .boxed()
}

/// An envelope with or without a sequence number (the codec does not care whether
/// the message should have one; the session does).
pub fn envelope() -> impl Strategy<Value = Envelope> {
    (prop::option::of(any::<u64>()), message()).prop_map(|(seq, msg)| Envelope { seq, msg })
}

/// A frame with or without a payload.
pub fn frame() -> impl Strategy<Value = Frame> {
    (
        envelope(),
        prop_oneof![
            3 => Just(Vec::new()),
            2 => prop::collection::vec(any::<u8>(), 1..64),
        ],
    )
        .prop_map(|(envelope, payload)| Frame {
            envelope,
            payload: Bytes::from(payload),
        })
}

/// Wire bytes of a sequence of frames, back to back.
pub fn encode_all(frames: &[Frame]) -> (Vec<RawFrame>, BytesMut) {
    let mut wire = BytesMut::new();
    let raws: Vec<RawFrame> = frames.iter().map(Frame::to_raw).collect();
    for raw in &raws {
        encode_raw(&raw.header, &raw.payload, &mut wire);
    }
    (raws, wire)
}

// ----- hand-written instances ---------------------------------------------------------

/// One row of the catalogue: a hand-written message and its expected properties.
#[derive(Debug)]
pub struct Example {
    pub msg: Message,
    pub direction: Direction,
    pub sequenced: bool,
    pub payload: bool,
}

fn ex(msg: Message, direction: Direction, sequenced: bool, payload: bool) -> Example {
    Example {
        msg,
        direction,
        sequenced,
        payload,
    }
}

/// One hand-written instance of every message type, with the direction, sequencing
/// and payload the protocol document gives it.
pub fn examples() -> Vec<Example> {
    use Direction::{Both, ToAgent, ToServer};
    let v1 = VersionRange::new(1, 1);
    vec![
        ex(
            Message::Enroll {
                versions: v1,
                token: "nbt1.k3j9.s3cr3t".into(),
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\n...".into(),
                software: "nbagent 0.1.0".into(),
            },
            ToServer,
            false,
            false,
        ),
        ex(
            Message::Enrolled {
                version: 1,
                agent: "agent-7".into(),
                certificate_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
                ca_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
                not_after: 1_767_225_600,
            },
            ToAgent,
            false,
            false,
        ),
        ex(
            Message::Hello {
                versions: v1,
                stream: "st-01".into(),
                software: "nbagent 0.1.0".into(),
                token: None,
                received: 0,
            },
            ToServer,
            false,
            false,
        ),
        ex(
            Message::Welcome {
                version: 1,
                agent: "agent-7".into(),
                acked: 0,
                heartbeat_ms: 15_000,
                max_payload: 16 << 20,
                tls: true,
            },
            ToAgent,
            false,
            false,
        ),
        ex(
            Message::RenewCertificate {
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\n...".into(),
            },
            ToServer,
            false,
            false,
        ),
        ex(
            Message::CertificateRenewed {
                certificate_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
                not_after: 1_767_312_000,
            },
            ToAgent,
            false,
            false,
        ),
        ex(Message::Heartbeat { sent_ms: 1 }, Both, false, false),
        ex(Message::Ack { upto: 3 }, Both, false, false),
        ex(
            Message::Error {
                code: ErrorCode::SequenceGap,
                message: "sequence gap: expected 4, got 6".into(),
                fatal: true,
            },
            Both,
            false,
            false,
        ),
        ex(
            Message::Goodbye {
                reason: "shutdown".into(),
            },
            Both,
            false,
            false,
        ),
        ex(
            Message::ExecuteCell {
                request: "r1".into(),
                cell: "c1".into(),
                code: "print('héllo ✓')".into(),
            },
            ToAgent,
            true,
            false,
        ),
        ex(
            Message::RunFrom {
                request: "r2".into(),
                cells: vec![
                    CellSource {
                        id: "c1".into(),
                        code: "x = 1".into(),
                    },
                    CellSource {
                        id: "c2".into(),
                        code: "x + 1".into(),
                    },
                ],
                from: 1,
            },
            ToAgent,
            true,
            false,
        ),
        ex(
            Message::Interrupt {
                request: "r3".into(),
            },
            ToAgent,
            true,
            false,
        ),
        ex(
            Message::RestartKernel {
                request: "r4".into(),
            },
            ToAgent,
            true,
            false,
        ),
        ex(
            Message::Shutdown {
                reason: "idle".into(),
                deadline_ms: 30_000,
            },
            ToAgent,
            true,
            false,
        ),
        ex(
            Message::Capabilities {
                features: vec![Feature {
                    name: "checkpoint".into(),
                    enabled: false,
                    detail: "criu 4.1.1 is too old".into(),
                    how_to_enable: "install criu 4.2 or newer".into(),
                }],
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::KernelStatus {
                state: KernelState::Idle,
                detail: String::new(),
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::KernelDied {
                exit_code: None,
                signal: Some(9),
                log_tail: "Killed".into(),
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::CellStarted {
                request: "r1".into(),
                cell: "c1".into(),
                started_ms: 1_700_000_000_000,
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::Output {
                request: "r1".into(),
                cell: "c1".into(),
                output: OutputContent::DisplayData {
                    data: json!({"text/plain": "<Figure>", "image/png": {"blob": "ab12"}}),
                    metadata: json!({"image/png": {"width": 640.5, "height": -2}}),
                    display_id: Some("d1".into()),
                },
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::CellFinished {
                request: "r1".into(),
                cell: "c1".into(),
                status: CellStatus::Ok,
                execution_count: Some(1),
                duration_ms: 12,
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::OutputGap {
                cell: Some("c1".into()),
                reason: "agent restarted".into(),
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::BlobChunk {
                hash: "ab12".into(),
                media_type: "image/png".into(),
                offset: 0,
                total: 4,
            },
            ToServer,
            true,
            true,
        ),
        ex(
            Message::DatasetHeadTail {
                cell: "c2".into(),
                name: "df".into(),
                columns: vec![
                    Column {
                        name: "a".into(),
                        dtype: "int64".into(),
                    },
                    Column {
                        name: "b".into(),
                        dtype: "float64".into(),
                    },
                ],
                total_rows: 1_000_000,
                head: vec![vec![json!(1), json!(0.1)]],
                tail: vec![vec![json!(-5), json!(null)]],
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::Checkpoint {
                cell: "c2".into(),
                checkpoint: "ck-2".into(),
                event: CheckpointEvent::Created,
                bytes: 52_428_800,
                duration_ms: 140,
                reason: String::new(),
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::FileChunk {
                root: FileRoot::Notebook,
                path: "data/out.csv".into(),
                base_version: String::new(),
                offset: 0,
                total: 3,
                version: String::new(),
            },
            ToServer,
            true,
            true,
        ),
        ex(
            Message::FileMkdir {
                root: FileRoot::Notebook,
                path: "results".into(),
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::FileRemove {
                root: FileRoot::Notebook,
                path: "results/tmp.csv".into(),
                kind: FileKind::File,
                base_version: "9f86d081".into(),
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::FileRename {
                root: FileRoot::Notebook,
                from: "results/draft.csv".into(),
                to: "results/final.csv".into(),
                base_version: "9f86d081".into(),
                replaced_version: String::new(),
            },
            ToServer,
            true,
            false,
        ),
        ex(
            Message::BlobQuery {
                request: 1,
                hashes: vec!["ab12".into()],
            },
            ToServer,
            false,
            false,
        ),
        ex(
            Message::BlobStatus {
                request: 1,
                present: vec![],
            },
            ToAgent,
            false,
            false,
        ),
        ex(
            Message::FileList {
                request: 2,
                root: FileRoot::Workspace,
            },
            ToServer,
            false,
            false,
        ),
        ex(
            Message::FileListing {
                request: 2,
                writable: false,
                entries: vec![FileEntry {
                    path: "shared/readme.md".into(),
                    kind: FileKind::File,
                    size: 10,
                    mtime_ms: 1_700_000_000_000,
                    version: "9f86".into(),
                }],
                error: None,
            },
            ToAgent,
            false,
            false,
        ),
        ex(
            Message::FileRead {
                request: 3,
                root: FileRoot::Workspace,
                path: "shared/readme.md".into(),
                version: "9f86".into(),
                offset: 0,
                len: 10,
            },
            ToServer,
            false,
            false,
        ),
        ex(
            Message::FileData {
                request: 3,
                offset: 0,
                eof: true,
                error: None,
            },
            ToAgent,
            false,
            true,
        ),
    ]
}
