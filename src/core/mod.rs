//! The client core: the only place openmls is called. One dedicated thread owns the provider,
//! the profile database, the signer and every group; the UI and the network talk to it through
//! channels ([`CoreInput`] in, [`CoreEvent`] out) and never wait on it.

mod cbor;
pub mod db;
mod engine;
mod pack;
pub mod provider;
pub mod trust;

use std::path::PathBuf;
use std::time::Duration;

use mlschat_ds::protocol::{GroupId, UserName};
use tokio::sync::mpsc::UnboundedSender;

pub use engine::{spawn, valid_group_name};

use crate::net::NetEvent;

/// The one ciphersuite mlschat uses (RFC 9420 §17.1, the mandatory-to-implement suite).
pub const CIPHERSUITE: openmls::prelude::Ciphersuite =
    openmls::prelude::Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("database error: {0}")]
    Database(String),
    /// The profile's storage failed in a way that may pass (busy, locked by another process,
    /// full, an I/O error, out of memory): the step rolled back and is worth trying again.
    #[error("the profile's storage failed: {0}")]
    Unavailable(String),
    #[error("MLS error: {0}")]
    Mls(String),
    #[error("{0}")]
    Invalid(String),
    /// Another process has the profile open.
    #[error("{0}")]
    InUse(String),
}

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub data_dir: PathBuf,
    pub name: UserName,
    /// Self-update every group this often (post-compromise security); `None` disables it.
    pub auto_update: Option<Duration>,
    /// Upload this many KeyPackages when the DS holds fewer than `key_package_low_water`.
    pub key_package_batch: u32,
    pub key_package_low_water: u32,
    /// How long `/quit` waits for the outbox to drain while connected.
    pub quit_flush_timeout: Duration,
    /// How long a processed delivery may wait for the fsync that makes it durable (and for its
    /// acknowledgement to the DS, which follows that fsync). Deliveries arriving within it share
    /// one fsync. [`DEFAULT_SYNC_DELAY`] unless set.
    pub sync_delay: Duration,
}

/// The default [`CoreConfig::sync_delay`]. In a busy group it bounds the client's fsyncs for
/// received messages to ten a second. Waiting longer costs only the acknowledgement's timing:
/// a delivery committed but not yet synced survives a crash of the process, and one lost with
/// the machine is delivered again, since it was not acknowledged. With 20 ms, a hundred
/// clients on one machine (figure 1 of docs/benchmarks.md) made about a hundred fsyncs per
/// message, and the messages waited behind them.
pub const DEFAULT_SYNC_DELAY: Duration = Duration::from_millis(100);

impl CoreConfig {
    pub fn new(data_dir: PathBuf, name: UserName) -> CoreConfig {
        CoreConfig {
            data_dir,
            name,
            auto_update: Some(Duration::from_secs(7 * 24 * 3600)),
            key_package_batch: 20,
            key_package_low_water: 5,
            quit_flush_timeout: Duration::from_secs(10),
            sync_delay: DEFAULT_SYNC_DELAY,
        }
    }
}

/// What the user asks the core to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    CreateGroup {
        name: String,
        /// The new group's id; `None`: a random one. A front end that sends further commands
        /// for the group before its `GroupCreated` comes back picks a random id itself.
        id: Option<[u8; 16]>,
    },
    Invite {
        group: GroupId,
        users: Vec<UserName>,
    },
    Kick {
        group: GroupId,
        user: UserName,
    },
    Leave {
        group: GroupId,
    },
    /// Gives the group a new name, for every member.
    Rename {
        group: GroupId,
        name: String,
    },
    Send {
        group: GroupId,
        text: String,
    },
    Update {
        group: GroupId,
    },
    Members {
        group: GroupId,
    },
    Fingerprint {
        user: Option<UserName>,
    },
    Verify {
        user: UserName,
    },
    Status {
        group: GroupId,
    },
    History {
        group: GroupId,
        limit: u32,
    },
    /// Messages of the group whose text contains `text` (ASCII case-insensitive).
    Search {
        group: GroupId,
        text: String,
    },
    /// The user has seen the group up to delivery `seq` (the next start counts only later
    /// messages as unread, and opens on the group looked at last).
    MarkRead {
        group: GroupId,
        seq: u64,
    },
    /// Stop once the outbox is flushed (bounded by `quit_flush_timeout` while connected); a
    /// second `Quit` stops at once.
    Quit,
}

/// Everything that reaches the core thread.
#[derive(Debug)]
pub enum CoreInput {
    Command(Command),
    Net(NetEvent),
}

/// A group as events name it: its display name and its stable id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRef {
    pub id: GroupId,
    pub name: String,
}

/// A group in the profile as the core lists it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedGroup {
    pub group: GroupRef,
    /// False once we left or were removed.
    pub active: bool,
    /// The epoch and its verification code, when the group's MLS state is loaded.
    pub epoch: Option<(u64, String)>,
    /// Messages from others after what the user has read (counted over the group's newest
    /// [`UNREAD_SCAN`] timeline lines).
    pub unread: usize,
    /// Whether one of those mentions us.
    pub mentioned: bool,
    /// When the user last looked at the group (unix seconds, 0 for never).
    pub viewed_at: i64,
}

/// How many of a group's newest timeline lines the start-up unread count looks at.
pub const UNREAD_SCAN: u32 = 1000;

/// The timeline's words for a change to a group's membership or keys. The stored history and
/// the live views say the same thing.
pub mod timeline {
    pub fn member_added(by: &str, user: &str) -> String {
        format!("{by} added {user}")
    }

    pub fn member_removed(by: &str, user: &str) -> String {
        if user == by {
            format!("{user} left")
        } else {
            format!("{by} removed {user}")
        }
    }

    pub fn added_you(by: &str) -> String {
        format!("{by} added you to the group")
    }

    /// A member (`by`, possibly `me`) renamed the group to `name`.
    pub fn renamed(by: &str, me: &str, name: &str) -> String {
        if by == me {
            format!("you renamed the group to {name}")
        } else {
            format!("{by} renamed the group to {name}")
        }
    }

    /// A rename the DS ordered before the one that gave the group its name `current` (the
    /// same name or not).
    pub fn rename_overtaken(by: &str, me: &str, name: &str, current: &str) -> String {
        if name == current {
            renamed(by, me, name)
        } else {
            format!("{}, before the rename to {current}", renamed(by, me, name))
        }
    }

    pub fn new_epoch(epoch: u64, code: &str) -> String {
        format!("new epoch {epoch} · verification code {code}")
    }

    /// Our own departure, as `me` sees it.
    /// `count` seqs of a group were never delivered to us (they expired at the DS first).
    pub fn expired(count: u64) -> String {
        match count {
            1 => "a message expired at the server before this client fetched it".to_string(),
            count => format!(
                "up to {count} messages expired at the server before this client fetched them"
            ),
        }
    }

    /// See [`CoreEvent::OutOfSync`].
    pub fn out_of_sync() -> String {
        "this client missed changes to the group that the server no longer has (they expired \
         while it was away), so it can no longer read or send here: ask a member to remove you \
         and add you again"
            .to_string()
    }

    /// See [`CoreEvent::ServerBehind`].
    pub fn server_behind(server_epoch: u64, epoch: u64) -> String {
        format!(
            "the server has lost changes to this group (it is at epoch {server_epoch}, this \
             client at {epoch}: it was restored from an older backup), so the group cannot carry \
             on; create a new one"
        )
    }

    /// Our removal, learned from a later Welcome: the DS had deleted the messages up to the
    /// commit that removed us (they expired) before we fetched them.
    pub fn removal_missed() -> String {
        "you were removed from the group while away, and the messages up to your removal \
         expired at the server before you came back"
            .to_string()
    }

    pub fn left(by: &str, me: &str) -> String {
        if by == me {
            "you left the group".to_string()
        } else {
            format!("{by} removed you")
        }
    }

    /// Whether `text` mentions `me` (the name as a word, with or without '@').
    pub fn mentions(me: &str, text: &str) -> bool {
        !me.is_empty()
            && text
                .split(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '@')))
                .any(|word| word.trim_start_matches('@').trim_end_matches('.') == me)
    }

    pub fn key_changed(user: &str, fingerprint: &str) -> String {
        format!(
            "WARNING: {user}'s key changed (new fingerprint {fingerprint}); verify it with /verify {user}"
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub name: String,
    pub fingerprint: String,
    pub verified: bool,
    pub key_changed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    Connecting,
    Connected,
    Reconnecting,
}

/// Facts the core reports. The UI and the headless mode render them; they never carry
/// ciphertext, and plaintext only in `Message`/`Queued`/`History`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreEvent {
    /// The groups in the profile, oldest first; sent once at start.
    Groups {
        groups: Vec<ListedGroup>,
    },
    Ready {
        name: String,
        fingerprint: String,
    },
    Connection {
        state: ConnectionState,
        detail: String,
    },
    GroupCreated {
        group: GroupRef,
    },
    Joined {
        group: GroupRef,
        by: String,
    },
    /// The group's name became known (`by` is `None`: a new member learned it) or a member
    /// renamed it (`by`, possibly us).
    GroupRenamed {
        group: GroupRef,
        by: Option<String>,
    },
    /// A member's rename (`by`, possibly us) that the DS ordered before the rename that
    /// already named the group here: the group keeps its name (`group.name`), and everyone ends
    /// with the same one. It arrives when our own later rename's answer came first.
    RenameOvertaken {
        group: GroupRef,
        by: String,
        name: String,
    },
    MemberAdded {
        group: GroupRef,
        user: String,
        by: String,
    },
    MemberRemoved {
        group: GroupRef,
        user: String,
        by: String,
    },
    /// The DS took our Remove proposal (`/leave`): we are out once another member's client
    /// commits it, which needs one of them online.
    LeaveRequested {
        group: GroupRef,
    },
    /// This client can no longer follow the group: a delivery of a later epoch than its own
    /// came, so a commit it needed is gone (expired at the DS while it was away, or one it
    /// could not process). It is out until a member removes it and adds it again.
    OutOfSync {
        group: GroupRef,
    },
    /// The DS refused a send because we are not a member, and holds nothing of the group for
    /// us: we were removed while away, and the commit that did it expired at the DS before
    /// this client fetched it. The group is closed here as after [`CoreEvent::Left`]; a
    /// Welcome replaces it if a member adds us again.
    RemovalExpired {
        group: GroupRef,
    },
    /// The DS refused a send with an epoch older than the group's here: it lost commits it had
    /// sequenced (restored from an older backup). The group cannot carry on and is closed here
    /// as after [`CoreEvent::Left`].
    ServerBehind {
        group: GroupRef,
        server_epoch: u64,
        epoch: u64,
    },
    /// This client is no longer in the group (removed, or its leave was committed).
    Left {
        group: GroupRef,
        by: String,
    },
    Message {
        group: GroupRef,
        from: String,
        text: String,
        seq: u64,
        at: i64,
    },
    /// One of our messages is in the outbox (local echo); `local_id` ties later events to it.
    Queued {
        group: GroupRef,
        local_id: i64,
        text: String,
    },
    Sent {
        group: GroupRef,
        local_id: i64,
        seq: u64,
    },
    Failed {
        group: GroupRef,
        local_id: i64,
        reason: String,
    },
    Members {
        group: GroupRef,
        members: Vec<MemberInfo>,
    },
    EpochChanged {
        group: GroupRef,
        epoch: u64,
        code: String,
    },
    KeyChanged {
        user: String,
        fingerprint: String,
        /// The group whose commit or Welcome showed the new key (its timeline stores the
        /// warning); `None` when a claimed KeyPackage showed it.
        group: Option<GroupRef>,
    },
    Fingerprint {
        user: String,
        fingerprint: String,
        verified: bool,
        key_changed: bool,
    },
    Verified {
        user: String,
    },
    Status {
        group: GroupRef,
        ciphersuite: String,
        epoch: u64,
        epoch_authenticator: String,
        code: String,
        members: usize,
    },
    History {
        group: GroupRef,
        entries: Vec<db::HistoryEntry>,
    },
    SearchResults {
        group: GroupRef,
        text: String,
        entries: Vec<db::HistoryEntry>,
    },
    Error {
        message: String,
    },
    /// The core thread has stopped (after `Quit`, with the outbox flushed or timed out).
    Stopped,
}

/// Where the UI sends inputs.
pub type CoreSender = std::sync::mpsc::Sender<CoreInput>;
/// Where the core sends events.
pub type EventSender = UnboundedSender<CoreEvent>;
