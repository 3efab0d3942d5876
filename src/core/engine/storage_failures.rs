//! What the core does when the profile's storage fails: a group's deliveries held unacknowledged
//! and fetched again ([`Held`]), outbox items built again after a back-off, the busy wait
//! shortened meanwhile, and openmls's storage errors told apart from its errors about a message.

use std::time::{Duration, Instant};

use openmls::group::{
    AddMembersError, CommitBuilderStageError, CommitToPendingProposalsError, LeaveGroupError,
    MergeCommitError, MergePendingCommitError, RemoveMembersError, SelfUpdateError,
};
use openmls::prelude::{ProcessMessageError, WelcomeError};

use mlschat_ds::protocol::{Fetch, Frame, GroupId, Messages};

use super::{Engine, Request, mls_error};
use crate::core::{CoreError, db};

/// The first wait before trying a step that failed on the profile's storage again (fetching a
/// held group's deliveries, see [`Held`], or building an outbox item); it doubles with every
/// failure in a row, up to `STORAGE_RETRY_MAX`.
const STORAGE_RETRY_FIRST: Duration = Duration::from_secs(1);
const STORAGE_RETRY_MAX: Duration = Duration::from_secs(30);
/// Deliveries asked for per `Fetch` of a held group.
const HELD_FETCH_PAGE: u32 = 200;

// openmls reports failures of the profile's storage inside its own errors. They are classified
// as the client's own SQL errors are (`db::sql`): when the storage rather than the message
// failed, the message must be tried again, not skipped.

/// Defines `$name`, which classifies an openmls error type by its `StorageError` variant and,
/// for the operations that build a commit, the commit builder's storage variant inside it.
/// (`create_message` reports a failed write as a `LibraryError`, which cannot be told apart;
/// writes inside a transaction rarely fail before its commit, where the client sees them.)
macro_rules! classify_openmls_error {
    ($name:ident: $error:ident $(, $builder:ident)?) => {
        pub(super) fn $name(error: $error<rusqlite::Error>) -> CoreError {
            match error {
                $error::StorageError(error) => db::sql(error),
                $($error::$builder(CommitBuilderStageError::KeyStoreError(error)) => {
                    db::sql(error)
                })?
                other => mls_error(other),
            }
        }
    };
}

classify_openmls_error!(process_error: ProcessMessageError);
classify_openmls_error!(merge_error: MergeCommitError);
classify_openmls_error!(welcome_error: WelcomeError);
classify_openmls_error!(leave_error: LeaveGroupError);
classify_openmls_error!(add_error: AddMembersError, CommitBuilderStageError);
classify_openmls_error!(remove_error: RemoveMembersError, CommitBuilderStageError);
classify_openmls_error!(self_update_error: SelfUpdateError, CommitBuilderStageError);
classify_openmls_error!(commit_error: CommitToPendingProposalsError, CommitBuilderStageError);

pub(super) fn merge_pending_error(error: MergePendingCommitError<rusqlite::Error>) -> CoreError {
    match error {
        MergePendingCommitError::MergeCommitError(error) => merge_error(error),
        other => mls_error(other),
    }
}

pub(super) fn stage_error(error: CommitBuilderStageError<rusqlite::Error>) -> CoreError {
    match error {
        CommitBuilderStageError::KeyStoreError(error) => db::sql(error),
        other => mls_error(other),
    }
}

/// The deliveries of a group that wait for the profile's storage. Processing one failed because
/// the storage did ([`CoreError::Unavailable`]: a full disk, a profile locked by another
/// process): its transaction rolled back, and it was not acknowledged, so the DS keeps it.
/// Skipping it instead would leave this client behind the group for good if it was a commit,
/// and nothing after it may be processed first. Later deliveries are dropped unacknowledged
/// too, and all of them are fetched again, after a back-off, until the group has caught up.
/// A group whose state could not be reloaded after a failed step is held the same way.
pub(super) struct Held {
    /// When to fetch again; `None` while a fetch is being answered.
    pub(super) retry_at: Option<Instant>,
    /// Failed attempts in a row, for the back-off.
    pub(super) failures: u32,
    /// The highest seq delivered meanwhile (dropped, to be fetched).
    pub(super) seen: u64,
    /// The last fetched seq done with. Fetches go on after it, not after the cursor, which some
    /// deliveries leave where it is (a Welcome that cannot be opened, a group no longer active).
    pub(super) done_to: u64,
}

/// The wait before the next try of a step after `failures` storage failures in a row.
pub(super) fn storage_retry_delay(failures: u32) -> Duration {
    STORAGE_RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(5))
        .min(STORAGE_RETRY_MAX)
}

impl Engine {
    /// Builds an outbox item again after a back-off; the first failure in a row is reported.
    pub(super) fn postpone_build(&mut self, group_id: &GroupId, outbox: i64, error: &CoreError) {
        if matches!(error, CoreError::Unavailable(_)) {
            self.storage_failed();
        }
        let failures = self.unbuilt.entry(outbox).or_insert(0);
        *failures = failures.saturating_add(1);
        let failures = *failures;
        self.retry_at
            .insert(outbox, Instant::now() + storage_retry_delay(failures));
        if failures == 1 {
            self.error(format!(
                "{}: cannot save the next message to send: {error}; it is tried again",
                self.group_ref(group_id).name
            ));
        } else {
            tracing::warn!(group = %group_id, outbox, failures, %error, "an outbox item still cannot be built");
        }
    }

    /// Holds a group's deliveries from `seq` on, or holds them longer after a retry failed.
    /// Returns the failures in a row; the caller reports the first.
    pub(super) fn hold(&mut self, group_id: &GroupId, seq: u64, error: &CoreError) -> u32 {
        if matches!(error, CoreError::Unavailable(_)) {
            self.storage_failed();
        }
        let held = self.held.entry(group_id.clone()).or_insert(Held {
            retry_at: None,
            failures: 0,
            seen: seq,
            done_to: 0,
        });
        held.failures = held.failures.saturating_add(1);
        held.seen = held.seen.max(seq);
        held.retry_at = Some(Instant::now() + storage_retry_delay(held.failures));
        held.failures
    }

    /// Holds a group's deliveries after `seq` could not be recorded.
    pub(super) fn hold_delivery(&mut self, group_id: &GroupId, seq: u64, error: &CoreError) {
        let failures = self.hold(group_id, seq, error);
        if failures == 1 {
            self.error(format!(
                "{}: cannot record message {seq}: {error}; the server keeps it and it is tried again",
                self.group_ref(group_id).name
            ));
        } else {
            tracing::warn!(group = %group_id, seq, failures, %error, "held deliveries still cannot be recorded");
        }
    }

    /// The profile's storage failed: until a step succeeds again, a write waits only briefly
    /// for a lock. The retries of every held group and postponed item, and the user's commands,
    /// would otherwise each block the core for the whole busy timeout.
    pub(super) fn storage_failed(&mut self) {
        if !self.storage_failing {
            self.storage_failing = true;
            if let Err(error) = db::set_busy_wait(&self.connection, db::BUSY_WAIT_WHILE_FAILING) {
                tracing::warn!(%error, "cannot shorten the busy timeout");
            }
        }
    }

    /// A step committed: the profile's storage works. Called from `committed_unsynced` and
    /// `became_durable`, where deliveries, sent messages, queueing, building and syncs end; a
    /// step that commits elsewhere leaves the short wait in place until the next of those.
    pub(super) fn storage_works(&mut self) {
        if self.storage_failing {
            self.storage_failing = false;
            tracing::info!("the profile can be written again");
            if let Err(error) = db::set_busy_wait(&self.connection, db::BUSY_WAIT) {
                tracing::warn!(%error, "cannot restore the busy timeout");
            }
        }
    }

    /// Fetches the held deliveries of the groups whose back-off is over.
    pub(super) fn retry_held(&mut self, now: Instant) {
        if !self.online() {
            return;
        }
        let due: Vec<GroupId> = self
            .held
            .iter()
            .filter(|(_, held)| held.retry_at.is_some_and(|at| at <= now))
            .map(|(group_id, _)| group_id.clone())
            .collect();
        for group_id in due {
            // A failed reload after the failure left the group in memory ahead of its storage.
            if self.groups.contains_key(&group_id)
                && let Err(error) = self.try_reload(&group_id)
            {
                let next = self
                    .groups
                    .get(&group_id)
                    .map_or(0, |group| group.cursor + 1);
                let failures = self.hold(&group_id, next, &error);
                tracing::warn!(group = %group_id, failures, %error, "a held group still cannot be reloaded");
                continue;
            }
            self.fetch_held(&group_id);
        }
    }

    /// Asks the DS for a held group's deliveries after the cursor, or after the last fetched seq
    /// done with if that is further on.
    pub(super) fn fetch_held(&mut self, group_id: &GroupId) {
        let Some(held) = self.held.get_mut(group_id) else {
            return;
        };
        held.retry_at = None;
        // Not joined yet (a held Welcome): the DS starts from the membership.
        let cursor = self.groups.get(group_id).map_or(0, |group| group.cursor);
        let after_seq = cursor.max(held.done_to);
        let fetched = group_id.clone();
        self.request(Request::Fetch(group_id.clone()), |request_id| {
            Frame::Fetch(Fetch {
                request_id,
                group_id: fetched,
                after_seq,
                limit: HELD_FETCH_PAGE,
            })
        });
    }

    /// Processes a page of a held group's deliveries; fetches the next one, or lets the group's
    /// deliveries flow again once it has caught up.
    pub(super) fn on_fetched(&mut self, group_id: GroupId, page: Messages) {
        let Some(seen) = self.held.get(&group_id).map(|held| held.seen) else {
            return;
        };
        let fetched = page.messages.len();
        for delivery in page.messages {
            if delivery.group_id != group_id {
                tracing::warn!("the DS answered a fetch with another group's message");
                continue;
            }
            let seq = delivery.seq;
            self.process(delivery);
            match self.held.get_mut(&group_id) {
                Some(held) if held.retry_at.is_none() => held.done_to = held.done_to.max(seq),
                // Failed again, and rescheduled: the rest of the page comes with the next fetch.
                _ => return,
            }
        }
        let cursor = self.groups.get(&group_id).map_or(0, |group| group.cursor);
        let done_to = self.held.get(&group_id).map_or(0, |held| held.done_to);
        // Messages that expired on the DS leave `seen` out of reach: an empty page ends it.
        if page.more != 0 || (cursor.max(done_to) < seen && fetched > 0) {
            self.fetch_held(&group_id);
            return;
        }
        self.held.remove(&group_id);
        tracing::info!(group = %group_id, "held deliveries recorded; the group's deliveries flow again");
        self.pump(&group_id);
    }
}
