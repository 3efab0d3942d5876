//! In-process fan-out: which authenticated session each user has, and which sessions follow
//! which groups. The hub only routes wake-ups, carrying the encoded `Deliver` frame for
//! messages this node accepted and none for messages another node accepted (see
//! [`Store::remote_appends`](crate::store::Store::remote_appends)), and only a seq to pass for
//! the sender of an application message, which has its seq from `Accepted`; each session's
//! delivery task restores order and fills gaps from the store, so a dropped wake-up costs a
//! read, never a message.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use crate::protocol::{GroupId, Seq, UserName};

/// Wake-ups a session may have queued before it is marked as lagging.
pub const SESSION_QUEUE: usize = 4096;

/// A freshly accepted message for one session.
#[derive(Debug, Clone)]
pub struct Notification {
    pub group_id: GroupId,
    pub seq: Seq,
    pub push: Push,
}

/// What a session sends for a [`Notification`].
#[derive(Debug, Clone)]
pub enum Push {
    /// This encoded `Deliver` frame.
    Frame(Bytes),
    /// The message as the store has it: another node accepted it.
    FromStore,
    /// Nothing: the recipient sent this application message and learned its seq from
    /// `Accepted` (docs/protocol.md, section 8.2). The session moves past the seq, and a
    /// catch-up from the store passes over it too.
    Nothing,
}

/// The hub's handle on one authenticated connection.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: u64,
    pub notifications: mpsc::Sender<Notification>,
    /// Signalled when a notification could not be queued: the session must resync from the store.
    pub lagged: Arc<Notify>,
    pub connection: quinn::Connection,
}

#[derive(Debug)]
struct Session {
    handle: SessionHandle,
    groups: HashSet<GroupId>,
}

#[derive(Debug, Default)]
struct HubState {
    sessions: HashMap<UserName, Session>,
    followers: HashMap<GroupId, HashSet<UserName>>,
}

/// What one accepted message means for routing.
#[derive(Debug)]
pub struct Publication<'a> {
    pub group_id: &'a GroupId,
    pub seq: Seq,
    /// The `Deliver` frame every current member gets (`None` for another node's message).
    pub frame: Option<Bytes>,
    /// For a commit with a Welcome: the `Deliver` frame the added users get instead.
    pub welcome_frame: Option<Bytes>,
    pub added: &'a [UserName],
    pub removed: &'a [UserName],
    /// The sender of an application message, which gets no copy of it ([`Push::Nothing`]).
    /// Commits and proposals go back to their sender: it merges its commit when the commit
    /// arrives in order.
    pub not_to: Option<&'a UserName>,
}

#[derive(Debug, Default)]
pub struct Hub {
    state: Mutex<HubState>,
}

impl Hub {
    fn state(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding this lock cannot leave the maps inconsistent in a way that
        // matters (each operation is a few inserts/removes), so recover from poisoning.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers the user's new session. Returns the connection of the session it replaces,
    /// which the caller closes.
    pub fn attach(&self, user: &UserName, handle: SessionHandle) -> Option<quinn::Connection> {
        let mut state = self.state();
        let replaced = state.sessions.insert(
            user.clone(),
            Session {
                handle,
                groups: HashSet::new(),
            },
        );
        let replaced = replaced?;
        for group_id in &replaced.groups {
            if let Some(followers) = state.followers.get_mut(group_id) {
                followers.remove(user);
            }
        }
        Some(replaced.handle.connection)
    }

    /// Removes the session if it is still the user's current one.
    pub fn detach(&self, user: &UserName, session_id: u64) {
        let mut state = self.state();
        let current = state
            .sessions
            .get(user)
            .is_some_and(|session| session.handle.id == session_id);
        if !current {
            return;
        }
        if let Some(session) = state.sessions.remove(user) {
            for group_id in session.groups {
                remove_follower(&mut state.followers, &group_id, user);
            }
        }
    }

    /// Makes the user's session follow `groups`.
    pub fn follow(
        &self,
        user: &UserName,
        session_id: u64,
        groups: impl IntoIterator<Item = GroupId>,
    ) {
        let mut state = self.state();
        let HubState {
            sessions,
            followers,
        } = &mut *state;
        let Some(session) = sessions
            .get_mut(user)
            .filter(|session| session.handle.id == session_id)
        else {
            return;
        };
        for group_id in groups {
            followers
                .entry(group_id.clone())
                .or_default()
                .insert(user.clone());
            session.groups.insert(group_id);
        }
    }

    /// Makes the user's current session, if any, follow a group it just created.
    pub fn follow_new_group(&self, user: &UserName, group_id: &GroupId) {
        let mut state = self.state();
        let HubState {
            sessions,
            followers,
        } = &mut *state;
        if let Some(session) = sessions.get_mut(user) {
            followers
                .entry(group_id.clone())
                .or_default()
                .insert(user.clone());
            session.groups.insert(group_id.clone());
        }
    }

    /// Routes one accepted message to every following session.
    pub fn publish(&self, publication: Publication<'_>) {
        let mut state = self.state();
        let HubState {
            sessions,
            followers,
        } = &mut *state;
        let group_id = publication.group_id;
        for user in publication.added {
            if let Some(session) = sessions.get_mut(user) {
                followers
                    .entry(group_id.clone())
                    .or_default()
                    .insert(user.clone());
                session.groups.insert(group_id.clone());
            }
        }
        if let Some(users) = followers.get(group_id) {
            for user in users {
                let Some(session) = sessions.get(user) else {
                    continue;
                };
                let frame = if publication.added.contains(user) {
                    // An added user gets the Welcome, never the commit: without the Welcome
                    // frame at hand it reads it from the store.
                    publication.welcome_frame.clone()
                } else {
                    publication.frame.clone()
                };
                let push = if publication.not_to == Some(user) {
                    Push::Nothing
                } else {
                    frame.map_or(Push::FromStore, Push::Frame)
                };
                let notification = Notification {
                    group_id: group_id.clone(),
                    seq: publication.seq,
                    push,
                };
                if session.handle.notifications.try_send(notification).is_err() {
                    session.handle.lagged.notify_one();
                }
            }
        }
        // A removed member gets the commit that removes it, then nothing more.
        for user in publication.removed {
            remove_follower(followers, group_id, user);
            if let Some(session) = sessions.get_mut(user) {
                session.groups.remove(group_id);
            }
        }
    }

    /// Makes every session resynchronise from the store (wake-ups may have been lost).
    pub fn resync_all(&self) {
        for session in self.state().sessions.values() {
            session.handle.lagged.notify_one();
        }
    }

    /// Number of attached sessions (for tests and metrics).
    pub fn session_count(&self) -> usize {
        self.state().sessions.len()
    }
}

fn remove_follower(
    followers: &mut HashMap<GroupId, HashSet<UserName>>,
    group_id: &GroupId,
    user: &UserName,
) {
    if let Some(users) = followers.get_mut(group_id) {
        users.remove(user);
        if users.is_empty() {
            followers.remove(group_id);
        }
    }
}
