//! The agent's credentials on disk and its TLS client configuration.
//!
//! An agent enrols once: it generates its own key ([`generate_key_and_csr`]), sends the
//! certificate signing request with a single-use token, and stores the returned client
//! certificate with the server's CA certificate ([`Identity::store`]). From then on it
//! connects with mutual TLS ([`client_config`]).
//!
//! The credentials live in a directory the kernel's user must never read: it is created
//! with mode 0700, every file is written with mode 0600 (atomically: temporary file and
//! rename), and [`Identity::load`] refuses a key file readable by group or others.
//!
//! Files: `agent.key` (PKCS#8 PEM), `agent.crt` (the client certificate, PEM) and
//! `ca.crt` (the server's CA, PEM). `agent.crt` is written last, so its presence marks a
//! completed enrolment.
//!
//! The agent verifies the server against a CA certificate ([`ServerTrust::CaFile`],
//! [`ServerTrust::CaPem`]) or, for the first connection, against a pinned SHA-256
//! fingerprint of the CA certificate ([`ServerTrust::Fingerprint`]); the server sends
//! its CA certificate in its chain for that purpose. The TLS server name is the host
//! part of the server address (an IP address or a DNS name).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use sha2::{Digest, Sha256};

/// File name of the agent's private key.
pub const KEY_FILE: &str = "agent.key";
/// File name of the agent's client certificate.
pub const CERT_FILE: &str = "agent.crt";
/// File name of the server's CA certificate.
pub const CA_FILE: &str = "ca.crt";

/// Errors of the identity module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file or directory could not be read, written or created.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The private key file can be read by group or others.
    #[error(
        "key file {path} has mode {mode:04o}, readable by group or others; \
         run `chmod 600 {path}` or re-enrol"
    )]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The enrolment is incomplete: the certificate exists but a companion file does not.
    #[error("identity in {dir} is incomplete: {missing} is missing; re-enrol with a new token")]
    Incomplete {
        /// The identity directory.
        dir: PathBuf,
        /// The missing file name.
        missing: &'static str,
    },
    /// A key or certificate (from disk or from the server) could not be parsed.
    #[error("{what} is not valid")]
    BadPem {
        /// What it should be (and where it came from).
        what: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The client certificate is not for the agent's key.
    #[error("the client certificate does not match the agent's private key")]
    KeyMismatch,
    /// Generating the key or the CSR failed.
    #[error("cannot generate the {what}")]
    Generate {
        /// The key or the CSR.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// A pinned fingerprint is not 64 hex characters.
    #[error("the CA fingerprint must be 64 hex characters (SHA-256 of the CA certificate)")]
    BadFingerprint,
    /// The CA certificate cannot be used as a trust anchor.
    #[error("the CA certificate cannot be used as a trust anchor")]
    BadTrustAnchor {
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
    /// The rustls client configuration could not be built.
    #[error("cannot build the TLS client configuration")]
    Tls {
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A private key in PEM (PKCS#8). Its `Debug` does not show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPairPem(String);

impl KeyPairPem {
    /// The PEM text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyPairPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyPairPem(<redacted>)")
    }
}

/// Generates a new ECDSA P-256 key and a certificate signing request for it (PEM). The
/// CSR's subject is a placeholder: the server chooses the agent's name.
pub fn generate_key_and_csr() -> Result<(KeyPairPem, String), IdentityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
        IdentityError::Generate {
            what: "key",
            source,
        }
    })?;
    let csr = csr_for(&key)?;
    Ok((KeyPairPem(key.serialize_pem()), csr))
}

fn csr_for(key: &KeyPair) -> Result<String, IdentityError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "nbagent");
    params.distinguished_name = dn;
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|source| IdentityError::Generate {
            what: "certificate signing request",
            source,
        })
}

/// The agent's credentials: its key pair, its client certificate and the server's CA.
#[derive(Clone)]
pub struct Identity {
    key_pem: String,
    cert_pem: String,
    ca_pem: String,
    cert_der: CertificateDer<'static>,
    not_before: i64,
    not_after: i64,
    agent_name: Option<String>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("agent_name", &self.agent_name)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the identity from `dir`; `None` if the agent never enrolled (no
    /// `agent.crt`). Refuses a key file readable by group or others.
    pub fn load(dir: &Path) -> Result<Option<Identity>, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        if !exists(&cert_path)? {
            return Ok(None);
        }
        let key_path = dir.join(KEY_FILE);
        let ca_path = dir.join(CA_FILE);
        for (path, name) in [(&key_path, KEY_FILE), (&ca_path, CA_FILE)] {
            if !exists(path)? {
                return Err(IdentityError::Incomplete {
                    dir: dir.to_owned(),
                    missing: name,
                });
            }
        }
        check_key_mode(&key_path)?;
        let key_pem = read_to_string(&key_path)?;
        let cert_pem = read_to_string(&cert_path)?;
        let ca_pem = read_to_string(&ca_path)?;
        let identity = Self::parse(key_pem, cert_pem, ca_pem)?;
        tracing::debug!(dir = %dir.display(), agent = ?identity.agent_name,
            not_after = identity.not_after, "loaded agent identity");
        Ok(Some(identity))
    }

    /// Validates and stores a new identity in `dir` (created with mode 0700), each file
    /// written atomically with mode 0600. The certificate must match the key.
    pub fn store(
        dir: &Path,
        key_pem: &str,
        cert_pem: &str,
        ca_pem: &str,
    ) -> Result<Identity, IdentityError> {
        let identity = Self::parse(key_pem.to_owned(), cert_pem.to_owned(), ca_pem.to_owned())?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| IdentityError::Io {
                action: "create directory",
                path: dir.to_owned(),
                source,
            })?;
        // An existing directory may have been created by someone else with a looser mode.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            IdentityError::Io {
                action: "set the mode of",
                path: dir.to_owned(),
                source,
            }
        })?;
        // The certificate goes last: its presence marks a complete enrolment.
        write_atomic(&dir.join(CA_FILE), ca_pem.as_bytes())?;
        write_atomic(&dir.join(KEY_FILE), key_pem.as_bytes())?;
        write_atomic(&dir.join(CERT_FILE), cert_pem.as_bytes())?;
        tracing::info!(dir = %dir.display(), agent = ?identity.agent_name,
            not_after = identity.not_after, "stored agent identity");
        Ok(identity)
    }

    fn parse(key_pem: String, cert_pem: String, ca_pem: String) -> Result<Self, IdentityError> {
        let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::BadPem {
            what: "the agent's private key".into(),
            source: Box::new(e),
        })?;
        let cert_der = parse_cert(&cert_pem, "the client certificate")?;
        parse_cert(&ca_pem, "the CA certificate")?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| IdentityError::BadPem {
                what: "the client certificate".into(),
                source: Box::new(e),
            })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(IdentityError::KeyMismatch);
        }
        let agent_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        Ok(Self {
            key_pem,
            cert_pem,
            ca_pem,
            cert_der,
            not_before,
            not_after,
            agent_name,
        })
    }

    /// Expiry of the client certificate, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Start of the client certificate's validity, Unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// A CSR for the same key, to renew the certificate before it expires.
    pub fn renewal_csr(&self) -> Result<String, IdentityError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| IdentityError::BadPem {
            what: "the agent's private key".into(),
            source: Box::new(e),
        })?;
        csr_for(&key)
    }

    /// Stores a renewed certificate for the key already in `dir`.
    pub fn complete_renewal(dir: &Path, cert_pem: &str) -> Result<Identity, IdentityError> {
        let current = Self::load(dir)?.ok_or_else(|| IdentityError::Incomplete {
            dir: dir.to_owned(),
            missing: CERT_FILE,
        })?;
        Self::store(dir, &current.key_pem, cert_pem, &current.ca_pem)
    }

    /// The agent's name (the certificate's common name, chosen by the server).
    pub fn agent_name(&self) -> Option<String> {
        self.agent_name.clone()
    }

    /// The client certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The server's CA certificate, PEM (use as [`ServerTrust::CaPem`]).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Whether the certificate is past two thirds of its lifetime at `now` (Unix
    /// seconds) and should be renewed.
    pub fn needs_renewal(&self, now: i64) -> bool {
        let lifetime = self.not_after.saturating_sub(self.not_before).max(0);
        let renew_at = self.not_before.saturating_add(lifetime / 3 * 2);
        now >= renew_at
    }
}

/// How the agent verifies the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// A PEM file holding the CA certificate (as an orchestrator would mount it).
    CaFile(PathBuf),
    /// The CA certificate, PEM.
    CaPem(String),
    /// The SHA-256 fingerprint (hex, `:` separators allowed) of the CA certificate's DER
    /// encoding. The server's chain must include that CA certificate, and the server's
    /// certificate must verify against it.
    Fingerprint(String),
}

/// Builds the agent's TLS client configuration: verifies the server according to
/// `trust` and, with an `identity`, presents the client certificate (mutual TLS);
/// without one, only enrolment is possible.
pub fn client_config(
    trust: &ServerTrust,
    identity: Option<&Identity>,
) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| IdentityError::Tls { source })?;
    let builder = match trust {
        ServerTrust::CaFile(path) => {
            let pem = read_to_string(path)?;
            builder.with_root_certificates(roots_from_pem(&pem, &path.display().to_string())?)
        }
        ServerTrust::CaPem(pem) => builder.with_root_certificates(roots_from_pem(pem, "")?),
        ServerTrust::Fingerprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(pin)?)),
    };
    let config = match identity {
        Some(identity) => {
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).map_err(|e| {
                IdentityError::BadPem {
                    what: "the agent's private key".into(),
                    source: Box::new(e),
                }
            })?;
            builder
                .with_client_auth_cert(vec![identity.cert_der.clone()], key)
                .map_err(|source| IdentityError::Tls { source })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn roots_from_pem(pem: &str, origin: &str) -> Result<RootCertStore, IdentityError> {
    let what = if origin.is_empty() {
        "the CA certificate".to_owned()
    } else {
        format!("the CA certificate in {origin}")
    };
    let mut roots = RootCertStore::empty();
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| IdentityError::BadPem {
            what: what.clone(),
            source: Box::new(e),
        })?;
        roots
            .add(cert)
            .map_err(|source| IdentityError::BadTrustAnchor { source })?;
        count += 1;
    }
    if count == 0 {
        return Err(IdentityError::BadPem {
            what,
            source: "no certificate found".into(),
        });
    }
    Ok(roots)
}

/// Lower-case hex SHA-256 of a CA certificate's DER encoding, from its PEM: the same
/// fingerprint the server prints and [`ServerTrust::Fingerprint`] pins. Use it to check
/// that the `ca_pem` received at enrolment is the pinned CA before storing it.
pub fn ca_fingerprint(ca_pem: &str) -> Result<String, IdentityError> {
    let der = parse_cert(ca_pem, "the CA certificate")?;
    Ok(hex::encode(Sha256::digest(der.as_ref())))
}

/// The pinned CA was not in the server's chain.
#[derive(Debug, thiserror::Error)]
#[error("the server's chain holds no CA certificate with the pinned fingerprint")]
struct PinMismatch;

/// Verifies the server against the CA certificate whose SHA-256 is pinned: the CA must
/// be in the presented chain, and the end-entity certificate must verify against it
/// (signature, validity, name, key usage) exactly as with a configured CA.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedCaVerifier {
    fn new(pin: &str) -> Result<Self, IdentityError> {
        let cleaned: String = pin.trim().chars().filter(|c| *c != ':').collect();
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&cleaned, &mut bytes).map_err(|_| IdentityError::BadFingerprint)?;
        Ok(Self {
            pin: bytes,
            provider: provider(),
        })
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref())[..] == self.pin[..])
        else {
            tracing::warn!(
                presented = intermediates.len(),
                "server chain does not contain the pinned CA"
            );
            return Err(CertificateError::Other(OtherError(Arc::new(PinMismatch))).into());
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| CertificateError::Other(OtherError(Arc::new(e))))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a TLS connection to the server failed, from the agent's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsRefusal {
    /// The server refused our client certificate because it has expired (or is not yet
    /// valid).
    ClientCertExpired,
    /// The server does not know the CA of our client certificate (e.g. it reset its
    /// certificate authority).
    ClientCertUnknownCa,
    /// We refused the server's certificate: it is not signed by the CA we trust, the CA
    /// does not match the pinned fingerprint, or it has expired.
    ServerCertUntrusted,
    /// The server's certificate is not valid for the address we connected to.
    ServerNameMismatch,
    /// Anything else (network errors, protocol errors).
    Other,
}

impl TlsRefusal {
    /// Whether the stored credentials are no longer accepted and the agent must enrol
    /// again (with a new token, and for an untrusted server, the new CA).
    pub fn needs_enrolment(self) -> bool {
        matches!(
            self,
            TlsRefusal::ClientCertExpired
                | TlsRefusal::ClientCertUnknownCa
                | TlsRefusal::ServerCertUntrusted
        )
    }
}

impl fmt::Display for TlsRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsRefusal::ClientCertExpired => {
                "the server refused the agent's certificate because it has expired \
                 (or is not yet valid): check the clocks, or re-enrol with a new token"
            }
            TlsRefusal::ClientCertUnknownCa => {
                "the server does not recognise the agent's certificate (it was issued by \
                 another certificate authority, e.g. before the server reset its secrets): \
                 re-enrol with a new token"
            }
            TlsRefusal::ServerCertUntrusted => {
                "the agent does not trust the server's certificate (not signed by the \
                 configured CA, CA fingerprint mismatch, or expired): check the CA file or \
                 fingerprint given to the agent, or whether the server reset its certificate \
                 authority"
            }
            TlsRefusal::ServerNameMismatch => {
                "the server's certificate is not valid for the address the agent connected \
                 to: connect with a name or IP address the server certificate lists"
            }
            TlsRefusal::Other => "the TLS connection to the server failed",
        })
    }
}

/// Classifies a failed TLS handshake or read (an I/O error from tokio-rustls, which
/// wraps the [`rustls::Error`]) into a [`TlsRefusal`].
///
/// With TLS 1.3 the client finishes its handshake before the server has checked the
/// client certificate, so a refusal of our certificate arrives as an alert on the first
/// read after the handshake; pass that error here too. If instead a *write* right after
/// the handshake fails (the server may already have closed the connection), read once
/// more and classify the read's error: the alert is usually still in the receive buffer.
pub fn describe_tls_error(err: &io::Error) -> TlsRefusal {
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return TlsRefusal::Other;
    };
    match tls {
        rustls::Error::AlertReceived(AlertDescription::CertificateExpired) => {
            TlsRefusal::ClientCertExpired
        }
        rustls::Error::AlertReceived(
            AlertDescription::UnknownCA | AlertDescription::BadCertificate,
        ) => TlsRefusal::ClientCertUnknownCa,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => TlsRefusal::ServerNameMismatch,
        rustls::Error::InvalidCertificate(_) => TlsRefusal::ServerCertUntrusted,
        _ => TlsRefusal::Other,
    }
}

/// The TLS server name for a server address `host:port`, `[v6]:port` or a bare host: the
/// host part, as an IP address or a DNS name.
pub fn server_name_for(addr: &str) -> Option<ServerName<'static>> {
    let host = if let Some(rest) = addr.strip_prefix('[') {
        rest.split_once(']')?.0
    } else {
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
            _ => addr,
        }
    };
    ServerName::try_from(host.to_owned()).ok()
}

// ----- helpers ---------------------------------------------------------------------

fn parse_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, IdentityError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| IdentityError::BadPem {
        what: what.to_owned(),
        source: Box::new(e),
    })
}

fn exists(path: &Path) -> Result<bool, IdentityError> {
    path.try_exists().map_err(|source| IdentityError::Io {
        action: "inspect",
        path: path.to_owned(),
        source,
    })
}

fn read_to_string(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

fn check_key_mode(path: &Path) -> Result<(), IdentityError> {
    let meta = fs::metadata(path).map_err(|source| IdentityError::Io {
        action: "inspect",
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::InsecureKeyFile {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file with mode 0600, fsync, rename,
/// fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let io_err = |action, path: &Path| {
        let path = path.to_owned();
        move |source| IdentityError::Io {
            action,
            path,
            source,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", &tmp)(e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("sync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("rename", &tmp))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateSigningRequestParams, IsCa, Issuer};
    use time::OffsetDateTime;

    /// A throwaway CA signing a CSR, as the server would (the real CA lives in nbserver;
    /// its tests cover it, and `server/tests/tls.rs` runs both together).
    fn sign(csr_pem: &str, cn: &str, not_before: i64, not_after: i64) -> (String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        csr.params.distinguished_name = dn;
        csr.params.not_before = OffsetDateTime::from_unix_timestamp(not_before).unwrap();
        csr.params.not_after = OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        (csr.signed_by(&issuer).unwrap().pem(), ca_cert.pem())
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn store_and_load_round_trip_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("identity");
        assert!(Identity::load(&dir).unwrap().is_none());
        let (key, csr) = generate_key_and_csr().unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(!format!("{key:?}").contains("PRIVATE"));
        let (cert, ca) = sign(&csr, "agent-1", 1_000, 4_000);
        let stored = Identity::store(&dir, key.as_str(), &cert, &ca).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for name in [KEY_FILE, CERT_FILE, CA_FILE] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        let loaded = Identity::load(&dir).unwrap().unwrap();
        assert_eq!(loaded.agent_name().as_deref(), Some("agent-1"));
        assert_eq!(stored.agent_name(), loaded.agent_name());
        assert_eq!(loaded.not_after(), 4_000);
        assert_eq!(loaded.ca_pem(), ca);
        assert_eq!(loaded.cert_pem(), cert);
    }

    #[test]
    fn group_readable_key_is_refused_naming_file_and_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, csr) = generate_key_and_csr().unwrap();
        let (cert, ca) = sign(&csr, "a", 1_000, 4_000);
        Identity::store(tmp.path(), key.as_str(), &cert, &ca).unwrap();
        let key_path = tmp.path().join(KEY_FILE);
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(tmp.path()).unwrap_err();
        assert!(
            matches!(&err, IdentityError::InsecureKeyFile { path, mode: 0o644 } if *path == key_path),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("0644") && msg.contains(KEY_FILE), "{msg}");
    }

    #[test]
    fn store_refuses_a_certificate_for_another_key() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, csr) = generate_key_and_csr().unwrap();
        let (other_key, _) = generate_key_and_csr().unwrap();
        let (cert, ca) = sign(&csr, "a", 1_000, 4_000);
        let err = Identity::store(tmp.path(), other_key.as_str(), &cert, &ca).unwrap_err();
        assert!(matches!(err, IdentityError::KeyMismatch), "{err:?}");
        assert!(!tmp.path().join(CERT_FILE).exists());
        let err = Identity::store(tmp.path(), other_key.as_str(), "garbage", &ca).unwrap_err();
        assert!(matches!(err, IdentityError::BadPem { .. }), "{err:?}");
    }

    #[test]
    fn missing_key_is_an_incomplete_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, csr) = generate_key_and_csr().unwrap();
        let (cert, ca) = sign(&csr, "a", 1_000, 4_000);
        Identity::store(tmp.path(), key.as_str(), &cert, &ca).unwrap();
        fs::remove_file(tmp.path().join(KEY_FILE)).unwrap();
        let err = Identity::load(tmp.path()).unwrap_err();
        assert!(
            matches!(
                err,
                IdentityError::Incomplete {
                    missing: KEY_FILE,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn renewal_after_two_thirds_of_lifetime() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, csr) = generate_key_and_csr().unwrap();
        let (cert, ca) = sign(&csr, "a", 1_000, 4_000);
        let id = Identity::store(tmp.path(), key.as_str(), &cert, &ca).unwrap();
        assert_eq!(id.not_before(), 1_000);
        assert!(!id.needs_renewal(1_000));
        assert!(!id.needs_renewal(2_999));
        assert!(id.needs_renewal(3_000));
        assert!(id.needs_renewal(5_000));
    }

    #[test]
    fn bad_fingerprints_are_refused() {
        for pin in ["", "abc", &"g".repeat(64), &"a".repeat(62)] {
            let err = client_config(&ServerTrust::Fingerprint(pin.to_owned()), None).unwrap_err();
            assert!(
                matches!(err, IdentityError::BadFingerprint),
                "{pin}: {err:?}"
            );
        }
        let colons = ["ab"; 32].join(":");
        client_config(&ServerTrust::Fingerprint(colons), None).unwrap();
    }

    #[test]
    fn ca_trust_needs_a_certificate() {
        let err = client_config(&ServerTrust::CaPem(String::new()), None).unwrap_err();
        assert!(matches!(err, IdentityError::BadPem { .. }), "{err:?}");
        let err =
            client_config(&ServerTrust::CaFile("/nonexistent/ca.crt".into()), None).unwrap_err();
        assert!(matches!(err, IdentityError::Io { .. }), "{err:?}");
    }

    #[test]
    fn server_names_from_addresses() {
        let name = |s| server_name_for(s).map(|n| n.to_str().into_owned());
        assert_eq!(name("127.0.0.1:7000").as_deref(), Some("127.0.0.1"));
        assert_eq!(name("localhost:7000").as_deref(), Some("localhost"));
        assert_eq!(name("nb.example").as_deref(), Some("nb.example"));
        assert_eq!(name("[::1]:7000").as_deref(), Some("::1"));
        assert_eq!(name("::1").as_deref(), Some("::1"));
        assert!(matches!(
            server_name_for("10.0.0.2:1"),
            Some(ServerName::IpAddress(_))
        ));
        assert_eq!(name("bad host:1"), None);
    }

    #[test]
    fn classifies_errors() {
        let wrap = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            describe_tls_error(&wrap(rustls::Error::AlertReceived(
                AlertDescription::CertificateExpired
            ))),
            TlsRefusal::ClientCertExpired
        );
        assert_eq!(
            describe_tls_error(&wrap(rustls::Error::AlertReceived(
                AlertDescription::UnknownCA
            ))),
            TlsRefusal::ClientCertUnknownCa
        );
        assert_eq!(
            describe_tls_error(&wrap(CertificateError::UnknownIssuer.into())),
            TlsRefusal::ServerCertUntrusted
        );
        assert_eq!(
            describe_tls_error(&wrap(CertificateError::NotValidForName.into())),
            TlsRefusal::ServerNameMismatch
        );
        assert_eq!(
            describe_tls_error(&io::Error::from(io::ErrorKind::ConnectionReset)),
            TlsRefusal::Other
        );
        assert!(
            TlsRefusal::ClientCertUnknownCa
                .to_string()
                .contains("re-enrol")
        );
    }
}
