//! TLS and QUIC setup: the DS certificate (generated self-signed on first start, or the
//! operator's), the DS's stateless reset key, certificate pinning for clients, and quinn
//! endpoints with enlarged UDP buffers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use crate::config::Limits;
use crate::protocol::ALPN;

const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";
const RESET_KEY_FILE: &str = "stateless-reset.key";
const RESET_KEY_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid QUIC TLS configuration: {0}")]
    Quic(String),
    #[error("cannot open the UDP socket on {address}: {source}")]
    Socket {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("a certificate fingerprint is 64 hex digits (SHA-256)")]
    BadFingerprint,
    #[error(
        "{path} holds {found} bytes, not the {RESET_KEY_LEN} of a stateless reset key; remove it \
         and a new one is made at the next start (connections open now then wait for their idle \
         timeout if the DS restarts)"
    )]
    BadResetKey { path: PathBuf, found: usize },
    #[error(
        "{present} exists but {missing} does not; restore {missing} from a backup, or move \
         {present} away to generate a new certificate (clients must then pin the new fingerprint)"
    )]
    IncompletePair { present: PathBuf, missing: PathBuf },
}

/// The SHA-256 of a DER certificate: what clients pin.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertFingerprint(pub [u8; 32]);

impl CertFingerprint {
    pub fn of(certificate_der: &[u8]) -> CertFingerprint {
        CertFingerprint(Sha256::digest(certificate_der).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits; colons and spaces between them are allowed.
    pub fn from_hex(text: &str) -> Result<CertFingerprint, TlsError> {
        let digits: String = text.chars().filter(|c| !matches!(c, ':' | ' ')).collect();
        let bytes = hex::decode(digits).map_err(|_| TlsError::BadFingerprint)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| TlsError::BadFingerprint)?;
        Ok(CertFingerprint(bytes))
    }
}

impl std::fmt::Debug for CertFingerprint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "CertFingerprint({})", self.to_hex())
    }
}

impl std::fmt::Display for CertFingerprint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.to_hex())
    }
}

/// The DS's certificate chain and private key.
#[derive(Debug)]
pub struct ServerIdentity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// The fingerprint of the end-entity certificate.
    pub fn fingerprint(&self) -> CertFingerprint {
        CertFingerprint::of(
            self.cert_chain
                .first()
                .map(|cert| cert.as_ref())
                .unwrap_or_default(),
        )
    }

    /// A fresh self-signed certificate, kept in memory only (tests, embedded use).
    pub fn self_signed() -> Result<ServerIdentity, TlsError> {
        let generated = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        Ok(ServerIdentity {
            cert_chain: vec![generated.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into()),
        })
    }

    /// Loads the operator's PEM files.
    pub fn from_pem_files(cert_path: &Path, key_path: &Path) -> Result<ServerIdentity, TlsError> {
        let cert_pem = read(cert_path)?;
        let cert_chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|_| TlsError::Pem {
                path: cert_path.to_path_buf(),
                what: "certificate",
            })?;
        if cert_chain.is_empty() {
            return Err(TlsError::Pem {
                path: cert_path.to_path_buf(),
                what: "certificate",
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&read(key_path)?).map_err(|_| TlsError::Pem {
            path: key_path.to_path_buf(),
            what: "private key",
        })?;
        Ok(ServerIdentity { cert_chain, key })
    }

    /// Loads `cert.pem`/`key.pem` from `data_dir`, generating a self-signed pair on first start.
    /// Returns the identity and whether it was just generated. If only one of the two files
    /// exists, nothing is written and the error says how to repair the pair.
    pub fn load_or_generate(data_dir: &Path) -> Result<(ServerIdentity, bool), TlsError> {
        let cert_path = data_dir.join(CERT_FILE);
        let key_path = data_dir.join(KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                return Ok((
                    ServerIdentity::from_pem_files(&cert_path, &key_path)?,
                    false,
                ));
            }
            // SECURITY: a new key beside the old certificate would never match it, and a new
            // certificate beside the old key would silently change the pinned fingerprint.
            (true, false) => {
                return Err(TlsError::IncompletePair {
                    present: cert_path,
                    missing: key_path,
                });
            }
            (false, true) => {
                return Err(TlsError::IncompletePair {
                    present: key_path,
                    missing: cert_path,
                });
            }
            (false, false) => {}
        }
        let generated = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        write_private(&key_path, generated.signing_key.serialize_pem().as_bytes())?;
        write_private(&cert_path, generated.cert.pem().as_bytes())?;
        Ok((ServerIdentity::from_pem_files(&cert_path, &key_path)?, true))
    }
}

/// The secret from which the DS derives the stateless reset token of every connection ID it
/// issues (RFC 9000, section 10.3). It is kept in the data directory so that a DS that
/// restarted (after a crash, `kill -9` or an upgrade) answers a client's packets for a
/// connection it no longer has with a reset that client accepts: the client then reconnects at
/// its next packet (a keep-alive within 10 s) instead of after the idle timeout. A key made
/// anew at every start, quinn's default, gives resets that no client can accept.
///
/// SECURITY: whoever holds it can end any client's connection to this DS with one forged
/// packet, so it is written owner-only, like the certificate's key; it protects no message.
pub struct StatelessResetKey(Box<[u8; RESET_KEY_LEN]>);

impl std::fmt::Debug for StatelessResetKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("StatelessResetKey(..)")
    }
}

impl StatelessResetKey {
    /// A key for this process only (tests, embedded use).
    pub fn random() -> StatelessResetKey {
        let mut key = Box::new([0u8; RESET_KEY_LEN]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key[..]);
        StatelessResetKey(key)
    }

    /// Loads `stateless-reset.key` from `data_dir`, making it on first start. The file is
    /// written under another name, synced and then renamed into place, so a crash or a full disk
    /// while it is made never leaves a short key that would stop every later start.
    pub fn load_or_generate(data_dir: &Path) -> Result<StatelessResetKey, TlsError> {
        let path = data_dir.join(RESET_KEY_FILE);
        if !path.exists() {
            let key = StatelessResetKey::random();
            let partial = data_dir.join(format!("{RESET_KEY_FILE}.partial"));
            // What a crash left while making one before: never in use.
            let _ = std::fs::remove_file(&partial);
            write_private(&partial, &key.0[..])?;
            let write_error = |source| TlsError::Write {
                path: path.clone(),
                source,
            };
            std::fs::rename(&partial, &path).map_err(write_error)?;
            std::fs::File::open(data_dir)
                .and_then(|directory| directory.sync_all())
                .map_err(write_error)?;
            return Ok(key);
        }
        let bytes = read(&path)?;
        let key: [u8; RESET_KEY_LEN] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| TlsError::BadResetKey {
                    path: path.clone(),
                    found: bytes.len(),
                })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            if let Ok(metadata) = std::fs::metadata(&path)
                && metadata.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    "the stateless reset key is readable by others than the DS's user; \
                     chmod 600 it"
                );
            }
        }
        Ok(StatelessResetKey(Box::new(key)))
    }

    fn hmac_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0[..])
    }

    /// The endpoint answers with a reset only packets whose connection ID it could have issued,
    /// which it checks with the connection-ID generator's key: that key must outlive the process
    /// too, so it comes from the same secret.
    fn connection_ids(&self) -> KeyedConnectionIds {
        let derived = ring::hmac::sign(&self.hmac_key(), b"mlschat-ds connection id generator");
        KeyedConnectionIds(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            derived.as_ref(),
        ))
    }

    fn endpoint_config(&self) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::new(Arc::new(self.hmac_key()));
        let connection_ids = self.connection_ids();
        config.cid_generator(move || Box::new(connection_ids.clone()));
        // quinn sends at most one reset per interval on the whole endpoint (20 ms by default,
        // 50 a second): after a restart with thousands of clients, most would wait for their
        // next retransmission, or their idle timeout. A reset is smaller than the packet that
        // prompts it and goes only to packets with a connection ID this DS issued (see
        // `KeyedConnectionIds`), so a higher rate amplifies nothing.
        config.min_reset_interval(Duration::from_millis(1));
        config
    }
}

/// Connection IDs of [`CID_RANDOM_LEN`] random bytes and a [`CID_TAG_LEN`]-byte tag keyed from
/// the stateless reset key. The tag lets the endpoint answer with a reset only packets whose
/// connection ID it issued, in this process or an earlier one; the random part is long enough
/// that no two connections, before and after any number of restarts, get the same ID (and so
/// the same reset token, RFC 9000, section 10.3.2). quinn's own keyed generator has 3 random
/// bytes, which is enough only for a key that dies with the process.
#[derive(Clone)]
struct KeyedConnectionIds(ring::hmac::Key);

const CID_RANDOM_LEN: usize = 12;
const CID_TAG_LEN: usize = 4;

impl KeyedConnectionIds {
    fn tag(&self, random: &[u8]) -> [u8; CID_TAG_LEN] {
        let mut tag = [0u8; CID_TAG_LEN];
        tag.copy_from_slice(&ring::hmac::sign(&self.0, random).as_ref()[..CID_TAG_LEN]);
        tag
    }
}

impl quinn::ConnectionIdGenerator for KeyedConnectionIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; CID_RANDOM_LEN + CID_TAG_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes[..CID_RANDOM_LEN]);
        let tag = self.tag(&bytes[..CID_RANDOM_LEN]);
        bytes[CID_RANDOM_LEN..].copy_from_slice(&tag);
        quinn::ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &quinn::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != CID_RANDOM_LEN + CID_TAG_LEN {
            return Err(quinn_proto::InvalidCid);
        }
        let (random, tag) = cid.split_at(CID_RANDOM_LEN);
        // Not a secret comparison: a wrong tag only means no reset is sent.
        if self.tag(random) == tag {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_RANDOM_LEN + CID_TAG_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(|source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The quinn server configuration: TLS 1.3 only, ALPN `mlschat/1`, no 0-RTT, and a transport
/// tightened for a chat server (one stream per connection, bounded windows, idle timeout).
pub fn server_config(
    identity: ServerIdentity,
    limits: &Limits,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain, identity.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // SECURITY: 0-RTT data is replayable (RFC 8446 §8); the DS never accepts it.
    tls.max_early_data_size = 0;
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|error| TlsError::Quic(error.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((2u32 * 1024 * 1024).into())
        .receive_window((4u32 * 1024 * 1024).into())
        .send_window(16 * 1024 * 1024)
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(limits.idle_timeout().try_into().ok());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Accepts exactly one server certificate: the one whose SHA-256 is pinned. The name in it is
/// irrelevant; trust comes from the pin (like SSH known_hosts), not from a CA.
#[derive(Debug)]
struct PinnedCertVerifier {
    fingerprint: CertFingerprint,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if CertFingerprint::of(end_entity.as_ref()) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Trust on first use: accepts the pinned certificate, or any certificate when nothing is pinned
/// yet, and records what the server presented so the caller can pin it (or report a change).
/// The TLS handshake signature is verified either way, so the server holds the certificate's key.
#[derive(Debug)]
struct FirstUseVerifier {
    expected: Option<CertFingerprint>,
    presented: PresentedCertificate,
    signatures: PinnedCertVerifier,
}

impl ServerCertVerifier for FirstUseVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = CertFingerprint::of(end_entity.as_ref());
        if let Ok(mut slot) = self.presented.lock() {
            *slot = Some(presented);
        }
        match self.expected {
            Some(expected) if expected != presented => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// What the server presented during a connection attempt with [`client_config_first_use`].
pub type PresentedCertificate = Arc<std::sync::Mutex<Option<CertFingerprint>>>;

/// A client configuration that trusts `expected` if given, else whatever the server presents
/// (trust on first use); the returned slot tells which certificate the server presented.
pub fn client_config_first_use(
    expected: Option<CertFingerprint>,
) -> Result<(quinn::ClientConfig, PresentedCertificate), TlsError> {
    let provider = crypto_provider();
    let presented = PresentedCertificate::default();
    let verifier = FirstUseVerifier {
        expected,
        presented: Arc::clone(&presented),
        signatures: PinnedCertVerifier {
            fingerprint: CertFingerprint([0; 32]),
            provider: Arc::clone(&provider),
        },
    };
    Ok((client_config_with(provider, Arc::new(verifier))?, presented))
}

/// The quinn client configuration for a DS whose certificate fingerprint is `pinned`.
pub fn client_config(pinned: CertFingerprint) -> Result<quinn::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = PinnedCertVerifier {
        fingerprint: pinned,
        provider: Arc::clone(&provider),
    };
    client_config_with(provider, Arc::new(verifier))
}

/// How long a client's connection stays silent before it sends a keep-alive: it keeps an idle
/// connection (and any NAT mapping on the way) open, and its going unanswered is how a DS that
/// has gone is found out.
pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_secs(10);

/// How long a client waits without hearing from its DS before it counts the connection as gone
/// and reconnects (the effective timeout is the smaller of this and the DS's
/// `idle_timeout_secs`). It is what a client has to go on when the DS's host vanished without a
/// stateless reset (frozen, cut off, powered off): three keep-alive intervals, so a keep-alive
/// lost on the way does not end a healthy connection, but not a minute of "connected" to a
/// server that is gone.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn client_config_with(
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|error| TlsError::Quic(error.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(CLIENT_KEEP_ALIVE))
        .max_idle_timeout(CLIENT_IDLE_TIMEOUT.try_into().ok())
        .send_window(16 * 1024 * 1024)
        .stream_receive_window((16u32 * 1024 * 1024).into())
        .receive_window((32u32 * 1024 * 1024).into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Binds a UDP socket with `buffer_bytes` send and receive buffers and wraps it in a quinn
/// endpoint. The kernel caps the sizes at `net.core.rmem_max`/`wmem_max`. For a client, or a
/// server whose resets need not outlive it; a DS binds with [`bind_server_endpoint`].
pub fn bind_endpoint(
    address: SocketAddr,
    server_config: Option<quinn::ServerConfig>,
    buffer_bytes: usize,
) -> Result<quinn::Endpoint, TlsError> {
    bind(
        address,
        quinn::EndpointConfig::default(),
        server_config,
        buffer_bytes,
    )
}

/// [`bind_endpoint`] for a DS: its stateless resets use `reset_key`, so that they still work
/// after a restart with the same key.
pub fn bind_server_endpoint(
    address: SocketAddr,
    server_config: quinn::ServerConfig,
    reset_key: &StatelessResetKey,
    buffer_bytes: usize,
) -> Result<quinn::Endpoint, TlsError> {
    bind(
        address,
        reset_key.endpoint_config(),
        Some(server_config),
        buffer_bytes,
    )
}

fn bind(
    address: SocketAddr,
    endpoint_config: quinn::EndpointConfig,
    server_config: Option<quinn::ServerConfig>,
    buffer_bytes: usize,
) -> Result<quinn::Endpoint, TlsError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket_error = |source| TlsError::Socket { address, source };
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .map_err(socket_error)?;
    if address.is_ipv6() {
        // Best effort: dual-stack where the platform allows it.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: an operator's sysctl limits may cap these, which only costs throughput, but
    // the kernel caps them silently, so read them back and say so.
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    // Linux reports twice the size it granted (the other half is its bookkeeping), so a
    // report below the request means the request was capped.
    if let Ok(granted) = socket.recv_buffer_size()
        && granted < buffer_bytes
    {
        tracing::warn!(
            requested = buffer_bytes,
            granted,
            "the kernel granted a smaller UDP receive buffer than requested; raise \
             net.core.rmem_max (see docs/operations.md, UDP buffers)"
        );
    }
    if let Ok(granted) = socket.send_buffer_size()
        && granted < buffer_bytes
    {
        tracing::warn!(
            requested = buffer_bytes,
            granted,
            "the kernel granted a smaller UDP send buffer than requested; raise \
             net.core.wmem_max (see docs/operations.md, UDP buffers)"
        );
    }
    socket.bind(&address.into()).map_err(socket_error)?;
    socket.set_nonblocking(true).map_err(socket_error)?;
    quinn::Endpoint::new(
        endpoint_config,
        server_config,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(socket_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_certificate_or_key_is_an_error_and_nothing_is_written() {
        for (present, missing) in [(CERT_FILE, KEY_FILE), (KEY_FILE, CERT_FILE)] {
            let dir = tempfile::tempdir().expect("temporary directory");
            std::fs::write(dir.path().join(present), b"kept as it is").expect("write");
            let error = ServerIdentity::load_or_generate(dir.path())
                .expect_err("half a pair must not start");
            assert!(
                matches!(&error, TlsError::IncompletePair { .. }),
                "{error:?}"
            );
            let message = error.to_string();
            assert!(
                message.contains(present) && message.contains(missing),
                "{message}"
            );
            assert!(
                !dir.path().join(missing).exists(),
                "no new {missing} is written beside the old {present}"
            );
            assert_eq!(
                std::fs::read(dir.path().join(present)).expect("read"),
                b"kept as it is"
            );
        }
    }

    #[test]
    fn generates_once_then_loads() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (first, generated) = ServerIdentity::load_or_generate(dir.path()).expect("generate");
        assert!(generated);
        let (again, generated) = ServerIdentity::load_or_generate(dir.path()).expect("load");
        assert!(!generated);
        assert_eq!(first.fingerprint(), again.fingerprint());
    }

    #[test]
    fn the_reset_key_is_made_once_privately_and_then_loaded() {
        let dir = tempfile::tempdir().expect("temporary directory");
        // A partial key a crash left behind is not taken for the key.
        std::fs::write(dir.path().join("stateless-reset.key.partial"), b"half").expect("write");
        let first = StatelessResetKey::load_or_generate(dir.path()).expect("generate");
        let again = StatelessResetKey::load_or_generate(dir.path()).expect("load");
        assert_eq!(first.0, again.0);
        assert!(!dir.path().join("stateless-reset.key.partial").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join("stateless-reset.key"))
                .expect("the key file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        }
    }

    #[test]
    fn connection_ids_are_recognised_across_restarts_and_only_with_the_same_key() {
        use quinn::ConnectionIdGenerator as _;
        let key = StatelessResetKey::random();
        let mut before = key.connection_ids();
        let after = StatelessResetKey(key.0.clone()).connection_ids();
        let other = StatelessResetKey::random().connection_ids();
        let ids: Vec<quinn::ConnectionId> = (0..100).map(|_| before.generate_cid()).collect();
        for id in &ids {
            assert_eq!(id.len(), before.cid_len());
            assert!(after.validate(id).is_ok(), "a restarted DS knows {id}");
            assert!(
                other.validate(id).is_err(),
                "another key does not know {id}"
            );
            let mut changed = id.to_vec();
            changed[0] ^= 1;
            assert!(after.validate(&quinn::ConnectionId::new(&changed)).is_err());
        }
        let distinct: std::collections::HashSet<Vec<u8>> =
            ids.iter().map(|id| id.to_vec()).collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(after.validate(&quinn::ConnectionId::new(&[7; 8])).is_err());
    }

    /// Captures what `tracing` writes while a closure runs.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut buffer) = self.0.lock() {
                buffer.extend_from_slice(bytes);
            }
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_capped_udp_buffer_is_reported() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        // No kernel grants 1 GiB without SO_RCVBUFFORCE.
        let endpoint = tracing::subscriber::with_default(subscriber, || {
            bind_endpoint("127.0.0.1:0".parse().expect("address"), None, 1 << 30)
        })
        .expect("bind");
        drop(endpoint);
        let logged = String::from_utf8_lossy(&captured.0.lock().expect("lock")).into_owned();
        assert!(logged.contains("net.core.rmem_max"), "{logged}");
        assert!(logged.contains("net.core.wmem_max"), "{logged}");
    }
}
