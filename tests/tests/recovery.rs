//! Recovery end to end, with the real binaries: an agent re-enrols after the server's
//! secrets are reset, without losing its stream; and an agent whose server is away fills
//! its bounded outbox, waits (saying so), and delivers everything once the server comes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nbagent_tests::{Proc, bin, create_token, free_port, start_server, tail, wait_until};
use nbserver::store::Store;

fn stream_state(rt: &tokio::runtime::Runtime, data: &Path) -> Vec<(String, u64, u64)> {
    rt.block_on(async {
        let Ok(store) = Store::open_in(data).await else {
            return Vec::new();
        };
        let s = store
            .streams()
            .await
            .map(|v| {
                v.into_iter()
                    .map(|s| (s.agent, s.stored, s.messages))
                    .collect()
            })
            .unwrap_or_default();
        store.close().await;
        s
    })
}

fn stored(rt: &tokio::runtime::Runtime, data: &Path) -> u64 {
    stream_state(rt, data).first().map_or(0, |s| s.1)
}

#[test]
fn agent_reenrols_after_secrets_reset_and_keeps_its_stream() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let addr = free_port();
    let spec = "outputs=30000,blobs=4,blob_bytes=512k";
    let total = spec
        .parse::<nbagent::workload::Workload>()
        .unwrap()
        .plan()
        .len() as u64;

    let mut server = start_server(&data, addr, &["--heartbeat-ms", "500"]);
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, create_token(&data, "nb-7", 600)).unwrap();
    let log = tmp.path().join("agent.log");
    let mut cmd = Command::new(bin("nbagent"));
    cmd.args(["--server", &addr.to_string()])
        .arg("--state-dir")
        .arg(tmp.path().join("agent"))
        .arg("--server-ca")
        .arg(data.join("pki/ca.crt"))
        .arg("--token-file")
        .arg(&token_file)
        .args([
            "--workload",
            spec,
            "--exit-when-drained",
            "--max-backoff-secs",
            "1",
        ]);
    let mut agent = Proc::spawn("nbagent", cmd, &log);

    assert!(
        wait_until(Duration::from_secs(60), || stored(&rt, &data) >= total / 10),
        "no progress; agent log:\n{}",
        tail(&log, 30)
    );
    server.terminate();
    let before = stored(&rt, &data);
    assert!(
        before < total,
        "workload finished before the reset: raise it"
    );

    let out = Command::new(bin("nbserver"))
        .arg("--data-dir")
        .arg(&data)
        .arg("reset-secrets")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut server = start_server(&data, addr, &["--heartbeat-ms", "500"]);

    // The old certificate is refused and the used token is refused: the agent says so
    // and waits for a new token, keeping everything.
    assert!(
        wait_until(Duration::from_secs(60), || {
            let l = std::fs::read_to_string(&log).unwrap_or_default();
            l.contains("will enrol again") && l.contains("token refused")
        }),
        "agent did not report the refused certificate and token; log:\n{}",
        tail(&log, 30)
    );
    assert_eq!(
        stored(&rt, &data),
        before,
        "nothing stored while not enrolled"
    );

    std::fs::write(&token_file, create_token(&data, "nb-7", 600)).unwrap();
    let status = agent.wait_timeout(Duration::from_secs(120));
    assert!(
        matches!(status, Some(s) if s.success()),
        "agent did not finish ({status:?}); log:\n{}",
        tail(&log, 40)
    );
    server.terminate();
    let streams = stream_state(&rt, &data);
    assert_eq!(streams.len(), 1, "the same stream continued: {streams:?}");
    assert_eq!(streams[0], ("nb-7".to_owned(), total, total));
}

#[test]
fn full_outbox_waits_for_the_server_and_loses_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let addr = free_port();
    let spec = "outputs=20000,blobs=0";
    let total = 20_000;
    let token = create_token(&data, "nb-full", 600);
    let log = tmp.path().join("agent.log");
    let mut cmd = Command::new(bin("nbagent"));
    cmd.args(["--server", &addr.to_string()])
        .arg("--state-dir")
        .arg(tmp.path().join("agent"))
        .arg("--server-ca")
        .arg(data.join("pki/ca.crt"))
        .args(["--outbox-max-bytes", "262144"])
        .args([
            "--workload",
            spec,
            "--exit-when-drained",
            "--max-backoff-secs",
            "1",
        ])
        .env("NBAGENT_TOKEN", &token);
    let mut agent = Proc::spawn("nbagent", cmd, &log);

    // No server yet: the outbox fills up to its bound and the agent says it is waiting.
    assert!(
        wait_until(Duration::from_secs(60), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("outbox full")
        }),
        "agent never reported a full outbox; log:\n{}",
        tail(&log, 30)
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "agent waits, it does not exit"
    );
    let outbox_bytes: u64 = std::fs::read_dir(tmp.path().join("agent/outbox"))
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    assert!(
        outbox_bytes <= 262_144 + 64 * 1024,
        "outbox stays near its bound: {outbox_bytes} bytes"
    );

    let mut server = start_server(&data, addr, &["--heartbeat-ms", "500"]);
    let status = agent.wait_timeout(Duration::from_secs(120));
    assert!(
        matches!(status, Some(s) if s.success()),
        "agent did not finish ({status:?}); log:\n{}",
        tail(&log, 40)
    );
    server.terminate();
    let streams = stream_state(&rt, &data);
    assert_eq!(streams, vec![("nb-full".to_owned(), total, total)]);
}
