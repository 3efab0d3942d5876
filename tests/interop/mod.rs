//! Support for the MLS interop tests (`tests/interop_mls_rs.rs`).
//!
//! - [`MlsRsPeer`]: a second, independent MLS implementation (mls-rs with the RustCrypto
//!   provider) that speaks the mlschat DS protocol. It is written from `docs/protocol.md` and the
//!   shared wire types (`mlschat_ds::protocol`, `mlschat_ds::client`) only: it shares no code
//!   with the mlschat client core and never touches openmls.
//! - [`Chat`]: a real mlschat client (`mlschat::client::Client`) driven through the library.
//! - [`Ds`]: a real DS on `127.0.0.1:0`.
//!
//! Every wait is bounded by [`STEP`], so that a hang fails the test instead of blocking CI.

// The test binary uses most, not all, of these helpers.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::Duration;

use mls_rs::client_builder::{BaseConfig, WithCryptoProvider, WithIdentityProvider, WithMlsRules};
use mls_rs::crypto::{SignaturePublicKey, SignatureSecretKey};
use mls_rs::extension::ExtensionType as RsExtensionType;
use mls_rs::group::proposal::ProposalType as RsProposalType;
use mls_rs::group::{CommitEffect, CommitOutput, ReceivedMessage};
use mls_rs::identity::SigningIdentity;
use mls_rs::identity::basic::{BasicCredential, BasicIdentityProvider};
use mls_rs::mls_rules::{CommitOptions, DefaultMlsRules};
use mls_rs::{
    CipherSuite, CipherSuiteProvider, CryptoProvider, Extension, ExtensionList, MlsMessage,
};
use mls_rs_crypto_rustcrypto::RustCryptoProvider;
use mlschat::client::{Client, ClientOptions};
use mlschat::core::{Command, CoreEvent, CoreInput};
use mlschat_ds::LocalServer;
use mlschat_ds::client::{ChallengeSigner, RawConnection, read_frame};
use mlschat_ds::config::Limits;
use mlschat_ds::protocol::{
    Ack, ClaimKeyPackage, CommitRouting, CreateGroup, Delivery, DeliveryKind, ErrorCode, Frame,
    GroupId, Send, UploadKeyPackages, UserName,
};
use tokio::sync::mpsc;

/// The longest a single expected event may take.
pub const STEP: Duration = Duration::from_secs(15);
/// The longest a whole scenario may take.
pub const SCENARIO: Duration = Duration::from_secs(60);

/// The cipher suite both implementations use: MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519
/// (0x0001, RFC 9420 §17.1). Ed25519 is the only signature scheme the DS accepts.
pub const SUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

/// An extension type and a proposal type from the private-use range (RFC 9420 §17.3, §17.4)
/// that the peer advertises in its capabilities, as an implementation with extras would. The
/// peer also puts an extension of type [`EXTRA_EXTENSION`] in its leaf nodes.
pub const EXTRA_EXTENSION: u16 = 0xf0a0;
pub const EXTRA_PROPOSAL: u16 = 0xf0a1;
/// GREASE values (RFC 9420 §13.5) the peer lists in its capabilities.
pub const GREASE_EXTENSION: u16 = 0x0a0a;
pub const GREASE_PROPOSAL: u16 = 0x1a1a;
/// The GREASE extension type that [`PeerOptions::grease_extension`] puts in KeyPackages.
pub const GREASE_KEY_PACKAGE_EXTENSION: u16 = 0x2a2a;
/// The GREASE extension the peer puts in the GroupInfo of its Welcomes (RFC 9420 §13.5: a
/// joiner must ignore unknown GroupInfo extensions).
pub const GREASE_GROUP_INFO_EXTENSION: u16 = 0x3a3a;

/// Runs a scenario under [`SCENARIO`].
pub async fn timed<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(SCENARIO, body)
        .await
        .expect("the scenario did not finish within its timeout")
}

pub fn user(name: &str) -> UserName {
    UserName::new(name).expect("valid test user name")
}

// ---------------------------------------------------------------------------------------------
// Log capture

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LOG_INIT: Once = Once::new();

struct CaptureWriter;

impl Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(bytes).trim_end().to_string();
        if std::env::var_os("MLSCHAT_TEST_LOG").is_some() {
            eprintln!("{line}");
        }
        if let Ok(mut log) = LOG.lock() {
            log.push(line);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records the mlschat client's debug log (with thread names) for the whole test binary, so
/// a test can check what the client did where no event says it (a refused commit is retried
/// silently). Set `MLSCHAT_TEST_LOG=1` to see it on stderr as well.
pub fn capture_logs() {
    LOG_INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("mlschat=debug"))
            .with_writer(|| CaptureWriter)
            .with_thread_names(true)
            .with_ansi(false)
            .try_init();
    });
}

/// Captured log lines that contain every one of `needles`.
pub fn log_lines(needles: &[&str]) -> Vec<String> {
    LOG.lock()
        .map(|log| {
            log.iter()
                .filter(|line| needles.iter().all(|needle| line.contains(needle)))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The DS

/// A DS running in this process with its data in a temporary directory.
pub struct Ds {
    pub server: LocalServer,
    pub dir: tempfile::TempDir,
}

impl Ds {
    pub async fn start() -> Ds {
        capture_logs();
        let dir = tempfile::tempdir().expect("temporary directory");
        let server = LocalServer::start(
            "127.0.0.1:0".parse().expect("address"),
            &dir.path().join("ds"),
            Limits::default(),
        )
        .await
        .expect("the DS starts");
        Ds { server, dir }
    }

    pub fn address(&self) -> String {
        self.server.address().to_string()
    }

    pub fn fingerprint(&self) -> String {
        self.server.fingerprint().to_hex()
    }
}

// ---------------------------------------------------------------------------------------------
// mlschat clients

/// What `/status` reports for a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatStatus {
    pub ciphersuite: String,
    pub epoch: u64,
    pub epoch_authenticator: String,
    pub members: usize,
}

/// A real mlschat client, driven through `Client::start` and its command/event channels.
pub struct Chat {
    pub name: UserName,
    dir: PathBuf,
    server: String,
    pinned: String,
    client: Option<Client>,
    /// Events received and not yet returned by a wait.
    pending: VecDeque<CoreEvent>,
    /// Every event received, oldest first.
    pub history: Vec<CoreEvent>,
}

impl Chat {
    /// Starts an mlschat client for `name` against `ds` and waits until it is ready (registered,
    /// KeyPackages uploaded).
    pub async fn start(ds: &Ds, name: &str) -> Chat {
        let mut chat = Chat {
            name: user(name),
            dir: ds.dir.path().join("clients").join(name),
            server: ds.address(),
            pinned: ds.fingerprint(),
            client: None,
            pending: VecDeque::new(),
            history: Vec::new(),
        };
        chat.launch().await;
        chat.wait_ready().await;
        chat
    }

    /// Starts the client (again) on its profile without waiting for anything.
    pub async fn launch(&mut self) {
        assert!(self.client.is_none(), "{} is already running", self.name);
        let mut options = ClientOptions::new(self.name.clone(), self.dir.clone());
        options.server = Some(self.server.clone());
        options.pinned = Some(self.pinned.clone());
        options.auto_update = None;
        self.client = Some(Client::start(options).await.expect("the client starts"));
    }

    pub async fn wait_ready(&mut self) {
        self.wait_for("ready", |event| {
            matches!(event, CoreEvent::Ready { .. }).then_some(())
        })
        .await;
    }

    /// `/quit`, then waits for the core and the network task to end.
    pub async fn stop(&mut self) {
        self.command(Command::Quit);
        self.wait_for("stopped", |event| {
            (*event == CoreEvent::Stopped).then_some(())
        })
        .await;
        if let Some(client) = self.client.take() {
            client.finish().await;
        }
    }

    pub fn command(&self, command: Command) {
        self.client
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
            .inputs
            .send(CoreInput::Command(command))
            .expect("the core accepts commands");
    }

    /// Returns the first not yet returned event for which `pick` gives a value, waiting up to
    /// [`STEP`] for it. Other events stay pending for later waits.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&CoreEvent) -> Option<T>,
    ) -> T {
        if let Some(position) = self.pending.iter().position(|event| pick(event).is_some()) {
            let event = self.pending.remove(position).expect("position is in range");
            return pick(&event).expect("the event matched before");
        }
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let client = self
                .client
                .as_mut()
                .unwrap_or_else(|| panic!("{} is not running", self.name));
            let event = match tokio::time::timeout_at(deadline, client.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => panic!("{}: the client stopped while waiting for {what}", self.name),
                Err(_) => panic!(
                    "{}: no {what} within {STEP:?}; events so far: {:#?}",
                    self.name, self.history
                ),
            };
            self.history.push(event.clone());
            if let Some(value) = pick(&event) {
                return value;
            }
            self.pending.push_back(event);
        }
    }

    /// `/create NAME`; returns the new group's id.
    pub async fn create_group(&mut self, name: &str) -> GroupId {
        self.command(Command::CreateGroup {
            name: name.into(),
            id: None,
        });
        self.wait_for("group created", |event| match event {
            CoreEvent::GroupCreated { group } => Some(group.id.clone()),
            _ => None,
        })
        .await
    }

    pub fn send_text(&self, group: &GroupId, text: &str) {
        self.command(Command::Send {
            group: group.clone(),
            text: text.into(),
        });
    }

    pub async fn status(&mut self, group: &GroupId) -> ChatStatus {
        self.command(Command::Status {
            group: group.clone(),
        });
        self.wait_for("status", |event| match event {
            CoreEvent::Status {
                group: of,
                ciphersuite,
                epoch,
                epoch_authenticator,
                members,
                ..
            } if of.id == *group => Some(ChatStatus {
                ciphersuite: ciphersuite.clone(),
                epoch: *epoch,
                epoch_authenticator: epoch_authenticator.clone(),
                members: *members,
            }),
            _ => None,
        })
        .await
    }

    /// Polls `/status` until the group is at `epoch` (fails if it goes past it).
    pub async fn wait_epoch(&mut self, group: &GroupId, epoch: u64) -> ChatStatus {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let status = self.status(group).await;
            if status.epoch == epoch {
                return status;
            }
            assert!(
                status.epoch < epoch,
                "{} went past epoch {epoch}: {status:?}",
                self.name
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not reach epoch {epoch} within {STEP:?} (at {}); events: {:#?}",
                self.name,
                status.epoch,
                self.history
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_message(&mut self, group: &GroupId, from: &str, text: &str) {
        self.wait_for(
            &format!("message {text:?} from {from}"),
            |event| match event {
                CoreEvent::Message {
                    group: of,
                    from: sender,
                    text: body,
                    ..
                } if of.id == *group && sender == from && body == text => Some(()),
                _ => None,
            },
        )
        .await
    }

    /// Waits for this client to join a group from a Welcome; returns the group and the
    /// inviter it names.
    pub async fn wait_joined(&mut self) -> (GroupId, String) {
        self.wait_for("joined", |event| match event {
            CoreEvent::Joined { group, by } => Some((group.id.clone(), by.clone())),
            _ => None,
        })
        .await
    }

    /// Every error the client reported.
    pub fn errors(&self) -> Vec<String> {
        self.history
            .iter()
            .filter_map(|event| match event {
                CoreEvent::Error { message } => Some(message.clone()),
                CoreEvent::Failed { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .collect()
    }

    /// Asserts that the client reported no error, then stops it.
    pub async fn finish_clean(mut self) {
        // Pick up whatever arrived last.
        if let Some(client) = self.client.as_mut() {
            while let Ok(event) = client.events.try_recv() {
                self.history.push(event.clone());
                self.pending.push_back(event);
            }
        }
        let errors = self.errors();
        assert!(
            errors.is_empty(),
            "{} reported errors: {errors:#?}",
            self.name
        );
        self.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// The mls-rs peer

/// The mls-rs client configuration of the peer: in-memory storage, Basic credentials, the
/// RustCrypto provider and the default rules (with commit options of our choosing).
pub type PeerConfig = WithMlsRules<
    DefaultMlsRules,
    WithIdentityProvider<BasicIdentityProvider, WithCryptoProvider<RustCryptoProvider, BaseConfig>>,
>;
type PeerClient = mls_rs::Client<PeerConfig>;
type PeerGroup = mls_rs::Group<PeerConfig>;

/// How the peer behaves where RFC 9420 leaves a choice.
#[derive(Debug, Clone, Copy)]
pub struct PeerOptions {
    /// Put the ratchet tree in Welcomes (RFC 9420 §12.4.3.3). mls-rs does by default.
    pub ratchet_tree_in_welcome: bool,
    /// Send handshake messages as PrivateMessage. mls-rs sends PublicMessage by default.
    pub encrypt_handshakes: bool,
    /// Put a GREASE extension in every KeyPackage's `extensions` (and list it in the leaf's
    /// capabilities, as RFC 9420 §10 requires). mls-rs's own `grease` feature does not list it,
    /// which makes its KeyPackages invalid, so the peer does it by hand.
    pub grease_extension: bool,
}

impl Default for PeerOptions {
    fn default() -> PeerOptions {
        PeerOptions {
            ratchet_tree_in_welcome: true,
            encrypt_handshakes: false,
            grease_extension: false,
        }
    }
}

/// The peer's signing key: it is both the MLS leaf signature key and the key the peer
/// registers with the DS (docs/protocol.md §5, §9).
#[derive(Clone)]
pub struct PeerKey {
    crypto: RustCryptoProvider,
    secret: SignatureSecretKey,
    public: SignaturePublicKey,
}

impl ChallengeSigner for PeerKey {
    fn public_key(&self) -> Vec<u8> {
        self.public.as_bytes().to_vec()
    }

    /// Pure Ed25519 over the challenge bytes (mls-rs's `sign` adds no MLS label itself).
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let suite = self
            .crypto
            .cipher_suite_provider(SUITE)
            .expect("the RustCrypto provider supports suite 1");
        suite.sign(&self.secret, message).expect("Ed25519 signs")
    }
}

/// What the peer decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub group: GroupId,
    pub seq: u64,
    pub from: String,
    /// The `type` of an mlschat JSON envelope, or `None` for a plain payload.
    pub envelope: Option<String>,
    /// The text of a `text` envelope, or the payload itself when it is plain UTF-8.
    pub text: Option<String>,
}

/// How a commit the peer sent fared at the DS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The DS sequenced it; the peer merged it when it reached its seq.
    Accepted { seq: u64, epoch: u64 },
    /// Another commit won the epoch (`StaleEpoch`): the peer discarded its own and processed
    /// the winner.
    Lost { current_epoch: u64 },
}

struct Joined {
    group: PeerGroup,
    /// The highest seq processed.
    cursor: u64,
    active: bool,
}

/// An mls-rs client speaking the mlschat DS protocol.
pub struct MlsRsPeer {
    pub name: UserName,
    pub key: PeerKey,
    options: PeerOptions,
    client: PeerClient,
    send: quinn::SendStream,
    frames: mpsc::UnboundedReceiver<Frame>,
    _connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
    next_request_id: u32,
    /// Deliveries read while waiting for a response, in arrival order.
    backlog: VecDeque<Delivery>,
    groups: HashMap<GroupId, Joined>,
    /// (group, seq) of messages this peer sent and the DS accepted.
    own: HashSet<(GroupId, u64)>,
    /// Those of them that are application messages, which the DS does not push back within a
    /// session (docs/protocol.md §8.2): the cursor steps over them.
    own_application: HashSet<(GroupId, u64)>,
    pub received: Vec<Received>,
    /// Epochs and committers of the commits the peer processed or merged, per group.
    pub commits: Vec<(GroupId, u64, String)>,
    /// Why joining from a Welcome failed, if it did.
    pub join_errors: Vec<String>,
}

fn identity_of(signing_identity: &SigningIdentity) -> String {
    signing_identity
        .credential
        .as_basic()
        .map(|basic| String::from_utf8_lossy(basic.identifier()).into_owned())
        .unwrap_or_else(|| "(not a Basic credential)".into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl MlsRsPeer {
    /// Creates the peer's key and MLS client, connects to the DS (pinning its certificate) and
    /// registers `name` with the MLS signing key.
    pub async fn connect(ds: &Ds, name: &str, options: PeerOptions) -> MlsRsPeer {
        let name = user(name);
        let crypto = RustCryptoProvider::new();
        let suite = crypto
            .cipher_suite_provider(SUITE)
            .expect("the RustCrypto provider supports suite 1");
        let (secret, public) = suite.signature_key_generate().expect("Ed25519 key");
        let key = PeerKey {
            crypto: crypto.clone(),
            secret: secret.clone(),
            public: public.clone(),
        };
        // The DS checks both: a Basic credential whose identity is the user name, and a leaf
        // signature key equal to the registered key.
        let credential = BasicCredential::new(name.as_str().as_bytes().to_vec());
        let signing_identity = SigningIdentity::new(credential.into_credential(), public);
        let rules = DefaultMlsRules::new()
            .with_commit_options(
                CommitOptions::new().with_ratchet_tree_extension(options.ratchet_tree_in_welcome),
            )
            .with_encryption_options(mls_rs::mls_rules::EncryptionOptions::new(
                options.encrypt_handshakes,
                mls_rs::client_builder::PaddingMode::None,
            ));
        // Extras a conforming implementation may advertise: private-use and GREASE values
        // (RFC 9420 §13.5) in its capabilities.
        let mut extension_types = vec![EXTRA_EXTENSION, GREASE_EXTENSION];
        if options.grease_extension {
            extension_types.push(GREASE_KEY_PACKAGE_EXTENSION);
        }
        let client = mls_rs::Client::builder()
            .crypto_provider(crypto)
            .identity_provider(BasicIdentityProvider::new())
            .mls_rules(rules)
            .extension_types(extension_types.into_iter().map(RsExtensionType::new))
            .custom_proposal_types(
                [EXTRA_PROPOSAL, GREASE_PROPOSAL]
                    .into_iter()
                    .map(RsProposalType::new),
            )
            .signing_identity(signing_identity, secret, SUITE)
            .build();

        let pinned = ds.server.fingerprint();
        let mut raw = RawConnection::connect(ds.server.address(), pinned)
            .await
            .expect("the peer connects");
        let register = raw
            .register_frame(1, &name, &key)
            .expect("the exporter is available");
        raw.send_frame(&register).await.expect("Register is sent");
        let RawConnection {
            endpoint,
            connection,
            send,
            mut recv,
        } = raw;
        // One task reads the stream, so that waiting with a timeout never cuts a frame apart.
        let (frames_in, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(frame)) = read_frame(&mut recv).await {
                if frames_in.send(frame).is_err() {
                    break;
                }
            }
        });
        let mut peer = MlsRsPeer {
            name,
            key,
            options,
            client,
            send,
            frames,
            _connection: connection,
            _endpoint: endpoint,
            next_request_id: 2,
            backlog: VecDeque::new(),
            groups: HashMap::new(),
            own: HashSet::new(),
            own_application: HashSet::new(),
            received: Vec::new(),
            commits: Vec::new(),
            join_errors: Vec::new(),
        };
        match peer.response(1).await {
            Frame::Authenticated(authenticated) => {
                assert_eq!(authenticated.user_name, peer.name);
            }
            other => panic!("{}: Register answered with {other:?}", peer.name),
        }
        peer
    }

    // ---- framing ---------------------------------------------------------------------------

    async fn next_frame(&mut self, deadline: tokio::time::Instant) -> Frame {
        match tokio::time::timeout_at(deadline, self.frames.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!("{}: the DS closed the connection", self.name),
            Err(_) => panic!("{}: nothing from the DS within {STEP:?}", self.name),
        }
    }

    /// Reads frames until the response to `request_id`; deliveries read meanwhile are kept
    /// for later, in order.
    async fn response(&mut self, request_id: u32) -> Frame {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match self.next_frame(deadline).await {
                Frame::Deliver(delivery) => self.backlog.push_back(delivery),
                Frame::Error(error) if error.request_id == 0 => panic!(
                    "{}: the DS reported a connection error: {error:?}",
                    self.name
                ),
                frame if frame.request_id() == Some(request_id) => return frame,
                other => panic!("{}: unexpected frame {other:?}", self.name),
            }
        }
    }

    async fn request(&mut self, make: impl FnOnce(u32) -> Frame) -> Frame {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let frame = make(request_id);
        self.send
            .write_all(&frame.encode())
            .await
            .expect("the request is written");
        self.response(request_id).await
    }

    async fn ack(&mut self, group: &GroupId, seq: u64) {
        let frame = Frame::Ack(Ack {
            group_id: group.clone(),
            seq,
        });
        self.send
            .write_all(&frame.encode())
            .await
            .expect("the Ack is written");
    }

    fn random_bytes(&self, len: usize) -> Vec<u8> {
        self.key
            .crypto
            .cipher_suite_provider(SUITE)
            .expect("suite 1")
            .random_bytes_vec(len)
            .expect("random bytes")
    }

    // ---- KeyPackages -------------------------------------------------------------------------

    /// The extensions of the peer's leaf nodes: one of a type mlschat does not know.
    fn leaf_extensions() -> ExtensionList {
        let mut extensions = ExtensionList::new();
        extensions.set(Extension::new(
            RsExtensionType::new(EXTRA_EXTENSION),
            b"an extension mlschat does not know".to_vec(),
        ));
        extensions
    }

    /// A fresh KeyPackage, MLSMessage-framed (wire format `mls_key_package`).
    pub fn key_package(&self) -> Vec<u8> {
        let mut extensions = ExtensionList::new();
        if self.options.grease_extension {
            extensions.set(Extension::new(
                RsExtensionType::new(GREASE_KEY_PACKAGE_EXTENSION),
                Vec::new(),
            ));
        }
        self.client
            .generate_key_package_message(extensions, Self::leaf_extensions(), None)
            .expect("mls-rs generates a KeyPackage")
            .to_bytes()
            .expect("the KeyPackage encodes")
    }

    /// Uploads `count` one-time KeyPackages (docs/protocol.md §9).
    pub async fn upload_key_packages(&mut self, count: usize) {
        if let Err((code, message)) = self.try_upload_key_packages(count).await {
            panic!(
                "{}: the DS refused our KeyPackages ({code}): {message}",
                self.name
            );
        }
    }

    /// Uploads `count` one-time KeyPackages; on refusal, the error code and message.
    pub async fn try_upload_key_packages(&mut self, count: usize) -> Result<(), (u16, String)> {
        let key_packages = (0..count).map(|_| self.key_package().into()).collect();
        match self
            .request(|request_id| {
                Frame::UploadKeyPackages(UploadKeyPackages {
                    request_id,
                    key_packages,
                    last_resort: None,
                })
            })
            .await
        {
            Frame::KeyPackagesStored(stored) => {
                assert_eq!(stored.remaining as usize, count);
                Ok(())
            }
            Frame::Error(error) => Err((
                error.code,
                String::from_utf8_lossy(error.message.as_slice()).into_owned(),
            )),
            other => panic!("{}: UploadKeyPackages answered with {other:?}", self.name),
        }
    }

    /// Claims one KeyPackage of `user` from the DS.
    pub async fn claim(&mut self, user_name: &UserName) -> MlsMessage {
        let name = user_name.clone();
        match self
            .request(|request_id| {
                Frame::ClaimKeyPackage(ClaimKeyPackage {
                    request_id,
                    user_name: name,
                })
            })
            .await
        {
            Frame::KeyPackage(response) => MlsMessage::from_bytes(response.key_package.as_slice())
                .expect("the claimed KeyPackage decodes"),
            other => panic!(
                "{}: cannot claim a KeyPackage of {user_name}: {other:?}",
                self.name
            ),
        }
    }

    // ---- groups ------------------------------------------------------------------------------

    /// Registers a new group with the DS and creates it in mls-rs with the same id.
    pub async fn create_group(&mut self) -> GroupId {
        let group_id = GroupId::new(self.random_bytes(16)).expect("16 bytes is a valid group id");
        let id = group_id.clone();
        match self
            .request(|request_id| {
                Frame::CreateGroup(CreateGroup {
                    request_id,
                    group_id: id,
                })
            })
            .await
        {
            Frame::GroupCreated(created) => assert_eq!(created.epoch, 0),
            other => panic!("{}: CreateGroup answered with {other:?}", self.name),
        }
        let group = self
            .client
            .create_group_with_id(
                group_id.as_bytes().to_vec(),
                ExtensionList::new(),
                Self::leaf_extensions(),
                None,
            )
            .expect("mls-rs creates the group");
        self.groups.insert(
            group_id.clone(),
            Joined {
                group,
                cursor: 0,
                active: true,
            },
        );
        group_id
    }

    fn joined(&self, group: &GroupId) -> &Joined {
        self.groups
            .get(group)
            .unwrap_or_else(|| panic!("{} is not in group {group}", self.name))
    }

    fn joined_mut(&mut self, group: &GroupId) -> &mut Joined {
        let name = self.name.clone();
        self.groups
            .get_mut(group)
            .unwrap_or_else(|| panic!("{name} is not in group {group}"))
    }

    pub fn is_member(&self, group: &GroupId) -> bool {
        self.groups.get(group).is_some_and(|joined| joined.active)
    }

    pub fn epoch(&self, group: &GroupId) -> u64 {
        self.joined(group).group.current_epoch()
    }

    /// The epoch authenticator (RFC 9420 §8.7) of the current epoch, in hex.
    pub fn epoch_authenticator(&self, group: &GroupId) -> String {
        let secret = self
            .joined(group)
            .group
            .epoch_authenticator()
            .expect("mls-rs has the epoch authenticator");
        hex(secret.as_ref())
    }

    pub fn cipher_suite(&self, group: &GroupId) -> CipherSuite {
        self.joined(group).group.cipher_suite()
    }

    /// The identities of the group's members, by leaf index.
    pub fn members(&self, group: &GroupId) -> Vec<String> {
        self.joined(group)
            .group
            .roster()
            .members_iter()
            .map(|member| identity_of(&member.signing_identity))
            .collect()
    }

    fn member_index(&self, group: &GroupId, identity: &str) -> u32 {
        self.joined(group)
            .group
            .roster()
            .members_iter()
            .find(|member| identity_of(&member.signing_identity) == identity)
            .map(|member| member.index)
            .unwrap_or_else(|| panic!("{identity} is not a member of {group}"))
    }

    /// Encrypts `text` as plain UTF-8 (not an mlschat envelope) and sends it.
    pub async fn send_text(&mut self, group: &GroupId, text: &str) -> u64 {
        let message = self
            .joined_mut(group)
            .group
            .encrypt_application_message(text.as_bytes(), Vec::new())
            .expect("mls-rs encrypts")
            .to_bytes()
            .expect("the message encodes");
        let client_message_id = self.client_message_id();
        match self
            .request(|request_id| {
                Frame::Send(Send {
                    request_id,
                    client_message_id,
                    message: message.into(),
                    commit: None,
                })
            })
            .await
        {
            Frame::Accepted(accepted) => {
                self.own.insert((group.clone(), accepted.seq));
                self.own_application.insert((group.clone(), accepted.seq));
                self.step_over_own(group).await;
                accepted.seq
            }
            other => panic!("{}: the DS refused our message: {other:?}", self.name),
        }
    }

    /// Leaves the RFC 9420 way (§12.1.3): a Remove proposal for its own leaf, which another
    /// member commits.
    pub async fn propose_leave(&mut self, group: &GroupId) -> u64 {
        let joined = self.joined_mut(group);
        let own_index = joined.group.current_member_index();
        let message = joined
            .group
            .propose_remove(own_index, Vec::new())
            .expect("mls-rs proposes its own removal")
            .to_bytes()
            .expect("the proposal encodes");
        let client_message_id = self.client_message_id();
        match self
            .request(|request_id| {
                Frame::Send(Send {
                    request_id,
                    client_message_id,
                    message: message.into(),
                    commit: None,
                })
            })
            .await
        {
            Frame::Accepted(accepted) => {
                self.own.insert((group.clone(), accepted.seq));
                accepted.seq
            }
            other => panic!("{}: the DS refused our proposal: {other:?}", self.name),
        }
    }

    fn client_message_id(&self) -> [u8; 16] {
        self.random_bytes(16).try_into().expect("16 random bytes")
    }

    /// Builds a commit that adds one claimed KeyPackage of each of `users` (pending until the
    /// DS accepts it).
    pub async fn prepare_add(&mut self, group: &GroupId, users: &[UserName]) -> CommitOutput {
        let mut key_packages = Vec::new();
        for user_name in users {
            key_packages.push(self.claim(user_name).await);
        }
        let mut group_info_extensions = ExtensionList::new();
        group_info_extensions.set(Extension::new(
            RsExtensionType::new(GREASE_GROUP_INFO_EXTENSION),
            b"ignore me".to_vec(),
        ));
        let mut builder = self
            .joined_mut(group)
            .group
            .commit_builder()
            .set_group_info_ext(group_info_extensions);
        for key_package in key_packages {
            builder = builder
                .add_member(key_package)
                .expect("mls-rs accepts the claimed KeyPackage");
        }
        builder.build().expect("mls-rs builds the add commit")
    }

    /// Builds an empty commit, which carries an update path: a self-update (RFC 9420 §12.4).
    pub fn prepare_update(&mut self, group: &GroupId) -> CommitOutput {
        let output = self
            .joined_mut(group)
            .group
            .commit_builder()
            .build()
            .expect("mls-rs builds the commit");
        assert!(
            output.contains_update_path,
            "an empty commit must carry a path"
        );
        output
    }

    pub fn prepare_remove(&mut self, group: &GroupId, identity: &str) -> CommitOutput {
        let index = self.member_index(group, identity);
        self.joined_mut(group)
            .group
            .commit_builder()
            .remove_member(index)
            .expect("mls-rs removes the member")
            .build()
            .expect("mls-rs builds the remove commit")
    }

    /// Sends a pending commit with its routing (docs/protocol.md §4.1, §8.4). If the DS accepts
    /// it, the peer merges it once its own copy arrives at that seq; on `StaleEpoch` the peer
    /// discards it and processes the winning commit.
    pub async fn send_commit(
        &mut self,
        group: &GroupId,
        output: CommitOutput,
        added: &[UserName],
        removed: &[UserName],
    ) -> CommitOutcome {
        let welcome = match output.welcome_messages.as_slice() {
            [] => None,
            [welcome] => Some(welcome.to_bytes().expect("the Welcome encodes").into()),
            _ => panic!("the DS routes one Welcome per commit"),
        };
        let message = output
            .commit_message
            .to_bytes()
            .expect("the commit encodes");
        let routing = CommitRouting {
            welcome,
            added: added.to_vec(),
            removed: removed.to_vec(),
        };
        let client_message_id = self.client_message_id();
        match self
            .request(|request_id| {
                Frame::Send(Send {
                    request_id,
                    client_message_id,
                    message: message.into(),
                    commit: Some(routing),
                })
            })
            .await
        {
            Frame::Accepted(accepted) => {
                self.own.insert((group.clone(), accepted.seq));
                let seq = accepted.seq;
                self.pump_until(&format!("our commit at seq {seq}"), |peer| {
                    peer.joined(group).cursor >= seq
                })
                .await;
                assert_eq!(self.epoch(group), accepted.epoch);
                CommitOutcome::Accepted {
                    seq,
                    epoch: accepted.epoch,
                }
            }
            Frame::Error(error) if error.code == ErrorCode::StaleEpoch as u16 => {
                let current_epoch = error
                    .current_epoch
                    .expect("StaleEpoch carries the group's epoch");
                self.joined_mut(group).group.clear_pending_commit();
                self.pump_until(
                    &format!("the winning commit of epoch {current_epoch}"),
                    |peer| peer.epoch(group) >= current_epoch,
                )
                .await;
                CommitOutcome::Lost { current_epoch }
            }
            other => panic!("{}: the DS refused our commit: {other:?}", self.name),
        }
    }

    pub async fn invite(&mut self, group: &GroupId, users: &[UserName]) -> CommitOutcome {
        let output = self.prepare_add(group, users).await;
        self.send_commit(group, output, users, &[]).await
    }

    pub async fn self_update(&mut self, group: &GroupId) -> CommitOutcome {
        let output = self.prepare_update(group);
        self.send_commit(group, output, &[], &[]).await
    }

    pub async fn remove(&mut self, group: &GroupId, user_name: &UserName) -> CommitOutcome {
        let output = self.prepare_remove(group, user_name.as_str());
        self.send_commit(group, output, &[], std::slice::from_ref(user_name))
            .await
    }

    // ---- deliveries --------------------------------------------------------------------------

    /// Processes deliveries in order until `done` holds, waiting up to [`STEP`].
    pub async fn pump_until(&mut self, what: &str, done: impl Fn(&MlsRsPeer) -> bool) {
        let deadline = tokio::time::Instant::now() + STEP;
        while !done(self) {
            let delivery = match self.backlog.pop_front() {
                Some(delivery) => delivery,
                None => {
                    if tokio::time::Instant::now() >= deadline {
                        panic!("{}: {what} did not happen within {STEP:?}", self.name);
                    }
                    match tokio::time::timeout_at(deadline, self.frames.recv()).await {
                        Ok(Some(Frame::Deliver(delivery))) => delivery,
                        Ok(Some(other)) => panic!("{}: unexpected frame {other:?}", self.name),
                        Ok(None) => panic!("{}: the DS closed the connection", self.name),
                        Err(_) => panic!(
                            "{}: {what} did not happen within {STEP:?}; received: {:#?}",
                            self.name, self.received
                        ),
                    }
                }
            };
            self.on_delivery(delivery).await;
        }
    }

    /// Processes whatever deliveries arrive within `duration`.
    pub async fn pump_for(&mut self, duration: Duration) {
        let deadline = tokio::time::Instant::now() + duration;
        loop {
            let delivery = match self.backlog.pop_front() {
                Some(delivery) => delivery,
                None => match tokio::time::timeout_at(deadline, self.frames.recv()).await {
                    Ok(Some(Frame::Deliver(delivery))) => delivery,
                    Ok(Some(other)) => panic!("{}: unexpected frame {other:?}", self.name),
                    Ok(None) | Err(_) => return,
                },
            };
            self.on_delivery(delivery).await;
        }
    }

    /// Waits until the peer is a member of `group` (joined from a Welcome).
    pub async fn wait_joined(&mut self, group: &GroupId) {
        self.pump_until(&format!("joining {group}"), |peer| peer.is_member(group))
            .await;
    }

    /// Waits until the group is at `epoch`.
    pub async fn wait_epoch(&mut self, group: &GroupId, epoch: u64) {
        self.pump_until(&format!("epoch {epoch} of {group}"), |peer| {
            peer.groups
                .get(group)
                .is_some_and(|joined| joined.group.current_epoch() >= epoch)
        })
        .await;
        assert_eq!(
            self.epoch(group),
            epoch,
            "{} went past epoch {epoch}",
            self.name
        );
    }

    /// Waits for a decrypted message that satisfies `matches`.
    pub async fn wait_received(
        &mut self,
        what: &str,
        matches: impl Fn(&Received) -> bool,
    ) -> Received {
        self.pump_until(what, |peer| peer.received.iter().any(&matches))
            .await;
        self.received
            .iter()
            .find(|received| matches(received))
            .cloned()
            .expect("just found")
    }

    pub async fn wait_text(&mut self, group: &GroupId, from: &str, text: &str) -> Received {
        self.wait_received(&format!("{text:?} from {from}"), |received| {
            received.group == *group
                && received.from == from
                && received.text.as_deref() == Some(text)
        })
        .await
    }

    async fn on_delivery(&mut self, delivery: Delivery) {
        let group_id = delivery.group_id.clone();
        let seq = delivery.seq;
        match DeliveryKind::from_u8(delivery.kind) {
            Some(DeliveryKind::Welcome) => self.on_welcome(&delivery),
            Some(kind) => self.on_group_message(kind, &delivery),
            // docs/protocol.md §4.2: ignore a delivery kind we do not know.
            None => {}
        }
        self.ack(&group_id, seq).await;
        self.step_over_own(&group_id).await;
    }

    /// Moves the cursor past our own application messages right after it, and acknowledges
    /// them: the DS does not push them back.
    async fn step_over_own(&mut self, group_id: &GroupId) {
        let Some(joined) = self.groups.get_mut(group_id) else {
            return;
        };
        let before = joined.cursor;
        while self
            .own_application
            .remove(&(group_id.clone(), joined.cursor + 1))
        {
            joined.cursor += 1;
        }
        let cursor = joined.cursor;
        if cursor > before {
            self.ack(group_id, cursor).await;
        }
    }

    fn on_welcome(&mut self, delivery: &Delivery) {
        if self.is_member(&delivery.group_id) {
            return;
        }
        let welcome =
            MlsMessage::from_bytes(delivery.payload.as_slice()).expect("the Welcome decodes");
        // The DS protocol has no channel for the ratchet tree: it must be in the Welcome.
        match self.client.join_group(None, &welcome, None) {
            Ok((group, _info)) => {
                assert_eq!(group.group_id(), delivery.group_id.as_bytes());
                assert_eq!(group.current_epoch(), delivery.epoch);
                self.groups.insert(
                    delivery.group_id.clone(),
                    Joined {
                        group,
                        cursor: delivery.seq,
                        active: true,
                    },
                );
            }
            Err(error) => self.join_errors.push(error.to_string()),
        }
    }

    fn on_group_message(&mut self, kind: DeliveryKind, delivery: &Delivery) {
        let group_id = delivery.group_id.clone();
        let seq = delivery.seq;
        let own = self.own.contains(&(group_id.clone(), seq));
        let me = self.name.to_string();
        let Some(joined) = self.groups.get_mut(&group_id) else {
            return;
        };
        if seq <= joined.cursor || !joined.active {
            return;
        }
        joined.cursor = seq;
        if own {
            // Our own message, recognised by the seq the DS gave it (docs/protocol.md §8.4).
            if kind == DeliveryKind::Commit {
                joined
                    .group
                    .apply_pending_commit()
                    .expect("our accepted commit merges");
                let epoch = joined.group.current_epoch();
                self.commits.push((group_id, epoch, me));
            }
            return;
        }
        let message =
            MlsMessage::from_bytes(delivery.payload.as_slice()).expect("the message decodes");
        let received = joined
            .group
            .process_incoming_message(message)
            .unwrap_or_else(|error| {
                panic!(
                    "{me}: mls-rs cannot process seq {seq} ({kind:?} from {}): {error}",
                    delivery.sender
                )
            });
        match received {
            ReceivedMessage::ApplicationMessage(description) => {
                let from = joined
                    .group
                    .member_at_index(description.sender_index)
                    .map(|member| identity_of(&member.signing_identity))
                    .unwrap_or_default();
                let (envelope, text) = decode_payload(description.data());
                self.received.push(Received {
                    group: group_id,
                    seq,
                    from,
                    envelope,
                    text,
                });
            }
            ReceivedMessage::Commit(description) => {
                let committer = description.committer;
                // A removed member's group stays in the old epoch; the effect names the new one.
                let epoch = match &description.effect {
                    CommitEffect::NewEpoch(new_epoch) | CommitEffect::Removed { new_epoch, .. } => {
                        new_epoch.epoch()
                    }
                    CommitEffect::ReInit(_) => joined.group.current_epoch(),
                };
                // A committer never removes itself (RFC 9420 §12.4), so it is still a member.
                let by = joined
                    .group
                    .member_at_index(committer)
                    .map(|member| identity_of(&member.signing_identity))
                    .unwrap_or_default();
                if matches!(description.effect, CommitEffect::Removed { .. }) {
                    joined.active = false;
                }
                self.commits.push((group_id, epoch, by));
            }
            ReceivedMessage::Proposal(_) => {}
            other => panic!("{me}: unexpected content at seq {seq}: {other:?}"),
        }
    }
}

/// Reads an application payload as mlschat would: a JSON envelope `{"type": ...}`, or plain
/// UTF-8 text from any other client.
fn decode_payload(bytes: &[u8]) -> (Option<String>, Option<String>) {
    if let Ok(serde_json::Value::Object(envelope)) = serde_json::from_slice(bytes)
        && let Some(kind) = envelope.get("type").and_then(|kind| kind.as_str())
    {
        let text = envelope
            .get("text")
            .and_then(|text| text.as_str())
            .map(str::to_string);
        return (Some(kind.to_string()), text);
    }
    (None, std::str::from_utf8(bytes).ok().map(str::to_string))
}

// ---------------------------------------------------------------------------------------------
// Checks across implementations

/// Waits until every mlschat client and the peer are at `epoch` of `group`, then asserts that
/// they report the same cipher suite and the same epoch authenticator (RFC 9420 §8.7).
pub async fn assert_converged(
    group: &GroupId,
    epoch: u64,
    peer: &mut MlsRsPeer,
    chats: &mut [&mut Chat],
) {
    peer.wait_epoch(group, epoch).await;
    let expected = peer.epoch_authenticator(group);
    assert_eq!(peer.cipher_suite(group), SUITE);
    let members = peer.members(group).len();
    for chat in chats.iter_mut() {
        let status = chat.wait_epoch(group, epoch).await;
        assert_eq!(
            status.ciphersuite, "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519",
            "{}",
            chat.name
        );
        assert_eq!(
            status.epoch_authenticator, expected,
            "{} and the mls-rs peer {} disagree on the epoch authenticator of epoch {epoch}",
            chat.name, peer.name
        );
        assert_eq!(status.members, members, "{}: member count", chat.name);
    }
}
