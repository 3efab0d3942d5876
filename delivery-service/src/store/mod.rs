//! Durable state of the DS behind the [`Store`] trait: users, KeyPackages, groups, members,
//! messages and delivery cursors. Every backend must pass the conformance suite in
//! `tests/store_conformance.rs`.

mod sqlite;

pub use sqlite::SqliteStore;

use std::future::Future;

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
}

/// The DS's durable state. Every method is one transaction; a method that returns `Ok` has made
/// its effect durable (for writes: fsync'd) before returning.
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

    /// Stores verified KeyPackages; returns how many unclaimed ones the user now has.
    fn store_key_packages(
        &self,
        user: &UserName,
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// Removes and returns the user's oldest unclaimed KeyPackage, or else its last-resort one.
    fn claim_key_package(
        &self,
        user: &UserName,
    ) -> impl Future<Output = Result<Option<ClaimedKeyPackage>, StoreError>> + Send;

    /// Unclaimed KeyPackages of the user, and whether it has a last-resort one.
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
    fn append(
        &self,
        request: AppendRequest,
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send;

    fn memberships(
        &self,
        user: &UserName,
    ) -> impl Future<Output = Result<Vec<Membership>, StoreError>> + Send;

    /// The user's acknowledged cursor in the group, if it has access to it.
    fn cursor(
        &self,
        user: &UserName,
        group_id: &GroupId,
    ) -> impl Future<Output = Result<Option<Seq>, StoreError>> + Send;

    /// Messages after `after_seq` as delivered to `user` (Welcome substitution, removal cut-off).
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

    /// Deletes messages every member has acknowledged or that were stored before
    /// `expire_before_unix_secs`, and memberships of removed users that are fully delivered.
    fn purge(
        &self,
        expire_before_unix_secs: i64,
    ) -> impl Future<Output = Result<Purged, StoreError>> + Send;
}
