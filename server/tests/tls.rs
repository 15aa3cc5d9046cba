//! TLS handshakes between the agent's identity module and the server's PKI over a real
//! loopback TCP socket: enrolment, mutual TLS, and each way a handshake is refused.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nbagent::identity::{
    self, Identity, ServerTrust, TlsRefusal, client_config, describe_tls_error,
    generate_key_and_csr,
};
use nbserver::pki::{self, CertificateAuthority, load_or_issue_server_cert, peer_agent_name};
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Guard against a hung test; never used to wait for something to happen.
const GUARD: Duration = Duration::from_secs(20);

/// What the server saw on its one connection.
#[derive(Debug)]
enum ServerSaw {
    /// Handshake completed; the peer's agent name, if it presented a certificate.
    Peer(Option<String>),
    /// Handshake failed.
    Refused(std::io::Error),
}

struct Server {
    addr: SocketAddr,
    task: JoinHandle<ServerSaw>,
}

/// Accepts one connection; after the handshake writes the peer's name (or `-`) and closes.
async fn serve_once(config: Arc<rustls::ServerConfig>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let name = peer_agent_name(tls.get_ref().1.peer_certificates().unwrap_or(&[]));
                let line = format!("{}\n", name.as_deref().unwrap_or("-"));
                tls.write_all(line.as_bytes()).await.unwrap();
                tls.shutdown().await.unwrap();
                ServerSaw::Peer(name)
            }
            Err(e) => ServerSaw::Refused(e),
        }
    });
    Server { addr, task }
}

/// Connects, then reads what the server says: `Ok(line)` or the I/O error of the
/// handshake or of the first read (TLS 1.3 reports client-certificate refusals there).
async fn connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<String, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = TlsConnector::from(config).connect(server_name, tcp).await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

async fn round(
    server_config: Arc<rustls::ServerConfig>,
    name: &str,
    client: Arc<rustls::ClientConfig>,
) -> (Result<String, std::io::Error>, ServerSaw) {
    let server = serve_once(server_config).await;
    let client = tokio::time::timeout(GUARD, connect(server.addr, name, client))
        .await
        .expect("client hung");
    let saw = tokio::time::timeout(GUARD, server.task)
        .await
        .expect("server hung")
        .unwrap();
    (client, saw)
}

fn server_names() -> Vec<String> {
    vec!["127.0.0.1".to_owned(), "localhost".to_owned()]
}

fn server_tls(dir: &Path) -> (CertificateAuthority, Arc<rustls::ServerConfig>) {
    let ca = CertificateAuthority::load_or_create(dir).unwrap();
    let cert = load_or_issue_server_cert(dir, &ca, &server_names()).unwrap();
    let config = pki::server_config(&ca, &cert).unwrap();
    (ca, config)
}

/// Enrols an agent named `name` at the PKI level, valid for `validity` from `now`.
fn enrol(
    ca: &CertificateAuthority,
    dir: &Path,
    name: &str,
    validity: Duration,
    now: OffsetDateTime,
) -> Identity {
    let (key, csr) = generate_key_and_csr().unwrap();
    let issued = ca.sign_agent_csr(&csr, name, validity, now).unwrap();
    Identity::store(dir, key.as_str(), &issued.cert_pem, ca.cert_pem()).unwrap()
}

/// The rustls error behind the server's failed handshake.
fn server_error(saw: &ServerSaw) -> &rustls::Error {
    match saw {
        ServerSaw::Refused(e) => e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .unwrap_or_else(|| panic!("not a TLS error: {e:?}")),
        ServerSaw::Peer(name) => panic!("expected a refusal, the server accepted {name:?}"),
    }
}

fn refusal(result: &Result<String, std::io::Error>) -> TlsRefusal {
    match result {
        Ok(line) => panic!("expected a refusal, the server answered {line:?}"),
        Err(e) => describe_tls_error(e),
    }
}

#[tokio::test]
async fn enrolment_then_mutual_tls() {
    let data = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let agent_dir = agent_dir.path().join("identity");
    let (ca, server) = server_tls(data.path());

    // Enrolment connection: no client certificate, the CA file as an orchestrator would
    // mount it. The handshake succeeds and the server sees no agent name.
    let trust = ServerTrust::CaFile(data.path().join(pki::CA_CERT_FILE));
    assert!(Identity::load(&agent_dir).unwrap().is_none());
    let anonymous = client_config(&trust, None).unwrap();
    let (client, saw) = round(server.clone(), "127.0.0.1", anonymous).await;
    assert_eq!(client.unwrap(), "-\n");
    assert!(matches!(saw, ServerSaw::Peer(None)), "{saw:?}");

    // The server signs the CSR; the agent stores and reloads its identity.
    let now = OffsetDateTime::now_utc();
    enrol(&ca, &agent_dir, "agent-42", Duration::from_secs(3600), now);
    let identity = Identity::load(&agent_dir).unwrap().unwrap();
    assert_eq!(identity.agent_name().as_deref(), Some("agent-42"));
    assert!(!identity.needs_renewal(now.unix_timestamp()));

    // Data connection: mutual TLS, over both names of the server certificate.
    for name in ["127.0.0.1", "localhost"] {
        let config = client_config(
            &ServerTrust::CaPem(identity.ca_pem().to_owned()),
            Some(&identity),
        )
        .unwrap();
        let (client, saw) = round(server.clone(), name, config).await;
        assert_eq!(client.unwrap(), "agent-42\n");
        assert!(
            matches!(&saw, ServerSaw::Peer(Some(n)) if n == "agent-42"),
            "{saw:?}"
        );
    }
}

#[tokio::test]
async fn expired_client_certificate_is_refused_as_expired() {
    let data = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let (ca, server) = server_tls(data.path());
    let two_days_ago = OffsetDateTime::now_utc() - Duration::from_secs(2 * 86400);
    let identity = enrol(
        &ca,
        agent_dir.path(),
        "old",
        Duration::from_secs(86400),
        two_days_ago,
    );
    let config = client_config(
        &ServerTrust::CaPem(ca.cert_pem().to_owned()),
        Some(&identity),
    )
    .unwrap();
    let (client, saw) = round(server, "127.0.0.1", config).await;
    assert_eq!(
        refusal(&client),
        TlsRefusal::ClientCertExpired,
        "{client:?}"
    );
    assert!(
        matches!(
            server_error(&saw),
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
        ),
        "{saw:?}"
    );
}

#[tokio::test]
async fn certificate_from_a_foreign_ca_is_refused_as_unknown_ca() {
    let data = tempfile::tempdir().unwrap();
    let foreign_data = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let (ca, server) = server_tls(data.path());
    let foreign = CertificateAuthority::load_or_create(foreign_data.path()).unwrap();
    let identity = enrol(
        &foreign,
        agent_dir.path(),
        "intruder",
        Duration::from_secs(3600),
        OffsetDateTime::now_utc(),
    );
    // The agent trusts the right server, but its certificate is from elsewhere.
    let config = client_config(
        &ServerTrust::CaPem(ca.cert_pem().to_owned()),
        Some(&identity),
    )
    .unwrap();
    let (client, saw) = round(server, "127.0.0.1", config).await;
    assert_eq!(
        refusal(&client),
        TlsRefusal::ClientCertUnknownCa,
        "{client:?}"
    );
    assert!(
        matches!(
            server_error(&saw),
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{saw:?}"
    );
}

#[tokio::test]
async fn after_a_reset_old_credentials_and_old_trust_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let (old_ca, _) = server_tls(data.path());
    let identity = enrol(
        &old_ca,
        agent_dir.path(),
        "agent-1",
        Duration::from_secs(3600),
        OffsetDateTime::now_utc(),
    );
    let old_pin = old_ca.fingerprint();

    let new_ca = CertificateAuthority::reset(data.path()).unwrap();
    let cert = load_or_issue_server_cert(data.path(), &new_ca, &server_names()).unwrap();
    let server = pki::server_config(&new_ca, &cert).unwrap();

    // The agent still trusts the old CA: it refuses the new server certificate.
    let config = client_config(
        &ServerTrust::CaPem(identity.ca_pem().to_owned()),
        Some(&identity),
    )
    .unwrap();
    let (client, saw) = round(server.clone(), "127.0.0.1", config).await;
    assert_eq!(
        refusal(&client),
        TlsRefusal::ServerCertUntrusted,
        "{client:?}"
    );
    assert!(
        matches!(server_error(&saw), rustls::Error::AlertReceived(_)),
        "{saw:?}"
    );

    // Same with the old fingerprint pinned.
    let config = client_config(&ServerTrust::Fingerprint(old_pin), None).unwrap();
    let (client, _) = round(server.clone(), "127.0.0.1", config).await;
    assert_eq!(
        refusal(&client),
        TlsRefusal::ServerCertUntrusted,
        "{client:?}"
    );

    // The agent was given the new CA but presents its old certificate: the server
    // refuses it as from an unknown CA, which tells the agent to re-enrol.
    let config = client_config(
        &ServerTrust::CaPem(new_ca.cert_pem().to_owned()),
        Some(&identity),
    )
    .unwrap();
    let (client, saw) = round(server, "127.0.0.1", config).await;
    assert_eq!(
        refusal(&client),
        TlsRefusal::ClientCertUnknownCa,
        "{client:?}"
    );
    assert!(
        matches!(
            server_error(&saw),
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{saw:?}"
    );
    assert!(
        TlsRefusal::ClientCertUnknownCa
            .to_string()
            .contains("re-enrol")
    );
}

#[tokio::test]
async fn fingerprint_pinning() {
    let data = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let (ca, server) = server_tls(data.path());

    // The right pin (upper case with colons is accepted too) verifies the server.
    let pin = ca.fingerprint();
    assert_eq!(identity::ca_fingerprint(ca.cert_pem()).unwrap(), pin);
    let fancy = pin
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    for p in [pin.clone(), fancy] {
        let config = client_config(&ServerTrust::Fingerprint(p), None).unwrap();
        let (client, saw) = round(server.clone(), "127.0.0.1", config).await;
        assert_eq!(client.unwrap(), "-\n");
        assert!(matches!(saw, ServerSaw::Peer(None)), "{saw:?}");
    }

    // Pinning also works for mutual TLS.
    let identity = enrol(
        &ca,
        agent_dir.path(),
        "pinned",
        Duration::from_secs(3600),
        OffsetDateTime::now_utc(),
    );
    let config = client_config(&ServerTrust::Fingerprint(pin.clone()), Some(&identity)).unwrap();
    let (client, _) = round(server.clone(), "localhost", config).await;
    assert_eq!(client.unwrap(), "pinned\n");

    // A wrong pin is refused.
    let mut wrong = pin.into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let config = client_config(&ServerTrust::Fingerprint(wrong), None).unwrap();
    let (client, saw) = round(server.clone(), "127.0.0.1", config).await;
    assert_eq!(
        refusal(&client),
        TlsRefusal::ServerCertUntrusted,
        "{client:?}"
    );
    assert!(
        matches!(server_error(&saw), rustls::Error::AlertReceived(_)),
        "{saw:?}"
    );

    // The right pin does not excuse a name the server certificate does not list.
    let config = client_config(&ServerTrust::Fingerprint(ca.fingerprint()), None).unwrap();
    let (client, _) = round(server, "nb.example", config).await;
    assert_eq!(
        refusal(&client),
        TlsRefusal::ServerNameMismatch,
        "{client:?}"
    );
}

#[tokio::test]
async fn wrong_server_name_is_refused_as_mismatch() {
    let data = tempfile::tempdir().unwrap();
    let (ca, server) = server_tls(data.path());
    let config = client_config(&ServerTrust::CaPem(ca.cert_pem().to_owned()), None).unwrap();
    let (client, saw) = round(server, "nb.example", config).await;
    assert_eq!(
        refusal(&client),
        TlsRefusal::ServerNameMismatch,
        "{client:?}"
    );
    assert!(
        matches!(
            server_error(&saw),
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate)
        ),
        "{saw:?}"
    );
    // The agent derives the name from its server address.
    assert_eq!(
        identity::server_name_for("127.0.0.1:7443")
            .unwrap()
            .to_str(),
        "127.0.0.1"
    );
}

#[test]
fn stored_key_is_private_and_a_readable_key_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let (ca, _) = server_tls(data.path());
    enrol(
        &ca,
        agent_dir.path(),
        "a",
        Duration::from_secs(3600),
        OffsetDateTime::now_utc(),
    );
    let key = agent_dir.path().join(identity::KEY_FILE);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&data.path().join(pki::CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&data.path().join(pki::SERVER_KEY_FILE)), 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Identity::load(agent_dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("0644") && msg.contains("agent.key"), "{msg}");
}
