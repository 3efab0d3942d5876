//! The core thread: owns the provider, the database connection, the signer and every group,
//! and turns user commands and DS frames into MLS operations, one SQLite transaction per step.
//!
//! Ordering rules (see docs/architecture.md):
//! - Deliveries of a group are processed strictly in seq order; the cursor moves in the same
//!   transaction as the MLS state, so a crash never replays or skips a message.
//! - One outbox item per group is in flight at a time. A commit is merged only when the DS
//!   delivers it back (compared byte for byte with what we sent); if another commit won the
//!   epoch, ours is discarded and its intent is rebuilt in the new epoch.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::rc::Rc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use openmls::ciphersuite::hash_ref::ProposalRef;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, Capabilities, ContentType, CredentialWithKey, ExtensionType,
    GroupId as MlsGroupId, KeyPackage, LeafNodeIndex, LeafNodeParameters,
    MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY, MlsGroup, MlsGroupJoinConfig, MlsMessageBodyIn,
    MlsMessageIn, MlsMessageOut, ProcessedMessageContent, Proposal, ProtocolMessage,
    ProtocolVersion, Sender, StagedCommit, StagedWelcome, WelcomeError,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_sqlite_storage::Connection;
use openmls_traits::OpenMlsProvider as _;
use openmls_traits::signatures::Signer as _;
use openmls_traits::types::SignatureScheme;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use mlschat_ds::dir_lock::{self, DirLock, DirLockError};
use mlschat_ds::protocol::{
    AUTHENTICATE_LABEL, Ack, Authenticate, AuthenticationTbs, ClaimKeyPackage, CommitRouting,
    CountKeyPackages, CreateGroup, Delivery, DeliveryKind, ErrorCode, ErrorResponse, Fetch, Frame,
    GroupId, REGISTER_LABEL, Register, Send, UploadKeyPackages, UserName,
};

use super::db::{self, GroupFlag, Intent, KeyObservation, NewHistory, OutboxRow};
use super::provider::{ClientProvider, migrate_openmls_tables};
use super::trust::{fingerprint, verification_code};
use super::{
    CIPHERSUITE, Command, ConnectionState, CoreConfig, CoreError, CoreEvent, CoreInput,
    EventSender, GroupRef, ListedGroup, MemberInfo, UNREAD_SCAN, timeline,
};
use crate::net::{NetCommand, NetEvent};

mod storage_failures;

use storage_failures::{
    Held, add_error, commit_error, leave_error, merge_error, merge_pending_error, process_error,
    remove_error, self_update_error, stage_error, storage_retry_delay, welcome_error,
};

/// How often the loop wakes without input (auto-update, retries, quit deadline).
const TICK: Duration = Duration::from_millis(250);
/// Wait before retrying a request the DS refused for load (rate limit, internal error).
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long a send waits after the DS said the group's backlog is full: it frees up when a
/// member who has been away catches up, or when messages expire, not within a second.
const QUOTA_RETRY_DELAY: Duration = Duration::from_secs(10);
/// How long to wait before trying a failed sync again (see `Engine::sync`).
const SYNC_RETRY: Duration = Duration::from_secs(1);
/// The longest group name, in characters.
const MAX_GROUP_NAME: usize = 64;

fn mls_error(error: impl std::fmt::Display) -> CoreError {
    CoreError::Mls(error.to_string())
}

/// What an application message carries. Anything else that is UTF-8 is shown as text, so
/// other MLS implementations can chat with plain payloads.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Envelope {
    Text {
        text: String,
        /// When the sender wrote it (unix seconds, the sender's clock): a message that waited
        /// in an outbox or on the DS shows when it was written, not when it arrived. Absent
        /// from other clients' payloads.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sent_at: Option<i64>,
    },
    /// The group's name, sent by an inviter right after its commit: for the members who
    /// joined in that epoch. Everyone else knows the name (and may know a newer one).
    GroupName { name: String },
    /// A member renamed the group.
    Rename { name: String },
}

fn decode_envelope(bytes: &[u8]) -> Envelope {
    if let Ok(envelope) = serde_json::from_slice::<Envelope>(bytes) {
        return envelope;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Envelope::Text {
            text: text.to_string(),
            sent_at: None,
        },
        Err(_) => Envelope::Text {
            text: format!("[{} bytes that are not text]", bytes.len()),
            sent_at: None,
        },
    }
}

/// An application message carrying `envelope`, encrypted for the group.
fn seal(
    mls: &mut MlsGroup,
    provider: &ClientProvider,
    signer: &SignatureKeyPair,
    envelope: &Envelope,
) -> Result<Vec<u8>, CoreError> {
    let envelope =
        serde_json::to_vec(envelope).map_err(|error| CoreError::Invalid(error.to_string()))?;
    let message = mls
        .create_message(provider, signer, &envelope)
        .map_err(mls_error)?;
    to_bytes(&message)
}

/// The time to show for a received message: the sender's, unless it is missing or in the
/// future: a sender whose clock is ahead of ours would date it after the messages that follow.
fn message_time(sent_at: Option<i64>, now: i64) -> i64 {
    sent_at.filter(|&at| at > 0).map_or(now, |at| at.min(now))
}

/// A group name as typed, trimmed, or why it cannot be one.
pub fn valid_group_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_GROUP_NAME || name.chars().any(misleads) {
        return Err(format!(
            "group names are 1 to {MAX_GROUP_NAME} printable characters"
        ));
    }
    Ok(name.to_string())
}

/// A group name as received: without control or invisible formatting characters, at most
/// [`MAX_GROUP_NAME`] long.
fn clean_group_name(name: &str) -> String {
    name.chars()
        .filter(|&c| !misleads(c))
        .take(MAX_GROUP_NAME)
        .collect()
}

/// Characters a name must not hold: control characters (a line break or an escape would forge
/// timeline lines), and those that change how the text around them is shown, or show as
/// nothing (direction marks, overrides and isolates, zero-width spaces, fillers, tags, the byte
/// order mark), which would let a group or a user look like another. The zero-width
/// (non-)joiners stay: emoji sequences and several scripts need them.
fn misleads(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'..='\u{1160}'
                | '\u{180E}'
                | '\u{200B}'
                | '\u{200E}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{3164}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

/// Whether an inviter's [`Envelope::GroupName`] names the group for us: when we know no name,
/// or when we joined in the epoch it was sent in and no rename has named the group since
/// (a rename sequenced between the inviter's commit and its name message is newer).
fn takes_announced_name(
    known: Option<&str>,
    joined_epoch: Option<u64>,
    name_seq: u64,
    epoch: u64,
) -> bool {
    known.is_none() || (joined_epoch == Some(epoch) && name_seq == 0)
}

fn identity_of(credential: &openmls::prelude::Credential) -> String {
    match BasicCredential::try_from(credential.clone()) {
        // A valid user name has none of them, but anyone's leaf may claim any bytes.
        Ok(basic) => String::from_utf8_lossy(basic.identity())
            .chars()
            .map(|c| if misleads(c) { '\u{fffd}' } else { c })
            .collect(),
        Err(_) => "(unknown credential)".to_string(),
    }
}

fn join_config() -> MlsGroupJoinConfig {
    // Joiners do not inherit the creator's settings: the wire policy must accept PublicMessage
    // handshakes from other implementations here too.
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .build()
}

/// KeyPackage leaves advertise the last-resort extension (RFC 9420 §17.3, RFC 9750 §5.1), which
/// the last-resort package carries; a leaf must list every extension its KeyPackage uses.
fn key_package_capabilities() -> Capabilities {
    Capabilities::builder()
        .extensions(vec![ExtensionType::LastResort])
        .build()
}

fn to_bytes(message: &MlsMessageOut) -> Result<Vec<u8>, CoreError> {
    message.to_bytes().map_err(mls_error)
}

struct Group {
    mls: MlsGroup,
    name: Option<String>,
    cursor: u64,
    active: bool,
    announced: bool,
    leaving: bool,
    last_self_update: i64,
    /// After a StaleEpoch answer: do not rebuild until the group reaches this epoch.
    wait_for_epoch: Option<u64>,
    /// The epoch we joined in (unknown for groups joined before it was stored): an inviter's
    /// [`Envelope::GroupName`] from that epoch is for us.
    joined_epoch: Option<u64>,
    /// The seq of the rename that gave the group its name (0: none since we joined). Renames
    /// apply in seq order whatever order they are processed in: our own applies when the DS
    /// sequences it, which may be before we process an earlier one from someone else.
    name_seq: u64,
    /// Seqs of our own application messages above `cursor + 1`, from their `Accepted`. The DS
    /// does not push them back to us (docs/protocol.md, section 8.2), so the cursor steps over
    /// them once it reaches them. Not stored: after a restart the DS's backlog brings them
    /// back, and they are recognised as our own.
    own_ahead: OwnAhead,
}

impl Group {
    /// Where the cursor is once `seq` is processed: past our own messages that follow it.
    fn cursor_after(&self, seq: u64) -> u64 {
        self.own_ahead.cursor_after(seq)
    }

    fn move_cursor(&mut self, cursor: u64) {
        self.cursor = cursor;
        self.own_ahead.passed(cursor);
    }
}

/// See [`Group::own_ahead`].
#[derive(Debug, Default)]
struct OwnAhead(BTreeSet<u64>);

impl OwnAhead {
    fn cursor_after(&self, seq: u64) -> u64 {
        let mut cursor = seq;
        while self.0.contains(&(cursor + 1)) {
            cursor += 1;
        }
        cursor
    }

    fn insert(&mut self, seq: u64) {
        self.0.insert(seq);
    }

    /// Forgets what the cursor has passed.
    fn passed(&mut self, cursor: u64) {
        self.0.retain(|seq| *seq > cursor);
    }
}

enum Link {
    Offline,
    Authenticating { generation: u64 },
    Online { generation: u64 },
}

enum Request {
    Auth,
    CreateGroup(GroupId),
    /// An outbox item, sent as this client message id. An item gets a new id when it is
    /// rebuilt, so an answer to an older version of it is recognised as stale.
    Send {
        outbox: i64,
        client_message_id: [u8; 16],
    },
    Claim {
        outbox: i64,
        user: UserName,
    },
    CountKeyPackages,
    UploadKeyPackages,
    /// A held group's deliveries (see [`Held`]).
    Fetch(GroupId),
    /// Whether the DS still holds a membership of ours in a group: a `Fetch` after the last
    /// possible seq, which returns an empty page if so and `NotMember` if not.
    Probe(GroupId),
}

/// What [`Engine::apply_rename`] did with a sequenced rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RenameOutcome {
    /// The group has the new name.
    Applied,
    /// A rename sequenced after it already named the group: only a timeline line says it.
    Overtaken,
    /// An empty name, or nothing known to say it was overtaken by.
    Ignored,
}

/// What one pass over a group's outbox did.
#[derive(Debug, PartialEq, Eq)]
enum Pumped {
    /// Nothing to send, or waiting (for an answer, a claim, an epoch, a retry).
    Idle,
    Sent,
    /// An item was settled without sending anything; look at the next one.
    Again,
}

/// What building an outbox item gave.
enum Built {
    /// The MLS message, recorded in the outbox row.
    Ready(OutboxRow),
    /// KeyPackages are being claimed first.
    Waiting,
    /// Nothing needs sending any more (the row is deleted).
    Settled,
}

struct Claim {
    /// The group of the outbox item the claims are for.
    group_id: GroupId,
    outstanding: usize,
    key_packages: Vec<(UserName, KeyPackage)>,
    failures: Vec<String>,
}

struct Engine {
    config: CoreConfig,
    connection: Rc<Connection>,
    provider: ClientProvider,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    me: UserName,
    registered: bool,
    groups: HashMap<GroupId, Group>,
    events: EventSender,
    net: UnboundedSender<NetCommand>,
    link: Link,
    next_request_id: u32,
    requests: HashMap<u32, Request>,
    /// Outbox items sent whose outcome is awaited (the DS's answer, and for handshake
    /// messages their delivery), with the client message id they were sent as.
    in_flight: HashMap<i64, [u8; 16]>,
    /// Client message ids of leave proposals the DS accepted (waiting for a commit).
    awaiting_commit: HashSet<[u8; 16]>,
    /// Leaves (outbox ids) whose `LeaveRequested` was emitted: the proposal is sent again in
    /// every epoch until a member commits it, and the user hears of it once.
    announced_leaves: HashSet<i64>,
    /// Groups whose backlog the DS last reported full, told to the user once until a send to
    /// the group is accepted again.
    backlog_full: HashSet<GroupId>,
    /// Groups we get deliveries of without having joined them (their Welcome expired), told
    /// once per run.
    welcome_missed: HashSet<GroupId>,
    /// Invites whose KeyPackages are being claimed.
    claims: HashMap<i64, Claim>,
    /// Invites whose KeyPackages are all claimed, kept until the add commit is sequenced.
    claimed: HashMap<i64, Vec<(UserName, KeyPackage)>>,
    retry_at: HashMap<i64, Instant>,
    /// Outbox items whose building failed on the profile's storage, with the failures in a
    /// row: built again after a back-off instead of given up.
    unbuilt: HashMap<i64, u32>,
    /// Whether the profile's storage failed and no step has succeeded since (see
    /// `storage_failed`).
    storage_failing: bool,
    ready_announced: bool,
    /// Whether a connection attempt failed or a connection broke in this run.
    seen_disconnect: bool,
    quit_deadline: Option<Instant>,
    stop: bool,
    /// Since when some commit has not been fsync'd. Steps whose loss a crash of the machine
    /// could not make harmful commit unsynced (processing a delivery, which the DS redelivers
    /// until acknowledged; settling a sent message, which a retry with the same client message
    /// id settles again; queueing a message, which is synced with its building) and a sync
    /// follows within `config.sync_delay`. Building an application message is synced as soon
    /// as the message is handed to the network (see `pump_once`). Every fsync'd commit syncs
    /// them too.
    unsynced_since: Option<Instant>,
    /// Whether the last sync failed (reported once, retried every `SYNC_RETRY`).
    sync_failing: bool,
    /// Acknowledgements held back until what they acknowledge is durable: the DS forgets a
    /// message for us once we acknowledge it.
    deferred_acks: HashMap<GroupId, u64>,
    /// Groups whose deliveries wait for the profile's storage (see [`Held`]); a group not yet
    /// joined when its Welcome is held is here too.
    held: HashMap<GroupId, Held>,
    /// Held while the engine runs: no other process may use the profile meanwhile. Two would
    /// each keep the groups' MLS state in memory, move it on independently and overwrite each
    /// other's, and take turns replacing each other's session at the DS.
    _profile_lock: DirLock,
}

/// Starts the core thread. Returns once the profile is open (or failed to open), with the
/// user's own fingerprint.
pub fn spawn(
    config: CoreConfig,
    inputs: Receiver<CoreInput>,
    events: EventSender,
    net: UnboundedSender<NetCommand>,
) -> Result<(String, std::thread::JoinHandle<()>), CoreError> {
    let (opened, opening) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        // The user's name in the thread name tells clients apart in a shared log (tests run
        // several in one process) and in a profile. Linux keeps 15 bytes of a thread's name,
        // so the prefix is short enough to leave ten of them to the name.
        .name(format!("core-{}", config.name))
        .spawn(move || match Engine::open(config, events, net) {
            Ok(mut engine) => {
                let _ = opened.send(Ok(fingerprint(engine.signer.public())));
                engine.run(inputs);
            }
            Err(error) => {
                let _ = opened.send(Err(error));
            }
        })
        .map_err(|error| CoreError::Invalid(format!("cannot start the core thread: {error}")))?;
    let own_fingerprint = opening.recv().map_err(|_| {
        CoreError::Invalid("the core thread stopped while opening the profile".into())
    })??;
    Ok((own_fingerprint, handle))
}

/// Takes the profile's lock (see [`mlschat_ds::dir_lock`]), or says which process has it.
fn lock_profile(dir: &std::path::Path) -> Result<DirLock, CoreError> {
    dir_lock::lock(dir).map_err(|error| match error {
        DirLockError::InUse { holder, .. } if holder == Some(std::process::id()) => {
            CoreError::InUse(format!(
                "the profile in {} is already open in this process",
                dir.display()
            ))
        }
        DirLockError::InUse { holder, .. } => CoreError::InUse(format!(
            "the profile in {} is open in another mlschat{}; quit that one first",
            dir.display(),
            dir_lock::process_suffix(holder)
        )),
        error @ DirLockError::Io { .. } => CoreError::Invalid(error.to_string()),
    })
}

impl Engine {
    fn open(
        config: CoreConfig,
        events: EventSender,
        net: UnboundedSender<NetCommand>,
    ) -> Result<Engine, CoreError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|error| {
            CoreError::Invalid(format!(
                "cannot create the profile directory {}: {error}",
                config.data_dir.display()
            ))
        })?;
        let profile_lock = lock_profile(&config.data_dir)?;
        let database = config.data_dir.join("mlschat.sqlite3");
        // Which file: "file is not a database" or "unable to open database file" alone do not
        // say.
        let in_profile = |error: CoreError| match error {
            CoreError::Database(message) => {
                CoreError::Database(format!("{}: {message}", database.display()))
            }
            CoreError::Unavailable(message) => {
                CoreError::Unavailable(format!("{}: {message}", database.display()))
            }
            other => other,
        };
        let mut connection = db::open(&database).map_err(in_profile)?;
        migrate_openmls_tables(&mut connection)
            .map_err(|message| in_profile(CoreError::Database(message)))?;
        db::migrate(&connection).map_err(in_profile)?;
        let connection = Rc::new(connection);
        let provider = ClientProvider::new(Rc::clone(&connection));
        let me = config.name.clone();

        let (signer, registered) = match db::identity(&connection)? {
            Some(identity) => {
                if identity.name != me.as_str() {
                    return Err(CoreError::Invalid(format!(
                        "the profile in {} belongs to {}, not {me}",
                        config.data_dir.display(),
                        identity.name
                    )));
                }
                let signer = SignatureKeyPair::read(
                    provider.storage(),
                    &identity.signature_key,
                    SignatureScheme::ED25519,
                )
                .ok_or_else(|| {
                    CoreError::Database("the signature key is missing from the profile".into())
                })?;
                (signer, identity.registered)
            }
            None => {
                let signer = SignatureKeyPair::new(SignatureScheme::ED25519).map_err(mls_error)?;
                db::transaction(&connection, || {
                    signer
                        .store(provider.storage())
                        .map_err(|error| CoreError::Database(error.to_string()))?;
                    db::insert_identity(&connection, me.as_str(), signer.public())
                })?;
                (signer, false)
            }
        };
        let credential = CredentialWithKey {
            credential: BasicCredential::new(me.as_str().as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };

        let mut groups = HashMap::new();
        for row in db::groups(&connection)? {
            let mls_id = MlsGroupId::from_slice(&row.group_id);
            let Some(mls) = MlsGroup::load(provider.storage(), &mls_id).map_err(mls_error)? else {
                tracing::warn!("a group listed in the profile has no MLS state; skipping it");
                continue;
            };
            let Ok(group_id) = GroupId::new(row.group_id) else {
                continue;
            };
            // A profile written before a removal was stored in the step that processed it
            // may still list as active a group whose MLS state says we were removed.
            let active = row.active && mls.is_active();
            groups.insert(
                group_id,
                Group {
                    mls,
                    name: row.name,
                    cursor: row.cursor,
                    active,
                    announced: row.announced,
                    leaving: row.leaving,
                    last_self_update: row.last_self_update,
                    wait_for_epoch: None,
                    joined_epoch: row.joined_epoch,
                    name_seq: row.name_seq,
                    own_ahead: OwnAhead::default(),
                },
            );
        }
        Ok(Engine {
            config,
            connection,
            provider,
            signer,
            credential,
            me,
            registered,
            groups,
            events,
            net,
            link: Link::Offline,
            next_request_id: 1,
            requests: HashMap::new(),
            in_flight: HashMap::new(),
            claims: HashMap::new(),
            claimed: HashMap::new(),
            awaiting_commit: HashSet::new(),
            announced_leaves: HashSet::new(),
            backlog_full: HashSet::new(),
            welcome_missed: HashSet::new(),
            retry_at: HashMap::new(),
            unbuilt: HashMap::new(),
            storage_failing: false,
            ready_announced: false,
            seen_disconnect: false,
            quit_deadline: None,
            stop: false,
            unsynced_since: None,
            sync_failing: false,
            deferred_acks: HashMap::new(),
            held: HashMap::new(),
            _profile_lock: profile_lock,
        })
    }

    fn run(&mut self, inputs: Receiver<CoreInput>) {
        let mut listed: Vec<ListedGroup> = Vec::new();
        if let Ok(rows) = db::groups(&self.connection) {
            for row in rows {
                if let Ok(group_id) = GroupId::new(row.group_id) {
                    let active = self
                        .groups
                        .get(&group_id)
                        .map_or(row.active, |group| group.active);
                    // A count that cannot be read is no reason to hide the group.
                    let unread = db::unread_texts(
                        &self.connection,
                        group_id.as_bytes(),
                        row.read_seq,
                        self.me.as_str(),
                        UNREAD_SCAN,
                    )
                    .unwrap_or_else(|error| {
                        tracing::warn!(%error, "cannot count a group's unread messages");
                        Vec::new()
                    });
                    listed.push(ListedGroup {
                        group: self.group_ref(&group_id),
                        active,
                        epoch: self.epoch_of(&group_id),
                        unread: unread.len(),
                        mentioned: unread
                            .iter()
                            .any(|text| timeline::mentions(self.me.as_str(), text)),
                        viewed_at: row.viewed_at,
                    });
                }
            }
        }
        self.emit(CoreEvent::Groups { groups: listed });
        while !self.stop {
            let timeout = self.unsynced_since.map_or(TICK, |since| {
                (since + self.config.sync_delay)
                    .saturating_duration_since(Instant::now())
                    .min(TICK)
            });
            match inputs.recv_timeout(timeout) {
                Ok(CoreInput::Command(command)) => self.on_command(command),
                Ok(CoreInput::Net(event)) => self.on_net(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.on_tick();
        }
        self.sync();
        let _ = self.net.send(NetCommand::Shutdown);
        self.emit(CoreEvent::Stopped);
    }

    fn emit(&self, event: CoreEvent) {
        let _ = self.events.send(event);
    }

    fn error(&self, message: impl Into<String>) {
        self.emit(CoreEvent::Error {
            message: message.into(),
        });
    }

    fn group_ref(&self, group_id: &GroupId) -> GroupRef {
        let name = self
            .groups
            .get(group_id)
            .and_then(|group| group.name.clone())
            .unwrap_or_else(|| {
                format!(
                    "group-{}",
                    &group_id.to_hex()[..8.min(group_id.to_hex().len())]
                )
            });
        GroupRef {
            id: group_id.clone(),
            name,
        }
    }

    // ---- network ------------------------------------------------------------------------

    fn generation(&self) -> Option<u64> {
        match self.link {
            Link::Offline => None,
            Link::Authenticating { generation } | Link::Online { generation } => Some(generation),
        }
    }

    fn online(&self) -> bool {
        matches!(self.link, Link::Online { .. })
    }

    fn send_frame(&self, frame: &Frame) {
        if let Some(generation) = self.generation() {
            let _ = self.net.send(NetCommand::Send {
                generation,
                frame: frame.encode().into(),
            });
        }
    }

    fn request(&mut self, kind: Request, make: impl FnOnce(u32) -> Frame) {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        self.requests.insert(id, kind);
        let frame = make(id);
        self.send_frame(&frame);
    }

    fn on_net(&mut self, event: NetEvent) {
        match event {
            NetEvent::Connected {
                generation,
                exporter,
                server,
            } => {
                tracing::info!(%server, "connected; authenticating");
                self.link = Link::Authenticating { generation };
                self.forget_in_flight();
                let name = self.me.clone();
                let key = self.signer.public().to_vec();
                let label = if self.registered {
                    AUTHENTICATE_LABEL
                } else {
                    REGISTER_LABEL
                };
                let signed = AuthenticationTbs::to_signed_bytes(label, &exporter, &name, &key);
                let signature = match self.signer.sign(&signed) {
                    Ok(signature) => signature,
                    Err(error) => {
                        self.error(format!(
                            "cannot sign the authentication challenge: {error:?}"
                        ));
                        return;
                    }
                };
                let registered = self.registered;
                self.request(Request::Auth, |request_id| {
                    if registered {
                        Frame::Authenticate(Authenticate {
                            request_id,
                            user_name: name,
                            signature: signature.into(),
                        })
                    } else {
                        Frame::Register(Register {
                            request_id,
                            user_name: name,
                            signature_key: key.into(),
                            signature: signature.into(),
                        })
                    }
                });
            }
            NetEvent::Frame { generation, frame } => {
                if self.generation() == Some(generation) {
                    self.on_frame(frame);
                }
            }
            NetEvent::Disconnected { generation, reason } => {
                if self
                    .generation()
                    .is_some_and(|current| current != generation)
                {
                    return;
                }
                if matches!(self.link, Link::Authenticating { .. }) && self.registered {
                    // The DS may have lost our registration (a new DS, a wiped one): registering
                    // again with the same key is idempotent, so try that next time.
                    self.registered = false;
                }
                let was_connected = !matches!(self.link, Link::Offline);
                self.link = Link::Offline;
                self.seen_disconnect = true;
                self.forget_in_flight();
                if was_connected || !self.ready_announced {
                    self.emit(CoreEvent::Connection {
                        state: ConnectionState::Reconnecting,
                        detail: reason,
                    });
                }
                if self.quit_deadline.is_some() {
                    self.stop = true;
                }
            }
            NetEvent::Fatal { reason } => {
                self.error(reason);
                self.stop = true;
            }
        }
    }

    /// Requests die with their connection; whatever was in flight is sent again (with the
    /// same client message id, so the DS de-duplicates it) once a new connection is up.
    fn forget_in_flight(&mut self) {
        self.requests.clear();
        self.in_flight.clear();
        self.claims.clear();
        for held in self.held.values_mut() {
            // A fetch that was being answered: ask again on the next connection.
            held.retry_at.get_or_insert_with(Instant::now);
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Authenticated(_) => self.on_authenticated(),
            Frame::Error(error) => self.on_error_response(error),
            Frame::KeyPackageCount(count) => {
                self.requests.remove(&count.request_id);
                if count.remaining < self.config.key_package_low_water || count.has_last_resort == 0
                {
                    self.upload_key_packages(count.has_last_resort == 0);
                } else {
                    self.announce_ready();
                }
            }
            Frame::KeyPackagesStored(stored) => {
                self.requests.remove(&stored.request_id);
                tracing::debug!(remaining = stored.remaining, "KeyPackages uploaded");
                self.announce_ready();
            }
            Frame::KeyPackage(response) => {
                if let Some(Request::Claim { outbox, user }) =
                    self.requests.remove(&response.request_id)
                {
                    self.on_claimed(outbox, user, Ok(response.key_package.as_slice().to_vec()));
                }
            }
            Frame::GroupCreated(created) => {
                if let Some(Request::CreateGroup(group_id)) =
                    self.requests.remove(&created.request_id)
                {
                    self.on_group_announced(&group_id);
                }
            }
            Frame::Accepted(accepted) => {
                if let Some(Request::Send {
                    outbox,
                    client_message_id,
                }) = self.requests.remove(&accepted.request_id)
                {
                    self.on_accepted(outbox, client_message_id, accepted.seq);
                }
            }
            Frame::Deliver(delivery) => self.on_deliver(delivery),
            Frame::Messages(page) => match self.requests.remove(&page.request_id) {
                Some(Request::Fetch(group_id)) => self.on_fetched(group_id, page),
                // Still a member, or the commit that removed us is still stored and on its way.
                Some(Request::Probe(group_id)) => {
                    tracing::debug!(group = %group_id, "the DS still holds a membership of ours");
                }
                _ => {}
            },
            Frame::Pong(_) => {}
            other => tracing::warn!(kind = ?other.kind(), "unexpected frame from the DS"),
        }
    }

    fn on_authenticated(&mut self) {
        self.requests
            .retain(|_, request| !matches!(request, Request::Auth));
        let Link::Authenticating { generation } = self.link else {
            return;
        };
        self.link = Link::Online { generation };
        if !self.registered {
            self.registered = true;
            if let Err(error) = db::set_registered(&self.connection, true) {
                self.error(error.to_string());
            }
        }
        self.emit(CoreEvent::Connection {
            state: ConnectionState::Connected,
            detail: String::new(),
        });
        self.request(Request::CountKeyPackages, |request_id| {
            Frame::CountKeyPackages(CountKeyPackages { request_id })
        });
        let unannounced: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, group)| !group.announced)
            .map(|(id, _)| id.clone())
            .collect();
        for group_id in unannounced {
            self.announce_group(group_id);
        }
        self.pump_all();
    }

    fn on_error_response(&mut self, error: ErrorResponse) {
        let message = String::from_utf8_lossy(error.message.as_slice()).into_owned();
        let code = ErrorCode::from_u16(error.code);
        match self.requests.remove(&error.request_id) {
            Some(Request::Auth) => {
                if code == Some(ErrorCode::NameTaken) {
                    self.error(format!(
                        "the name {} is registered to another key on this server; choose another name",
                        self.me
                    ));
                    self.stop = true;
                } else {
                    self.error(format!("authentication failed: {message}"));
                }
            }
            Some(Request::CreateGroup(group_id)) => {
                if code == Some(ErrorCode::GroupExists) {
                    self.on_group_announced(&group_id);
                } else {
                    self.error(format!(
                        "the DS did not register group {}: {message}",
                        self.group_ref(&group_id).name
                    ));
                }
            }
            Some(Request::Send {
                outbox,
                client_message_id,
            }) => self.on_send_refused(
                outbox,
                client_message_id,
                code,
                error.current_epoch,
                message,
            ),
            Some(Request::Claim { outbox, user }) => {
                let reason = match code {
                    Some(ErrorCode::UnknownUser) => {
                        format!("{user} is not registered on this server")
                    }
                    Some(ErrorCode::NoKeyPackage) => {
                        format!("{user} has no KeyPackage left; ask them to connect once")
                    }
                    _ => format!("cannot get a KeyPackage for {user}: {message}"),
                };
                self.on_claimed(outbox, user, Err(reason));
            }
            Some(Request::CountKeyPackages) | Some(Request::UploadKeyPackages) => {
                self.error(format!("KeyPackage upload failed: {message}"));
                self.announce_ready();
            }
            Some(Request::Fetch(group_id)) => {
                if code == Some(ErrorCode::NotMember) {
                    // Nothing of the group is left for us on the DS: for a group we are in,
                    // the commit that removed us expired before we fetched it.
                    self.held.remove(&group_id);
                    self.on_removal_expired(&group_id);
                    self.pump(&group_id);
                } else if let Some(held) = self.held.get_mut(&group_id) {
                    tracing::warn!(group = %group_id, %message, "fetching held deliveries failed");
                    held.failures = held.failures.saturating_add(1);
                    held.retry_at = Some(Instant::now() + storage_retry_delay(held.failures));
                }
            }
            Some(Request::Probe(group_id)) => {
                if code == Some(ErrorCode::NotMember) {
                    self.on_removal_expired(&group_id);
                } else {
                    tracing::warn!(group = %group_id, %message, "cannot ask the DS about a membership");
                }
            }
            None => tracing::warn!(code = error.code, %message, "error from the DS"),
        }
    }

    /// `ready` is announced once KeyPackages are stocked, so a script can invite this user as
    /// soon as it sees it.
    fn announce_ready(&mut self) {
        if !self.ready_announced {
            self.ready_announced = true;
            self.emit(CoreEvent::Ready {
                name: self.me.to_string(),
                fingerprint: fingerprint(self.signer.public()),
            });
        }
    }

    fn announce_group(&mut self, group_id: GroupId) {
        if !self.online() {
            return;
        }
        let id = group_id.clone();
        self.request(Request::CreateGroup(group_id), |request_id| {
            Frame::CreateGroup(CreateGroup {
                request_id,
                group_id: id,
            })
        });
    }

    fn on_group_announced(&mut self, group_id: &GroupId) {
        if let Some(group) = self.groups.get_mut(group_id) {
            group.announced = true;
        }
        if let Err(error) = db::set_group_flag(
            &self.connection,
            group_id.as_bytes(),
            GroupFlag::Announced,
            true,
        ) {
            self.error(error.to_string());
        }
        self.pump(group_id);
    }

    fn upload_key_packages(&mut self, with_last_resort: bool) {
        let batch = self.config.key_package_batch;
        let built = db::transaction(&self.connection, || {
            let mut key_packages = Vec::new();
            for _ in 0..batch {
                let bundle = KeyPackage::builder()
                    .build(
                        CIPHERSUITE,
                        &self.provider,
                        &self.signer,
                        self.credential.clone(),
                    )
                    .map_err(mls_error)?;
                key_packages
                    .push(to_bytes(&MlsMessageOut::from(bundle.key_package().clone()))?.into());
            }
            let last_resort = if with_last_resort {
                let bundle = KeyPackage::builder()
                    .leaf_node_capabilities(key_package_capabilities())
                    .mark_as_last_resort()
                    .build(
                        CIPHERSUITE,
                        &self.provider,
                        &self.signer,
                        self.credential.clone(),
                    )
                    .map_err(mls_error)?;
                Some(to_bytes(&MlsMessageOut::from(bundle.key_package().clone()))?.into())
            } else {
                None
            };
            Ok((key_packages, last_resort))
        });
        match built {
            Ok((key_packages, last_resort)) => {
                self.request(Request::UploadKeyPackages, |request_id| {
                    Frame::UploadKeyPackages(UploadKeyPackages {
                        request_id,
                        key_packages,
                        last_resort,
                    })
                })
            }
            Err(error) => {
                self.error(format!("cannot create KeyPackages: {error}"));
                self.announce_ready();
            }
        }
    }

    // ---- commands -----------------------------------------------------------------------

    fn active_group(&self, group_id: &GroupId) -> Result<&Group, String> {
        match self.groups.get(group_id) {
            Some(group) if group.active => Ok(group),
            Some(_) => Err(format!(
                "you are no longer a member of {}",
                self.group_ref(group_id).name
            )),
            None => Err("no such group".to_string()),
        }
    }

    fn on_command(&mut self, command: Command) {
        let result = match command {
            Command::CreateGroup { name, id } => self.create_group(name, id),
            Command::Send { group, text } => self.queue_text(group, text),
            Command::Invite { group, users } => self.queue_invite(group, users),
            Command::Kick { group, user } => self.queue_handshake(
                group,
                Intent::Kick {
                    user: user.to_string(),
                },
            ),
            Command::Update { group } => self.queue_handshake(group, Intent::Update),
            Command::Leave { group } => self.queue_leave(group),
            Command::Rename { group, name } => self.queue_rename(group, name),
            Command::Members { group } => self.members(&group),
            Command::Fingerprint { user } => self.fingerprint_of(user),
            Command::Verify { user } => match db::set_verified(&self.connection, user.as_str()) {
                Ok(true) => {
                    self.emit(CoreEvent::Verified {
                        user: user.to_string(),
                    });
                    Ok(())
                }
                Ok(false) => Err(format!("no key is known for {user} yet")),
                Err(error) => Err(error.to_string()),
            },
            Command::Status { group } => self.status(&group),
            Command::History { group, limit } => {
                match db::history(&self.connection, group.as_bytes(), limit) {
                    Ok(entries) => {
                        self.emit(CoreEvent::History {
                            group: self.group_ref(&group),
                            entries,
                        });
                        Ok(())
                    }
                    Err(error) => Err(error.to_string()),
                }
            }
            Command::Search { group, text } => {
                match db::search_history(&self.connection, group.as_bytes(), &text, 200) {
                    Ok(entries) => {
                        self.emit(CoreEvent::SearchResults {
                            group: self.group_ref(&group),
                            text,
                            entries,
                        });
                        Ok(())
                    }
                    Err(error) => Err(error.to_string()),
                }
            }
            Command::MarkRead { group, seq } => {
                // Not worth an fsync of its own: the next sync covers it.
                match db::transaction_unsynced(&self.connection, || {
                    db::mark_read(&self.connection, group.as_bytes(), seq)
                }) {
                    Ok(()) => {
                        self.committed_unsynced();
                        Ok(())
                    }
                    Err(error) => Err(format!("cannot remember what you have read: {error}")),
                }
            }
            Command::Quit => {
                // Offline after a failed attempt: the outbox is kept for the next start. While
                // connected, or still connecting for the first time (a script that writes a
                // message and closes stdin right away), wait for the outbox to drain.
                // Asked a second time: stop now; what is still queued is stored, and goes out
                // at the next start.
                let wait = if self.quit_deadline.is_some()
                    || matches!(self.link, Link::Offline) && self.seen_disconnect
                {
                    Duration::ZERO
                } else {
                    self.config.quit_flush_timeout
                };
                self.quit_deadline = Some(Instant::now() + wait);
                Ok(())
            }
        };
        if let Err(message) = result {
            self.error(message);
        }
    }

    fn create_group(&mut self, name: String, id: Option<[u8; 16]>) -> Result<(), String> {
        let name = valid_group_name(&name)?;
        let raw_id: [u8; 16] = id.unwrap_or_else(rand::random);
        let group_id = GroupId::new(raw_id.to_vec()).map_err(|error| error.to_string())?;
        if self.groups.contains_key(&group_id) {
            return Err(format!("a group with the id {} exists", group_id.to_hex()));
        }
        let mls = db::transaction(&self.connection, || {
            let mls = MlsGroup::builder()
                .with_group_id(MlsGroupId::from_slice(&raw_id))
                .ciphersuite(CIPHERSUITE)
                .use_ratchet_tree_extension(true)
                .with_wire_format_policy(MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY)
                .build(&self.provider, &self.signer, self.credential.clone())
                .map_err(mls_error)?;
            db::insert_group(&self.connection, &raw_id, Some(&name), 0, false, 0)?;
            db::insert_history(
                &self.connection,
                &raw_id,
                NewHistory::system(None, &format!("you created {name}")),
            )?;
            Ok(mls)
        })
        .map_err(|error| format!("cannot create the group: {error}"))?;
        self.groups.insert(
            group_id.clone(),
            Group {
                mls,
                name: Some(name),
                cursor: 0,
                active: true,
                announced: false,
                leaving: false,
                last_self_update: db::now_unix_secs(),
                wait_for_epoch: None,
                joined_epoch: Some(0),
                name_seq: 0,
                own_ahead: OwnAhead::default(),
            },
        );
        self.emit(CoreEvent::GroupCreated {
            group: self.group_ref(&group_id),
        });
        self.emit_epoch(&group_id);
        self.announce_group(group_id);
        Ok(())
    }

    fn queue_text(&mut self, group_id: GroupId, text: String) -> Result<(), String> {
        let group = self.active_group(&group_id)?;
        if group.leaving {
            return Err("you are leaving this group".into());
        }
        if text.trim().is_empty() {
            return Err("nothing to send".into());
        }
        let me = self.me.to_string();
        // Not fsync'd: when the group can send, the fsync that follows the message's building
        // (once the message is on its way) makes this durable too, so the message waits for no
        // fsync. Otherwise (offline, another item in flight) the sync within `sync_delay` does.
        let outbox_id = db::transaction_unsynced(&self.connection, || {
            let id = db::insert_outbox(
                &self.connection,
                group_id.as_bytes(),
                &Intent::Text { text: text.clone() },
            )?;
            db::insert_history(
                &self.connection,
                group_id.as_bytes(),
                NewHistory {
                    outbox_id: Some(id),
                    state: Some("sending"),
                    ..NewHistory::message(None, &me, &text)
                },
            )?;
            Ok(id)
        })
        .map_err(|error| error.to_string())?;
        self.committed_unsynced();
        self.emit(CoreEvent::Queued {
            group: self.group_ref(&group_id),
            local_id: outbox_id,
            text,
        });
        self.pump(&group_id);
        Ok(())
    }

    /// Sends a rename. It applies here too only once the DS has sequenced it
    /// ([`Engine::apply_rename`]), in its place among the other members' renames, so that
    /// every member ends with the same name.
    fn queue_rename(&mut self, group_id: GroupId, name: String) -> Result<(), String> {
        let group = self.active_group(&group_id)?;
        if group.leaving {
            return Err("you are leaving this group".into());
        }
        let name = valid_group_name(&name)?;
        // The name the group will have once what is queued is sequenced.
        let pending = db::outbox_of_group(&self.connection, group_id.as_bytes())
            .map_err(|error| error.to_string())?
            .into_iter()
            .rev()
            .find_map(|row| match row.intent {
                Intent::Rename { name } => Some(name),
                _ => None,
            });
        if pending.as_deref().or(group.name.as_deref()) == Some(name.as_str()) {
            return Err(format!("the group is already called {name}"));
        }
        db::transaction_unsynced(&self.connection, || {
            db::insert_outbox(
                &self.connection,
                group_id.as_bytes(),
                &Intent::Rename { name: name.clone() },
            )
        })
        .map_err(|error| format!("cannot rename the group: {error}"))?;
        self.committed_unsynced();
        self.pump(&group_id);
        Ok(())
    }

    /// A rename by `by` (possibly us) sequenced as `seq`, inside the step that processes or
    /// settles it: the group's name from now on, with its timeline line, unless a rename
    /// sequenced after it (`name_seq`, which gave the name `current`) was applied already. That
    /// happens when our own rename's `Accepted` comes before an earlier member's rename: the
    /// earlier one then gets a line that says it was overtaken, and the name stays.
    fn apply_rename(
        connection: &Connection,
        group_id: &GroupId,
        (name_seq, current): (u64, Option<&str>),
        name: &str,
        seq: u64,
        by: &str,
        me: &str,
    ) -> Result<RenameOutcome, CoreError> {
        if name.is_empty() {
            return Ok(RenameOutcome::Ignored);
        }
        if seq <= name_seq {
            let Some(current) = current else {
                return Ok(RenameOutcome::Ignored);
            };
            db::insert_history(
                connection,
                group_id.as_bytes(),
                NewHistory::system(
                    Some(seq),
                    &timeline::rename_overtaken(by, me, name, current),
                ),
            )?;
            return Ok(RenameOutcome::Overtaken);
        }
        db::set_group_name(connection, group_id.as_bytes(), name, Some(seq))?;
        db::insert_history(
            connection,
            group_id.as_bytes(),
            NewHistory::system(Some(seq), &timeline::renamed(by, me, name)),
        )?;
        Ok(RenameOutcome::Applied)
    }

    /// Applies a rename that a committed step stored, and tells the UI.
    fn renamed(&mut self, group_id: &GroupId, name: &str, seq: u64, by: Option<String>) {
        if let Some(group) = self.groups.get_mut(group_id) {
            group.name = Some(name.to_string());
            group.name_seq = seq;
        }
        self.emit(CoreEvent::GroupRenamed {
            group: self.group_ref(group_id),
            by,
        });
    }

    fn queue_invite(&mut self, group_id: GroupId, users: Vec<UserName>) -> Result<(), String> {
        let group = self.active_group(&group_id)?;
        let members: Vec<String> = group
            .mls
            .members()
            .map(|member| identity_of(&member.credential))
            .collect();
        let mut wanted = Vec::new();
        for user in users {
            if user == self.me {
                return Err("you are already in the group".into());
            }
            if members.iter().any(|member| member == user.as_str()) {
                return Err(format!("{user} is already a member"));
            }
            if !wanted.contains(&user.to_string()) {
                wanted.push(user.to_string());
            }
        }
        if wanted.is_empty() {
            return Err("whom to invite?".into());
        }
        self.queue_handshake(group_id, Intent::Invite { users: wanted })
    }

    fn queue_leave(&mut self, group_id: GroupId) -> Result<(), String> {
        let group = self.active_group(&group_id)?;
        if group.leaving {
            return Err("already leaving".into());
        }
        if group.mls.members().count() <= 1 {
            // Nobody is left to commit our removal: just drop the group here.
            self.deactivate(
                &group_id,
                timeline::left(self.me.as_str(), self.me.as_str()),
            );
            self.emit(CoreEvent::Left {
                group: self.group_ref(&group_id),
                by: self.me.to_string(),
            });
            return Ok(());
        }
        self.queue_handshake(group_id, Intent::Leave)
    }

    fn queue_handshake(&mut self, group_id: GroupId, intent: Intent) -> Result<(), String> {
        let group = self.active_group(&group_id)?;
        if group.leaving {
            return Err("you are leaving this group".into());
        }
        if let Intent::Kick { user } = &intent {
            if user == self.me.as_str() {
                return Err("use /leave to leave a group".into());
            }
            if !self.is_member(&group_id, user) {
                return Err(format!("{user} is not a member"));
            }
        }
        db::insert_outbox(&self.connection, group_id.as_bytes(), &intent)
            .map_err(|error| error.to_string())?;
        self.pump(&group_id);
        Ok(())
    }

    fn member_infos(&self, group: &Group) -> Vec<MemberInfo> {
        group
            .mls
            .members()
            .map(|member| {
                let name = identity_of(&member.credential);
                let known = db::known_key(&self.connection, &name).ok().flatten();
                MemberInfo {
                    fingerprint: fingerprint(&member.signature_key),
                    verified: known.as_ref().is_some_and(|key| {
                        key.verified && key.signature_key == member.signature_key
                    }),
                    key_changed: known.as_ref().is_some_and(|key| key.key_changed),
                    name,
                }
            })
            .collect()
    }

    /// None for a group we left or were removed from: the MLS state we keep of it has merged
    /// the commit that removed us without learning the new epoch, so its member list (and
    /// its code, see [`Self::status`]) would be out of date.
    fn members(&self, group_id: &GroupId) -> Result<(), String> {
        let group = self.groups.get(group_id).ok_or("no such group")?;
        let members = if group.active {
            self.member_infos(group)
        } else {
            Vec::new()
        };
        self.emit(CoreEvent::Members {
            group: self.group_ref(group_id),
            members,
        });
        Ok(())
    }

    fn fingerprint_of(&self, user: Option<UserName>) -> Result<(), String> {
        let Some(user) = user.filter(|user| *user != self.me) else {
            self.emit(CoreEvent::Fingerprint {
                user: self.me.to_string(),
                fingerprint: fingerprint(self.signer.public()),
                verified: true,
                key_changed: false,
            });
            return Ok(());
        };
        let known =
            db::known_key(&self.connection, user.as_str()).map_err(|error| error.to_string())?;
        let known = known.ok_or_else(|| {
            format!("no key is known for {user} yet: share a group with them first")
        })?;
        self.emit(CoreEvent::Fingerprint {
            user: user.to_string(),
            fingerprint: fingerprint(&known.signature_key),
            verified: known.verified,
            key_changed: known.key_changed,
        });
        Ok(())
    }

    /// Only of a group we are in (see [`Self::members`]).
    fn status(&self, group_id: &GroupId) -> Result<(), String> {
        let group = self.active_group(group_id)?;
        let authenticator = group.mls.epoch_authenticator().as_slice();
        self.emit(CoreEvent::Status {
            group: self.group_ref(group_id),
            ciphersuite: format!("{:?}", group.mls.ciphersuite()),
            epoch: group.mls.epoch().as_u64(),
            epoch_authenticator: hex::encode(authenticator),
            code: verification_code(authenticator),
            members: group.mls.members().count(),
        });
        Ok(())
    }

    fn emit_epoch(&self, group_id: &GroupId) {
        if let Some((epoch, code)) = self.epoch_of(group_id) {
            self.emit(CoreEvent::EpochChanged {
                group: self.group_ref(group_id),
                epoch,
                code,
            });
        }
    }

    /// The group's epoch and verification code, if its MLS state is loaded.
    fn epoch_of(&self, group_id: &GroupId) -> Option<(u64, String)> {
        self.groups
            .get(group_id)
            .map(|group| epoch_and_code(&group.mls))
    }

    // ---- ticks ----------------------------------------------------------------------------

    fn on_tick(&mut self) {
        let now = Instant::now();
        if self
            .unsynced_since
            .is_some_and(|since| now.duration_since(since) >= self.config.sync_delay)
        {
            self.sync();
        }
        let due: Vec<i64> = self
            .retry_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| *id)
            .collect();
        if !due.is_empty() {
            for id in due {
                self.retry_at.remove(&id);
            }
            self.pump_all();
        }
        self.retry_held(now);
        if let Some(period) = self.config.auto_update {
            let threshold =
                db::now_unix_secs() - i64::try_from(period.as_secs()).unwrap_or(i64::MAX);
            let stale: Vec<GroupId> = self
                .groups
                .iter()
                .filter(|(_, group)| {
                    group.active && !group.leaving && group.last_self_update < threshold
                })
                .map(|(id, _)| id.clone())
                .collect();
            for group_id in stale {
                if let Some(group) = self.groups.get_mut(&group_id) {
                    // Mark now so the update is queued once, not every tick.
                    group.last_self_update = db::now_unix_secs();
                }
                let _ = db::set_last_self_update(
                    &self.connection,
                    group_id.as_bytes(),
                    db::now_unix_secs(),
                );
                tracing::info!("automatic self-update");
                let _ = self.queue_handshake(group_id, Intent::Update);
            }
        }
        if let Some(deadline) = self.quit_deadline {
            // A leave whose proposal the DS has sequenced waits for another member's commit,
            // which may take any time; it is sent again (de-duplicated) on the next start.
            let drained = db::outbox(&self.connection)
                .map(|rows| {
                    rows.iter()
                        .all(|row| self.awaiting_commit.contains(&row.client_message_id))
                })
                .unwrap_or(true);
            if drained || now >= deadline {
                self.stop = true;
            }
        }
    }

    // ---- outbox ---------------------------------------------------------------------------

    fn pump_all(&mut self) {
        let ids: Vec<GroupId> = self.groups.keys().cloned().collect();
        for group_id in ids {
            self.pump(&group_id);
        }
    }

    /// Sends the next outbox item of a group if nothing of it is in flight. Items that turn
    /// out to need no message (nothing left to commit, the user already removed) are settled
    /// on the way, and the next one is considered.
    fn pump(&mut self, group_id: &GroupId) {
        // Every `Again` settled (deleted) an outbox row or emptied the proposal store, so this
        // ends; the bound only guards against a bug turning into a hang.
        for _ in 0..10_000 {
            if self.pump_once(group_id) != Pumped::Again {
                return;
            }
        }
        tracing::error!(group = %group_id, "the outbox did not settle");
    }

    fn pump_once(&mut self, group_id: &GroupId) -> Pumped {
        // A held group sends nothing: its state may be behind the group's (a held commit), and
        // its storage is failing anyway. It is pumped again once it has caught up.
        if !self.online() || self.held.contains_key(group_id) {
            return Pumped::Idle;
        }
        let Some(group) = self.groups.get_mut(group_id) else {
            return Pumped::Idle;
        };
        if !group.active {
            self.resend_unanswered(group_id);
            return Pumped::Idle;
        }
        if !group.announced {
            return Pumped::Idle;
        }
        if let Some(epoch) = group.wait_for_epoch {
            if group.mls.epoch().as_u64() < epoch {
                return Pumped::Idle;
            }
            group.wait_for_epoch = None;
        }
        let has_proposals = group.mls.pending_proposals().next().is_some();
        let leaving = group.leaving;
        // Everyone else has proposed to leave too: nobody but us will ever commit those
        // proposals, so the last one out does, and then leaves an empty group on its own.
        let last_out = leaving && others_all_leaving(&group.mls);
        let rows = match db::outbox_of_group(&self.connection, group_id.as_bytes()) {
            Ok(rows) => rows,
            Err(error) => {
                self.error(error.to_string());
                return Pumped::Idle;
            }
        };
        // A leave the DS has sequenced only waits for someone's commit; it does not keep the
        // last one out from making that commit.
        let waits_for_commit =
            |row: &OutboxRow| last_out && self.awaiting_commit.contains(&row.client_message_id);
        if rows.iter().any(|row| {
            (self.is_in_flight(row) && !waits_for_commit(row)) || self.claims.contains_key(&row.id)
        }) {
            return Pumped::Idle;
        }
        // An item already built goes first: its answer may have been lost with a connection,
        // and the DS may have sequenced it (a retry with the same client message id is
        // de-duplicated). Building anything else now would replace a pending commit the group
        // may already have accepted.
        let next = if let Some(row) = rows
            .iter()
            .find(|row| row.payload.is_some() && !waits_for_commit(row))
        {
            row.clone()
        } else if has_proposals && (!leaving || last_out) {
            // Proposals from others (a member leaving) block application messages until
            // someone commits them, so committing them comes first.
            match rows
                .iter()
                .find(|row| row.intent == Intent::CommitProposals)
            {
                Some(row) => row.clone(),
                None => {
                    return match db::insert_outbox(
                        &self.connection,
                        group_id.as_bytes(),
                        &Intent::CommitProposals,
                    ) {
                        Ok(_) => Pumped::Again,
                        Err(error) => {
                            self.error(error.to_string());
                            Pumped::Idle
                        }
                    };
                }
            }
        } else {
            match rows.into_iter().next() {
                Some(row) => row,
                None => return Pumped::Idle,
            }
        };
        if self.retry_at.contains_key(&next.id) || self.is_in_flight(&next) {
            return Pumped::Idle;
        }
        if next.payload.is_some() {
            self.transmit(&next);
            return Pumped::Sent;
        }
        // Members are counted only when a leave is next: counting walks the whole tree, and the
        // pump runs after every delivery.
        if next.intent == Intent::Leave
            && self
                .groups
                .get(group_id)
                .is_some_and(|group| group.mls.members().count() <= 1)
        {
            // Nobody is left to remove us, nor to read anything: leave locally.
            self.deactivate(group_id, timeline::left(self.me.as_str(), self.me.as_str()));
            self.emit(CoreEvent::Left {
                group: self.group_ref(group_id),
                by: self.me.to_string(),
            });
            return Pumped::Idle;
        }
        // An application message waits for no fsync, unless syncing is failing: then nothing
        // may leave whose state is not durable, and the build's own fsync decides.
        let unsynced = next.intent.is_application() && !self.sync_failing && !self.storage_failing;
        // After a failed build whose reload failed on the storage too, the group is held (see
        // `reload`) and not pumped until a reload succeeds.
        let built = self.build(group_id, &next, unsynced);
        if !matches!(built, Err(CoreError::Unavailable(_))) {
            self.unbuilt.remove(&next.id);
        }
        match built {
            Ok(Built::Ready(row)) if unsynced => {
                // Built without an fsync: the message goes to the network task first and the
                // fsync runs while it travels, instead of before (figure 1 of
                // docs/benchmarks.md). A crash of the process loses nothing committed. Only a
                // power loss within that fsync can forget a message the DS then delivers:
                // building its intent again reuses its ratchet generation, which the members
                // refuse (RFC 9420 §9.2), and the reuse guard keeps the two nonces apart
                // (RFC 9420 §6.3.1). A commit could not be merged after such a loss, so
                // handshake messages keep their fsync before sending.
                self.committed_unsynced();
                self.transmit(&row);
                self.sync();
                Pumped::Sent
            }
            Ok(Built::Ready(row)) => {
                // Building commits with an fsync: no separate sync is needed for what came
                // before it, such as queueing this very message.
                self.became_durable();
                self.transmit(&row);
                Pumped::Sent
            }
            Ok(Built::Waiting) => Pumped::Idle,
            Ok(Built::Settled) => Pumped::Again,
            Err(error @ CoreError::Unavailable(_)) => {
                // The profile's storage failed, not the item: keep it.
                self.postpone_build(group_id, next.id, &error);
                Pumped::Idle
            }
            Err(error) => {
                if next.intent == Intent::CommitProposals {
                    // Proposals we cannot commit would block the group for good (and be
                    // retried forever): drop them, and say so.
                    self.drop_proposals(group_id);
                }
                if self.fail_outbox(group_id, next.id, &next.intent, &error.to_string()) {
                    Pumped::Again
                } else {
                    Pumped::Idle
                }
            }
        }
    }

    /// In a group we are no longer in, the outbox holds only application messages we built
    /// before we were removed (see `deactivate_in_step`). One whose answer was lost with a
    /// connection (or never came: its settle failed) is sent again, for the DS to answer:
    /// `Accepted` if it sequenced it before the removal, `NotMember` if not.
    fn resend_unanswered(&mut self, group_id: &GroupId) {
        let rows = match db::outbox_of_group(&self.connection, group_id.as_bytes()) {
            Ok(rows) => rows,
            Err(error) => {
                self.error(error.to_string());
                return;
            }
        };
        for row in rows {
            if row.payload.is_some()
                && !self.is_in_flight(&row)
                && !self.retry_at.contains_key(&row.id)
            {
                self.transmit(&row);
            }
        }
    }

    /// Whether this version of an outbox item was sent and its outcome is still awaited.
    fn is_in_flight(&self, row: &OutboxRow) -> bool {
        self.in_flight.get(&row.id) == Some(&row.client_message_id)
    }

    /// Takes our own Remove proposal back out of the proposal store after a failed leave:
    /// left there, it would be swept into our next commit, and no commit may remove its own
    /// committer.
    fn withdraw_leave_proposal(&mut self, group_id: &GroupId) {
        let Some(group) = self.groups.get_mut(group_id) else {
            return;
        };
        let own = group.mls.own_leaf_index();
        let own_removals: Vec<ProposalRef> = group
            .mls
            .pending_proposals()
            .filter(|queued| {
                matches!(queued.sender(), Sender::Member(sender) if *sender == own)
                    && matches!(queued.proposal(), Proposal::Remove(remove) if remove.removed() == own)
            })
            .map(|queued| queued.proposal_reference_ref().clone())
            .collect();
        for reference in own_removals {
            if let Err(error) = group
                .mls
                .remove_pending_proposal(self.provider.storage(), &reference)
            {
                tracing::warn!(%error, "cannot withdraw our leave proposal");
            }
        }
    }

    fn drop_proposals(&mut self, group_id: &GroupId) {
        let Some(group) = self.groups.get_mut(group_id) else {
            return;
        };
        if let Err(error) = group.mls.clear_pending_proposals(self.provider.storage()) {
            self.error(format!("cannot drop the pending proposals: {error}"));
            self.reload(group_id);
        }
    }

    fn transmit(&mut self, row: &OutboxRow) {
        let Some(payload) = row.payload.clone() else {
            return;
        };
        let Ok(group_id) = GroupId::new(row.group_id.clone()) else {
            return;
        };
        let commit = if row.intent.is_application() || row.intent == Intent::Leave {
            None
        } else {
            let names = |list: &[String]| {
                list.iter()
                    .filter_map(|name| UserName::new(name.clone()).ok())
                    .collect()
            };
            Some(CommitRouting {
                welcome: row.welcome.clone().map(Into::into),
                added: names(&row.added),
                removed: names(&row.removed),
            })
        };
        let client_message_id = row.client_message_id;
        self.in_flight.insert(row.id, client_message_id);
        tracing::debug!(group = %group_id, outbox = row.id, intent = row.intent.label(), "sending");
        self.request(
            Request::Send {
                outbox: row.id,
                client_message_id,
            },
            |request_id| {
                Frame::Send(Send {
                    request_id,
                    client_message_id,
                    message: payload.into(),
                    commit,
                })
            },
        );
    }

    /// Turns an intent into an MLS message (one transaction).
    fn build(
        &mut self,
        group_id: &GroupId,
        row: &OutboxRow,
        unsynced: bool,
    ) -> Result<Built, CoreError> {
        if matches!(row.intent, Intent::Invite { .. }) && !self.claimed.contains_key(&row.id) {
            let Intent::Invite { users } = &row.intent else {
                return Ok(Built::Waiting);
            };
            // An earlier invite (ours, queued before this one, or another member's) may have
            // added some of them since this one was queued: their KeyPackages are not claimed
            // for nothing, and the user hears why they are left out.
            let (already, wanted): (Vec<String>, Vec<String>) = users
                .iter()
                .cloned()
                .partition(|user| self.is_member(group_id, user));
            self.report_already_members(group_id, &already);
            if wanted.is_empty() {
                db::delete_outbox(&self.connection, row.id)?;
                return Ok(Built::Settled);
            }
            return self
                .start_claims(group_id, row.id, wanted)
                .map(|()| Built::Waiting);
        }
        let claimed = self.claimed.get(&row.id).cloned().unwrap_or_default();
        // Removed by another member's commit (or our own earlier kick) since this was queued.
        let kicked_already = match &row.intent {
            Intent::Kick { user } if !self.is_member(group_id, user) => Some(user.clone()),
            _ => None,
        };
        // Added by another member while the KeyPackages were being claimed.
        let already: Vec<String> = claimed
            .iter()
            .map(|(user, _)| user.to_string())
            .filter(|user| self.is_member(group_id, user))
            .collect();
        let Some(group) = self.groups.get_mut(group_id) else {
            return Ok(Built::Waiting);
        };
        let provider = &self.provider;
        let signer = &self.signer;
        let connection = &self.connection;
        // Without an fsync when the pump runs it once the message is on its way (see
        // `pump_once`).
        let commit_step = if unsynced {
            db::transaction_unsynced
        } else {
            db::transaction
        };
        let built = commit_step(connection, || {
            let (payload, welcome) = match &row.intent {
                Intent::Text { text } => {
                    let envelope = Envelope::Text {
                        text: text.clone(),
                        sent_at: Some(row.created_at),
                    };
                    (seal(&mut group.mls, provider, signer, &envelope)?, None)
                }
                Intent::GroupName { name } => {
                    let envelope = Envelope::GroupName { name: name.clone() };
                    (seal(&mut group.mls, provider, signer, &envelope)?, None)
                }
                Intent::Rename { name } => {
                    let envelope = Envelope::Rename { name: name.clone() };
                    (seal(&mut group.mls, provider, signer, &envelope)?, None)
                }
                Intent::Invite { .. } => {
                    let key_packages: Vec<KeyPackage> = claimed
                        .iter()
                        .filter(|(user, _)| !already.iter().any(|member| member == user.as_str()))
                        .map(|(_, key_package)| key_package.clone())
                        .collect();
                    if key_packages.is_empty() {
                        db::delete_outbox(connection, row.id)?;
                        return Ok(Built::Settled);
                    }
                    let (commit, welcome, _info) = group
                        .mls
                        .add_members(provider, signer, &key_packages)
                        .map_err(add_error)?;
                    (to_bytes(&commit)?, Some(to_bytes(&welcome)?))
                }
                Intent::Kick { user } => {
                    let Some(index) = group
                        .mls
                        .members()
                        .find(|member| identity_of(&member.credential) == *user)
                        .map(|member| member.index)
                    else {
                        // Already removed (by another member's commit): nothing left to do.
                        db::delete_outbox(connection, row.id)?;
                        return Ok(Built::Settled);
                    };
                    let (commit, welcome, _info) = group
                        .mls
                        .remove_members(provider, signer, &[index])
                        .map_err(remove_error)?;
                    let welcome = welcome.map(|welcome| to_bytes(&welcome)).transpose()?;
                    (to_bytes(&commit)?, welcome)
                }
                Intent::Update => {
                    let bundle = group
                        .mls
                        .self_update(provider, signer, LeafNodeParameters::default())
                        .map_err(self_update_error)?;
                    let (commit, welcome, _info) = bundle.into_messages();
                    let welcome = welcome.map(|welcome| to_bytes(&welcome)).transpose()?;
                    (to_bytes(&commit)?, welcome)
                }
                Intent::CommitProposals => {
                    if group.mls.pending_proposals().next().is_none() {
                        // Someone else committed them first.
                        db::delete_outbox(connection, row.id)?;
                        return Ok(Built::Settled);
                    }
                    if group.leaving {
                        // The last one out: the store holds our own Remove proposal, which no
                        // commit of ours may include, so the others are removed by value.
                        let others = leaving_others(&group.mls);
                        if others.is_empty() {
                            db::delete_outbox(connection, row.id)?;
                            return Ok(Built::Settled);
                        }
                        let bundle = group
                            .mls
                            .commit_builder()
                            .consume_proposal_store(false)
                            .propose_removals(others)
                            .load_psks(provider.storage())
                            .map_err(mls_error)?
                            .build(provider.rand(), provider.crypto(), signer, |_| true)
                            .map_err(mls_error)?
                            .stage_commit(provider)
                            .map_err(stage_error)?;
                        let (commit, welcome, _info) = bundle.into_messages();
                        let welcome = welcome.map(|welcome| to_bytes(&welcome)).transpose()?;
                        (to_bytes(&commit)?, welcome)
                    } else {
                        let (commit, welcome, _info) = group
                            .mls
                            .commit_to_pending_proposals(provider, signer)
                            .map_err(commit_error)?;
                        let welcome = welcome.map(|welcome| to_bytes(&welcome)).transpose()?;
                        (to_bytes(&commit)?, welcome)
                    }
                }
                Intent::Leave => {
                    let proposal = group
                        .mls
                        .leave_group(provider, signer)
                        .map_err(leave_error)?;
                    db::set_group_flag(connection, &row.group_id, GroupFlag::Leaving, true)?;
                    (to_bytes(&proposal)?, None)
                }
            };
            // Every commit also carries the proposals pending in the group (openmls consumes
            // the proposal store), so the DS's routing comes from the staged commit itself,
            // not from the intent: a self-update that also commits a member's leave removes
            // that member at the DS too.
            let (added, removed) = match group.mls.pending_commit() {
                Some(staged) => commit_routing(&group.mls, staged),
                None => (vec![], vec![]),
            };
            let client_message_id = db::set_outbox_payload(
                connection,
                row.id,
                &payload,
                welcome.as_deref(),
                &added,
                &removed,
            )?;
            Ok(Built::Ready(OutboxRow {
                client_message_id,
                payload: Some(payload),
                welcome,
                added,
                removed,
                ..row.clone()
            }))
        });
        if built.is_ok() {
            self.report_already_members(group_id, &already);
            if let Some(user) = kicked_already {
                let name = self.group_ref(group_id).name;
                self.error(format!(
                    "{user} is not a member of {name} any more: not removed again"
                ));
            }
        }
        match built {
            Ok(built) => {
                if row.intent == Intent::Leave
                    && let Some(group) = self.groups.get_mut(group_id)
                {
                    group.leaving = true;
                }
                if matches!(built, Built::Settled) {
                    self.claimed.remove(&row.id);
                    self.in_flight.remove(&row.id);
                }
                Ok(built)
            }
            Err(error) => {
                self.reload(group_id);
                Err(error)
            }
        }
    }

    fn is_member(&self, group_id: &GroupId, user: &str) -> bool {
        self.groups.get(group_id).is_some_and(|group| {
            group
                .mls
                .members()
                .any(|member| identity_of(&member.credential) == user)
        })
    }

    /// Says which users an invite leaves out because they are in the group by now, in the
    /// words of the refusal of an invite of a member ([`Self::queue_invite`]).
    fn report_already_members(&self, group_id: &GroupId, users: &[String]) {
        let name = self.group_ref(group_id).name;
        for user in users {
            self.error(format!(
                "{user} is already a member of {name} by now: not invited again"
            ));
        }
    }

    fn start_claims(
        &mut self,
        group_id: &GroupId,
        outbox: i64,
        users: Vec<String>,
    ) -> Result<(), CoreError> {
        let users: Vec<UserName> = users
            .into_iter()
            .filter_map(|user| UserName::new(user).ok())
            .collect();
        if users.is_empty() {
            return Err(CoreError::Invalid("no valid user to invite".into()));
        }
        self.claims.insert(
            outbox,
            Claim {
                group_id: group_id.clone(),
                outstanding: users.len(),
                key_packages: Vec::new(),
                failures: Vec::new(),
            },
        );
        for user in users {
            let name = user.clone();
            self.request(Request::Claim { outbox, user }, |request_id| {
                Frame::ClaimKeyPackage(ClaimKeyPackage {
                    request_id,
                    user_name: name,
                })
            });
        }
        Ok(())
    }

    /// Checks a claimed KeyPackage: it must verify and name the user we asked for.
    fn check_key_package(&self, user: &UserName, bytes: &[u8]) -> Result<KeyPackage, String> {
        let message = MlsMessageIn::tls_deserialize_exact(bytes)
            .map_err(|error| format!("malformed: {error}"))?;
        let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
            return Err("not a KeyPackage".into());
        };
        let key_package = key_package
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|error| format!("does not verify: {error}"))?;
        if key_package.ciphersuite() != CIPHERSUITE {
            return Err(format!(
                "uses ciphersuite {:?}, this group uses {CIPHERSUITE:?}",
                key_package.ciphersuite()
            ));
        }
        // SECURITY: the DS checks this too, but a client must not trust the DS to have.
        let identity = identity_of(key_package.leaf_node().credential());
        if identity != user.as_str() {
            return Err(format!("its credential names {identity}"));
        }
        Ok(key_package)
    }

    /// Collects the claimed KeyPackages of an invite. Once all are in, they are kept (in
    /// memory) until the add commit is sequenced: a commit that loses its epoch is rebuilt
    /// with the same KeyPackages, since its Welcome was never delivered, instead of using up
    /// another one-time KeyPackage of each invitee per retry.
    fn on_claimed(&mut self, outbox: i64, user: UserName, result: Result<Vec<u8>, String>) {
        let checked = result.and_then(|bytes| {
            self.check_key_package(&user, &bytes)
                .map_err(|reason| format!("{user}'s KeyPackage is unusable: {reason}"))
        });
        let checked = checked.and_then(|key_package| {
            let key = key_package.leaf_node().signature_key().as_slice();
            self.observe(user.as_str(), key);
            // SECURITY: a KeyPackage under a known name but a new key may be the DS's (or
            // anyone's) substitute for the person. It is never silently accepted: the user
            // compares fingerprints with /verify first, and invites again.
            match db::known_key(&self.connection, user.as_str()) {
                Ok(Some(known)) if known.key_changed => Err(format!(
                    "{user}'s key changed since you last saw it (new fingerprint {}); compare \
                     fingerprints with /verify {user}, then invite again",
                    fingerprint(key)
                )),
                Ok(_) => Ok(key_package),
                Err(error) => Err(error.to_string()),
            }
        });
        let Some(claim) = self.claims.get_mut(&outbox) else {
            return;
        };
        claim.outstanding = claim.outstanding.saturating_sub(1);
        match checked {
            Ok(key_package) => claim.key_packages.push((user, key_package)),
            Err(reason) => claim.failures.push(reason),
        }
        if claim.outstanding > 0 {
            return;
        }
        let Some(claim) = self.claims.remove(&outbox) else {
            return;
        };
        for failure in &claim.failures {
            self.error(failure.clone());
        }
        // The item may have gone meanwhile (the group was left): deleting it again changes
        // nothing, and the pump finds no row to use the KeyPackages for.
        if claim.key_packages.is_empty() {
            if let Err(error) = db::delete_outbox(&self.connection, outbox) {
                self.error(error.to_string());
            }
        } else {
            self.claimed.insert(outbox, claim.key_packages);
        }
        self.pump(&claim.group_id);
    }

    /// Finds the outbox row a DS answer is about. `None` for a stale answer: the row is gone,
    /// or it was rebuilt since (new client message id) and this answers the old version.
    fn answered_row(&mut self, outbox: i64, client_message_id: [u8; 16]) -> Option<OutboxRow> {
        let row = match db::outbox_row(&self.connection, outbox) {
            Ok(row) => row.filter(|row| row.client_message_id == client_message_id),
            Err(error) => {
                // The answer cannot be matched now: the item is sent again after a back-off,
                // and the DS answers it the same way.
                self.error(error.to_string());
                if self.in_flight.get(&outbox) == Some(&client_message_id) {
                    self.in_flight.remove(&outbox);
                    self.retry_at.insert(outbox, Instant::now() + RETRY_DELAY);
                }
                return None;
            }
        };
        if row.is_none() {
            tracing::debug!(
                outbox,
                "an answer for an outbox item already settled or rebuilt; ignored"
            );
            if self.in_flight.get(&outbox) == Some(&client_message_id) {
                self.in_flight.remove(&outbox);
            }
        }
        row
    }

    fn on_accepted(&mut self, outbox: i64, client_message_id: [u8; 16], seq: u64) {
        tracing::debug!(outbox, seq, "accepted");
        let Some(row) = self.answered_row(outbox, client_message_id) else {
            return;
        };
        let Ok(group_id) = GroupId::new(row.group_id.clone()) else {
            return;
        };
        self.backlog_full.remove(&group_id);
        if row.intent.is_application() {
            self.in_flight.remove(&outbox);
            if self.settle_application(&group_id, outbox, &row.intent, seq) {
                self.pump(&group_id);
            } else {
                // Unsettled (the storage failed): sent again after a back-off, the DS answers
                // it the same way (same client message id), and the settle is tried again.
                // Nothing else in the group goes out before it.
                self.retry_at.insert(outbox, Instant::now() + RETRY_DELAY);
            }
        } else if row.intent == Intent::Leave {
            self.awaiting_commit.insert(client_message_id);
            if self.announced_leaves.insert(outbox) {
                self.emit(CoreEvent::LeaveRequested {
                    group: self.group_ref(&group_id),
                });
            }
            // If everyone else is leaving too, we are the one to commit.
            self.pump(&group_id);
        }
        // Handshake messages take effect when the DS delivers them back in order; until then
        // the item stays in flight.
    }

    /// Settles our application message sequenced as `seq`. Returns whether that was stored.
    fn settle_application(
        &mut self,
        group_id: &GroupId,
        outbox: i64,
        intent: &Intent,
        seq: u64,
    ) -> bool {
        let (name_seq, current) = self
            .groups
            .get(group_id)
            .map_or((0, None), |group| (group.name_seq, group.name.clone()));
        // The DS does not push our own message back: the cursor passes it here when it is
        // next, and otherwise when the deliveries before it have come (see `Group::own_ahead`).
        let cursor = self
            .groups
            .get(group_id)
            .filter(|group| group.active && seq == group.cursor + 1)
            .map(|group| group.cursor_after(seq));
        let me = self.me.as_str();
        let settled = db::transaction_unsynced(&self.connection, || {
            db::settle_history(&self.connection, outbox, Some(seq), "sent")?;
            db::delete_outbox(&self.connection, outbox)?;
            if let Some(cursor) = cursor {
                db::set_cursor(&self.connection, group_id.as_bytes(), cursor)?;
            }
            match intent {
                Intent::Rename { name } => Engine::apply_rename(
                    &self.connection,
                    group_id,
                    (name_seq, current.as_deref()),
                    name,
                    seq,
                    me,
                    me,
                ),
                _ => Ok(RenameOutcome::Ignored),
            }
        });
        match settled {
            Ok(renamed) => {
                self.committed_unsynced();
                if let Some(group) = self.groups.get_mut(group_id) {
                    match cursor {
                        Some(cursor) => group.move_cursor(cursor),
                        None if seq > group.cursor + 1 => {
                            group.own_ahead.insert(seq);
                        }
                        None => {}
                    }
                }
                if let Some(cursor) = cursor {
                    self.ack(group_id, cursor);
                }
                if let Intent::Rename { name } = intent {
                    match renamed {
                        RenameOutcome::Applied => {
                            self.renamed(group_id, name, seq, Some(self.me.to_string()));
                        }
                        RenameOutcome::Overtaken => self.emit(CoreEvent::RenameOvertaken {
                            group: self.group_ref(group_id),
                            by: self.me.to_string(),
                            name: name.clone(),
                        }),
                        RenameOutcome::Ignored => {}
                    }
                }
                if matches!(intent, Intent::Text { .. }) {
                    self.emit(CoreEvent::Sent {
                        group: self.group_ref(group_id),
                        local_id: outbox,
                        seq,
                    });
                }
                true
            }
            Err(error) => {
                if matches!(error, CoreError::Unavailable(_)) {
                    self.storage_failed();
                }
                self.error(format!("cannot record a sent message: {error}"));
                false
            }
        }
    }

    fn on_send_refused(
        &mut self,
        outbox: i64,
        client_message_id: [u8; 16],
        code: Option<ErrorCode>,
        current_epoch: Option<u64>,
        message: String,
    ) {
        tracing::debug!(outbox, ?code, ?current_epoch, "send refused");
        let Some(row) = self.answered_row(outbox, client_message_id) else {
            return;
        };
        self.in_flight.remove(&outbox);
        let Ok(group_id) = GroupId::new(row.group_id.clone()) else {
            return;
        };
        match code {
            Some(ErrorCode::StaleEpoch) if self.built_before_joining(&group_id, &row) => {
                // Built before we were removed and added again, and never sequenced: it was
                // meant for the group as it was, not for who is in it now.
                tracing::info!(outbox, "a message from before a removal; not sent");
                self.fail_outbox(&group_id, outbox, &row.intent, NOT_A_MEMBER);
                self.pump(&group_id);
            }
            Some(ErrorCode::StaleEpoch)
                if current_epoch.is_some_and(|current| {
                    self.groups
                        .get(&group_id)
                        .is_some_and(|group| current < group.mls.epoch().as_u64())
                }) =>
            {
                // Waiting for the DS to reach our epoch would never end: the message would be
                // rebuilt and sent again in a tight loop, for good.
                self.discard_built(&group_id, &row);
                self.on_server_behind(&group_id, current_epoch.unwrap_or_default());
            }
            Some(ErrorCode::StaleEpoch) => {
                tracing::info!(outbox, "the DS had moved to another epoch; rebuilding");
                self.discard_built(&group_id, &row);
                if let Some(group) = self.groups.get_mut(&group_id) {
                    group.wait_for_epoch = current_epoch;
                }
                self.pump(&group_id);
            }
            Some(ErrorCode::QuotaExceeded) => {
                // Kept and sent again: nothing is lost, but the user must know why it waits.
                if self.backlog_full.insert(group_id.clone()) {
                    let name = self.group_ref(&group_id).name;
                    self.error(format!(
                        "{name}: the server holds as many undelivered messages for this group as \
                         it allows, for a member who has been away; what you send waits, and goes \
                         out once they catch up or old messages expire"
                    ));
                }
                self.retry_at
                    .insert(outbox, Instant::now() + QUOTA_RETRY_DELAY);
            }
            Some(ErrorCode::RateLimited | ErrorCode::Internal) => {
                self.retry_at.insert(outbox, Instant::now() + RETRY_DELAY);
            }
            Some(ErrorCode::NotMember)
                if self
                    .groups
                    .get(&group_id)
                    .is_some_and(|group| group.leaving) =>
            {
                // We asked to leave and someone has already removed us: what we sent meanwhile
                // (our proposal again, or the last-one-out commit) is moot, and the commit
                // that removed us is on its way (the DS delivers it to us). Not an error.
                tracing::info!(outbox, "already removed from a group we are leaving");
                self.discard_pending(&group_id, &row.intent);
                if let Err(error) = db::delete_outbox(&self.connection, outbox) {
                    self.error(error.to_string());
                }
                self.claimed.remove(&outbox);
                self.pump(&group_id);
            }
            _ => {
                self.discard_pending(&group_id, &row.intent);
                self.fail_outbox(&group_id, outbox, &row.intent, &message);
                if code == Some(ErrorCode::NotMember) {
                    self.probe_membership(&group_id);
                }
                self.pump(&group_id);
            }
        }
    }

    /// Asks the DS whether anything of `group_id` is left for us, after it refused a send
    /// because we are not a member. If the commit that removed us is still stored, it is on its
    /// way and ends the group as any removal does. If nothing is left, we were removed while
    /// away and that commit expired before we fetched it: without the probe the group would
    /// stay open here, every send failing, for good.
    fn probe_membership(&mut self, group_id: &GroupId) {
        let probing = self
            .requests
            .values()
            .any(|request| matches!(request, Request::Probe(id) if id == group_id));
        let open = self
            .groups
            .get(group_id)
            .is_some_and(|group| group.active && group.announced && !group.leaving);
        if probing || !open {
            return;
        }
        let probed = group_id.clone();
        self.request(Request::Probe(group_id.clone()), |request_id| {
            Frame::Fetch(Fetch {
                request_id,
                group_id: probed,
                after_seq: u64::MAX,
                limit: 1,
            })
        });
    }

    /// The DS answered a send with an epoch older than the group's here: it lost commits it had
    /// sequenced (restored from an older backup, docs/operations.md). Everyone who processed
    /// them is ahead of it for good, so the group cannot carry on: it is closed, saying so.
    fn on_server_behind(&mut self, group_id: &GroupId, server_epoch: u64) {
        let Some(epoch) = self
            .groups
            .get(group_id)
            .filter(|group| group.active)
            .map(|group| group.mls.epoch().as_u64())
        else {
            return;
        };
        tracing::warn!(group = %group_id, server_epoch, epoch, "the DS is behind this group's epoch: it lost commits");
        self.close_group(
            group_id,
            &timeline::server_behind(server_epoch, epoch),
            |group| CoreEvent::ServerBehind {
                group,
                server_epoch,
                epoch,
            },
        );
    }

    /// Ends our part in a group the DS can no longer serve us in (see the callers), in a step
    /// of its own: the group is closed with `note` in its timeline, what was queued fails, and
    /// `event` tells the user.
    fn close_group(
        &mut self,
        group_id: &GroupId,
        note: &str,
        event: impl FnOnce(GroupRef) -> CoreEvent,
    ) {
        let connection = &self.connection;
        let stepped = db::transaction(connection, || {
            Engine::deactivate_in_step(connection, group_id, None, note, Unsent::FailAll)
        });
        match stepped {
            Ok(unsent) => {
                self.deactivated(group_id, unsent);
                self.emit(event(self.group_ref(group_id)));
            }
            Err(error) => self.error(error.to_string()),
        }
    }

    /// The DS holds nothing of a group for us any more while we still take part in it: see
    /// [`Self::probe_membership`]. Ends our part, as a removal does.
    fn on_removal_expired(&mut self, group_id: &GroupId) {
        let open = self
            .groups
            .get(group_id)
            .is_some_and(|group| group.active && !group.leaving);
        if !open {
            return;
        }
        tracing::warn!(group = %group_id, "the DS no longer counts us as a member; the removal expired");
        self.close_group(group_id, &timeline::removal_missed(), |group| {
            CoreEvent::RemovalExpired { group }
        });
    }

    /// Whether an outbox item was built in an epoch before the one we (last) joined in: before a
    /// removal, when we have been added again since.
    fn built_before_joining(&self, group_id: &GroupId, row: &OutboxRow) -> bool {
        let Some(joined) = self
            .groups
            .get(group_id)
            .and_then(|group| group.joined_epoch)
        else {
            return false;
        };
        row.payload
            .as_deref()
            .and_then(|payload| mlschat_ds::protocol::mls::peek_message_header(payload).ok())
            .is_some_and(|header| header.epoch < joined)
    }

    /// Forgets the MLS message built for an outbox item (another commit won the epoch) so that
    /// the intent is built again in the next epoch.
    ///
    /// Pending proposals stay: the commit that won may reference them (they are dropped when
    /// it is merged), and without them it could not be processed. That includes our own
    /// Remove proposal when leaving.
    fn discard_built(&mut self, group_id: &GroupId, row: &OutboxRow) {
        let Some(group) = self.groups.get_mut(group_id) else {
            return;
        };
        let storage = self.provider.storage();
        let result = db::transaction(&self.connection, || {
            if !row.intent.is_application()
                && row.intent != Intent::Leave
                && group.mls.pending_commit().is_some()
            {
                group.mls.clear_pending_commit(storage).map_err(db::sql)?;
            }
            db::reset_outbox(&self.connection, row.id)
        });
        if let Err(error) = result {
            self.reload(group_id);
            self.error(error.to_string());
        }
    }

    fn discard_pending(&mut self, group_id: &GroupId, intent: &Intent) {
        if intent.is_application() || *intent == Intent::Leave {
            return;
        }
        let Some(group) = self.groups.get_mut(group_id) else {
            return;
        };
        if group.mls.pending_commit().is_some() {
            let storage = self.provider.storage();
            if let Err(error) = group.mls.clear_pending_commit(storage) {
                self.error(error.to_string());
                self.reload(group_id);
            }
        }
    }

    /// Gives up on an outbox item. The caller pumps the group's next item. Returns false if
    /// the item could not be settled: it stays, and is pumped again after a back-off (built
    /// again, or, if it was built, sent again for the DS to answer once more).
    fn fail_outbox(
        &mut self,
        group_id: &GroupId,
        outbox: i64,
        intent: &Intent,
        reason: &str,
    ) -> bool {
        self.in_flight.remove(&outbox);
        self.claimed.remove(&outbox);
        if *intent == Intent::Leave
            && let Some(group) = self.groups.get_mut(group_id)
        {
            group.leaving = false;
            if let Err(error) = db::set_group_flag(
                &self.connection,
                group_id.as_bytes(),
                GroupFlag::Leaving,
                false,
            ) {
                self.error(error.to_string());
            }
            self.withdraw_leave_proposal(group_id);
        }
        let result = db::transaction(&self.connection, || {
            db::settle_history(&self.connection, outbox, None, &format!("failed: {reason}"))?;
            db::delete_outbox(&self.connection, outbox)
        });
        if let Err(error) = result {
            // Left in place, it would be pumped again at once.
            self.postpone_build(group_id, outbox, &error);
            return false;
        }
        match intent {
            Intent::Text { .. } => self.emit(CoreEvent::Failed {
                group: self.group_ref(group_id),
                local_id: outbox,
                reason: reason.to_string(),
            }),
            Intent::Rename { name } => self.error(format!(
                "cannot rename {} to {name}: {reason}",
                self.group_ref(group_id).name
            )),
            _ => self.error(format!("{}: {reason}", self.group_ref(group_id).name)),
        }
        true
    }

    // ---- deliveries -----------------------------------------------------------------------

    /// Acknowledges a group's deliveries up to `seq`, once what they changed is durable.
    fn ack(&mut self, group_id: &GroupId, seq: u64) {
        if self.unsynced_since.is_some() {
            let deferred = self.deferred_acks.entry(group_id.clone()).or_insert(seq);
            *deferred = (*deferred).max(seq);
        } else {
            self.send_ack(group_id, seq);
        }
    }

    fn send_ack(&self, group_id: &GroupId, seq: u64) {
        self.send_frame(&Frame::Ack(Ack {
            group_id: group_id.clone(),
            seq,
        }));
    }

    /// Remembers that a commit was made without an fsync (see `unsynced_since`).
    fn committed_unsynced(&mut self) {
        self.unsynced_since.get_or_insert_with(Instant::now);
        self.storage_works();
    }

    /// Makes the unsynced commits durable, then sends the acknowledgements held back for them.
    /// On failure both wait for the next attempt, `SYNC_RETRY` later.
    fn sync(&mut self) {
        if self.unsynced_since.is_none() {
            return;
        }
        if let Err(error) = db::sync(&self.connection) {
            if matches!(error, CoreError::Unavailable(_)) {
                self.storage_failed();
            }
            // Counted from a moment ahead, so that the next attempt comes SYNC_RETRY later.
            self.unsynced_since = Some(Instant::now() + SYNC_RETRY);
            if !self.sync_failing {
                self.sync_failing = true;
                self.error(format!(
                    "cannot make the profile's latest changes durable: {error}"
                ));
            }
            return;
        }
        self.became_durable();
    }

    /// After an fsync'd commit: it also made every earlier commit durable (one WAL, written
    /// in order), so nothing is left to sync and the held-back acknowledgements can go.
    fn became_durable(&mut self) {
        self.storage_works();
        if self.unsynced_since.is_none() {
            return;
        }
        if self.sync_failing {
            self.sync_failing = false;
            tracing::info!("syncing the profile works again");
        }
        self.unsynced_since = None;
        let acks = std::mem::take(&mut self.deferred_acks);
        // Only on an authenticated connection. Offline, or while authenticating, they are
        // dropped: after the next login the DS delivers again from the cursor it has, and the
        // deliveries at or below ours are acknowledged as they are skipped.
        if self.online() {
            for (group_id, seq) in acks {
                self.send_ack(&group_id, seq);
            }
        }
    }

    /// After a step that did not commit: replaces the group in memory with its stored state.
    /// If that fails too because the storage does, the group in memory may be ahead of its
    /// storage (a commit staged but never stored), so the group is held (see [`Held`]): nothing
    /// of it is processed or built until a retry has reloaded it.
    /// Returns false if the reload failed.
    fn reload(&mut self, group_id: &GroupId) -> bool {
        match self.try_reload(group_id) {
            Ok(()) => true,
            Err(error @ CoreError::Unavailable(_)) => {
                let next = self
                    .groups
                    .get(group_id)
                    .map_or(0, |group| group.cursor + 1);
                if self.hold(group_id, next, &error) == 1 {
                    self.error(format!(
                        "{}: cannot reload group state: {error}; its messages wait until it can",
                        self.group_ref(group_id).name
                    ));
                }
                false
            }
            Err(error) => {
                self.error(format!("cannot reload group state: {error}"));
                false
            }
        }
    }

    /// Replaces the group in memory with its stored state, after a step that did not commit.
    fn try_reload(&mut self, group_id: &GroupId) -> Result<(), CoreError> {
        let mls_id = MlsGroupId::from_slice(group_id.as_bytes());
        match MlsGroup::load(self.provider.storage(), &mls_id).map_err(db::sql)? {
            Some(mls) => {
                if let Some(group) = self.groups.get_mut(group_id) {
                    group.mls = mls;
                }
            }
            None => {
                self.groups.remove(group_id);
            }
        }
        Ok(())
    }

    /// Records the keys a step saw, inside the step's transaction: a key change must not be
    /// lost to a crash between the step and its record. A change gets a warning line in the
    /// group's timeline; the returned events announce the changes once the step committed.
    fn observe_in_step(
        connection: &Connection,
        group: &GroupRef,
        seq: u64,
        observed: &[(String, Vec<u8>)],
    ) -> Result<Vec<CoreEvent>, CoreError> {
        let mut changes = Vec::new();
        for (user, key) in observed {
            if db::observe_key(connection, user, key)? == KeyObservation::Changed {
                let fingerprint = fingerprint(key);
                db::insert_history(
                    connection,
                    group.id.as_bytes(),
                    NewHistory::warning(Some(seq), &timeline::key_changed(user, &fingerprint)),
                )?;
                changes.push(CoreEvent::KeyChanged {
                    user: user.clone(),
                    fingerprint,
                    group: Some(group.clone()),
                });
            }
        }
        Ok(changes)
    }

    fn observe(&self, user: &str, signature_key: &[u8]) {
        match db::observe_key(&self.connection, user, signature_key) {
            Ok(KeyObservation::Changed) => {
                self.emit(CoreEvent::KeyChanged {
                    user: user.to_string(),
                    fingerprint: fingerprint(signature_key),
                    group: None,
                });
            }
            Ok(_) => {}
            Err(error) => self.error(error.to_string()),
        }
    }

    fn on_deliver(&mut self, delivery: Delivery) {
        if let Some(held) = self.held.get_mut(&delivery.group_id) {
            // Not acknowledged: the DS keeps it, and a fetch brings it back in order.
            held.seen = held.seen.max(delivery.seq);
            return;
        }
        self.process(delivery);
    }

    /// Processes one delivery of a group in seq order, from the DS's stream or from a fetch.
    fn process(&mut self, delivery: Delivery) {
        let group_id = delivery.group_id.clone();
        let seq = delivery.seq;
        if delivery.kind == DeliveryKind::Welcome as u8 {
            if self.on_welcome(delivery) {
                self.ack(&group_id, seq);
            }
            return;
        }
        let Some(group) = self.groups.get(&group_id) else {
            // A group we were added to without joining it: its Welcome expired at the DS before
            // we fetched it, or could not be opened. Nothing else lets us in, but the user can
            // ask to be added again.
            if self.welcome_missed.insert(group_id.clone()) {
                self.error(format!(
                    "you are in a group of {} ({}) that this client could not join (the \
                     invitation expired at the server while you were away, or could not be \
                     opened): ask them to remove you and add you again",
                    delivery.sender,
                    group_id.to_hex()
                ));
            }
            self.ack(&group_id, seq);
            return;
        };
        if seq <= group.cursor {
            self.ack(&group_id, group.cursor);
            return;
        }
        if !group.active {
            // We left or were removed; the MLS state cannot process anything newer.
            self.ack(&group_id, seq);
            return;
        }
        if delivery.epoch > group.mls.epoch().as_u64() {
            // The DS delivers every commit before what follows it, so one we needed is gone:
            // nothing of this group can be read or sent any more, and saying so once beats an
            // error per message and messages "sending" for ever.
            self.fall_out_of_sync(&group_id, seq);
            return;
        }
        let mut expired = None;
        if seq > group.cursor + 1 {
            if self.application_in_flight(&group_id) {
                // Our own message, which the DS does not push back, may be in the gap: its
                // `Accepted` can come after the next delivery.
                tracing::debug!(group = %group_id, expected = group.cursor + 1, seq, "a gap our message in flight may fill");
            } else {
                // The DS delivers a group's messages without gaps but for what it deleted:
                // messages that expired (a commit among them would have put us out of sync,
                // above). The timeline says so where they would have been.
                tracing::warn!(group = %group_id, expected = group.cursor + 1, seq, "gap in deliveries (expired messages?)");
                expired = Some(timeline::expired(seq - group.cursor - 1));
            }
        }
        let from_me = delivery.sender == self.me;
        tracing::debug!(group = %group_id, seq, kind = delivery.kind, sender = %delivery.sender, epoch = delivery.epoch, "delivery");
        let outcome = self.process_delivery(&group_id, &delivery, from_me, expired.as_deref());
        let events = match outcome {
            Ok(events) => events,
            Err(error @ CoreError::Unavailable(_)) => {
                // Nothing was written, but the group in memory may have moved on.
                if let Err(reload) = self.try_reload(&group_id) {
                    tracing::warn!(group = %group_id, error = %reload, "cannot reload a held group yet");
                }
                self.hold_delivery(&group_id, seq, &error);
                return;
            }
            Err(error) => {
                // Skip what cannot be processed, but never silently: the timeline says so.
                // Unless the storage turns out to be failing too (openmls does not always say
                // that a failure was its storage's): then it is held like any delivery that
                // could not be recorded.
                if !self.reload(&group_id)
                    && let Some(held) = self.held.get_mut(&group_id)
                {
                    // The reload failed on the storage, and held the group.
                    held.seen = held.seen.max(seq);
                    return;
                }
                let note = format!(
                    "could not process message {seq} from {}: {error}",
                    delivery.sender
                );
                let cursor = self
                    .groups
                    .get(&group_id)
                    .map_or(seq, |group| group.cursor_after(seq));
                let recorded = db::transaction(&self.connection, || {
                    db::set_cursor(&self.connection, group_id.as_bytes(), cursor)?;
                    db::insert_history(
                        &self.connection,
                        group_id.as_bytes(),
                        NewHistory::system(Some(seq), &note),
                    )
                    .map(|_| ())
                });
                match recorded {
                    Err(storage @ CoreError::Unavailable(_)) => {
                        self.hold_delivery(&group_id, seq, &storage);
                        return;
                    }
                    Err(error) => self.error(error.to_string()),
                    Ok(()) => {}
                }
                if let Some(group) = self.groups.get_mut(&group_id) {
                    group.move_cursor(cursor);
                }
                vec![CoreEvent::Error {
                    message: format!("{}: {note}", self.group_ref(&group_id).name),
                }]
            }
        };
        // The cursor may have stepped past our own messages after this one.
        let processed = self
            .groups
            .get(&group_id)
            .map_or(seq, |group| group.cursor.max(seq));
        self.ack(&group_id, processed);
        for event in events {
            self.emit(event);
        }
        self.pump(&group_id);
    }

    /// Ends our part in a group we can no longer follow (see [`CoreEvent::OutOfSync`]), at the
    /// delivery `seq` that showed it. A Welcome, once a member adds us again, replaces it.
    fn fall_out_of_sync(&mut self, group_id: &GroupId, seq: u64) {
        tracing::warn!(group = %group_id, seq, "a delivery of a later epoch: commits are missing");
        let connection = &self.connection;
        let stepped = db::transaction(connection, || {
            let unsent = Engine::deactivate_in_step(
                connection,
                group_id,
                Some(seq),
                &timeline::out_of_sync(),
                Unsent::FailAll,
            )?;
            db::set_cursor(connection, group_id.as_bytes(), seq)?;
            Ok(unsent)
        });
        match stepped {
            Ok(unsent) => {
                if let Some(group) = self.groups.get_mut(group_id) {
                    group.move_cursor(seq);
                }
                self.deactivated(group_id, unsent);
                self.emit(CoreEvent::OutOfSync {
                    group: self.group_ref(group_id),
                });
                self.ack(group_id, seq);
            }
            Err(error @ CoreError::Unavailable(_)) => self.hold_delivery(group_id, seq, &error),
            Err(error) => self.error(error.to_string()),
        }
    }

    /// Whether an application message of ours in `group_id` is sent and not yet answered.
    fn application_in_flight(&self, group_id: &GroupId) -> bool {
        db::outbox_of_group(&self.connection, group_id.as_bytes()).is_ok_and(|rows| {
            rows.iter()
                .any(|row| row.intent.is_application() && self.in_flight.contains_key(&row.id))
        })
    }

    /// Processes one delivery in one transaction and returns the events to emit after it
    /// committed. On error nothing was written and the caller reloads the group.
    fn process_delivery(
        &mut self,
        group_id: &GroupId,
        delivery: &Delivery,
        from_me: bool,
        expired: Option<&str>,
    ) -> Result<Vec<CoreEvent>, CoreError> {
        let kind = DeliveryKind::from_u8(delivery.kind);
        let payload = delivery.payload.as_slice();
        let seq = delivery.seq;
        let group_ref = self.group_ref(group_id);
        // Only our own messages come back with a payload our outbox holds.
        let own_row = if from_me {
            db::outbox_of_group(&self.connection, group_id.as_bytes())?
                .into_iter()
                .find(|row| row.payload.as_deref() == Some(payload))
        } else {
            None
        };
        let mut events = Vec::new();
        let mut observed: Vec<(String, Vec<u8>)> = Vec::new();
        let mut key_changes: Vec<CoreEvent> = Vec::new();
        let mut unsent: Vec<i64> = Vec::new();
        let mut merged_own: Option<OutboxRow> = None;
        let mut settled_own: Option<i64> = None;
        let mut self_removed_by: Option<String> = None;
        let mut epoch_changed = false;
        // Applied to the group in memory only once the transaction has committed: the new
        // name, who renamed the group (`None` when we only learned its name) and the rename's
        // seq (`None` for a name we learned).
        let mut renamed_to: Option<(String, Option<String>, Option<u64>)> = None;
        let mut self_updated_at: Option<i64> = None;
        let me = self.me.to_string();
        let Some(group) = self.groups.get_mut(group_id) else {
            return Ok(events);
        };
        let cursor = group.cursor_after(seq);
        let provider = &self.provider;
        let connection = &self.connection;
        if let Some(note) = expired {
            events.push(CoreEvent::Error {
                message: format!("{}: {note}", group_ref.name),
            });
        }
        // Unsynced: until we acknowledge it (after the sync), the DS delivers it again.
        db::transaction_unsynced(connection, || {
            if let Some(note) = expired {
                db::insert_history(
                    connection,
                    group_id.as_bytes(),
                    NewHistory::warning(Some(seq), note),
                )?;
            }
            match (kind, from_me) {
                (Some(DeliveryKind::Application), true) => {
                    // Our own message, from the DS's backlog after a reconnect (within a session
                    // the DS does not push it back): it cannot be decrypted by us (RFC 9420
                    // §6.3.2 secret reuse rules), and the outbox says what it was.
                    if let Some(row) = &own_row {
                        db::settle_history(connection, row.id, Some(seq), "sent")?;
                        db::delete_outbox(connection, row.id)?;
                        settled_own = Some(row.id);
                        if let Intent::Rename { name } = &row.intent {
                            match Engine::apply_rename(
                                connection,
                                group_id,
                                (group.name_seq, group.name.as_deref()),
                                name,
                                seq,
                                &me,
                                &me,
                            )? {
                                RenameOutcome::Applied => {
                                    renamed_to = Some((name.clone(), Some(me.clone()), Some(seq)));
                                }
                                RenameOutcome::Overtaken => {
                                    events.push(CoreEvent::RenameOvertaken {
                                        group: group_ref.clone(),
                                        by: me.clone(),
                                        name: name.clone(),
                                    });
                                }
                                RenameOutcome::Ignored => {}
                            }
                        }
                        if matches!(row.intent, Intent::Text { .. }) {
                            events.push(CoreEvent::Sent {
                                group: group_ref.clone(),
                                local_id: row.id,
                                seq,
                            });
                        }
                    }
                }
                (Some(DeliveryKind::Proposal), true) => {}
                (Some(DeliveryKind::Commit), true)
                    if own_row.is_some() && group.mls.pending_commit().is_some() =>
                {
                    let Some(row) = own_row.clone() else {
                        return Ok(());
                    };
                    if let Some(staged) = group.mls.pending_commit() {
                        let inspection = inspect_commit(&group.mls, staged, &me);
                        apply_inspection(&inspection, &group_ref, &mut events, &mut observed);
                        if let Some(by) = &inspection.self_removed_by {
                            self_removed_by = Some(by.clone());
                        }
                    }
                    group
                        .mls
                        .merge_pending_commit(provider)
                        .map_err(merge_pending_error)?;
                    db::delete_outbox(connection, row.id)?;
                    if row.intent == Intent::Update {
                        let now = db::now_unix_secs();
                        db::set_last_self_update(connection, group_id.as_bytes(), now)?;
                        self_updated_at = Some(now);
                    }
                    if matches!(row.intent, Intent::Invite { .. })
                        && let Some(name) = &group.name
                    {
                        // New members learn the group's name from an encrypted message.
                        db::insert_outbox(
                            connection,
                            group_id.as_bytes(),
                            &Intent::GroupName { name: name.clone() },
                        )?;
                    }
                    merged_own = Some(row);
                    epoch_changed = true;
                }
                (Some(DeliveryKind::Commit), true) => {
                    // The DS sequenced a commit of ours that we hold no pending state for:
                    // merging is impossible, and silently skipping it would fork the group.
                    return Err(CoreError::Invalid(
                        "our own commit was sequenced but its pending state is gone".into(),
                    ));
                }
                (Some(_), _) => {
                    let message =
                        MlsMessageIn::tls_deserialize_exact(payload).map_err(mls_error)?;
                    let protocol: ProtocolMessage =
                        message.try_into_protocol_message().map_err(mls_error)?;
                    if protocol.content_type() == ContentType::Commit
                        && group.mls.pending_commit().is_some()
                    {
                        // Another commit won this epoch: ours is void (its intent is retried
                        // when the DS answers StaleEpoch). Only a commit voids it: a proposal
                        // or a message sequenced before our commit leaves it valid, and the DS
                        // may well accept it after them.
                        group
                            .mls
                            .clear_pending_commit(provider.storage())
                            .map_err(db::sql)?;
                    }
                    let processed = group
                        .mls
                        .process_message(provider, protocol)
                        .map_err(process_error)?;
                    let sender = identity_of(processed.credential());
                    match processed.into_content() {
                        ProcessedMessageContent::ApplicationMessage(message) => {
                            match decode_envelope(&message.into_bytes()) {
                                Envelope::Text { text, sent_at } => {
                                    let at = message_time(sent_at, db::now_unix_secs());
                                    db::insert_history(
                                        connection,
                                        group_id.as_bytes(),
                                        NewHistory {
                                            at: Some(at),
                                            ..NewHistory::message(Some(seq), &sender, &text)
                                        },
                                    )?;
                                    events.push(CoreEvent::Message {
                                        group: group_ref.clone(),
                                        from: sender,
                                        text,
                                        seq,
                                        at,
                                    });
                                }
                                Envelope::GroupName { name } => {
                                    let name = clean_group_name(&name);
                                    if takes_announced_name(
                                        group.name.as_deref(),
                                        group.joined_epoch,
                                        group.name_seq,
                                        group.mls.epoch().as_u64(),
                                    ) && !name.is_empty()
                                        && group.name.as_deref() != Some(name.as_str())
                                    {
                                        db::set_group_name(
                                            connection,
                                            group_id.as_bytes(),
                                            &name,
                                            None,
                                        )?;
                                        renamed_to = Some((name, None, None));
                                    }
                                }
                                Envelope::Rename { name } => {
                                    // A rename sequenced before the one that named the group
                                    // (our own, applied when the DS sequenced it) is stale.
                                    let name = clean_group_name(&name);
                                    match Engine::apply_rename(
                                        connection,
                                        group_id,
                                        (group.name_seq, group.name.as_deref()),
                                        &name,
                                        seq,
                                        &sender,
                                        &me,
                                    )? {
                                        RenameOutcome::Applied => {
                                            renamed_to = Some((name, Some(sender), Some(seq)));
                                        }
                                        RenameOutcome::Overtaken => {
                                            events.push(CoreEvent::RenameOvertaken {
                                                group: group_ref.clone(),
                                                by: sender,
                                                name,
                                            });
                                        }
                                        RenameOutcome::Ignored => {}
                                    }
                                }
                            }
                        }
                        ProcessedMessageContent::ProposalMessage(proposal) => {
                            if let Proposal::Update(update) = proposal.proposal() {
                                refuse_rename(&sender, update.leaf_node().credential())?;
                            }
                            group
                                .mls
                                .store_pending_proposal(provider.storage(), *proposal)
                                .map_err(db::sql)?;
                        }
                        ProcessedMessageContent::ExternalJoinProposalMessage(_) => {
                            tracing::info!("ignoring an external join proposal");
                        }
                        ProcessedMessageContent::StagedCommitMessage(staged) => {
                            refuse_renames(&group.mls, &staged, &sender)?;
                            let inspection = inspect_commit(&group.mls, &staged, &sender);
                            apply_inspection(&inspection, &group_ref, &mut events, &mut observed);
                            if let Some(by) = &inspection.self_removed_by {
                                self_removed_by = Some(by.clone());
                            }
                            group
                                .mls
                                .merge_staged_commit(provider, *staged)
                                .map_err(merge_error)?;
                            epoch_changed = true;
                        }
                        other => {
                            tracing::debug!(content = ?std::mem::discriminant(&other), "nothing to do for this message");
                        }
                    }
                }
                (None, _) => {
                    return Err(CoreError::Invalid(format!(
                        "unknown delivery kind {}",
                        delivery.kind
                    )));
                }
            }
            // The timeline keeps who changed the group and the codes of its epochs, so that
            // they are still there after a restart.
            for event in &events {
                let note = match event {
                    CoreEvent::MemberAdded { user, by, .. } => timeline::member_added(by, user),
                    // Our own removal has its own line (see `deactivate`).
                    CoreEvent::MemberRemoved { user, by, .. } if *user != me => {
                        timeline::member_removed(by, user)
                    }
                    _ => continue,
                };
                db::insert_history(
                    connection,
                    group_id.as_bytes(),
                    NewHistory::system(Some(seq), &note),
                )?;
            }
            if epoch_changed && self_removed_by.is_none() {
                let (epoch, code) = epoch_and_code(&group.mls);
                db::insert_history(
                    connection,
                    group_id.as_bytes(),
                    NewHistory::system(Some(seq), &timeline::new_epoch(epoch, &code)),
                )?;
            }
            if let Some(by) = &self_removed_by {
                unsent = Engine::deactivate_in_step(
                    connection,
                    group_id,
                    Some(seq),
                    &timeline::left(by, &me),
                    Unsent::KeepBuilt,
                )?;
            }
            key_changes = Engine::observe_in_step(connection, &group_ref, seq, &observed)?;
            db::set_cursor(connection, group_id.as_bytes(), cursor)?;
            Ok(())
        })?;
        group.move_cursor(cursor);
        if let Some(at) = self_updated_at {
            group.last_self_update = at;
        }
        let renamed_by = renamed_to.map(|(name, by, name_seq)| {
            group.name = Some(name);
            if let Some(name_seq) = name_seq {
                group.name_seq = name_seq;
            }
            by
        });
        self.committed_unsynced();
        if let Some(row) = merged_own {
            self.in_flight.remove(&row.id);
            self.claimed.remove(&row.id);
        }
        if let Some(id) = settled_own {
            // Delivered before its `Accepted`: it is sequenced, so the next item may go.
            self.in_flight.remove(&id);
        }
        if let Some(by) = renamed_by {
            events.push(CoreEvent::GroupRenamed {
                group: self.group_ref(group_id),
                by,
            });
        }
        if let Some(by) = self_removed_by {
            self.deactivated(group_id, unsent);
            events.push(CoreEvent::Left {
                group: self.group_ref(group_id),
                by,
            });
            // Announced after the lines they follow in the stored timeline.
            events.extend(key_changes);
            return Ok(events);
        }
        if epoch_changed {
            if let Some((epoch, code)) = self.epoch_of(group_id) {
                events.push(CoreEvent::EpochChanged {
                    group: self.group_ref(group_id),
                    epoch,
                    code,
                });
            }
            self.after_epoch_change(group_id);
        }
        events.extend(key_changes);
        Ok(events)
    }

    /// A new epoch voids proposals of the old one: if we are leaving and our removal was not
    /// in that commit, propose it again.
    fn after_epoch_change(&mut self, group_id: &GroupId) {
        let Some(group) = self.groups.get(group_id) else {
            return;
        };
        if !group.leaving {
            return;
        }
        let rows = match db::outbox_of_group(&self.connection, group_id.as_bytes()) {
            Ok(rows) => rows,
            Err(error) => {
                self.error(error.to_string());
                return;
            }
        };
        if let Some(row) = rows
            .iter()
            .find(|row| row.intent == Intent::Leave && row.payload.is_some())
        {
            // Whatever answer the DS gives the old proposal no longer matters (it names the
            // old client message id and is ignored).
            self.in_flight.remove(&row.id);
            if let Err(error) = db::reset_outbox(&self.connection, row.id) {
                self.error(error.to_string());
            }
        }
    }

    /// Leaves a group locally, in a transaction of its own (when no commit is involved: we were
    /// its last member).
    fn deactivate(&mut self, group_id: &GroupId, note: String) {
        let result = db::transaction(&self.connection, || {
            Engine::deactivate_in_step(&self.connection, group_id, None, &note, Unsent::KeepBuilt)
        });
        match result {
            Ok(unsent) => self.deactivated(group_id, unsent),
            Err(error) => self.error(error.to_string()),
        }
    }

    /// The stored half of leaving a group, inside the step that ends our membership: marks the
    /// group inactive, fails the messages still queued for it (their lines say so, instead of
    /// "sending" forever) and notes why. Returns the failed lines' ids for [`Self::deactivated`].
    fn deactivate_in_step(
        connection: &Connection,
        group_id: &GroupId,
        seq: Option<u64>,
        note: &str,
        unsent: Unsent,
    ) -> Result<Vec<i64>, CoreError> {
        // An application message already built stays: it may have been sent, and the DS may
        // have sequenced it before the commit that removes us (the others then have it), even
        // if its answer was lost or could not be recorded. Its answer settles it (`Accepted`,
        // or `NotMember` if it came too late); `pump_once` sends it again if it is not awaited.
        let rest: Vec<OutboxRow> = db::outbox_of_group(connection, group_id.as_bytes())?
            .into_iter()
            .filter(|row| {
                unsent == Unsent::FailAll || !(row.intent.is_application() && row.payload.is_some())
            })
            .collect();
        let unsent: Vec<i64> = rest
            .iter()
            .filter(|row| matches!(row.intent, Intent::Text { .. }))
            .map(|row| row.id)
            .collect();
        db::set_group_flag(connection, group_id.as_bytes(), GroupFlag::Active, false)?;
        for id in &unsent {
            db::settle_history(connection, *id, None, &format!("failed: {NOT_A_MEMBER}"))?;
        }
        for row in &rest {
            db::delete_outbox(connection, row.id)?;
        }
        // Shown as a warning, as the live view shows it.
        db::insert_history(
            connection,
            group_id.as_bytes(),
            NewHistory::warning(seq, note),
        )?;
        Ok(unsent)
    }

    /// The in-memory half of leaving a group, once the step that stored it has committed.
    fn deactivated(&mut self, group_id: &GroupId, unsent: Vec<i64>) {
        if let Some(group) = self.groups.get_mut(group_id) {
            group.active = false;
            group.leaving = false;
        }
        for id in unsent {
            self.in_flight.remove(&id);
            self.emit(CoreEvent::Failed {
                group: self.group_ref(group_id),
                local_id: id,
                reason: NOT_A_MEMBER.to_string(),
            });
        }
    }

    /// Joins a group from its Welcome. Returns false if the Welcome is held for the profile's
    /// storage (see [`Held`]) and must not be acknowledged.
    fn on_welcome(&mut self, delivery: Delivery) -> bool {
        let group_id = delivery.group_id.clone();
        // A Welcome replayed from before what we processed since (acks lost with a
        // connection): joining again from it would rewind the group and replay its messages.
        // A later one for a group we are still in means that we were removed and added again,
        // and that the DS no longer had the commit that removed us when we came back (the
        // messages expired): the DS delivers a removal before a later Welcome when it has it.
        let removal_missed = match self.groups.get(&group_id) {
            Some(group) if delivery.seq <= group.cursor => return true,
            Some(group) if group.active && delivery.epoch <= group.mls.epoch().as_u64() => {
                return true;
            }
            Some(group) => group.active,
            None => false,
        };
        let replace = self.groups.contains_key(&group_id);
        // Added again after a removal: the name we knew still applies until the inviter's
        // name message arrives.
        let known_name = self
            .groups
            .get(&group_id)
            .and_then(|group| group.name.clone());
        let payload = delivery.payload.as_slice();
        let provider = &self.provider;
        let connection = &self.connection;
        let me = self.me.as_str();
        // As events will name the group once it is joined (the name we knew, if any).
        let group_ref = self.group_ref(&group_id);
        let joined = db::transaction(connection, || {
            let unsent = if removal_missed {
                Engine::deactivate_in_step(
                    connection,
                    &group_id,
                    Some(delivery.seq),
                    &timeline::removal_missed(),
                    Unsent::FailAll,
                )?
            } else {
                Vec::new()
            };
            let message = MlsMessageIn::tls_deserialize_exact(payload).map_err(mls_error)?;
            let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
                return Err(CoreError::Invalid(
                    "the Welcome delivery holds no Welcome".into(),
                ));
            };
            let mut builder = StagedWelcome::build_from_welcome(provider, &join_config(), welcome)
                .map_err(welcome_error)?;
            // SECURITY: the group we are added to must be the one the DS delivered the Welcome
            // in. A Welcome for another group could replace the state of a group we are in
            // (below), under the wrong name and members.
            let mls_id = MlsGroupId::from_slice(group_id.as_bytes());
            if *builder
                .processed_welcome()
                .unverified_group_info()
                .group_id()
                != mls_id
            {
                return Err(CoreError::Invalid(format!(
                    "the Welcome from {} is for another group than the one it came in",
                    delivery.sender
                )));
            }
            if replace {
                // openmls overwrites the old state as it joins, but not all of it: the
                // proposals queued in our first membership (our own leave, say) would come
                // back with the next load and go into our next commit.
                if let Some(mut old) =
                    MlsGroup::load(provider.storage(), &mls_id).map_err(mls_error)?
                {
                    old.delete(provider.storage()).map_err(mls_error)?;
                }
                builder = builder.replace_old_group();
            }
            let staged = builder.build().map_err(|error| match error {
                // The DS protocol has no channel for the tree (docs/interop.md).
                WelcomeError::MissingRatchetTree => CoreError::Invalid(format!(
                    "the Welcome from {} carries no ratchet tree (RFC 9420 §12.4.3.3 ratchet_tree \
                     extension) and mlschat has no other way to get the group's tree; the \
                     inviter's client must put the ratchet tree in its Welcomes",
                    delivery.sender
                )),
                other => welcome_error(other),
            })?;
            let by = staged
                .welcome_sender()
                .map(|leaf| identity_of(leaf.credential()))
                .unwrap_or_else(|_| delivery.sender.to_string());
            let others: Vec<(String, Vec<u8>)> = staged
                .members()
                .map(|member| {
                    (
                        identity_of(&member.credential),
                        member.signature_key.clone(),
                    )
                })
                .filter(|(user, _)| *user != me)
                .collect();
            let mls = staged.into_group(provider).map_err(welcome_error)?;
            let (epoch, code) = epoch_and_code(&mls);
            db::insert_group(
                connection,
                group_id.as_bytes(),
                known_name.as_deref(),
                delivery.seq,
                true,
                epoch,
            )?;
            for line in [timeline::added_you(&by), timeline::new_epoch(epoch, &code)] {
                db::insert_history(
                    connection,
                    group_id.as_bytes(),
                    NewHistory::system(Some(delivery.seq), &line),
                )?;
            }
            let key_changes =
                Engine::observe_in_step(connection, &group_ref, delivery.seq, &others)?;
            Ok((mls, by, key_changes, epoch, unsent))
        });
        match joined {
            Ok((mls, by, key_changes, epoch, unsent)) => {
                if removal_missed {
                    self.deactivated(&group_id, unsent);
                }
                self.groups.insert(
                    group_id.clone(),
                    Group {
                        mls,
                        name: known_name,
                        cursor: delivery.seq,
                        active: true,
                        announced: true,
                        leaving: false,
                        last_self_update: db::now_unix_secs(),
                        wait_for_epoch: None,
                        joined_epoch: Some(epoch),
                        name_seq: 0,
                        own_ahead: OwnAhead::default(),
                    },
                );
                self.emit(CoreEvent::Joined {
                    group: self.group_ref(&group_id),
                    by,
                });
                self.emit_epoch(&group_id);
                // After the join, as their warnings follow its line in the stored timeline.
                for change in key_changes {
                    self.emit(change);
                }
                // A KeyPackage was used up: top the stock up if it runs low.
                self.request(Request::CountKeyPackages, |request_id| {
                    Frame::CountKeyPackages(CountKeyPackages { request_id })
                });
            }
            Err(error @ CoreError::Unavailable(_)) => {
                self.hold_delivery(&group_id, delivery.seq, &error);
                return false;
            }
            Err(error) => {
                // Said here with its reason; the group's later messages need not say it again.
                self.welcome_missed.insert(group_id.clone());
                self.error(format!(
                    "could not join a group of {} from its Welcome: {error}; ask them to remove \
                     you and add you again",
                    delivery.sender
                ));
            }
        }
        true
    }
}

/// What ending our membership of a group does with the application messages already built
/// for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unsent {
    /// They stay until the DS answers them: it may have sequenced them before our removal.
    KeepBuilt,
    /// They fail with the rest. For a removal learned only from a later Welcome: whatever
    /// the DS sequenced before it has expired there, and sent again they would meet a later
    /// epoch and be built again for the new membership, which is not what they were written
    /// for.
    FailAll,
}

/// Who a commit adds and removes, and whose keys it shows.
struct CommitInspection {
    /// Added users with their signature keys, and who asked for each addition.
    added: Vec<(String, Vec<u8>, String)>,
    /// Removed users, and who asked for each removal (the user itself when it left).
    removed: Vec<(String, String)>,
    updated: Vec<(String, Vec<u8>)>,
    /// Who asked for our own removal, if the commit removes us.
    self_removed_by: Option<String>,
}

/// Who asked for a proposal that a commit carries: the member that proposed it, or the
/// committer for its own proposals (and for any not sent by a member).
fn proposer(group: &MlsGroup, sender: &Sender, committer: &str) -> String {
    match sender {
        Sender::Member(leaf) => group
            .member_at(*leaf)
            .map(|member| identity_of(&member.credential))
            .unwrap_or_else(|| committer.to_string()),
        _ => committer.to_string(),
    }
}

fn inspect_commit(group: &MlsGroup, staged: &StagedCommit, committer: &str) -> CommitInspection {
    let added = staged
        .add_proposals()
        .map(|proposal| {
            let leaf = proposal.add_proposal().key_package().leaf_node();
            (
                identity_of(leaf.credential()),
                leaf.signature_key().as_slice().to_vec(),
                proposer(group, proposal.sender(), committer),
            )
        })
        .collect();
    let own = group.own_leaf_index();
    let mut self_removed_by = None;
    let mut removed = Vec::new();
    for proposal in staged.remove_proposals() {
        let leaf = proposal.remove_proposal().removed();
        let by = proposer(group, proposal.sender(), committer);
        if leaf == own {
            self_removed_by = Some(by.clone());
        }
        if let Some(member) = group.member_at(leaf) {
            removed.push((identity_of(&member.credential), by));
        }
    }
    if staged.self_removed() && self_removed_by.is_none() {
        self_removed_by = Some(committer.to_string());
    }
    let updated = staged
        .update_path_leaf_node()
        .map(|leaf| {
            vec![(
                identity_of(leaf.credential()),
                leaf.signature_key().as_slice().to_vec(),
            )]
        })
        .unwrap_or_default();
    CommitInspection {
        added,
        removed,
        updated,
        self_removed_by,
    }
}

/// Refuses a leaf of `member` whose credential names someone else. A member may replace its
/// keys, never its name: openmls accepts such a leaf (RFC 9420 leaves the check to the
/// application's authentication service), and the name is all this client shows of a sender,
/// so a renamed leaf would let a member speak as a user the client has never seen.
fn refuse_rename(member: &str, credential: &openmls::prelude::Credential) -> Result<(), CoreError> {
    let claimed = identity_of(credential);
    if claimed == member {
        Ok(())
    } else {
        Err(CoreError::Invalid(format!(
            "{member} tried to change its name to {claimed}; refused"
        )))
    }
}

/// [`refuse_rename`] for every leaf a commit replaces: the committer's own (its update path)
/// and those of the Update proposals it carries.
fn refuse_renames(
    group: &MlsGroup,
    staged: &StagedCommit,
    committer: &str,
) -> Result<(), CoreError> {
    if let Some(leaf) = staged.update_path_leaf_node() {
        refuse_rename(committer, leaf.credential())?;
    }
    for update in staged.update_proposals() {
        if let Sender::Member(index) = update.sender()
            && let Some(member) = group.member_at(*index)
        {
            refuse_rename(
                &identity_of(&member.credential),
                update.update_proposal().leaf_node().credential(),
            )?;
        }
    }
    Ok(())
}

/// Why the messages still queued for a group we left were not sent.
const NOT_A_MEMBER: &str = "you are no longer a member of the group";

/// The group's epoch and the verification code its members compare.
fn epoch_and_code(group: &MlsGroup) -> (u64, String) {
    (
        group.epoch().as_u64(),
        verification_code(group.epoch_authenticator().as_slice()),
    )
}

fn apply_inspection(
    inspection: &CommitInspection,
    group: &GroupRef,
    events: &mut Vec<CoreEvent>,
    observed: &mut Vec<(String, Vec<u8>)>,
) {
    for (user, key, by) in &inspection.added {
        observed.push((user.clone(), key.clone()));
        events.push(CoreEvent::MemberAdded {
            group: group.clone(),
            user: user.clone(),
            by: by.clone(),
        });
    }
    for (user, by) in &inspection.removed {
        events.push(CoreEvent::MemberRemoved {
            group: group.clone(),
            user: user.clone(),
            by: by.clone(),
        });
    }
    observed.extend(inspection.updated.iter().cloned());
}

/// Other members that have proposed their own removal (their Remove proposals are pending).
fn leaving_others(group: &MlsGroup) -> Vec<LeafNodeIndex> {
    let own = group.own_leaf_index();
    let mut leaving: Vec<LeafNodeIndex> = group
        .pending_proposals()
        .filter_map(|queued| match (queued.sender(), queued.proposal()) {
            (Sender::Member(sender), Proposal::Remove(remove))
                if remove.removed() == *sender && *sender != own =>
            {
                Some(*sender)
            }
            _ => None,
        })
        .collect();
    leaving.sort_unstable();
    leaving.dedup();
    leaving
}

/// Whether every other member has proposed to leave.
fn others_all_leaving(group: &MlsGroup) -> bool {
    let own = group.own_leaf_index();
    let leaving = leaving_others(group);
    let mut others = group
        .members()
        .map(|member| member.index)
        .filter(|index| *index != own);
    !leaving.is_empty() && others.all(|index| leaving.contains(&index))
}

/// Users a staged commit adds and removes, for the DS's routing (names of removed members are
/// read from the tree the commit applies to).
fn commit_routing(group: &MlsGroup, staged: &StagedCommit) -> (Vec<String>, Vec<String>) {
    let added = staged
        .add_proposals()
        .map(|proposal| {
            identity_of(
                proposal
                    .add_proposal()
                    .key_package()
                    .leaf_node()
                    .credential(),
            )
        })
        .collect();
    let removed = staged
        .remove_proposals()
        .filter_map(|proposal| group.member_at(proposal.remove_proposal().removed()))
        .map(|member| identity_of(&member.credential))
        .collect();
    (added, removed)
}

#[cfg(test)]
mod tests {
    //! Checks of what the engine refuses in others' commits, on openmls groups in memory.

    use openmls::prelude::tls_codec::Serialize as _;
    use openmls::prelude::{LeafNodeParameters, MlsGroupCreateConfig};
    use openmls_rust_crypto::OpenMlsRustCrypto;

    use super::*;

    #[test]
    fn the_cursor_steps_over_our_own_messages_once_it_reaches_them() {
        // Answers for seqs 5, 6 and 9 came while the cursor was at 3.
        let mut own = OwnAhead::default();
        for seq in [5, 6, 9] {
            own.insert(seq);
        }
        assert_eq!(
            own.cursor_after(3),
            3,
            "seq 4 is someone else's, still to come"
        );
        assert_eq!(own.cursor_after(4), 6, "seq 4 came: past 5 and 6");
        own.passed(6);
        assert_eq!(own.cursor_after(7), 7, "seq 8 is still to come");
        assert_eq!(own.cursor_after(8), 9);
        own.passed(9);
        assert!(own.0.is_empty(), "nothing passed is kept");
    }

    struct Member {
        provider: OpenMlsRustCrypto,
        signer: SignatureKeyPair,
        credential: CredentialWithKey,
    }

    fn member(name: &str) -> Member {
        let provider = OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(SignatureScheme::ED25519).expect("a key pair");
        signer
            .store(provider.storage())
            .expect("the key pair is stored");
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        Member {
            provider,
            signer,
            credential,
        }
    }

    fn received(message: &MlsMessageOut) -> MlsMessageIn {
        let bytes = message.tls_serialize_detached().expect("encodes");
        MlsMessageIn::tls_deserialize_exact(bytes.as_slice()).expect("decodes")
    }

    /// Alice's group with mallory in it, from both sides.
    fn alice_and_mallory() -> (Member, MlsGroup, Member, MlsGroup) {
        let alice = member("alice");
        let mallory = member("mallory");
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .build();
        let mut alice_group = MlsGroup::new(
            &alice.provider,
            &alice.signer,
            &config,
            alice.credential.clone(),
        )
        .expect("alice creates the group");
        let key_package = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &mallory.provider,
                &mallory.signer,
                mallory.credential.clone(),
            )
            .expect("a KeyPackage");
        let (_commit, welcome, _info) = alice_group
            .add_members(
                &alice.provider,
                &alice.signer,
                &[key_package.key_package().clone()],
            )
            .expect("alice adds mallory");
        alice_group
            .merge_pending_commit(&alice.provider)
            .expect("alice merges");
        let MlsMessageBodyIn::Welcome(welcome) = received(&welcome).extract() else {
            panic!("not a Welcome");
        };
        let mallory_group =
            StagedWelcome::build_from_welcome(&mallory.provider, &join_config(), welcome)
                .expect("mallory reads the Welcome")
                .build()
                .expect("mallory stages the join")
                .into_group(&mallory.provider)
                .expect("mallory joins");
        (alice, alice_group, mallory, mallory_group)
    }

    /// What alice's check says of mallory's self-update with the leaf parameters `leaf` makes
    /// from mallory's signer. openmls itself accepts the commit either way.
    fn check_update(
        leaf: impl Fn(&SignatureKeyPair) -> LeafNodeParameters,
    ) -> Result<(), CoreError> {
        let (alice, mut alice_group, mallory, mut mallory_group) = alice_and_mallory();
        let bundle = mallory_group
            .self_update(&mallory.provider, &mallory.signer, leaf(&mallory.signer))
            .expect("mallory builds the update");
        let protocol = received(bundle.commit())
            .try_into_protocol_message()
            .expect("a protocol message");
        let processed = alice_group
            .process_message(&alice.provider, protocol)
            .expect("openmls accepts the commit");
        let sender = identity_of(processed.credential());
        assert_eq!(sender, "mallory");
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            panic!("not a commit");
        };
        refuse_renames(&alice_group, &staged, &sender)
    }

    #[test]
    fn an_inviters_name_message_names_the_group_only_for_those_it_added() {
        // A member that knows no name takes it, whenever it comes.
        assert!(takes_announced_name(None, Some(3), 0, 7));
        // Added in this epoch, and no rename since: the inviter's name is the first we get.
        assert!(takes_announced_name(Some("old"), Some(7), 0, 7));
        // A rename sequenced after the inviter's commit but before its name message is newer.
        assert!(!takes_announced_name(Some("renamed"), Some(7), 12, 7));
        // Everyone else knows the name, and perhaps a newer one than the inviter's.
        assert!(!takes_announced_name(Some("team"), Some(2), 0, 7));
        assert!(!takes_announced_name(Some("team"), None, 0, 7));
    }

    #[test]
    fn names_lose_invisible_formatting_and_control_characters() {
        assert_eq!(clean_group_name("te\u{202E}am\u{200B}\u{3164}\n"), "team");
        // Joiners stay: an emoji sequence keeps its meaning.
        assert_eq!(clean_group_name("👩\u{200D}💻 team"), "👩\u{200D}💻 team");
        assert!(valid_group_name("te\u{2067}am").is_err());
        assert_eq!(valid_group_name("  crew "), Ok("crew".to_string()));
        assert_eq!(clean_group_name(&"x".repeat(100)).len(), MAX_GROUP_NAME);
    }

    #[test]
    fn a_message_shows_its_senders_time_unless_that_is_missing_or_ahead_of_ours() {
        let now = 1_764_400_000;
        assert_eq!(message_time(Some(now - 3600), now), now - 3600);
        assert_eq!(message_time(Some(now + 60), now), now);
        assert_eq!(message_time(None, now), now);
        assert_eq!(message_time(Some(-5), now), now);
    }

    #[test]
    fn a_member_may_update_its_keys_but_not_its_name() {
        assert!(check_update(|_| LeafNodeParameters::default()).is_ok());
        let refused = check_update(|signer| {
            LeafNodeParameters::builder()
                .with_credential_with_key(CredentialWithKey {
                    credential: BasicCredential::new(b"ceo".to_vec()).into(),
                    signature_key: signer.public().into(),
                })
                .build()
        });
        assert!(
            matches!(&refused, Err(CoreError::Invalid(reason)) if reason.contains("mallory tried to change its name to ceo")),
            "{refused:?}"
        );
    }
}
