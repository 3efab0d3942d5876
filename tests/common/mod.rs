//! Shared helpers for the client end-to-end tests: a real DS on `127.0.0.1:0`, library clients
//! ([`Peer`]) driven through `Client`, and the real `mlschat --headless` binary ([`Headless`]).
//!
//! Both kinds of peer keep every event they ever received (across restarts) in `log`, so a test
//! can wait for one event without losing the others, and can count afterwards how often a
//! message arrived.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlschat::client::{Client, ClientOptions};
use mlschat::core::db::HistoryEntry;
use mlschat::core::provider::ClientProvider;
use mlschat::core::{Command, CoreEvent, CoreInput, GroupRef, ListedGroup};
use mlschat_ds::LocalServer;
use mlschat_ds::client::{ChallengeSigner, RawConnection};
use mlschat_ds::config::Limits;
use mlschat_ds::protocol::{GroupId, UserName};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider as _;
use openmls_traits::types::SignatureScheme;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// The longest a single expected event may take.
pub const STEP: Duration = Duration::from_secs(30);

/// Runs a test body under a limit, so that a hang fails instead of blocking CI.
pub async fn timed<F: Future>(limit: Duration, body: F) -> F::Output {
    tokio::time::timeout(limit, body)
        .await
        .expect("the test did not finish within its timeout")
}

/// With `MLSCHAT_TEST_LOG` set (an env filter such as `mlschat=debug`), the clients of a test
/// log to stderr, which the test harness shows for failed tests.
pub fn init_tracing() {
    if let Ok(filter) = std::env::var("MLSCHAT_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .with_thread_names(true)
            .try_init();
    }
}

pub fn user(name: &str) -> UserName {
    UserName::new(name).expect("valid test user name")
}

/// A DS running in this process with its data in a temporary directory.
pub struct Ds {
    pub server: LocalServer,
    pub dir: tempfile::TempDir,
}

impl Ds {
    pub async fn start() -> Ds {
        Ds::start_with(Limits::default()).await
    }

    /// A DS with other limits than the defaults.
    pub async fn start_with(limits: Limits) -> Ds {
        let dir = tempfile::tempdir().expect("temporary directory");
        let server =
            LocalServer::start("127.0.0.1:0".parse().expect("address"), dir.path(), limits)
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

    /// Shuts the DS down; its data stays for [`StoppedDs::start`].
    pub async fn stop(self) -> StoppedDs {
        let address = self.server.address();
        self.server.shutdown().await;
        StoppedDs {
            address,
            dir: self.dir,
        }
    }
}

/// A DS shut down by [`Ds::stop`].
pub struct StoppedDs {
    address: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

impl StoppedDs {
    /// The DS's data directory (its SQLite database is `ds.sqlite3` there).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the DS again on the same address and data (its certificate included), so that
    /// clients reconnect to it.
    pub async fn start(self) -> Ds {
        // The old endpoint's socket closes when its driver task ends, which may be just after
        // the shutdown returned.
        let mut attempts = 0;
        let server = loop {
            match LocalServer::start(self.address, self.dir.path(), Limits::default()).await {
                Ok(server) => break server,
                Err(error) if attempts < 20 => {
                    attempts += 1;
                    tracing::debug!(%error, "the DS's address is not free yet");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("the DS cannot start again on {}: {error}", self.address),
            }
        };
        Ds {
            server,
            dir: self.dir,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Library clients

/// A user whose client runs in this process. The data directory outlives restarts.
pub struct Peer {
    pub name: String,
    pub dir: PathBuf,
    server: String,
    pinned: String,
    /// Automatic self-updates (taken into account at the next start).
    pub auto_update: Option<Duration>,
    /// The core's `sync_delay` (taken into account at the next start); `None`: the default.
    pub sync_delay: Option<Duration>,
    client: Option<Client>,
    /// Every event received, across restarts, oldest first.
    pub log: Vec<CoreEvent>,
    /// Which entries of `log` a `wait_for` has already returned.
    consumed: Vec<bool>,
}

impl Peer {
    /// Starts `name` with its profile in `root/name` and waits until it is ready.
    pub async fn start(ds: &Ds, name: &str, root: &Path) -> Peer {
        Peer::start_with_auto_update(ds, name, root, None).await
    }

    /// Like [`Peer::start`], with automatic self-updates every `auto_update`.
    pub async fn start_with_auto_update(
        ds: &Ds,
        name: &str,
        root: &Path,
        auto_update: Option<Duration>,
    ) -> Peer {
        init_tracing();
        let mut peer = Peer {
            name: name.to_string(),
            dir: root.join(name),
            server: ds.address(),
            pinned: ds.fingerprint(),
            auto_update,
            sync_delay: None,
            client: None,
            log: Vec::new(),
            consumed: Vec::new(),
        };
        peer.restart().await;
        peer
    }

    /// Starts the client again on the same profile and waits for `Ready`.
    pub async fn restart(&mut self) {
        assert!(self.client.is_none(), "{} is already running", self.name);
        let mut options = ClientOptions::new(user(&self.name), self.dir.clone());
        options.server = Some(self.server.clone());
        options.pinned = Some(self.pinned.clone());
        options.auto_update = self.auto_update;
        if let Some(delay) = self.sync_delay {
            options.sync_delay = delay;
        }
        let client = Client::start(options).await.expect("the client starts");
        self.client = Some(client);
        // Older `Ready` and `Stopped` events belong to earlier runs.
        for (event, consumed) in self.log.iter().zip(self.consumed.iter_mut()) {
            if matches!(event, CoreEvent::Ready { .. } | CoreEvent::Stopped) {
                *consumed = true;
            }
        }
        self.wait_for("ready", |event| matches!(event, CoreEvent::Ready { .. }))
            .await;
    }

    /// `/quit`: waits for the core to flush and stop, then for the client to finish.
    pub async fn stop(&mut self) {
        self.command(Command::Quit);
        self.wait_for("stopped", |event| *event == CoreEvent::Stopped)
            .await;
        if let Some(client) = self.client.take() {
            client.finish().await;
        }
    }

    pub fn running(&self) -> bool {
        self.client.is_some()
    }

    pub fn command(&self, command: Command) {
        self.client
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
            .inputs
            .send(CoreInput::Command(command))
            .expect("the core accepts commands");
    }

    pub fn send_text(&self, group: &GroupId, text: &str) {
        self.command(Command::Send {
            group: group.clone(),
            text: text.to_string(),
        });
    }

    fn record(&mut self, event: CoreEvent) {
        self.log.push(event);
        self.consumed.push(false);
    }

    /// Moves whatever events are waiting into the log, without blocking.
    pub fn drain(&mut self) {
        let mut received = Vec::new();
        if let Some(client) = self.client.as_mut() {
            while let Ok(event) = client.events.try_recv() {
                received.push(event);
            }
        }
        for event in received {
            self.record(event);
        }
    }

    /// The groups as the core listed them at its latest start (it lists them before `Ready`).
    pub fn listing(&mut self) -> Vec<ListedGroup> {
        self.drain();
        self.log
            .iter()
            .rev()
            .find_map(|event| match event {
                CoreEvent::Groups { groups } => Some(groups.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{} listed no groups at start", self.name))
    }

    /// Collects events for `duration`.
    pub async fn idle(&mut self, duration: Duration) {
        let deadline = tokio::time::Instant::now() + duration;
        loop {
            let Some(client) = self.client.as_mut() else {
                return;
            };
            match tokio::time::timeout_at(deadline, client.events.recv()).await {
                Ok(Some(event)) => self.record(event),
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Returns the oldest event not returned before that matches `predicate`, waiting for it
    /// up to [`STEP`]. Other events stay in the log.
    pub async fn wait_for(
        &mut self,
        what: &str,
        predicate: impl Fn(&CoreEvent) -> bool,
    ) -> CoreEvent {
        self.wait_for_within(STEP, what, predicate).await
    }

    pub async fn wait_for_within(
        &mut self,
        limit: Duration,
        what: &str,
        predicate: impl Fn(&CoreEvent) -> bool,
    ) -> CoreEvent {
        let deadline = tokio::time::Instant::now() + limit;
        let mut checked = 0;
        loop {
            self.drain();
            while checked < self.log.len() {
                if !self.consumed[checked] && predicate(&self.log[checked]) {
                    self.consumed[checked] = true;
                    return self.log[checked].clone();
                }
                checked += 1;
            }
            let name = self.name.clone();
            let Some(client) = self.client.as_mut() else {
                panic!("{name} is not running; waited for {what}");
            };
            match tokio::time::timeout_at(deadline, client.events.recv()).await {
                Ok(Some(event)) => self.record(event),
                Ok(None) => panic!("{name}: the event channel closed while waiting for {what}"),
                Err(_) => panic!(
                    "{name}: no {what} within {limit:?}; recent events: {:#?}",
                    self.log.iter().rev().take(15).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Waits for the `Message` carrying `text` in `group`.
    pub async fn wait_message(&mut self, group: &GroupId, text: &str) -> (String, u64) {
        let event = self
            .wait_for(&format!("message {text:?}"), |event| {
                matches!(event, CoreEvent::Message { group: g, text: t, .. } if g.id == *group && t == text)
            })
            .await;
        match event {
            CoreEvent::Message { from, seq, .. } => (from, seq),
            _ => unreachable!(),
        }
    }

    /// Waits for the `Sent` of the message `text` (matched through its `Queued` local id).
    pub async fn wait_sent(&mut self, group: &GroupId, text: &str) -> u64 {
        let local = self.log.iter().find_map(|event| match event {
            CoreEvent::Queued {
                group: g,
                local_id,
                text: t,
            } if g.id == *group && t == text => Some(*local_id),
            _ => None,
        });
        let local = match local {
            Some(local) => local,
            None => match self
                .wait_for(&format!("queued {text:?}"), |event| {
                    matches!(event, CoreEvent::Queued { group: g, text: t, .. } if g.id == *group && t == text)
                })
                .await
            {
                CoreEvent::Queued { local_id, .. } => local_id,
                _ => unreachable!(),
            },
        };
        match self
            .wait_for(&format!("sent {text:?}"), |event| {
                matches!(event, CoreEvent::Sent { group: g, local_id, .. } if g.id == *group && *local_id == local)
            })
            .await
        {
            CoreEvent::Sent { seq, .. } => seq,
            _ => unreachable!(),
        }
    }

    /// Every `Message` of `group` received so far: (from, text, seq).
    pub fn messages(&mut self, group: &GroupId) -> Vec<(String, String, u64)> {
        self.drain();
        self.log
            .iter()
            .filter_map(|event| match event {
                CoreEvent::Message {
                    group: g,
                    from,
                    text,
                    seq,
                    ..
                } if g.id == *group => Some((from.clone(), text.clone(), *seq)),
                _ => None,
            })
            .collect()
    }

    /// How many `Sent` events `group` got for the local ids of messages with `text`.
    pub fn sent_count(&mut self, group: &GroupId, text: &str) -> usize {
        self.drain();
        let locals: Vec<i64> = self
            .log
            .iter()
            .filter_map(|event| match event {
                CoreEvent::Queued {
                    group: g,
                    local_id,
                    text: t,
                } if g.id == *group && t == text => Some(*local_id),
                _ => None,
            })
            .collect();
        self.log
            .iter()
            .filter(|event| matches!(event, CoreEvent::Sent { group: g, local_id, .. } if g.id == *group && locals.contains(local_id)))
            .count()
    }

    /// The `Error` events received so far.
    pub fn errors(&mut self) -> Vec<String> {
        self.drain();
        self.log
            .iter()
            .filter_map(|event| match event {
                CoreEvent::Error { message } => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    /// `Command::History`: the group's stored timeline, oldest first (up to 1,000 lines).
    pub async fn history(&mut self, group: &GroupId) -> Vec<HistoryEntry> {
        self.command(Command::History {
            group: group.clone(),
            limit: 1_000,
        });
        match self
            .wait_for(
                "history",
                |event| matches!(event, CoreEvent::History { group: g, .. } if g.id == *group),
            )
            .await
        {
            CoreEvent::History { entries, .. } => entries,
            _ => unreachable!(),
        }
    }

    /// `Command::Status`: (epoch, epoch authenticator in hex, member count).
    pub async fn status(&mut self, group: &GroupId) -> (u64, String, usize) {
        self.command(Command::Status {
            group: group.clone(),
        });
        match self
            .wait_for(
                "status",
                |event| matches!(event, CoreEvent::Status { group: g, .. } if g.id == *group),
            )
            .await
        {
            CoreEvent::Status {
                epoch,
                epoch_authenticator,
                members,
                ..
            } => (epoch, epoch_authenticator, members),
            _ => unreachable!(),
        }
    }

    /// Whether, by the events so far, this peer is in `group` (joined or created it, and has
    /// not left it since).
    pub fn in_group(&mut self, group: &GroupId) -> bool {
        self.drain();
        self.log
            .iter()
            .rev()
            .find_map(|event| match event {
                CoreEvent::Joined { group: g, .. } | CoreEvent::GroupCreated { group: g }
                    if g.id == *group =>
                {
                    Some(true)
                }
                CoreEvent::Left { group: g, .. }
                | CoreEvent::OutOfSync { group: g }
                | CoreEvent::RemovalExpired { group: g }
                | CoreEvent::ServerBehind { group: g, .. }
                    if g.id == *group =>
                {
                    Some(false)
                }
                _ => None,
            })
            .unwrap_or(false)
    }

    /// `Command::Members`: the member names.
    pub async fn members(&mut self, group: &GroupId) -> Vec<String> {
        self.command(Command::Members {
            group: group.clone(),
        });
        match self
            .wait_for(
                "members",
                |event| matches!(event, CoreEvent::Members { group: g, .. } if g.id == *group),
            )
            .await
        {
            CoreEvent::Members { members, .. } => {
                members.into_iter().map(|member| member.name).collect()
            }
            _ => unreachable!(),
        }
    }

    /// The current display name of `group` as this peer knows it.
    pub fn group_name(&self, group: &GroupId) -> Option<String> {
        self.log.iter().rev().find_map(|event| match event {
            CoreEvent::GroupCreated { group: g }
            | CoreEvent::Joined { group: g, .. }
            | CoreEvent::GroupRenamed { group: g, .. }
                if g.id == *group =>
            {
                Some(g.name.clone())
            }
            _ => None,
        })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Stop the core thread of a failed test (the client's own drop then tells it to stop
        // without waiting for the outbox).
        if let Some(client) = self.client.take() {
            let _ = client.inputs.send(CoreInput::Command(Command::Quit));
        }
    }
}

/// A DS on loopback, a temporary directory for the profiles, and one started peer per name,
/// each ready: the set-up most tests begin with. Keep the first two alive for the test.
pub async fn start_peers<const N: usize>(names: [&str; N]) -> (Ds, tempfile::TempDir, [Peer; N]) {
    let ds = Ds::start().await;
    let root = tempfile::tempdir().expect("temporary directory");
    let mut peers = Vec::with_capacity(N);
    for name in names {
        peers.push(Peer::start(&ds, name, root.path()).await);
    }
    let peers: [Peer; N] = peers
        .try_into()
        .unwrap_or_else(|_| unreachable!("one peer per name"));
    (ds, root, peers)
}

/// `alice` creates a group named `name`; returns its reference.
pub async fn create_group(creator: &mut Peer, name: &str) -> GroupRef {
    creator.command(Command::CreateGroup {
        id: None,
        name: name.to_string(),
    });
    match creator
        .wait_for(
            "group created",
            |event| matches!(event, CoreEvent::GroupCreated { group } if group.name == name),
        )
        .await
    {
        CoreEvent::GroupCreated { group } => group,
        _ => unreachable!(),
    }
}

/// `inviter` invites `invitees`; waits until the inviter saw them added and each invitee joined
/// and learned the group's name.
pub async fn invite(inviter: &mut Peer, group: &GroupRef, invitees: &mut [&mut Peer]) {
    inviter.command(Command::Invite {
        group: group.id.clone(),
        users: invitees.iter().map(|peer| user(&peer.name)).collect(),
    });
    for invitee in invitees.iter_mut() {
        let name = invitee.name.clone();
        inviter
            .wait_for(&format!("member_added {name}"), |event| {
                matches!(event, CoreEvent::MemberAdded { group: g, user, .. } if g.id == group.id && *user == name)
            })
            .await;
        let by = inviter.name.clone();
        let joined = invitee
            .wait_for("joined", |event| {
                matches!(event, CoreEvent::Joined { group: g, by: b } if g.id == group.id && *b == by)
            })
            .await;
        // A first-time member learns the name from the inviter's message after the commit;
        // one added again still knows it.
        if !matches!(&joined, CoreEvent::Joined { group: g, .. } if g.name == group.name) {
            invitee
                .wait_for("group name", |event| {
                    matches!(event, CoreEvent::GroupRenamed { group: g, by: None } if g.id == group.id && g.name == group.name)
                })
                .await;
        }
    }
}

/// `kicker` removes `kicked` from `group`; waits until `kicked` heard it was removed by
/// `kicker`, and the kicker and each of `others` saw the removal.
pub async fn kick(kicker: &mut Peer, kicked: &mut Peer, others: &mut [&mut Peer], group: &GroupId) {
    kicker.command(Command::Kick {
        group: group.clone(),
        user: user(&kicked.name),
    });
    let by = kicker.name.clone();
    kicked
        .wait_for("removed", |event| {
            matches!(event, CoreEvent::Left { group: g, by: b } if g.id == *group && *b == by)
        })
        .await;
    let removed = kicked.name.clone();
    for peer in std::iter::once(kicker).chain(others.iter_mut().map(|peer| &mut **peer)) {
        peer.wait_for(&format!("{removed} removed"), |event| {
            matches!(event, CoreEvent::MemberRemoved { group: g, user, by: b } if g.id == *group && *user == removed && *b == by)
        })
        .await;
    }
}

/// Checks that no peer saw an error event, then stops each one.
pub async fn stop_clean(peers: &mut [&mut Peer]) {
    for peer in peers.iter_mut() {
        assert_eq!(peer.errors(), Vec::<String>::new(), "{}", peer.name);
        peer.stop().await;
    }
}

/// Asks every peer for its `Status` once: the common (epoch, authenticator, members) if all
/// agree, else every peer's answer.
pub async fn agreed_status(
    peers: &mut [&mut Peer],
    group: &GroupId,
) -> Result<(u64, String, usize), Vec<(String, (u64, String, usize))>> {
    let mut statuses = Vec::new();
    for peer in peers.iter_mut() {
        statuses.push((peer.name.clone(), peer.status(group).await));
    }
    if statuses.windows(2).all(|pair| pair[0].1 == pair[1].1) {
        Ok(statuses[0].1.clone())
    } else {
        Err(statuses)
    }
}

/// Polls `Status` on every peer until all agree on epoch and epoch authenticator (the group
/// did not fork); returns the common (epoch, authenticator, members).
pub async fn converge(peers: &mut [&mut Peer], group: &GroupId) -> (u64, String, usize) {
    let deadline = Instant::now() + STEP;
    loop {
        let statuses = match agreed_status(peers, group).await {
            Ok(status) => return status,
            Err(statuses) => statuses,
        };
        assert!(
            Instant::now() < deadline,
            "the group did not converge: {statuses:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The DS as a stopped client sees it

/// Signs DS challenges with the key kept in a (stopped) client's profile.
pub struct ProfileSigner(SignatureKeyPair);

impl ChallengeSigner for ProfileSigner {
    fn public_key(&self) -> Vec<u8> {
        self.0.public().to_vec()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        openmls_traits::signatures::Signer::sign(&self.0, message).expect("Ed25519 signs")
    }
}

/// Reads the signature key pair from a profile directory (the client must be stopped).
pub fn profile_signer(dir: &Path) -> ProfileSigner {
    let connection = mlschat::core::db::open(&dir.join("mlschat.sqlite3")).expect("profile opens");
    let identity = mlschat::core::db::identity(&connection)
        .expect("identity readable")
        .expect("identity present");
    let provider = ClientProvider::new(Rc::new(connection));
    let key = SignatureKeyPair::read(
        provider.storage(),
        &identity.signature_key,
        SignatureScheme::ED25519,
    )
    .expect("signature key in the profile");
    ProfileSigner(key)
}

/// Connects to the DS as the user of a stopped profile, with the raw protocol client.
pub async fn raw_login(ds: &Ds, name: &str, dir: &Path) -> RawConnection {
    use mlschat_ds::protocol::Frame;
    let signer = profile_signer(dir);
    let mut raw = RawConnection::connect(ds.server.address(), ds.server.fingerprint())
        .await
        .expect("raw connection");
    let frame = raw
        .authenticate_frame(1, &user(name), &signer)
        .expect("authenticate frame");
    raw.send_frame(&frame).await.expect("send authenticate");
    loop {
        match tokio::time::timeout(STEP, raw.next_frame()).await {
            Ok(Ok(Some(Frame::Authenticated(_)))) => return raw,
            Ok(Ok(Some(Frame::Deliver(_)))) => continue,
            other => panic!("authentication as {name} failed: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The headless binary

/// One line of the binary's stdout: a JSON object with an `event`, or what broke the contract.
type Line = Result<Value, String>;

/// A running `mlschat --headless`.
pub struct Headless {
    pub name: String,
    pub dir: PathBuf,
    pub log_file: PathBuf,
    server: String,
    pinned: String,
    env: Vec<(String, String)>,
    child: Option<tokio::process::Child>,
    stdin: Option<tokio::process::ChildStdin>,
    lines: Option<mpsc::UnboundedReceiver<Line>>,
    /// The task reading stdout; aborting it closes the pipe's reading end.
    reader: Option<tokio::task::JoinHandle<()>>,
    /// Every stdout event, across restarts.
    pub log: Vec<Value>,
    consumed: Vec<bool>,
}

impl Headless {
    /// Starts `mlschat --headless` for `name` with its profile in `root/name`; waits for `ready`.
    pub async fn start(ds: &Ds, name: &str, root: &Path, env: &[(&str, &str)]) -> Headless {
        let mut headless = Headless::new(ds, name, root, env);
        headless.restart().await;
        headless
    }

    /// The binary for `name`, not started yet.
    pub fn new(ds: &Ds, name: &str, root: &Path, env: &[(&str, &str)]) -> Headless {
        Headless {
            name: name.to_string(),
            dir: root.join(name),
            log_file: root.join(format!("{name}.log")),
            server: ds.address(),
            pinned: ds.fingerprint(),
            env: env
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            child: None,
            stdin: None,
            lines: None,
            reader: None,
            log: Vec::new(),
            consumed: Vec::new(),
        }
    }

    /// Pins another certificate fingerprint than the DS's (64 hex digits).
    pub fn pinning(mut self, fingerprint: &str) -> Headless {
        self.pinned = fingerprint.to_string();
        self
    }

    /// Starts the binary (again) on the same profile and waits for `ready`.
    pub async fn restart(&mut self) {
        self.spawn();
        for (event, consumed) in self.log.iter().zip(self.consumed.iter_mut()) {
            if event["event"] == "ready" {
                *consumed = true;
            }
        }
        let ready = self
            .wait_event("ready", |event| event["event"] == "ready")
            .await;
        assert_eq!(ready["name"], self.name.as_str());
    }

    /// Starts the binary without waiting for anything.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        // stderr goes to a file beside the log: the test harness does not capture a child's.
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file.with_extension("stderr"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mlschat"));
        command
            .args(["--headless", "--name", &self.name, "--server", &self.server])
            .args(["--server-cert-sha256", &self.pinned])
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--log-file")
            .arg(&self.log_file)
            .args(["--auto-update-secs", "0"])
            .envs(
                self.env
                    .iter()
                    .map(|(key, value)| (key.as_str(), value.as_str())),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        let mut child = command.spawn().expect("the mlschat binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        self.stdin = child.stdin.take();
        let (sender, receiver) = mpsc::unbounded_channel();
        self.reader = Some(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let parsed = match serde_json::from_str::<Value>(&line) {
                    Ok(value) if value["event"].is_string() => Ok(value),
                    Ok(_) => Err(format!("a stdout line without an event: {line}")),
                    Err(error) => Err(format!("a stdout line that is not JSON ({error}): {line}")),
                };
                if sender.send(parsed).is_err() {
                    return;
                }
            }
        }));
        self.child = Some(child);
        self.lines = Some(receiver);
    }

    pub async fn send_line(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes()).await;
    }

    /// Writes `bytes` to stdin in one write (several lines, or a line that is not UTF-8).
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(bytes).await.expect("write to stdin");
        stdin.flush().await.expect("flush stdin");
    }

    fn record(&mut self, line: Line) {
        match line {
            Ok(value) => {
                self.log.push(value);
                self.consumed.push(false);
            }
            Err(broken) => panic!("{}: {broken}", self.name),
        }
    }

    fn drain(&mut self) {
        let mut received = Vec::new();
        if let Some(lines) = self.lines.as_mut() {
            while let Ok(line) = lines.try_recv() {
                received.push(line);
            }
        }
        for line in received {
            self.record(line);
        }
    }

    /// Returns the oldest event not returned before that matches `predicate`.
    pub async fn wait_event(&mut self, what: &str, predicate: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + STEP;
        let mut checked = 0;
        loop {
            self.drain();
            while checked < self.log.len() {
                if !self.consumed[checked] && predicate(&self.log[checked]) {
                    self.consumed[checked] = true;
                    return self.log[checked].clone();
                }
                checked += 1;
            }
            let name = self.name.clone();
            let lines = self
                .lines
                .as_mut()
                .unwrap_or_else(|| panic!("{name} is not running; waited for {what}"));
            match tokio::time::timeout_at(deadline, lines.recv()).await {
                Ok(Some(line)) => self.record(line),
                Ok(None) => panic!(
                    "{name}: stdout closed while waiting for {what}; events: {:#?}",
                    self.log.iter().rev().take(15).collect::<Vec<_>>()
                ),
                Err(_) => panic!(
                    "{name}: no {what} within {STEP:?}; recent events: {:#?}",
                    self.log.iter().rev().take(15).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Sends `/status` and returns the answer for the current group.
    pub async fn status(&mut self) -> Value {
        self.send_line("/status").await;
        self.wait_event("status", |event| event["event"] == "status")
            .await
    }

    /// SIGKILL, then reap the process; stdout lines already written are kept.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill the client");
        }
        self.stdin = None;
        if let Some(mut lines) = self.lines.take() {
            while let Some(line) = lines.recv().await {
                if let Ok(value) = line {
                    self.log.push(value);
                    self.consumed.push(false);
                }
            }
        }
    }

    /// Stops reading the process's stdout and closes the pipe, as a reader that went away
    /// would; its next write fails.
    pub async fn close_stdout(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
            let _ = reader.await;
        }
        self.drain();
        self.lines = None;
    }

    /// Sends the running process a signal (`"TERM"`, `"HUP"`, ...) as `kill` would.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(|child| child.id())
            .expect("running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid}: {status:?}");
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|child| child.id())
            .expect("running")
    }

    /// What the process wrote to stderr, across restarts.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log_file.with_extension("stderr")).unwrap_or_default()
    }

    /// Closes stdin (EOF) and waits for the process to exit; returns its exit status.
    pub async fn close_stdin(&mut self) -> std::process::ExitStatus {
        self.stdin = None;
        self.wait_exit().await
    }

    /// Waits for the process to exit by itself; returns its exit status.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = tokio::time::timeout(STEP, child.wait())
            .await
            .expect("the client exits after EOF")
            .expect("wait for the client");
        if let Some(mut lines) = self.lines.take() {
            while let Some(line) = lines.recv().await {
                self.record(line);
            }
        }
        status
    }

    /// Every `message` event of the group with this id.
    pub fn messages(&mut self, group_id: &str) -> Vec<Value> {
        self.drain();
        self.log
            .iter()
            .filter(|event| event["event"] == "message" && event["group_id"] == group_id)
            .cloned()
            .collect()
    }

    pub fn errors(&mut self) -> Vec<Value> {
        self.drain();
        self.log
            .iter()
            .filter(|event| event["event"] == "error")
            .cloned()
            .collect()
    }
}
