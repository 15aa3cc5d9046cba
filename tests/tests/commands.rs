//! Server -> agent commands are stored, numbered per agent, resent until acknowledged,
//! and processed by the agent at most once, across reconnects and agent restarts.
//! Real server and real mutual TLS over loopback, in one process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use nbagent::channel::{self, Backoff, ChannelConfig, ChannelStatus, TokenSource};
use nbagent::identity::ServerTrust;
use nbagent::outbox::{Outbox, OutboxConfig};
use nbagent::sender::Shared;
use nbagent_protocol::{Frame, Message};
use tokio::sync::{mpsc, watch};

struct Agent {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    commands: mpsc::Receiver<Frame>,
}

async fn start_agent(dir: &Path, server: &nbserver::RunningServer, token: &str) -> Agent {
    let outbox = Outbox::open(OutboxConfig::new(dir.join("outbox"))).unwrap();
    let shared = Shared::new(outbox, false);
    let (tx, commands) = mpsc::channel(64);
    let (status_tx, mut status) = watch::channel(ChannelStatus::Disconnected);
    let (stop, stop_rx) = watch::channel(false);
    let cfg = ChannelConfig {
        server: server.addr.to_string(),
        server_name: None,
        identity_dir: dir.join("identity"),
        trust: Some(ServerTrust::CaPem(
            server.state.ca.read().await.cert_pem().to_owned(),
        )),
        token: TokenSource {
            value: Some(token.to_owned()),
            file: None,
        },
        plaintext: false,
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        window_bytes: 1 << 20,
        connect_timeout: Duration::from_secs(10),
        command_log: dir.join("commands.received"),
    };
    let task = tokio::spawn(channel::run(cfg, shared, tx, status_tx, stop_rx));
    while !matches!(*status.borrow(), ChannelStatus::Connected { .. }) {
        status.changed().await.unwrap();
    }
    Agent {
        stop,
        task,
        commands,
    }
}

impl Agent {
    async fn stop(self) -> mpsc::Receiver<Frame> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.commands
    }
}

fn execute(i: u32) -> Message {
    Message::ExecuteCell {
        request: format!("r{i}"),
        cell: format!("c{i}"),
        code: format!("x = {i}"),
    }
}

async fn next(rx: &mut mpsc::Receiver<Frame>) -> (u64, String) {
    let f = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a command within 10 s")
        .expect("channel open");
    match f.envelope.msg {
        Message::ExecuteCell { request, .. } => (f.envelope.seq.unwrap(), request),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_arrive_once_in_order_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let config =
        nbserver::ServerConfig::new(tmp.path().join("server"), "127.0.0.1:0".parse().unwrap());
    let server = nbserver::start(config).await.unwrap();
    let token =
        nbserver::cli::create_token(&server.state.store, "cmd-agent", Duration::from_secs(60))
            .await
            .unwrap();

    // Queued before the agent ever connected.
    for i in 1..=3u32 {
        assert_eq!(
            server.state.submit("cmd-agent", &execute(i)).await.unwrap(),
            u64::from(i)
        );
    }
    // A message that is not a command is refused.
    assert!(
        server
            .state
            .submit("cmd-agent", &Message::Heartbeat { sent_ms: 0 })
            .await
            .is_err()
    );
    let agent_dir = tmp.path().join("agent");
    let mut agent = start_agent(&agent_dir, &server, &token.to_string()).await;
    for i in 1..=3u32 {
        assert_eq!(
            next(&mut agent.commands).await,
            (u64::from(i), format!("r{i}"))
        );
    }
    // Queued while connected: delivered at once.
    server.state.submit("cmd-agent", &execute(4)).await.unwrap();
    assert_eq!(next(&mut agent.commands).await, (4, "r4".into()));
    let acked = async {
        loop {
            if server
                .state
                .store
                .commands_acked("cmd-agent")
                .await
                .unwrap()
                == 4
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), acked)
        .await
        .expect("the agent acknowledges what it processed");

    // Agent restart: nothing is delivered twice; what was queued meanwhile arrives.
    let mut old = agent.stop().await;
    assert!(old.try_recv().is_err(), "no stray deliveries");
    server.state.submit("cmd-agent", &execute(5)).await.unwrap();
    server.state.submit("cmd-agent", &execute(6)).await.unwrap();
    let mut agent = start_agent(&agent_dir, &server, "unused: already enrolled").await;
    assert_eq!(next(&mut agent.commands).await, (5, "r5".into()));
    assert_eq!(next(&mut agent.commands).await, (6, "r6".into()));
    let mut rx = agent.stop().await;
    assert!(rx.try_recv().is_err(), "exactly the new commands");

    // The agent's record of processed commands survives it.
    let log = channel::CommandLog::load(agent_dir.join("commands.received")).unwrap();
    assert_eq!(log.stored(), 6);
    server.shutdown().await;
}
