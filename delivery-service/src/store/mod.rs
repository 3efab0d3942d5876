//! Durable state of the DS behind the [`Store`] trait: users, KeyPackages, groups, members,
//! messages, idempotency records and delivery cursors. Every backend must pass the conformance
//! suite in `tests/store_conformance.rs`.
//!
//! Two backends exist: [`SqliteStore`], embedded and single-node (the default), and
//! [`PostgresStore`], which several DS nodes can share. [`DatabaseUrl`] picks one from a URL.

mod postgres;
mod sqlite;
mod url;
pub mod wal_vfs;

pub use postgres::{PostgresOptions, PostgresStore};
pub use sqlite::SqliteStore;
pub use url::{DatabaseUrl, DatabaseUrlError};

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use crate::protocol::{ClientMessageId, Delivery, DeliveryKind, Epoch, GroupId, Seq, UserName};

/// Limits a store enforces inside its transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Unclaimed KeyPackages one user may have stored.
    pub max_key_packages_per_user: u32,
    /// Stored (not yet purged) messages one group may hold.
    pub max_group_backlog: u64,
}

impl Default for StoreLimits {
    fn default() -> StoreLimits {
        StoreLimits {
            max_key_packages_per_user: 1000,
            max_group_backlog: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the name is registered to another key")]
    NameTaken,
    #[error("unknown user {0}")]
    UnknownUser(UserName),
    #[error("the group already exists")]
    GroupExists,
    #[error("unknown group")]
    UnknownGroup,
    #[error("not a member of the group")]
    NotMember,
    #[error("stale epoch: the group is at epoch {current}")]
    StaleEpoch { current: Epoch },
    #[error("invalid membership change: {0}")]
    InvalidMembership(String),
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The sender already used this client message id in this group for a different message.
    #[error("the client message id was already used for another message (seq {seq})")]
    ReusedMessageId { seq: Seq },
    #[error("storage failure: {0}")]
    Backend(String),
}

/// The outcome of registering a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    Created,
    /// The name was already bound to this very key: registration is idempotent.
    AlreadyRegistered,
}

/// A verified KeyPackage to store, with the end of its lifetime (RFC 9420 §7.2, `not_after`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKeyPackage {
    pub key_package: Vec<u8>,
    /// Unix seconds after which the KeyPackage is expired: it is never handed out after that
    /// and a purge deletes it.
    pub not_after: u64,
}

/// A KeyPackage handed out by [`Store::claim_key_package`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKeyPackage {
    pub key_package: Vec<u8>,
    pub last_resort: bool,
}

/// Membership change that travels with a commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipChange {
    pub welcome: Option<Vec<u8>>,
    pub added: Vec<UserName>,
    pub removed: Vec<UserName>,
}

/// One message to sequence and store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    pub group_id: GroupId,
    pub sender: UserName,
    pub client_message_id: ClientMessageId,
    pub epoch: Epoch,
    pub kind: DeliveryKind,
    pub payload: Vec<u8>,
    /// Only for commits.
    pub membership: Option<MembershipChange>,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: Seq,
    /// The group's epoch once this message is applied.
    pub epoch: Epoch,
    /// True if this was a retry of a message already stored; nothing was written.
    pub duplicate: bool,
    pub added: Vec<UserName>,
    pub removed: Vec<UserName>,
}

/// The rules every backend applies to an append once it has read the group's state: one epoch
/// at a time (RFC 9420 §14: exactly one commit wins each epoch, and every handshake and
/// application message must be for the current one), the backlog quota, and membership
/// changes only on commits. Returns the membership change to apply.
pub(crate) fn check_append_rules(
    request: &AppendRequest,
    epoch: Epoch,
    stored: u64,
    limits: &StoreLimits,
) -> Result<MembershipChange, StoreError> {
    if request.epoch != epoch {
        return Err(StoreError::StaleEpoch { current: epoch });
    }
    if stored >= limits.max_group_backlog {
        return Err(StoreError::QuotaExceeded(format!(
            "the group holds {} undelivered messages",
            limits.max_group_backlog
        )));
    }
    if request.kind != DeliveryKind::Commit && request.membership.is_some() {
        return Err(StoreError::InvalidMembership(
            "only commits change membership".into(),
        ));
    }
    Ok(request.membership.clone().unwrap_or_default())
}

/// A stored message as a backend reads it back, before it is shaped for one member.
pub(crate) struct StoredMessage {
    pub seq: Seq,
    pub epoch: Epoch,
    pub kind: i64,
    pub sender: String,
    pub payload: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
}

/// The delivery of a stored message to a member who joined at `joined_seq` (0: the creator).
/// A member added by the commit at `joined_seq` gets that commit's Welcome instead of the
/// commit, with the epoch it creates (see protocol.md); `None` if there is no Welcome to give.
pub(crate) fn delivery_for_member(
    group_id: &GroupId,
    joined_seq: Seq,
    message: StoredMessage,
) -> Result<Option<Delivery>, StoreError> {
    let sender = UserName::new(message.sender)
        .map_err(|error| StoreError::Backend(format!("corrupt sender: {error}")))?;
    if message.seq == joined_seq && joined_seq > 0 {
        return Ok(message.welcome.map(|welcome| Delivery {
            group_id: group_id.clone(),
            seq: message.seq,
            epoch: message.epoch + 1,
            kind: DeliveryKind::Welcome as u8,
            sender,
            payload: welcome.into(),
        }));
    }
    let kind = u8::try_from(message.kind)
        .map_err(|_| StoreError::Backend("corrupt message kind".into()))?;
    Ok(Some(Delivery {
        group_id: group_id.clone(),
        seq: message.seq,
        epoch: message.epoch,
        kind,
        sender,
        payload: message.payload.into(),
    }))
}

/// One membership of a user in a group, as the `members` table of either backend holds it: a
/// user removed and added again before it fetched its removal has two (see
/// [`Store::fetch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemberSpan {
    /// The seq of the commit that added the user (0: the creator).
    pub joined_seq: Seq,
    /// The seq of the commit that removed it, if one did.
    pub left_seq: Option<Seq>,
    /// The last seq the user acknowledged within this membership.
    pub cursor: Seq,
}

impl MemberSpan {
    /// The seqs `(start, end]` of this membership after `after_seq`, if any are left.
    pub fn range_after(&self, after_seq: Seq) -> Option<(Seq, Seq)> {
        let start = after_seq.max(self.joined_seq.saturating_sub(1));
        let end = self.left_seq.unwrap_or(Seq::MAX);
        (start < end).then_some((start, end))
    }
}

impl FetchPage {
    /// Adds a stored message read within `span` to a page of at most `limit` deliveries.
    /// Returns true, with `more` set, if the page was already full.
    pub(crate) fn push(
        &mut self,
        group_id: &GroupId,
        span: &MemberSpan,
        message: StoredMessage,
        limit: u64,
    ) -> Result<bool, StoreError> {
        if self.deliveries.len() as u64 >= limit {
            self.more = true;
            return Ok(true);
        }
        if let Some(delivery) = delivery_for_member(group_id, span.joined_seq, message)? {
            self.deliveries.push(delivery);
        }
        Ok(false)
    }

    /// How many stored messages to read for the rest of a page of `limit`: one more than
    /// fits, to learn whether there are more.
    pub(crate) fn rows_to_read(&self, limit: u64) -> u64 {
        (limit + 1).saturating_sub(self.deliveries.len() as u64)
    }
}

/// An append submitted with [`Store::submit_append`].
#[derive(Debug)]
pub enum PendingAppend {
    /// Already answered.
    Done(Result<Appended, StoreError>),
    /// Queued; answered once committed.
    Queued(oneshot::Receiver<Result<Appended, StoreError>>),
}

impl PendingAppend {
    /// Waits for the append to be durable (or refused).
    pub async fn outcome(self) -> Result<Appended, StoreError> {
        match self {
            PendingAppend::Done(outcome) => outcome,
            PendingAppend::Queued(answer) => answer
                .await
                .unwrap_or_else(|_| Err(StoreError::Backend("the store writer stopped".into()))),
        }
    }
}

/// One group a user belongs to, with the user's acknowledged cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub group_id: GroupId,
    pub cursor: Seq,
}

/// A page of deliveries returned by [`Store::fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPage {
    pub deliveries: Vec<Delivery>,
    pub more: bool,
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub messages: u64,
    pub memberships: u64,
    /// Expired KeyPackages.
    pub key_packages: u64,
    /// Idempotency records older than the retention period, including those of the messages
    /// that expired in this purge (both backends count them alike).
    pub idempotency_records: u64,
}

/// A message another DS node sharing the store has accepted (see [`Store::remote_appends`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteAppend {
    /// `seq` of `group_id` is stored; `added` and `removed` are the commit's membership change.
    Appended {
        group_id: GroupId,
        seq: Seq,
        added: Vec<UserName>,
        removed: Vec<UserName>,
    },
    /// Notifications may have been lost (the listening connection dropped, or a notification
    /// was too large to carry): every session must resynchronise from the store.
    ResyncAll,
}

/// The DS's durable state. A method that returns `Ok` has made its effect durable (for writes:
/// committed and fsync'd) before returning; each append, upload, claim, registration and group
/// creation is one transaction, so it happens completely or not at all.
///
/// The methods return `impl Future + Send` so that the server, generic over `S: Store`, can
/// spawn them; `main` picks the backend at startup and instantiates the server for it.
pub trait Store: Send + Sync + 'static {
    fn register_user(
        &self,
        name: &UserName,
        signature_key: &[u8],
    ) -> impl Future<Output = Result<Registration, StoreError>> + Send;

    fn user_key(
        &self,
        name: &UserName,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    /// Stores verified KeyPackages; returns how many unexpired unclaimed ones the user now has.
    /// Expired ones of the user are deleted first and do not count against the quota.
    fn store_key_packages(
        &self,
        user: &UserName,
        key_packages: Vec<NewKeyPackage>,
        last_resort: Option<NewKeyPackage>,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// Removes and returns the user's oldest unexpired unclaimed KeyPackage, or else its
    /// last-resort one if that has not expired. Each one-time KeyPackage is handed out at most
    /// once, however many claims run at the same time.
    fn claim_key_package(
        &self,
        user: &UserName,
    ) -> impl Future<Output = Result<Option<ClaimedKeyPackage>, StoreError>> + Send;

    /// Unexpired unclaimed KeyPackages of the user, and whether it has an unexpired last-resort
    /// one.
    fn count_key_packages(
        &self,
        user: &UserName,
    ) -> impl Future<Output = Result<(u32, bool), StoreError>> + Send;

    fn create_group(
        &self,
        group_id: &GroupId,
        creator: &UserName,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Sequences and stores one message, applying the epoch rule and any membership change in
    /// the same transaction.
    ///
    /// Idempotency: a message whose (sender, group, client message id) was stored within the
    /// retention period is answered with its original seq and epoch (`duplicate`), even after
    /// the message itself was purged; the same key with a different payload is
    /// [`StoreError::ReusedMessageId`].
    fn append(
        &self,
        request: AppendRequest,
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send;

    /// Queues an append and resolves as soon as it is queued; the [`PendingAppend`] resolves
    /// once it is durable. Appends one caller submits one after the other are sequenced in that
    /// order, so a connection can keep many messages in flight and still have them stored in
    /// the order it sent them, group-committed together.
    ///
    /// The default runs the append to completion before resolving, which keeps the order for
    /// backends whose batching may reorder queued appends.
    fn submit_append(&self, request: AppendRequest) -> impl Future<Output = PendingAppend> + Send {
        async move { PendingAppend::Done(self.append(request).await) }
    }

    /// The groups the user has access to, each with the lowest cursor of its memberships
    /// there (see [`Store::fetch`]).
    fn memberships(
        &self,
        user: &UserName,
    ) -> impl Future<Output = Result<Vec<Membership>, StoreError>> + Send;

    /// The user's acknowledged cursor in the group (the lowest of its memberships there), if
    /// it has access to it.
    fn cursor(
        &self,
        user: &UserName,
        group_id: &GroupId,
    ) -> impl Future<Output = Result<Option<Seq>, StoreError>> + Send;

    /// Messages after `after_seq` as delivered to `user` (Welcome substitution, removal cut-off).
    ///
    /// A user removed and then added again before it fetched the commit that removed it gets
    /// the rest of its first membership, up to that commit, then the Welcome of the second and
    /// what follows it; not what was sent while it was out. Its client has to process its
    /// removal before it can join again from the Welcome.
    fn fetch(
        &self,
        user: &UserName,
        group_id: &GroupId,
        after_seq: Seq,
        limit: u32,
    ) -> impl Future<Output = Result<FetchPage, StoreError>> + Send;

    /// Moves the user's cursor forward; acks for groups the user is not in are ignored.
    fn ack(
        &self,
        user: &UserName,
        group_id: &GroupId,
        seq: Seq,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes messages that were stored before `expire_before_unix_secs` or that every member
    /// who may still receive them has acknowledged (a removed member only holds messages up to
    /// its removal), memberships of removed users that are fully delivered, expired
    /// KeyPackages and idempotency records older than `expire_before_unix_secs`.
    fn purge(
        &self,
        expire_before_unix_secs: i64,
    ) -> impl Future<Output = Result<Purged, StoreError>> + Send;

    /// Finishes every write already submitted, then releases the database (for SQLite: the
    /// writer thread is joined and the WAL checkpointed). Later calls fail with
    /// [`StoreError::Backend`]. Once this returns, everything acknowledged is on disk and no
    /// thread of the store is left running.
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Messages accepted by *other* DS nodes sharing this store, so that this node can wake its
    /// own sessions. Called once by the server at start. A single-node backend returns `None`
    /// (the default): every message it stores was accepted by this very process.
    fn remote_appends(&self) -> Option<mpsc::Receiver<RemoteAppend>> {
        None
    }
}

/// Unix time in seconds.
pub(crate) fn now_unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What an idempotency record remembers of a message: enough to tell a retry (same bytes) from
/// a reuse of its client message id (other bytes), without keeping the ciphertext.
pub(crate) fn payload_hash(payload: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(payload).into()
}

/// The checks of a membership change that need no database: nobody named twice, the sender
/// not removing itself, and a Welcome exactly when users are added.
pub(crate) fn check_membership_shape(
    request: &AppendRequest,
    change: &MembershipChange,
) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::new();
    for user in change.added.iter().chain(&change.removed) {
        if !seen.insert(user) {
            return Err(StoreError::InvalidMembership(format!(
                "{user} is named twice"
            )));
        }
    }
    if change.removed.contains(&request.sender) {
        return Err(StoreError::InvalidMembership(
            "a commit cannot remove its own sender (RFC 9420 §12.2)".into(),
        ));
    }
    if change.added.is_empty() != change.welcome.is_none() {
        return Err(StoreError::InvalidMembership(
            "a Welcome must come with added users, and added users need a Welcome".into(),
        ));
    }
    Ok(())
}
