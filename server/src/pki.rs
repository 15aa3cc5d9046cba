//! The server's certificate authority, its TLS identity and enrolment tokens.
//!
//! `nbserver` creates its own certificate authority (CA) on first start and keeps it in
//! its data directory (`ca.key`, mode 0600, and `ca.crt`). The CA signs:
//!
//! * the server's own certificate (`server.crt`, `server.key`), reissued when the CA
//!   changes, when the requested names change or when it expires within 30 days;
//! * short-lived client certificates for agents, from a certificate signing request the
//!   agent sends when it enrols with a single-use token ([`Token`]).
//!
//! One TCP port serves enrolment (server-authenticated TLS, no client certificate) and
//! data sessions (mutual TLS). The [`server_config`] therefore *allows* unauthenticated
//! clients; after the handshake the server calls [`peer_agent_name`]: a name means an
//! authenticated agent, none means only enrolment is allowed on that connection.
//!
//! The server sends its full chain (its certificate and the CA certificate) so that an
//! agent that only knows the CA's SHA-256 fingerprint can verify it.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// File name of the CA private key inside the data directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the CA certificate inside the data directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the server's private key inside the data directory.
pub const SERVER_KEY_FILE: &str = "server.key";
/// File name of the server's certificate inside the data directory.
pub const SERVER_CERT_FILE: &str = "server.crt";

/// Validity of a newly created certificate authority.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of a newly issued server certificate.
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A server certificate expiring sooner than this is reissued on load.
const SERVER_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Issued certificates start this long before "now", to tolerate clock skew.
const BACKDATE: Duration = Duration::from_secs(60);
/// Longest agent name accepted (the X.509 upper bound for a common name).
const MAX_AGENT_NAME: usize = 64;

/// Errors of the PKI module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file or directory could not be read, written or created.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done (`read`, `write`, `create directory`, ...).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Only one of the CA's two files exists: refuse to overwrite the other.
    #[error("certificate authority in {dir} is incomplete: {missing} is missing")]
    IncompleteCa {
        /// The data directory.
        dir: PathBuf,
        /// The missing file name.
        missing: &'static str,
    },
    /// A private key file is readable by group or others.
    #[error("key file {path} has mode {mode:04o}, readable by group or others; expected 0600")]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A stored key or certificate could not be parsed.
    #[error("{path} is not a valid {what}")]
    BadStoredFile {
        /// The file.
        path: PathBuf,
        /// What it should contain.
        what: &'static str,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The in-memory server certificate or key given to [`server_config`] is not valid PEM.
    #[error("the server {what} is not valid PEM")]
    BadPem {
        /// The certificate or the key.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A stored certificate does not belong to the stored key.
    #[error("certificate {path} does not match its private key")]
    KeyMismatch {
        /// The certificate file.
        path: PathBuf,
    },
    /// Generating a key or certificate failed.
    #[error("cannot generate {what}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// The agent's certificate signing request is unparsable or its signature is wrong.
    #[error("bad certificate signing request")]
    BadCsr {
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// The agent name cannot be used as a certificate's common name.
    #[error("agent name {name:?} is not valid: {reason}")]
    BadAgentName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A server name is neither an IP address nor a valid DNS name.
    #[error("server name {name:?} is neither an IP address nor a DNS name")]
    BadServerName {
        /// The rejected name.
        name: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// No server name was given for the server certificate.
    #[error("the server certificate needs at least one name")]
    NoServerNames,
    /// The issued certificate carries no private key (needed for the server).
    #[error("the server certificate has no private key")]
    MissingServerKey,
    /// The rustls configuration could not be built.
    #[error("cannot build the TLS configuration")]
    Tls {
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
    /// The client certificate verifier could not be built.
    #[error("cannot build the client certificate verifier")]
    Verifier {
        /// The underlying error.
        #[source]
        source: VerifierBuilderError,
    },
    /// An enrolment token is malformed.
    #[error("malformed enrolment token: {reason}")]
    MalformedToken {
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The ring crypto provider used for every TLS configuration.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Lower-case hex SHA-256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A certificate issued by the [`CertificateAuthority`].
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM, when the CA generated it (server certificates); `None` for
    /// certificates signed from an agent's CSR (the agent keeps its key).
    pub key_pem: Option<String>,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The server's certificate authority: its key pair and self-signed certificate.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    fingerprint: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the CA from `dir` (`ca.key`, `ca.crt`), or creates it when neither file
    /// exists. A missing `dir` is created with mode 0700.
    ///
    /// Refuses a key file readable by group or others, a CA with only one of its two
    /// files, and a certificate that does not match the key.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        create_private_dir(dir)?;
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        match (exists(&key_path)?, exists(&cert_path)?) {
            (true, true) => Self::load(&key_path, &cert_path),
            (false, false) => Self::create(dir),
            (true, false) => Err(PkiError::IncompleteCa {
                dir: dir.to_owned(),
                missing: CA_CERT_FILE,
            }),
            (false, true) => Err(PkiError::IncompleteCa {
                dir: dir.to_owned(),
                missing: CA_KEY_FILE,
            }),
        }
    }

    /// Retires the current CA and server certificate (moved into
    /// `dir/retired-<unix seconds>/`) and creates a new CA. Every agent certificate
    /// signed by the old CA stops working: those agents must enrol again.
    pub fn reset(dir: &Path) -> Result<Self, PkiError> {
        create_private_dir(dir)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut retired = dir.join(format!("retired-{now}"));
        let mut n = 1;
        while exists(&retired)? {
            retired = dir.join(format!("retired-{now}-{n}"));
            n += 1;
        }
        let mut moved = Vec::new();
        for name in [CA_KEY_FILE, CA_CERT_FILE, SERVER_KEY_FILE, SERVER_CERT_FILE] {
            let from = dir.join(name);
            if !exists(&from)? {
                continue;
            }
            if moved.is_empty() {
                create_private_dir(&retired)?;
            }
            let to = retired.join(name);
            fs::rename(&from, &to).map_err(|source| PkiError::Io {
                action: "move",
                path: from.clone(),
                source,
            })?;
            moved.push(name);
        }
        tracing::warn!(dir = %dir.display(), retired = %retired.display(), files = ?moved,
            "certificate authority reset: agents must enrol again");
        Self::create(dir)
    }

    fn create(dir: &Path) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            PkiError::Generate {
                what: "CA key",
                source,
            }
        })?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A unique name per CA: path building in webpki matches issuers by name, so a
        // certificate from a retired CA must not find a same-named new CA (that would
        // report a bad signature instead of an unknown issuer).
        let tag: [u8; 4] = rand::rng().random();
        dn.push(
            DnType::CommonName,
            format!("nbserver CA {}", hex::encode(tag)),
        );
        dn.push(DnType::OrganizationName, "nbagent");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial().0);
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: "CA certificate",
                source,
            })?;
        let cert_pem = cert.pem();
        write_atomic(&dir.join(CA_KEY_FILE), key.serialize_pem().as_bytes())?;
        write_atomic(&dir.join(CA_CERT_FILE), cert_pem.as_bytes())?;
        let cert_der = cert.der().clone();
        let fingerprint = sha256_hex(&cert_der);
        tracing::info!(dir = %dir.display(), fingerprint = %fingerprint, "created certificate authority");
        Ok(Self {
            cert_pem,
            cert_der,
            fingerprint,
            issuer: Issuer::new(params, key),
        })
    }

    fn load(key_path: &Path, cert_path: &Path) -> Result<Self, PkiError> {
        let key_pem = read_key_file(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadStoredFile {
            path: key_path.to_owned(),
            what: "private key",
            source: Some(Box::new(e)),
        })?;
        let cert_pem = read_to_string(cert_path)?;
        let cert_der = parse_cert_pem(&cert_pem, cert_path)?;
        check_key_matches(&cert_der, &key, cert_path)?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| PkiError::BadStoredFile {
                path: cert_path.to_owned(),
                what: "CA certificate",
                source: Some(Box::new(e)),
            })?;
        let fingerprint = sha256_hex(&cert_der);
        tracing::debug!(path = %cert_path.display(), fingerprint = %fingerprint, "loaded certificate authority");
        Ok(Self {
            cert_pem,
            cert_der,
            fingerprint,
            issuer,
        })
    }

    /// The CA certificate, PEM (what agents trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Lower-case hex SHA-256 of the CA certificate's DER encoding (what an agent may pin).
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// Issues a server certificate with a fresh key for `names` (each an IP address or a
    /// DNS name, all put in the subject alternative names), for about one year, with the
    /// extended key usage serverAuth.
    pub fn issue_server_cert(&self, names: &[String]) -> Result<IssuedCert, PkiError> {
        let first = names.first().ok_or(PkiError::NoServerNames)?;
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(|source| {
                    PkiError::BadServerName {
                        name: name.clone(),
                        source,
                    }
                })?),
            };
            sans.push(san);
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            PkiError::Generate {
                what: "server key",
                source,
            }
        })?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, first.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = now + SERVER_VALIDITY;
        let (serial, serial_hex) = random_serial();
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "server certificate",
                source,
            })?;
        tracing::info!(names = ?names, serial = %serial_hex, "issued server certificate");
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: Some(key.serialize_pem()),
            serial: serial_hex,
            not_after: params.not_after.unix_timestamp(),
        })
    }

    /// Signs an agent's certificate signing request.
    ///
    /// The certificate's common name is `agent` (the CSR's subject and requested
    /// extensions are ignored: the server decides the name), its extended key usage is
    /// clientAuth, it is valid from `now - 60 s` to `now + validity`, and its serial is
    /// random. An unparsable CSR, or one whose signature is wrong, is
    /// [`PkiError::BadCsr`].
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        agent: &str,
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        validate_agent_name(agent)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|source| PkiError::BadCsr { source })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        let (serial, serial_hex) = random_serial();
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "agent certificate",
                source,
            })?;
        tracing::info!(agent, serial = %serial_hex, not_after = params.not_after.unix_timestamp(),
            "signed agent certificate");
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: None,
            serial: serial_hex,
            not_after: params.not_after.unix_timestamp(),
        })
    }

    /// Verifies that `cert` was issued by this CA, is valid now and covers every name.
    fn verifies_server_cert(&self, cert: &CertificateDer<'_>, names: &[String]) -> bool {
        let mut roots = RootCertStore::empty();
        if roots.add(self.cert_der.clone()).is_err() {
            return false;
        }
        let Ok(verifier) =
            WebPkiServerVerifier::builder_with_provider(roots.into(), provider()).build()
        else {
            return false;
        };
        names.iter().all(|name| {
            let Ok(server_name) = ServerName::try_from(name.as_str()) else {
                return false;
            };
            verifier
                .verify_server_cert(cert, &[], &server_name, &[], UnixTime::now())
                .is_ok()
        })
    }
}

/// Loads the server certificate from `dir` (`server.crt`, `server.key`), or issues a new
/// one when there is none, when it was not issued by `ca` (the CA was reset), when it
/// does not cover every name in `names`, or when it expires within 30 days.
pub fn load_or_issue_server_cert(
    dir: &Path,
    ca: &CertificateAuthority,
    names: &[String],
) -> Result<IssuedCert, PkiError> {
    if names.is_empty() {
        return Err(PkiError::NoServerNames);
    }
    create_private_dir(dir)?;
    let key_path = dir.join(SERVER_KEY_FILE);
    let cert_path = dir.join(SERVER_CERT_FILE);
    if exists(&key_path)? && exists(&cert_path)? {
        let key_pem = read_key_file(&key_path)?;
        let cert_pem = read_to_string(&cert_path)?;
        let cert_der = parse_cert_pem(&cert_pem, &cert_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadStoredFile {
            path: key_path.clone(),
            what: "private key",
            source: Some(Box::new(e)),
        })?;
        let (serial, not_after) = serial_and_expiry(&cert_der, &cert_path)?;
        let renew_at = OffsetDateTime::now_utc() + SERVER_RENEW_BEFORE;
        let reason = if check_key_matches(&cert_der, &key, &cert_path).is_err() {
            Some("key does not match")
        } else if !ca.verifies_server_cert(&cert_der, names) {
            Some("not issued by the current CA for these names")
        } else if not_after < renew_at.unix_timestamp() {
            Some("expires within 30 days")
        } else {
            None
        };
        match reason {
            None => {
                return Ok(IssuedCert {
                    cert_pem,
                    key_pem: Some(key_pem),
                    serial,
                    not_after,
                });
            }
            Some(reason) => {
                tracing::info!(path = %cert_path.display(), reason, "reissuing server certificate");
            }
        }
    }
    let issued = ca.issue_server_cert(names)?;
    let key_pem = issued
        .key_pem
        .as_deref()
        .ok_or(PkiError::MissingServerKey)?;
    write_atomic(&key_path, key_pem.as_bytes())?;
    write_atomic(&cert_path, issued.cert_pem.as_bytes())?;
    Ok(issued)
}

/// Builds the server's TLS configuration: presents `server_cert` followed by the CA
/// certificate, and verifies client certificates against the CA while *allowing*
/// clients without one (enrolment connections). Decide after the handshake with
/// [`peer_agent_name`].
pub fn server_config(
    ca: &CertificateAuthority,
    server_cert: &IssuedCert,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let key_pem = server_cert
        .key_pem
        .as_deref()
        .ok_or(PkiError::MissingServerKey)?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| PkiError::BadPem {
            what: "private key",
            source,
        })?;
    let leaf =
        CertificateDer::from_pem_slice(server_cert.cert_pem.as_bytes()).map_err(|source| {
            PkiError::BadPem {
                what: "certificate",
                source,
            }
        })?;
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.cert_der.clone())
        .map_err(|source| PkiError::Tls { source })?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|source| PkiError::Verifier { source })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| PkiError::Tls { source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![leaf, ca.cert_der.clone()], key)
        .map_err(|source| PkiError::Tls { source })?;
    Ok(Arc::new(config))
}

/// The agent name of an authenticated peer: the common name of the end-entity (first)
/// certificate, or `None` when the peer presented no certificate (or one without a
/// common name).
///
/// Only call this with certificates the TLS layer has verified
/// (`ServerConnection::peer_certificates`).
pub fn peer_agent_name(certs: &[CertificateDer<'_>]) -> Option<String> {
    let der = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

// ----- enrolment tokens ------------------------------------------------------------

/// Prefix and version of the token format.
const TOKEN_PREFIX: &str = "nbt1";
/// Length of a token id, hex characters.
const TOKEN_ID_LEN: usize = 12;
/// Length of a generated secret (43 alphanumeric characters: about 256 bits).
const TOKEN_SECRET_LEN: usize = 43;
/// Shortest secret [`Token::parse`] accepts.
const TOKEN_SECRET_MIN: usize = 32;
/// Longest secret [`Token::parse`] accepts.
const TOKEN_SECRET_MAX: usize = 128;

/// A single-use enrolment token, written `nbt1.<id>.<secret>`.
///
/// The id (12 lower-case hex characters) names the token in the server's store and
/// logs; the secret (at least 32 URL-safe characters) is only ever stored as its
/// [`Token::secret_hash`].
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Public identifier, 12 lower-case hex characters.
    pub id: String,
    /// The secret part.
    pub secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}.{}.{}", self.id, self.secret)
    }
}

impl Token {
    /// A new random token.
    pub fn generate() -> Token {
        let mut rng = rand::rng();
        let id: [u8; TOKEN_ID_LEN / 2] = rng.random();
        let secret: String = (&mut rng)
            .sample_iter(rand::distr::Alphanumeric)
            .take(TOKEN_SECRET_LEN)
            .map(char::from)
            .collect();
        Token {
            id: hex::encode(id),
            secret,
        }
    }

    /// Parses `nbt1.<id>.<secret>` (surrounding white space is ignored).
    pub fn parse(s: &str) -> Result<Token, PkiError> {
        let bad = |reason| PkiError::MalformedToken { reason };
        let mut parts = s.trim().splitn(3, '.');
        let (Some(prefix), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected nbt1.<id>.<secret>"));
        };
        if prefix != TOKEN_PREFIX {
            return Err(bad("unknown prefix, expected nbt1"));
        }
        if id.len() != TOKEN_ID_LEN
            || !id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad("the id must be 12 lower-case hex characters"));
        }
        if secret.len() < TOKEN_SECRET_MIN || secret.len() > TOKEN_SECRET_MAX {
            return Err(bad("the secret must be 32 to 128 characters"));
        }
        if !secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(
                "the secret may only contain letters, digits, '-' and '_'",
            ));
        }
        Ok(Token {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// Lower-case hex SHA-256 of the secret: what the server stores.
    pub fn secret_hash(&self) -> String {
        sha256_hex(self.secret.as_bytes())
    }
}

// ----- helpers ---------------------------------------------------------------------

fn validate_agent_name(agent: &str) -> Result<(), PkiError> {
    let bad = |reason| PkiError::BadAgentName {
        name: agent.to_owned(),
        reason,
    };
    if agent.is_empty() {
        return Err(bad("it is empty"));
    }
    if agent.len() > MAX_AGENT_NAME {
        return Err(bad("it is longer than 64 bytes"));
    }
    if agent.chars().any(char::is_control) {
        return Err(bad("it contains control characters"));
    }
    Ok(())
}

/// A random positive 16-byte serial number and its hex form.
fn random_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::rng().random();
    // Positive, and without a leading zero byte so the encoding has a fixed length.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

fn parse_cert_pem(pem: &str, path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadStoredFile {
        path: path.to_owned(),
        what: "certificate",
        source: Some(Box::new(e)),
    })
}

fn check_key_matches(
    cert: &CertificateDer<'_>,
    key: &KeyPair,
    path: &Path,
) -> Result<(), PkiError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| PkiError::BadStoredFile {
            path: path.to_owned(),
            what: "certificate",
            source: Some(Box::new(e)),
        })?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(PkiError::KeyMismatch {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn serial_and_expiry(cert: &CertificateDer<'_>, path: &Path) -> Result<(String, i64), PkiError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| PkiError::BadStoredFile {
            path: path.to_owned(),
            what: "certificate",
            source: Some(Box::new(e)),
        })?;
    Ok((
        hex::encode(parsed.raw_serial()),
        parsed.validity().not_after.timestamp(),
    ))
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(|source| PkiError::Io {
        action: "inspect",
        path: path.to_owned(),
        source,
    })
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            action: "create directory",
            path: dir.to_owned(),
            source,
        })
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// Reads a private key file after checking that only its owner can read it.
fn read_key_file(path: &Path) -> Result<String, PkiError> {
    let meta = fs::metadata(path).map_err(|source| PkiError::Io {
        action: "inspect",
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PkiError::InsecureKeyFile {
            path: path.to_owned(),
            mode,
        });
    }
    read_to_string(path)
}

/// Writes `bytes` to `path` atomically (temporary file with mode 0600, fsync, rename,
/// fsync of the directory).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let io_err = |action, path: &Path| {
        let path = path.to_owned();
        move |source| PkiError::Io {
            action,
            path,
            source,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // A stale temporary file from a crash would make create_new fail.
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
    use std::os::unix::fs::PermissionsExt;

    fn agent_csr() -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "i-want-to-be-admin");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_ca_with_private_files_and_reloads_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let ca = CertificateAuthority::load_or_create(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(ca.fingerprint().len(), 64);
        assert_eq!(ca.fingerprint(), sha256_hex(ca.cert_der()));

        let again = CertificateAuthority::load_or_create(&dir).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        assert_eq!(again.cert_pem(), ca.cert_pem());
    }

    #[test]
    fn refuses_group_readable_ca_key_and_incomplete_ca() {
        let tmp = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(tmp.path()).unwrap();
        let key = tmp.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let err = CertificateAuthority::load_or_create(tmp.path()).unwrap_err();
        assert!(
            matches!(&err, PkiError::InsecureKeyFile { path, mode: 0o640 } if *path == key),
            "{err:?}"
        );
        assert!(err.to_string().contains("0640"), "{err}");

        fs::remove_file(tmp.path().join(CA_CERT_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(tmp.path()).unwrap_err();
        assert!(
            matches!(
                err,
                PkiError::IncompleteCa {
                    missing: CA_CERT_FILE,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn reset_retires_old_files_and_makes_a_new_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let old = CertificateAuthority::load_or_create(tmp.path()).unwrap();
        load_or_issue_server_cert(tmp.path(), &old, &["localhost".into()]).unwrap();
        let new = CertificateAuthority::reset(tmp.path()).unwrap();
        assert_ne!(old.fingerprint(), new.fingerprint());
        let retired: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("retired-")
            })
            .collect();
        assert_eq!(retired.len(), 1);
        for name in [CA_KEY_FILE, CA_CERT_FILE, SERVER_KEY_FILE, SERVER_CERT_FILE] {
            assert!(retired[0].join(name).exists(), "{name} not retired");
        }
        assert_eq!(
            fs::read_to_string(retired[0].join(CA_CERT_FILE)).unwrap(),
            old.cert_pem()
        );
        assert!(!tmp.path().join(SERVER_CERT_FILE).exists());
        let reloaded = CertificateAuthority::load_or_create(tmp.path()).unwrap();
        assert_eq!(reloaded.fingerprint(), new.fingerprint());
    }

    #[test]
    fn signs_csr_with_server_chosen_name_and_client_auth() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
        let (key, csr) = agent_csr();
        let now = OffsetDateTime::now_utc();
        let issued = ca
            .sign_agent_csr(&csr, "agent-7", Duration::from_secs(3600), now)
            .unwrap();
        assert!(issued.key_pem.is_none());
        assert_eq!(issued.not_after, now.unix_timestamp() + 3600);
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            peer_agent_name(std::slice::from_ref(&der)).as_deref(),
            Some("agent-7")
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.validity().not_before.timestamp(),
            now.unix_timestamp() - 60
        );
        assert_eq!(hex::encode(cert.raw_serial()), issued.serial);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        // Serials are random.
        let other = ca
            .sign_agent_csr(&csr, "agent-7", Duration::from_secs(3600), now)
            .unwrap();
        assert_ne!(other.serial, issued.serial);
    }

    #[test]
    fn bad_csr_and_bad_agent_name_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
        let now = OffsetDateTime::now_utc();
        let day = Duration::from_secs(86400);
        let err = ca.sign_agent_csr("not a csr", "a", day, now).unwrap_err();
        assert!(matches!(err, PkiError::BadCsr { .. }), "{err:?}");
        // A CSR whose body was tampered with fails its signature check.
        let (_, csr) = agent_csr();
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let i = bytes.len() / 2;
        bytes[i] ^= 0x01;
        let tampered = pem_encode("CERTIFICATE REQUEST", &bytes);
        let err = ca.sign_agent_csr(&tampered, "a", day, now).unwrap_err();
        assert!(matches!(err, PkiError::BadCsr { .. }), "{err:?}");

        let err = ca.sign_agent_csr(&csr, "", day, now).unwrap_err();
        assert!(matches!(err, PkiError::BadAgentName { .. }), "{err:?}");
        let err = ca
            .sign_agent_csr(&csr, &"x".repeat(65), day, now)
            .unwrap_err();
        assert!(matches!(err, PkiError::BadAgentName { .. }), "{err:?}");
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        use std::fmt::Write as _;
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk.len();
            let v = (u32::from(chunk[0]) << 16)
                | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
                | u32::from(*chunk.get(2).unwrap_or(&0));
            for k in 0..4 {
                if k <= n {
                    b64.push(B64[((v >> (18 - 6 * k)) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            writeln!(out, "{}", std::str::from_utf8(line).unwrap()).unwrap();
        }
        writeln!(out, "-----END {label}-----").unwrap();
        out
    }

    #[test]
    fn server_cert_is_reused_then_reissued_when_ca_or_names_change() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
        let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        let first = load_or_issue_server_cert(tmp.path(), &ca, &names).unwrap();
        assert_eq!(mode(&tmp.path().join(SERVER_KEY_FILE)), 0o600);
        let der = CertificateDer::from_pem_slice(first.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth);
        let lifetime = first.not_after - OffsetDateTime::now_utc().unix_timestamp();
        assert!(
            (360 * 86400..=366 * 86400).contains(&lifetime),
            "{lifetime}"
        );

        let second = load_or_issue_server_cert(tmp.path(), &ca, &names).unwrap();
        assert_eq!(
            second.serial, first.serial,
            "an intact certificate is reused"
        );
        assert_eq!(second.key_pem, first.key_pem);

        let more = vec!["127.0.0.1".to_owned(), "nb.example".to_owned()];
        let third = load_or_issue_server_cert(tmp.path(), &ca, &more).unwrap();
        assert_ne!(
            third.serial, first.serial,
            "new names need a new certificate"
        );

        let new_ca = CertificateAuthority::reset(tmp.path()).unwrap();
        // reset retired server.*; put the old one back to prove the CA check.
        write_atomic(
            &tmp.path().join(SERVER_CERT_FILE),
            third.cert_pem.as_bytes(),
        )
        .unwrap();
        write_atomic(
            &tmp.path().join(SERVER_KEY_FILE),
            third.key_pem.as_deref().unwrap().as_bytes(),
        )
        .unwrap();
        let fourth = load_or_issue_server_cert(tmp.path(), &new_ca, &more).unwrap();
        assert_ne!(
            fourth.serial, third.serial,
            "a new CA needs a new certificate"
        );
        assert!(new_ca.verifies_server_cert(
            &CertificateDer::from_pem_slice(fourth.cert_pem.as_bytes()).unwrap(),
            &more
        ));
    }

    #[test]
    fn bad_server_names_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
        assert!(matches!(
            ca.issue_server_cert(&[]),
            Err(PkiError::NoServerNames)
        ));
        assert!(matches!(
            ca.issue_server_cert(&["bad name\u{e9}".into()]),
            Err(PkiError::BadServerName { .. })
        ));
    }

    #[test]
    fn token_round_trip() {
        let token = Token::generate();
        assert_eq!(token.id.len(), 12);
        assert!(token.secret.len() >= 32);
        let text = token.to_string();
        assert!(text.starts_with("nbt1."));
        let parsed = Token::parse(&format!("  {text}\n")).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(parsed.secret_hash(), token.secret_hash());
        assert_eq!(token.secret_hash(), sha256_hex(token.secret.as_bytes()));
        assert_ne!(Token::generate(), token);
        assert!(!format!("{token:?}").contains(&token.secret));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let secret = "A".repeat(32);
        let cases = [
            String::new(),
            "nbt1".to_owned(),
            "nbt1.0123456789ab".to_owned(),
            format!("nbt2.0123456789ab.{secret}"),
            format!("nbt1.0123456789AB.{secret}"),
            format!("nbt1.0123456789a.{secret}"),
            format!("nbt1.0123456789abc.{secret}"),
            format!("nbt1.0123456789ab.{}", "A".repeat(31)),
            format!("nbt1.0123456789ab.{}", "A".repeat(129)),
            format!("nbt1.0123456789ab.{}+/", "A".repeat(32)),
            format!("nbt1.0123456789ab.{secret}.extra"),
        ];
        for case in cases {
            let err = Token::parse(&case).unwrap_err();
            assert!(
                matches!(err, PkiError::MalformedToken { .. }),
                "{case}: {err:?}"
            );
        }
        let ok = Token::parse(&format!("nbt1.0123456789ab.{secret}-_")).unwrap();
        assert_eq!(ok.id, "0123456789ab");
    }
}
