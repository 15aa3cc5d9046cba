//! Keeps `docs/protocol.md` exact: the worked example's JSON headers and hex dump are
//! generated here from the real types, and the document must contain them verbatim, as
//! well as every message type and every error code.
//!
//! To regenerate the example after changing a message:
//! `cargo test -p nbagent-protocol --test doc_examples -- --ignored --nocapture`

mod common;

use bytes::{Bytes, BytesMut};
use nbagent_protocol::codec::encode_raw;
use nbagent_protocol::{
    AgentEvent, AgentSession, CellStatus, Envelope, Feature, Frame, KernelState, Message,
    OutputContent, Receipt, SUPPORTED, SendWindow, ServerEvent, ServerSession, VersionRange,
};
use serde_json::json;
use sha2::{Digest, Sha256};

const DOC: &str = include_str!("../../docs/protocol.md");

/// One line of the transcript: who sends, the header, and the payload if any.
struct Line {
    from: &'static str,
    frame: Frame,
}

fn line(from: &'static str, seq: Option<u64>, msg: Message, payload: &'static [u8]) -> Line {
    Line {
        from,
        frame: Frame {
            envelope: Envelope { seq, msg },
            payload: Bytes::from_static(payload),
        },
    }
}

const PNG: &[u8] = b"\x89PNG\r\n";

fn blob_hash() -> String {
    Sha256::digest(PNG)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn enrolment() -> Vec<Line> {
    vec![
        line(
            "agent",
            None,
            Message::Enroll {
                versions: VersionRange::new(1, 1),
                token: "nbt1.7Qm2xK.Zt4v8Jc0n1W5yQ3e".into(),
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nMIIBFTCBvAIBADAA...\n-----END CERTIFICATE REQUEST-----\n".into(),
                software: "nbagent 0.1.0".into(),
            },
            b"",
        ),
        line(
            "server",
            None,
            Message::Enrolled {
                version: 1,
                agent: "agent-7Qm2xK".into(),
                certificate_pem: "-----BEGIN CERTIFICATE-----\nMIIBczCCARmgAwIBAgIU...\n-----END CERTIFICATE-----\n".into(),
                ca_pem: "-----BEGIN CERTIFICATE-----\nMIIBeDCCAR6gAwIBAgIU...\n-----END CERTIFICATE-----\n".into(),
                not_after: 1_767_312_000,
            },
            b"",
        ),
        line(
            "agent",
            None,
            Message::Goodbye {
                reason: "enrolled".into(),
            },
            b"",
        ),
    ]
}

fn hello(received: u64) -> Line {
    line(
        "agent",
        None,
        Message::Hello {
            versions: SUPPORTED,
            stream: "st-4f1c9a".into(),
            software: "nbagent 0.1.0".into(),
            token: None,
            received,
        },
        b"",
    )
}

fn welcome(acked: u64) -> Line {
    line(
        "server",
        None,
        Message::Welcome {
            version: 1,
            agent: "agent-7Qm2xK".into(),
            acked,
            heartbeat_ms: 15_000,
            max_payload: 16 << 20,
            tls: true,
        },
        b"",
    )
}

fn output_image() -> Message {
    Message::Output {
        request: "run-1".into(),
        cell: "c1".into(),
        output: OutputContent::DisplayData {
            data: json!({"image/png": {"blob": blob_hash()}, "text/plain": "<Figure>"}),
            metadata: json!({}),
            display_id: None,
        },
    }
}

fn cell_finished() -> Message {
    Message::CellFinished {
        request: "run-1".into(),
        cell: "c1".into(),
        status: CellStatus::Ok,
        execution_count: Some(1),
        duration_ms: 212,
    }
}

/// The first data connection, up to the point where it breaks.
fn first_connection() -> Vec<Line> {
    vec![
        hello(0),
        welcome(0),
        line(
            "agent",
            Some(1),
            Message::Capabilities {
                features: vec![
                    Feature {
                        name: "checkpoint".into(),
                        enabled: true,
                        detail: "criu 4.2.1".into(),
                        how_to_enable: String::new(),
                    },
                    Feature {
                        name: "fuse_mount".into(),
                        enabled: false,
                        detail: "/dev/fuse is missing".into(),
                        how_to_enable:
                            "run the container with --device /dev/fuse and CAP_SYS_ADMIN".into(),
                    },
                ],
            },
            b"",
        ),
        line(
            "agent",
            Some(2),
            Message::KernelStatus {
                state: KernelState::Idle,
                detail: String::new(),
            },
            b"",
        ),
        line(
            "server",
            Some(1),
            Message::ExecuteCell {
                request: "run-1".into(),
                cell: "c1".into(),
                code: "print(\"hi\"); plot()".into(),
            },
            b"",
        ),
        line(
            "agent",
            Some(3),
            Message::CellStarted {
                request: "run-1".into(),
                cell: "c1".into(),
                started_ms: 1_767_225_600_000,
            },
            b"",
        ),
        line(
            "agent",
            Some(4),
            Message::Output {
                request: "run-1".into(),
                cell: "c1".into(),
                output: OutputContent::Stream {
                    name: "stdout".into(),
                    text: "hi\n".into(),
                },
            },
            b"",
        ),
        line(
            "agent",
            Some(5),
            Message::BlobChunk {
                hash: blob_hash(),
                media_type: "image/png".into(),
                offset: 0,
                total: 6,
            },
            b"\x89PN",
        ),
        line(
            "agent",
            Some(6),
            Message::BlobChunk {
                hash: blob_hash(),
                media_type: "image/png".into(),
                offset: 3,
                total: 6,
            },
            b"G\r\n",
        ),
        line("server", None, Message::Ack { upto: 5 }, b""),
        line("agent", Some(7), output_image(), b""),
        line("agent", Some(8), cell_finished(), b""),
    ]
}

/// The reconnect: the server has stored up to 5 and resumes there.
fn second_connection() -> Vec<Line> {
    vec![
        hello(1),
        welcome(5),
        line(
            "agent",
            Some(6),
            Message::BlobChunk {
                hash: blob_hash(),
                media_type: "image/png".into(),
                offset: 3,
                total: 6,
            },
            b"G\r\n",
        ),
        line("agent", Some(7), output_image(), b""),
        line("agent", Some(8), cell_finished(), b""),
        line("server", None, Message::Ack { upto: 8 }, b""),
        line(
            "agent",
            None,
            Message::Heartbeat {
                sent_ms: 1_767_225_615_000,
            },
            b"",
        ),
        line(
            "server",
            None,
            Message::Heartbeat {
                sent_ms: 1_767_225_615_004,
            },
            b"",
        ),
        line(
            "agent",
            None,
            Message::Goodbye {
                reason: "shutdown".into(),
            },
            b"",
        ),
    ]
}

fn header(frame: &Frame) -> String {
    String::from_utf8(frame.to_raw().header.to_vec()).expect("headers are UTF-8")
}

/// The hex dump of the `ack` frame shown in the document, `xxd`-like.
fn hex_dump() -> String {
    let raw = Frame::control(Message::Ack { upto: 8 }).to_raw();
    let mut wire = BytesMut::new();
    encode_raw(&raw.header, &raw.payload, &mut wire);
    let mut out = String::new();
    for (i, row) in wire.chunks(16).enumerate() {
        let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = row
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!("{:08x}  {:<47}  {text}\n", i * 16, hex.join(" ")));
    }
    out
}

fn all_lines() -> Vec<Line> {
    let mut v = enrolment();
    v.extend(first_connection());
    v.extend(second_connection());
    v
}

#[test]
#[ignore = "prints the worked example for docs/protocol.md"]
fn print_doc_examples() {
    for (title, lines) in [
        ("enrolment", enrolment()),
        ("first connection", first_connection()),
        ("second connection", second_connection()),
    ] {
        println!("--- {title}");
        for l in lines {
            let payload = if l.frame.payload.is_empty() {
                String::new()
            } else {
                format!("   + payload {:02x?}", &l.frame.payload[..])
            };
            println!("{:<6} {}{payload}", l.from, header(&l.frame));
        }
    }
    println!("--- hex\n{}", hex_dump());
}

#[test]
fn document_contains_the_generated_example() {
    for l in all_lines() {
        let h = header(&l.frame);
        assert!(DOC.contains(&h), "docs/protocol.md lacks the header\n{h}");
    }
    for row in hex_dump().lines() {
        assert!(
            DOC.contains(row),
            "docs/protocol.md lacks the hex row\n{row}"
        );
    }
    assert!(DOC.contains(&blob_hash()));
}

#[test]
fn document_lists_every_message_type_and_error_code() {
    for t in common::all_message_types() {
        assert!(DOC.contains(&format!("| `{t}` |")), "catalogue lacks `{t}`");
    }
    for c in common::all_error_codes() {
        assert!(
            DOC.contains(&format!("| `{c}` |")),
            "error table lacks `{c}`"
        );
    }
    for k in common::all_output_kinds() {
        assert!(DOC.contains(&format!("`{k}`")), "output kinds lack `{k}`");
    }
}

#[test]
fn document_limits_match_the_code() {
    use nbagent_protocol::codec::{DEFAULT_MAX_HEADER, DEFAULT_MAX_PAYLOAD};
    assert_eq!(DEFAULT_MAX_HEADER, 1_048_576);
    assert_eq!(DEFAULT_MAX_PAYLOAD, 16_777_216);
    assert_eq!(nbagent_protocol::CHUNK_SIZE, 1_048_576);
    for s in ["1 MiB (1 048 576 bytes)", "16 MiB (16 777 216 bytes)"] {
        assert!(DOC.contains(s), "docs/protocol.md lacks {s}");
    }
}

/// The example is a valid exchange: the real state machines accept it, with the
/// outcomes the document describes (including the duplicate on reconnect).
#[test]
fn the_worked_example_is_accepted_by_the_state_machines() {
    // Enrolment connection.
    let mut server = ServerSession::new(SUPPORTED);
    let mut agent = AgentSession::new(SUPPORTED, SendWindow::default());
    for l in enrolment() {
        match l.from {
            "agent" => {
                server.on_frame(&l.frame).expect("server accepts");
            }
            _ => assert_eq!(
                agent.on_frame(&l.frame).expect("agent accepts"),
                AgentEvent::Enrolled
            ),
        }
    }

    // First data connection: the server stores 1..=5 and acks 5, then stores 6 but
    // the connection breaks before it can ack it; 7 and 8 never arrive.
    let mut server = ServerSession::new(SUPPORTED);
    let mut agent = AgentSession::new(SUPPORTED, SendWindow::default());
    let mut stored_in_db = 0;
    for l in first_connection() {
        if l.from == "agent" {
            if let Some(seq) = l.frame.envelope.seq {
                if seq > 6 {
                    continue; // lost with the connection
                }
                assert_eq!(seq, agent.assign());
            }
            match server.on_frame(&l.frame).expect("server accepts") {
                ServerEvent::Hello { version } => server.established(version, stored_in_db),
                ServerEvent::Data { seq, receipt } => {
                    assert_eq!(receipt, Receipt::New);
                    server.commit(seq);
                    stored_in_db = seq;
                }
                _ => {}
            }
        } else {
            agent.on_frame(&l.frame).expect("agent accepts");
        }
    }
    assert_eq!(stored_in_db, 6);
    // The agent has assigned 8, 5 are acked.
    let window = SendWindow::resume(8, 5);

    // Second connection: welcome says 5 (computed before 6 was committed, which the
    // protocol allows: welcome.acked may lag what is stored, never lead it); the agent
    // resends 6, 7, 8; 6 is a duplicate and is dropped.
    let mut server = ServerSession::new(SUPPORTED);
    let mut agent = AgentSession::new(SUPPORTED, window);
    let mut receipts = Vec::new();
    for l in second_connection() {
        if l.from == "agent" {
            match server.on_frame(&l.frame).expect("server accepts") {
                ServerEvent::Hello { version } => server.established(version, 5),
                ServerEvent::Data { seq, receipt } => {
                    // The store is keyed by (agent, stream, seq): 6 is already there.
                    let receipt = if seq <= stored_in_db {
                        Receipt::Duplicate
                    } else {
                        receipt
                    };
                    if receipt == Receipt::New {
                        server.commit(seq);
                        stored_in_db = seq;
                    } else {
                        server.commit(seq); // it is stored; move past it
                    }
                    receipts.push((seq, receipt));
                }
                _ => {}
            }
        } else {
            match agent.on_frame(&l.frame).expect("agent accepts") {
                AgentEvent::Welcome { acked, .. } => assert_eq!(acked, 5),
                AgentEvent::Acked { upto, released } => {
                    assert_eq!((upto, released), (8, 3));
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        receipts,
        vec![
            (6, Receipt::Duplicate),
            (7, Receipt::New),
            (8, Receipt::New)
        ]
    );
    assert_eq!(agent.window().in_flight(), 0);
}
