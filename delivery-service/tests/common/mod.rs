//! Shared helpers for the DS integration tests: a real DS on `127.0.0.1:0` with a temporary data
//! directory, raw protocol clients that register or authenticate with real keys, fake MLS
//! messages (the DS only peeks at their clear header) and real KeyPackages made with openmls.
//!
//! Every client reads its stream in a background task that forwards frames over a channel, so
//! waiting for a frame with a timeout never loses half a frame (quinn's `read_exact` is not
//! cancel-safe).

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mlschat_ds::LocalServer;
use mlschat_ds::client::{ChallengeSigner, RawConnection, read_frame};
use mlschat_ds::config::Limits;
use mlschat_ds::protocol::mls::{ContentType, MLS_VERSION_10, WireFormat};
use mlschat_ds::protocol::{
    ALPN, Accepted, Ack, ClientMessageId, CommitRouting, CreateGroup, Delivery, Epoch, ErrorCode,
    ErrorResponse, Fetch, Frame, GroupId, Messages, Ping, Seq, UserName,
};
use mlschat_ds::tls::CertFingerprint;
use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, CredentialWithKey, Extension, ExtensionType,
    Extensions, KeyPackage, MlsMessageOut, UnknownExtension,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use quinn::crypto::rustls::QuicClientConfig;
use rand::RngCore as _;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tls_codec::{Serialize as _, VLByteSlice};
use tokio::sync::mpsc;

/// Every test body runs under this limit, so that a hang fails instead of blocking CI.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The ciphersuite of every KeyPackage the tests make (the DS accepts Ed25519 keys only).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Runs a test body with [`TEST_TIMEOUT`].
pub async fn timed<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .expect("the test did not finish within its timeout")
}

pub fn user(name: &str) -> UserName {
    UserName::new(name).expect("valid test user name")
}

pub fn group(name: &str) -> GroupId {
    GroupId::new(name.as_bytes().to_vec()).expect("valid test group id")
}

pub fn random_message_id() -> ClientMessageId {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    id
}

// ---------------------------------------------------------------------------------------------
// Signers

/// A challenge signer that can be cloned into tasks and stored in a [`Client`].
#[derive(Clone)]
pub struct Signer(Arc<dyn ChallengeSigner + Send + Sync>);

impl Signer {
    /// A fresh Ed25519 key.
    pub fn ed25519() -> Signer {
        Signer(Arc::new(ed25519_dalek::SigningKey::generate(
            &mut rand::rngs::OsRng,
        )))
    }

    /// Signs challenges with an openmls key pair (the key inside the user's KeyPackages).
    pub fn mls(key_pair: Arc<SignatureKeyPair>) -> Signer {
        Signer(Arc::new(MlsSigner(key_pair)))
    }
}

impl ChallengeSigner for Signer {
    fn public_key(&self) -> Vec<u8> {
        self.0.public_key()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message)
    }
}

/// [`ChallengeSigner`] for an openmls `SignatureKeyPair`: its public key is the raw 32-byte
/// Ed25519 key and its `Signer::sign` gives a raw 64-byte Ed25519 signature, exactly what the DS
/// verifies, so one key serves both MLS and DS authentication.
pub struct MlsSigner(pub Arc<SignatureKeyPair>);

impl ChallengeSigner for MlsSigner {
    fn public_key(&self) -> Vec<u8> {
        self.0.public().to_vec()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        openmls_traits::signatures::Signer::sign(&*self.0, message)
            .expect("Ed25519 signing does not fail")
    }
}

/// An MLS identity: a Basic credential naming the user and an Ed25519 signature key pair.
pub struct MlsIdentity {
    pub name: UserName,
    pub key_pair: Arc<SignatureKeyPair>,
    provider: OpenMlsRustCrypto,
}

impl MlsIdentity {
    pub fn new(name: &str) -> MlsIdentity {
        let key_pair = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm())
            .expect("generate an Ed25519 key pair");
        MlsIdentity {
            name: user(name),
            key_pair: Arc::new(key_pair),
            provider: OpenMlsRustCrypto::default(),
        }
    }

    pub fn signer(&self) -> Signer {
        Signer::mls(Arc::clone(&self.key_pair))
    }

    /// A fresh KeyPackage, MLSMessage-framed as the DS expects it.
    pub fn key_package(&self, last_resort: bool) -> Vec<u8> {
        let credential = CredentialWithKey {
            credential: BasicCredential::new(self.name.as_str().as_bytes().to_vec()).into(),
            signature_key: self.key_pair.public().into(),
        };
        let mut builder = KeyPackage::builder();
        if last_resort {
            // openmls validates KeyPackage extensions against the leaf's capabilities, so a
            // last-resort KeyPackage must declare the extension or it fails verification.
            builder = builder.mark_as_last_resort().leaf_node_capabilities(
                Capabilities::builder()
                    .extensions(vec![ExtensionType::LastResort])
                    .build(),
            );
        }
        let bundle = builder
            .build(CIPHERSUITE, &self.provider, &*self.key_pair, credential)
            .expect("build a KeyPackage");
        MlsMessageOut::from(bundle.key_package().clone())
            .to_bytes()
            .expect("serialize a KeyPackage")
    }

    /// A valid KeyPackage padded with an unknown KeyPackage extension of `padding` bytes (so
    /// that its encoding is at least that large), with or without the last_resort extension.
    pub fn padded_key_package(&self, padding: usize, last_resort: bool) -> Vec<u8> {
        const PADDING: u16 = 0xff0a;
        let credential = CredentialWithKey {
            credential: BasicCredential::new(self.name.as_str().as_bytes().to_vec()).into(),
            signature_key: self.key_pair.public().into(),
        };
        let mut builder = KeyPackage::builder()
            .key_package_extensions(
                Extensions::single(Extension::Unknown(
                    PADDING,
                    UnknownExtension(vec![0x5a; padding]),
                ))
                .expect("an unknown extension is valid in a KeyPackage"),
            )
            .leaf_node_capabilities(
                Capabilities::builder()
                    .extensions(vec![
                        ExtensionType::Unknown(PADDING),
                        ExtensionType::LastResort,
                    ])
                    .build(),
            );
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(CIPHERSUITE, &self.provider, &*self.key_pair, credential)
            .expect("build a padded KeyPackage");
        MlsMessageOut::from(bundle.key_package().clone())
            .to_bytes()
            .expect("serialize a KeyPackage")
    }

    pub fn key_packages(&self, count: usize) -> Vec<Vec<u8>> {
        (0..count).map(|_| self.key_package(false)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Fake MLS messages

fn push_opaque(out: &mut Vec<u8>, bytes: &[u8]) {
    VLByteSlice(bytes)
        .tls_serialize(out)
        .expect("encode an opaque vector");
}

/// A minimally well-formed MLSMessage carrying a PrivateMessage (RFC 9420 §6.3): the clear
/// header the DS peeks at, then `body` as the ciphertext.
pub fn private_message(
    group_id: &GroupId,
    epoch: Epoch,
    content_type: ContentType,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MLS_VERSION_10.to_be_bytes());
    out.extend_from_slice(&(WireFormat::PrivateMessage as u16).to_be_bytes());
    push_opaque(&mut out, group_id.as_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.push(content_type as u8);
    push_opaque(&mut out, b""); // authenticated_data
    push_opaque(&mut out, &[0x5a; 16]); // encrypted_sender_data
    push_opaque(&mut out, body); // ciphertext
    out
}

/// A minimally well-formed MLSMessage carrying a PublicMessage (RFC 9420 §6.2) from member 0.
pub fn public_message(
    group_id: &GroupId,
    epoch: Epoch,
    content_type: ContentType,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MLS_VERSION_10.to_be_bytes());
    out.extend_from_slice(&(WireFormat::PublicMessage as u16).to_be_bytes());
    push_opaque(&mut out, group_id.as_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.push(1); // sender_type member
    out.extend_from_slice(&0u32.to_be_bytes()); // leaf_index
    push_opaque(&mut out, b""); // authenticated_data
    out.push(content_type as u8);
    push_opaque(&mut out, body); // the content, opaque to the DS
    push_opaque(&mut out, &[0x11; 64]); // signature
    if content_type == ContentType::Commit {
        push_opaque(&mut out, &[0x22; 32]); // confirmation_tag
    }
    push_opaque(&mut out, &[0x33; 32]); // membership_tag
    out
}

/// A fake Welcome: the MLSMessage header (version mls10, wire format welcome) then anything.
pub fn fake_welcome(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MLS_VERSION_10.to_be_bytes());
    out.extend_from_slice(&(WireFormat::Welcome as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Commit routing that adds `added` (with a fake Welcome) and removes `removed`.
pub fn routing(added: &[&UserName], removed: &[&UserName]) -> CommitRouting {
    CommitRouting {
        welcome: if added.is_empty() {
            None
        } else {
            Some(fake_welcome(b"welcome for the added members").into())
        },
        added: added.iter().map(|name| (*name).clone()).collect(),
        removed: removed.iter().map(|name| (*name).clone()).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Assertions on responses

#[track_caller]
pub fn expect_accepted(frame: Frame) -> Accepted {
    match frame {
        Frame::Accepted(accepted) => accepted,
        other => panic!("expected Accepted, got {other:?}"),
    }
}

#[track_caller]
pub fn expect_error(frame: Frame, code: ErrorCode) -> ErrorResponse {
    match frame {
        Frame::Error(error) => {
            assert_eq!(
                ErrorCode::from_u16(error.code),
                Some(code),
                "wrong error code in {error:?} (message: {})",
                String::from_utf8_lossy(error.message.as_slice())
            );
            error
        }
        other => panic!("expected Error {code}, got {other:?}"),
    }
}

#[track_caller]
pub fn expect_messages(frame: Frame) -> Messages {
    match frame {
        Frame::Messages(messages) => messages,
        other => panic!("expected Messages, got {other:?}"),
    }
}

/// Asserts a QUIC connection was closed by the DS with the application close code `code`.
pub async fn expect_close_code(connection: &quinn::Connection, code: ErrorCode) {
    match connection.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
            close.error_code.into_inner(),
            code as u64,
            "closed with the wrong code (reason: {})",
            String::from_utf8_lossy(&close.reason)
        ),
        other => panic!("expected an application close with {code}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Custom client configurations

/// Accepts exactly the pinned certificate, like the real client.
#[derive(Debug)]
struct Pinned(CertFingerprint, Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if CertFingerprint::of(end_entity.as_ref()) == self.0 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the pinned certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
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
            &self.1.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.1.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration like `tls::client_config`, but with the given ALPN and, if set, a
/// small stream receive window (to make a slow consumer).
pub fn client_config(
    server: &TestServer,
    alpn: &[u8],
    stream_receive_window: Option<u32>,
) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned(server.fingerprint(), provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).expect("QUIC client config");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    if let Some(window) = stream_receive_window {
        let mut transport = quinn::TransportConfig::default();
        transport
            .stream_receive_window(window.into())
            .receive_window((2 * window).into());
        config.transport_config(Arc::new(transport));
    }
    config
}

/// A client endpoint on 127.0.0.1 using `config`.
pub fn client_endpoint(config: quinn::ClientConfig) -> quinn::Endpoint {
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("address")).expect("client endpoint");
    endpoint.set_default_client_config(config);
    endpoint
}

// ---------------------------------------------------------------------------------------------
// The server

/// A DS on 127.0.0.1 with a temporary data directory.
pub struct TestServer {
    pub server: LocalServer,
    pub limits: Limits,
    _data: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> TestServer {
        let data = tempfile::tempdir().expect("create a temporary data directory");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        let server = LocalServer::start(listen, data.path(), limits.clone())
            .await
            .expect("the DS starts");
        TestServer {
            server,
            limits,
            _data: data,
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.server.address()
    }

    pub fn fingerprint(&self) -> CertFingerprint {
        self.server.fingerprint()
    }

    /// The DS's data directory (certificate and database).
    pub fn data_dir(&self) -> &std::path::Path {
        self._data.path()
    }

    /// Shuts the DS down gracefully and hands back its data directory for inspection.
    pub async fn shutdown(self) -> tempfile::TempDir {
        self.server.shutdown().await;
        self._data
    }

    /// A new raw connection whose stream receive window is only `window` bytes.
    pub async fn raw_with_window(&self, window: u32) -> RawConnection {
        let endpoint = client_endpoint(client_config(self, ALPN, Some(window)));
        let connection = endpoint
            .connect(self.address(), "mlschat-ds")
            .expect("start connecting")
            .await
            .expect("connect to the DS");
        let (send, recv) = connection.open_bi().await.expect("open the stream");
        RawConnection {
            endpoint,
            connection,
            send,
            recv,
        }
    }

    /// A new, unauthenticated raw connection.
    pub async fn raw(&self) -> RawConnection {
        RawConnection::connect(self.address(), self.fingerprint())
            .await
            .expect("connect to the DS")
    }

    /// A new, unauthenticated client that will act as `name`.
    pub async fn connect(&self, name: &str, signer: Signer) -> Client {
        Client::new(self.raw().await, user(name), signer)
    }

    /// Registers `name` with a fresh Ed25519 key on a new connection.
    pub async fn register(&self, name: &str) -> Client {
        self.register_with(name, Signer::ed25519()).await
    }

    /// Registers `name` with `signer` on a new connection.
    pub async fn register_with(&self, name: &str, signer: Signer) -> Client {
        let mut client = self.connect(name, signer).await;
        client.expect_authenticated_by_register().await;
        client
    }

    /// Authenticates an already registered user on a new connection.
    pub async fn login(&self, name: &UserName, signer: &Signer) -> Client {
        let mut client = Client::new(self.raw().await, name.clone(), signer.clone());
        let response = client.authenticate().await;
        match response {
            Frame::Authenticated(authenticated) => assert_eq!(&authenticated.user_name, name),
            other => panic!("expected Authenticated, got {other:?}"),
        }
        client
    }
}

// ---------------------------------------------------------------------------------------------
// The client

/// What the background reader saw.
#[derive(Debug)]
pub enum Incoming {
    Frame(Frame),
    /// The DS finished its side of the stream.
    Finished,
    /// Reading failed (for example because the connection was closed).
    Failed(String),
}

/// One connection to the DS, acting as one user.
pub struct Client {
    pub name: UserName,
    pub signer: Signer,
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    send: quinn::SendStream,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    next_request_id: u32,
    /// Responses that arrived while another was awaited.
    responses: HashMap<u32, Frame>,
    /// Deliveries that arrived while a response was awaited.
    deliveries: VecDeque<Delivery>,
    ended: Option<String>,
}

impl Client {
    pub fn new(raw: RawConnection, name: UserName, signer: Signer) -> Client {
        let RawConnection {
            endpoint,
            connection,
            send,
            mut recv,
        } = raw;
        let (forward, incoming) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let item = match read_frame(&mut recv).await {
                    Ok(Some(frame)) => Incoming::Frame(frame),
                    Ok(None) => Incoming::Finished,
                    Err(error) => Incoming::Failed(error.to_string()),
                };
                let last = !matches!(item, Incoming::Frame(_));
                if forward.send(item).is_err() || last {
                    return;
                }
            }
        });
        Client {
            name,
            signer,
            endpoint,
            connection,
            send,
            incoming,
            next_request_id: 1,
            responses: HashMap::new(),
            deliveries: VecDeque::new(),
            ended: None,
        }
    }

    pub fn next_request_id(&mut self) -> u32 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    fn exporter(&self) -> [u8; 32] {
        let mut exporter = [0u8; 32];
        self.connection
            .export_keying_material(&mut exporter, mlschat_ds::protocol::EXPORTER_LABEL, b"")
            .expect("TLS exporter");
        exporter
    }

    /// A `Register` frame signed for this connection.
    pub fn register_frame(&self, request_id: u32) -> Frame {
        let key = self.signer.public_key();
        let signed = mlschat_ds::protocol::AuthenticationTbs::to_signed_bytes(
            mlschat_ds::protocol::REGISTER_LABEL,
            &self.exporter(),
            &self.name,
            &key,
        );
        Frame::Register(mlschat_ds::protocol::Register {
            request_id,
            user_name: self.name.clone(),
            signature_key: key.into(),
            signature: self.signer.sign(&signed).into(),
        })
    }

    /// An `Authenticate` frame signed for this connection.
    pub fn authenticate_frame(&self, request_id: u32) -> Frame {
        let key = self.signer.public_key();
        let signed = mlschat_ds::protocol::AuthenticationTbs::to_signed_bytes(
            mlschat_ds::protocol::AUTHENTICATE_LABEL,
            &self.exporter(),
            &self.name,
            &key,
        );
        Frame::Authenticate(mlschat_ds::protocol::Authenticate {
            request_id,
            user_name: self.name.clone(),
            signature: self.signer.sign(&signed).into(),
        })
    }

    pub async fn register(&mut self) -> Frame {
        let id = self.next_request_id();
        let frame = self.register_frame(id);
        self.send_frame(&frame).await;
        self.response(id).await
    }

    pub async fn authenticate(&mut self) -> Frame {
        let id = self.next_request_id();
        let frame = self.authenticate_frame(id);
        self.send_frame(&frame).await;
        self.response(id).await
    }

    pub async fn expect_authenticated_by_register(&mut self) {
        match self.register().await {
            Frame::Authenticated(authenticated) => assert_eq!(authenticated.user_name, self.name),
            other => panic!("{}: expected Authenticated, got {other:?}", self.name),
        }
    }

    pub async fn send_frame(&mut self, frame: &Frame) {
        self.send_raw(&frame.encode()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.send
            .write_all(bytes)
            .await
            .expect("write to the DS stream");
    }

    /// Finishes our side of the stream.
    pub fn finish(&mut self) {
        self.send.finish().expect("finish the stream");
    }

    /// The next frame the DS sent, ignoring the buffers; `None` once the stream ended.
    async fn receive(&mut self) -> Option<Frame> {
        if self.ended.is_some() {
            return None;
        }
        match self.incoming.recv().await {
            Some(Incoming::Frame(frame)) => Some(frame),
            Some(Incoming::Finished) => {
                self.ended = Some("the DS finished the stream".into());
                None
            }
            Some(Incoming::Failed(error)) => {
                self.ended = Some(error);
                None
            }
            None => {
                self.ended = Some("the reader stopped".into());
                None
            }
        }
    }

    /// Files a frame that is not the one awaited.
    fn stash(&mut self, frame: Frame) {
        match frame {
            Frame::Deliver(delivery) => self.deliveries.push_back(delivery),
            other => {
                let id = other
                    .request_id()
                    .unwrap_or_else(|| panic!("unexpected frame without request id: {other:?}"));
                let previous = self.responses.insert(id, other);
                assert!(
                    previous.is_none(),
                    "two responses for request {id}: {previous:?}"
                );
            }
        }
    }

    /// The response to request `id`; deliveries that arrive meanwhile are kept for later.
    pub async fn response(&mut self, id: u32) -> Frame {
        self.try_response(id).await.unwrap_or_else(|| {
            panic!(
                "{}: the stream ended before the response to request {id}: {:?}",
                self.name, self.ended
            )
        })
    }

    /// Like [`Client::response`], but `None` if the stream ends first.
    pub async fn try_response(&mut self, id: u32) -> Option<Frame> {
        if let Some(frame) = self.responses.remove(&id) {
            return Some(frame);
        }
        loop {
            let frame = self.receive().await?;
            if frame.request_id() == Some(id) && !matches!(frame, Frame::Deliver(_)) {
                return Some(frame);
            }
            self.stash(frame);
        }
    }

    /// Sends the request `make` builds with a fresh request id and waits for its response.
    pub async fn request(&mut self, make: impl FnOnce(u32) -> Frame) -> Frame {
        let id = self.next_request_id();
        let frame = make(id);
        self.send_frame(&frame).await;
        self.response(id).await
    }

    /// The next delivery, from the buffer or the stream.
    pub async fn next_delivery(&mut self) -> Delivery {
        if let Some(delivery) = self.deliveries.pop_front() {
            return delivery;
        }
        loop {
            let Some(frame) = self.receive().await else {
                panic!(
                    "{}: the stream ended while a delivery was awaited: {:?}",
                    self.name, self.ended
                );
            };
            match frame {
                Frame::Deliver(delivery) => return delivery,
                other => self.stash(other),
            }
        }
    }

    /// The next `count` deliveries.
    pub async fn deliveries(&mut self, count: usize) -> Vec<Delivery> {
        let mut deliveries = Vec::with_capacity(count);
        for _ in 0..count {
            deliveries.push(self.next_delivery().await);
        }
        deliveries
    }

    /// A delivery that arrives within `wait`, if any.
    pub async fn delivery_within(&mut self, wait: Duration) -> Option<Delivery> {
        tokio::time::timeout(wait, self.next_delivery()).await.ok()
    }

    /// Asserts that the DS closes this connection with `code`: first an `Error` frame with that
    /// code (the DS finishes its stream and waits for the client to read it before closing),
    /// then the QUIC application close code.
    pub async fn expect_closed(&mut self, code: ErrorCode) {
        let frames = self.drain_until_closed().await;
        let errors: Vec<&ErrorResponse> = frames
            .iter()
            .filter_map(|frame| match frame {
                Frame::Error(error) => Some(error),
                _ => None,
            })
            .collect();
        assert!(
            !errors.is_empty(),
            "{}: no Error frame before the close with {code}",
            self.name
        );
        for error in errors {
            assert_eq!(
                ErrorCode::from_u16(error.code),
                Some(code),
                "{}: closing error frame {error:?} (message: {})",
                self.name,
                String::from_utf8_lossy(error.message.as_slice())
            );
        }
        expect_close_code(&self.connection, code).await;
    }

    /// Asserts that the DS closes this connection with `code` as the QUIC application close
    /// code, for closes that come without an `Error` frame (session replacement, no stream).
    pub async fn expect_closed_without_frame(&mut self, code: ErrorCode) {
        for frame in self.drain_until_closed().await {
            if let Frame::Error(error) = frame {
                assert_eq!(ErrorCode::from_u16(error.code), Some(code), "{error:?}");
            }
        }
        expect_close_code(&self.connection, code).await;
    }

    /// Every response frame still buffered or arriving until the stream ends (deliveries are
    /// dropped).
    async fn drain_until_closed(&mut self) -> Vec<Frame> {
        let mut frames: Vec<Frame> = self.responses.drain().map(|(_, frame)| frame).collect();
        while let Some(frame) = self.receive().await {
            match frame {
                Frame::Deliver(_) => {}
                Frame::Error(_) => frames.push(frame),
                other => panic!("{}: unexpected {other:?} before the close", self.name),
            }
        }
        frames
    }

    /// A Ping round trip.
    pub async fn ping(&mut self) {
        match self
            .request(|id| Frame::Ping(Ping { request_id: id }))
            .await
        {
            Frame::Pong(_) => {}
            other => panic!("{}: expected Pong, got {other:?}", self.name),
        }
    }

    pub async fn create_group(&mut self, group_id: &GroupId) {
        let group_id = group_id.clone();
        match self
            .request(|id| {
                Frame::CreateGroup(CreateGroup {
                    request_id: id,
                    group_id,
                })
            })
            .await
        {
            Frame::GroupCreated(created) => assert_eq!(created.epoch, 0),
            other => panic!("expected GroupCreated, got {other:?}"),
        }
    }

    /// Sends one MLS message with a fresh client message id.
    pub async fn send_message(&mut self, message: Vec<u8>, commit: Option<CommitRouting>) -> Frame {
        self.send_message_with_id(random_message_id(), message, commit)
            .await
    }

    pub async fn send_message_with_id(
        &mut self,
        client_message_id: ClientMessageId,
        message: Vec<u8>,
        commit: Option<CommitRouting>,
    ) -> Frame {
        self.request(|id| send_frame(id, client_message_id, message, commit))
            .await
    }

    /// Sends an application message (a fake PrivateMessage) and expects it to be accepted.
    pub async fn send_application(
        &mut self,
        group_id: &GroupId,
        epoch: Epoch,
        body: &[u8],
    ) -> Accepted {
        let message = private_message(group_id, epoch, ContentType::Application, body);
        let accepted = expect_accepted(self.send_message(message, None).await);
        assert_eq!(
            accepted.epoch, epoch,
            "an application message keeps the epoch"
        );
        accepted
    }

    /// Sends a commit (a fake PrivateMessage) with the given routing.
    pub async fn send_commit(
        &mut self,
        group_id: &GroupId,
        epoch: Epoch,
        body: &[u8],
        routing: Option<CommitRouting>,
    ) -> Frame {
        let message = private_message(group_id, epoch, ContentType::Commit, body);
        self.send_message(message, routing).await
    }

    pub async fn fetch(&mut self, group_id: &GroupId, after_seq: Seq, limit: u32) -> Frame {
        let group_id = group_id.clone();
        self.request(|id| {
            Frame::Fetch(Fetch {
                request_id: id,
                group_id,
                after_seq,
                limit,
            })
        })
        .await
    }

    /// Fetches everything after `after_seq`, page by page.
    pub async fn fetch_all(&mut self, group_id: &GroupId, after_seq: Seq) -> Vec<Delivery> {
        let mut all: Vec<Delivery> = Vec::new();
        let mut after = after_seq;
        loop {
            let page = expect_messages(self.fetch(group_id, after, 1000).await);
            if let Some(last) = page.messages.last() {
                after = last.seq;
            }
            all.extend(page.messages);
            if page.more == 0 {
                return all;
            }
        }
    }

    pub async fn ack(&mut self, group_id: &GroupId, seq: Seq) {
        self.send_frame(&Frame::Ack(Ack {
            group_id: group_id.clone(),
            seq,
        }))
        .await;
    }

    /// Ends the connection gracefully: finishes our side and waits until the DS has finished
    /// its side, which it does only after every request we sent (acks included) completed.
    pub async fn disconnect(mut self) {
        self.finish();
        while self.receive().await.is_some() {}
        assert_eq!(
            self.ended.as_deref(),
            Some("the DS finished the stream"),
            "{}: the DS did not end the stream cleanly",
            self.name
        );
        self.connection.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }

    /// Closes the connection abruptly.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

/// A `Send` frame.
pub fn send_frame(
    request_id: u32,
    client_message_id: ClientMessageId,
    message: Vec<u8>,
    commit: Option<CommitRouting>,
) -> Frame {
    Frame::Send(mlschat_ds::protocol::Send {
        request_id,
        client_message_id,
        message: message.into(),
        commit,
    })
}

/// Creates `group_id` with `members[0]` as creator, adds the others with one commit at epoch 0
/// and consumes the setup deliveries (the commit for the creator, the Welcome for the others).
/// The group is then at epoch 1 with seq 1 used.
pub async fn setup_group(members: &mut [&mut Client], group_id: &GroupId) {
    let (creator, others) = members.split_first_mut().expect("at least the creator");
    creator.create_group(group_id).await;
    if others.is_empty() {
        return;
    }
    let added: Vec<UserName> = others.iter().map(|client| client.name.clone()).collect();
    let added_refs: Vec<&UserName> = added.iter().collect();
    let accepted = expect_accepted(
        creator
            .send_commit(
                group_id,
                0,
                b"setup commit",
                Some(routing(&added_refs, &[])),
            )
            .await,
    );
    assert_eq!((accepted.seq, accepted.epoch), (1, 1));
    let commit = creator.next_delivery().await;
    assert_eq!((commit.seq, commit.kind), (1, 3));
    for member in others.iter_mut() {
        let welcome = member.next_delivery().await;
        assert_eq!((welcome.seq, welcome.epoch, welcome.kind), (1, 1, 4));
    }
}
