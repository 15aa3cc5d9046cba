//! End to end over loopback TLS with the real binaries: an agent streams 100,000 outputs
//! and 50 MB of blobs while the server is SIGKILLed and restarted twice and the agent
//! once. Every message must be stored exactly once and in order, and nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nbagent::workload::{self, Workload};
use nbagent_protocol::Envelope;
use nbagent_tests::{Proc, bin, create_token, free_port, start_server, tail, wait_until};
use nbserver::store::Store;

fn agent_cmd(server: &str, state: &Path, ca: &Path, token: &str, w: &str) -> Command {
    let mut cmd = Command::new(bin("nbagent"));
    cmd.args(["--server", server])
        .arg("--state-dir")
        .arg(state)
        .arg("--server-ca")
        .arg(ca)
        .args([
            "--workload",
            w,
            "--exit-when-drained",
            "--max-backoff-secs",
            "1",
        ])
        .env("NBAGENT_TOKEN", token)
        .env("RUST_LOG", "info");
    cmd
}

/// Highest stored sequence number of the (only) stream, read from the server's SQLite
/// file by a separate connection while the server runs.
fn stored(rt: &tokio::runtime::Runtime, data: &Path) -> u64 {
    rt.block_on(async {
        let Ok(store) = Store::open_in(data).await else {
            return 0;
        };
        let n = store
            .streams()
            .await
            .ok()
            .and_then(|s| s.first().map(|s| s.stored))
            .unwrap_or(0);
        store.close().await;
        n
    })
}

#[test]
fn exactly_once_across_server_and_agent_kills() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let agent_state = tmp.path().join("agent");
    let addr = free_port();
    let spec = "outputs=100000,blobs=50,blob_bytes=1M";
    let w: Workload = spec.parse().unwrap();
    let plan = w.plan();
    let total = plan.len() as u64;

    let mut server = start_server(&data, addr, &["--heartbeat-ms", "1000"]);
    let token = create_token(&data, "durable-agent", 600);
    let ca = data.join("pki").join("ca.crt");
    let agent_log = tmp.path().join("agent.log");
    let mut agent = Proc::spawn(
        "nbagent",
        agent_cmd(&addr.to_string(), &agent_state, &ca, &token, spec),
        &agent_log,
    );

    // Kill points, as fractions of the plan. Each kill must happen while data is still
    // flowing, or the test would prove nothing.
    let mut kills = Vec::new();
    for (i, frac) in [0.10, 0.35, 0.60].into_iter().enumerate() {
        let target = (total as f64 * frac) as u64;
        assert!(
            wait_until(Duration::from_secs(120), || stored(&rt, &data) >= target),
            "no progress to {target}/{total}; agent log:\n{}\nserver log:\n{}",
            tail(&agent_log, 30),
            tail(&data.with_extension("log"), 30)
        );
        let at = stored(&rt, &data);
        kills.push(at);
        assert!(
            at < total,
            "workload finished before kill {i}: raise the workload"
        );
        if i == 1 {
            agent.kill9();
            agent = Proc::spawn(
                "nbagent",
                agent_cmd(&addr.to_string(), &agent_state, &ca, &token, spec),
                &agent_log,
            );
        } else {
            server.kill9();
            server = start_server(&data, addr, &["--heartbeat-ms", "1000"]);
        }
    }

    let status = agent.wait_timeout(Duration::from_secs(300));
    assert!(
        matches!(status, Some(s) if s.success()),
        "agent did not finish cleanly ({status:?}); log:\n{}",
        tail(&agent_log, 40)
    );
    server.terminate();

    // Verify: exactly the plan, in order, byte-identical headers, every blob intact.
    rt.block_on(async {
        let store = Store::open_in(&data).await.unwrap();
        let streams = store.streams().await.unwrap();
        assert_eq!(streams.len(), 1, "one stream, nothing else: {streams:?}");
        let s = &streams[0];
        assert_eq!(s.stored, total);
        assert_eq!(s.messages, total, "exactly one row per message");
        let mut cache = None;
        let mut after = 0;
        let mut hashes = Vec::new();
        while after < total {
            let batch = store
                .messages(&s.agent, &s.stream, after, 5000)
                .await
                .unwrap();
            assert!(!batch.is_empty(), "missing messages after {after}");
            for m in batch {
                assert_eq!(m.seq, after + 1, "in order, no gaps");
                let (msg, _) = workload::message(&w, plan[after as usize], &mut cache);
                if let nbagent_protocol::Message::BlobChunk { hash, .. } = &msg
                    && hashes.last() != Some(hash)
                {
                    hashes.push(hash.clone());
                }
                let want = nbagent_protocol::codec::encode_header(&Envelope {
                    seq: Some(m.seq),
                    msg,
                });
                assert_eq!(m.header.as_bytes(), &want[..], "message {} differs", m.seq);
                after = m.seq;
            }
        }
        assert_eq!(hashes.len(), 50);
        let blobs = nbserver::blobs::BlobStore::open(data.join("blobs")).unwrap();
        for h in &hashes {
            let bytes = blobs.read(h).unwrap();
            assert_eq!(bytes.len(), 1 << 20);
            assert_eq!(&workload::sha256_hex(&bytes), h);
            assert!(store.blob(h).await.unwrap().is_some(), "blob {h} recorded");
        }
        store.close().await;
    });
    eprintln!("kills at stored seq {kills:?} of {total}");
}
