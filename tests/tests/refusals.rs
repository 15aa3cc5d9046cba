//! Every refusal of the channel gives its own clear error: bad, replayed and expired
//! tokens, expired and foreign client certificates, plaintext when TLS is forced,
//! oversized frames, unsupported versions, and a data session without a certificate.
//! Real server, real TLS over loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use nbagent::channel::{self, Backoff, ChannelConfig, ChannelError, TokenSource};
use nbagent::identity::{self, Identity, ServerTrust, TlsRefusal};
use nbagent_protocol::io::{FrameReader, write_frame};
use nbagent_protocol::{ErrorCode, Frame, Limits, Message, SUPPORTED, VersionRange};
use nbserver::pki::CertificateAuthority;
use nbserver::store::NewToken;
use tokio::io::AsyncWriteExt;

struct Env {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    server: nbserver::RunningServer,
}

async fn server(force_tls: bool) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let mut config =
        nbserver::ServerConfig::new(dir.join("server"), "127.0.0.1:0".parse().unwrap());
    config.force_agent_tls = force_tls;
    config.max_payload = 64 * 1024;
    let server = nbserver::start(config).await.unwrap();
    Env {
        _tmp: tmp,
        dir,
        server,
    }
}

impl Env {
    fn agent(&self, name: &str) -> ChannelConfig {
        ChannelConfig {
            server: self.server.addr.to_string(),
            server_name: None,
            identity_dir: self.dir.join(name),
            trust: Some(ServerTrust::CaFile(self.dir.join("server/pki/ca.crt"))),
            token: TokenSource::default(),
            plaintext: false,
            backoff: Backoff::default(),
            window_bytes: 1 << 20,
            connect_timeout: Duration::from_secs(10),
            command_log: self.dir.join(name).with_extension("commands"),
        }
    }

    async fn token(&self, agent: &str, ttl: i64) -> String {
        let token = nbserver::pki::Token::generate();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.server
            .state
            .store
            .insert_token(&NewToken {
                id: token.id.clone(),
                secret_hash: token.secret_hash(),
                agent: agent.into(),
                created_at: now - 10,
                expires_at: now + ttl,
            })
            .await
            .unwrap();
        token.to_string()
    }
}

fn refused(r: Result<impl std::fmt::Debug, ChannelError>) -> (ErrorCode, String) {
    match r {
        Err(ChannelError::Refused { code, message }) => (code, message),
        Err(ChannelError::Protocol(nbagent_protocol::SessionError::Peer { code, message })) => {
            (code, message)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn tls_refusal(r: Result<impl std::fmt::Debug, ChannelError>) -> TlsRefusal {
    match r {
        Err(ChannelError::Tls(t)) => t,
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn tokens_unknown_replayed_expired_malformed() {
    let env = server(true).await;
    let cfg = env.agent("a1");

    let bogus = nbserver::pki::Token::generate().to_string();
    let (code, msg) = refused(channel::enroll(&cfg, &bogus).await);
    assert_eq!(code, ErrorCode::TokenUnknown);
    assert!(msg.contains("not known"), "{msg}");

    let (code, msg) = refused(channel::enroll(&cfg, "not-a-token").await);
    assert_eq!(code, ErrorCode::TokenUnknown);
    assert!(msg.contains("malformed"), "{msg}");

    let good = env.token("a1", 600).await;
    let id = channel::enroll(&cfg, &good)
        .await
        .expect("first use enrols");
    assert_eq!(id.agent_name().as_deref(), Some("a1"));
    let (code, msg) = refused(channel::enroll(&cfg, &good).await);
    assert_eq!(code, ErrorCode::TokenUsed);
    assert!(msg.contains("already used"), "{msg}");

    let expired = env.token("a2", -5).await;
    let (code, msg) = refused(channel::enroll(&env.agent("a2"), &expired).await);
    assert_eq!(code, ErrorCode::TokenExpired);
    assert!(msg.contains("expired"), "{msg}");

    // And the enrolled agent gets a data session under its certificate's name.
    let name = channel::probe(&cfg, "s-1").await.expect("mTLS session");
    assert_eq!(name, "a1");
}

#[tokio::test]
async fn expired_and_foreign_certificates() {
    let env = server(true).await;
    let ca_pem = std::fs::read_to_string(env.dir.join("server/pki/ca.crt")).unwrap();

    // Expired: signed by the right CA, but its life ended yesterday.
    let cfg = env.agent("old");
    let (key, csr) = identity::generate_key_and_csr().unwrap();
    let issued = {
        let ca = env.server.state.ca.read().await;
        ca.sign_agent_csr(
            &csr,
            "old",
            Duration::from_secs(3600),
            time::OffsetDateTime::now_utc() - time::Duration::days(2),
        )
        .unwrap()
    };
    Identity::store(&cfg.identity_dir, key.as_str(), &issued.cert_pem, &ca_pem).unwrap();
    let r = tls_refusal(channel::probe(&cfg, "s").await);
    assert_eq!(r, TlsRefusal::ClientCertExpired, "{r}");
    assert!(r.to_string().contains("expired"), "{r}");

    // Foreign: a valid certificate from another CA.
    let cfg = env.agent("foreign");
    let other = CertificateAuthority::load_or_create(&env.dir.join("other-ca")).unwrap();
    let (key, csr) = identity::generate_key_and_csr().unwrap();
    let issued = other
        .sign_agent_csr(
            &csr,
            "foreign",
            Duration::from_secs(3600),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    Identity::store(&cfg.identity_dir, key.as_str(), &issued.cert_pem, &ca_pem).unwrap();
    let r = tls_refusal(channel::probe(&cfg, "s").await);
    assert_eq!(r, TlsRefusal::ClientCertUnknownCa, "{r}");

    // And we refuse a server whose CA we do not trust.
    let mut cfg = env.agent("wary");
    cfg.trust = Some(ServerTrust::CaPem(other.cert_pem().to_owned()));
    let r = tls_refusal(channel::enroll(&cfg, "nbt1.000000000000.x").await);
    assert_eq!(r, TlsRefusal::ServerCertUntrusted, "{r}");
}

#[tokio::test]
async fn plaintext_refused_when_forced_and_accepted_otherwise() {
    let env = server(true).await;
    let mut cfg = env.agent("p");
    cfg.plaintext = true;
    cfg.token.value = Some(env.token("p", 600).await);
    let (code, msg) = refused(channel::probe(&cfg, "s").await);
    assert_eq!(code, ErrorCode::PlaintextRefused);
    assert!(msg.contains("requires TLS"), "{msg}");

    let env = server(false).await;
    let mut cfg = env.agent("legacy");
    cfg.plaintext = true;
    cfg.token.value = Some(env.token("legacy", 600).await);
    assert_eq!(channel::probe(&cfg, "s").await.expect("accepted"), "legacy");
    // Legacy agents present the same token on every connection.
    assert_eq!(channel::probe(&cfg, "s").await.expect("again"), "legacy");
}

/// A raw mutual-TLS connection of an enrolled agent, to send frames the real agent
/// never would.
async fn raw_session(
    env: &Env,
    name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = env.agent(name);
    let token = env.token(name, 600).await;
    let id = channel::enroll(&cfg, &token).await.unwrap();
    let client = identity::client_config(cfg.trust.as_ref().unwrap(), Some(&id)).unwrap();
    let tcp = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    let sn = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::clone(&client))
        .connect(sn, tcp)
        .await
        .unwrap()
}

async fn expect_error<S: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<S>,
) -> (ErrorCode, String) {
    loop {
        let raw = reader
            .read_frame()
            .await
            .unwrap()
            .expect("an error frame before close");
        if let Message::Error { code, message, .. } = raw.parse().unwrap().envelope.msg {
            return (code, message);
        }
    }
}

fn hello(versions: VersionRange) -> Frame {
    Frame::control(Message::Hello {
        versions,
        stream: "raw".into(),
        software: "test".into(),
        token: None,
        received: 0,
    })
}

#[tokio::test]
async fn oversized_frame_refused() {
    let env = server(true).await;
    let s = raw_session(&env, "big").await;
    let (rd, mut wr) = tokio::io::split(s);
    let mut reader = FrameReader::new(rd, Limits::default());
    write_frame(&mut wr, &hello(SUPPORTED)).await.unwrap();
    wr.flush().await.unwrap();
    let welcome = reader.read_frame().await.unwrap().unwrap().parse().unwrap();
    assert!(matches!(welcome.envelope.msg, Message::Welcome { .. }));
    // Announce a payload over the server's 64 KiB limit; send only the prefix.
    let mut b = BytesMut::new();
    b.extend_from_slice(&10u32.to_be_bytes());
    b.extend_from_slice(&(1u32 << 20).to_be_bytes());
    wr.write_all(&b).await.unwrap();
    wr.flush().await.unwrap();
    let (code, msg) = expect_error(&mut reader).await;
    assert_eq!(code, ErrorCode::FrameTooLarge);
    assert!(msg.contains("exceeds the limit"), "{msg}");
}

#[tokio::test]
async fn unsupported_version_and_missing_certificate_refused() {
    let env = server(true).await;
    let s = raw_session(&env, "future").await;
    let (rd, mut wr) = tokio::io::split(s);
    let mut reader = FrameReader::new(rd, Limits::default());
    write_frame(&mut wr, &hello(VersionRange::new(7, 9)))
        .await
        .unwrap();
    wr.flush().await.unwrap();
    let (code, msg) = expect_error(&mut reader).await;
    assert_eq!(code, ErrorCode::UnsupportedVersion);
    assert!(msg.contains("7..=9"), "{msg}");

    // A TLS connection without a client certificate may enrol but not open a session.
    let cfg = env.agent("anon");
    let client = identity::client_config(cfg.trust.as_ref().unwrap(), None).unwrap();
    let tcp = tokio::net::TcpStream::connect(env.server.addr)
        .await
        .unwrap();
    let sn = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let s = tokio_rustls::TlsConnector::from(client)
        .connect(sn, tcp)
        .await
        .unwrap();
    let (rd, mut wr) = tokio::io::split(s);
    let mut reader = FrameReader::new(rd, Limits::default());
    write_frame(&mut wr, &hello(SUPPORTED)).await.unwrap();
    wr.flush().await.unwrap();
    let (code, msg) = expect_error(&mut reader).await;
    assert_eq!(code, ErrorCode::Unauthenticated);
    assert!(msg.contains("enrol"), "{msg}");
}
