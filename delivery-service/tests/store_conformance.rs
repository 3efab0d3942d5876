//! Conformance suite for the [`Store`] trait.
//!
//! Every check is a generic `async fn check<B: Backend>(backend: B)`; the [`conformance!`] macro
//! turns the whole list into one `#[tokio::test]` per check for one backend. Both backends run
//! it: SQLite in a temporary directory, PostgreSQL in a fresh schema of the test database (see
//! `support_postgres`; those tests are skipped with a printed reason when PostgreSQL is not
//! reachable, and fail instead under `CI=true`).
//!
//! A backend can open several stores on one location: the checks that race two handles stand
//! for two DS nodes sharing a database.
//!
//! Payloads are plain bytes: the store never parses MLS.

mod support_postgres;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mlschat_ds::protocol::{ClientMessageId, DeliveryKind, Epoch, GroupId, Seq, UserName};
use mlschat_ds::store::{
    AppendRequest, Appended, ClaimedKeyPackage, Membership, MembershipChange, NewKeyPackage,
    PostgresOptions, PostgresStore, Registration, SqliteStore, Store, StoreError, StoreLimits,
};
use support_postgres::TestDatabase;

/// Upper bound for any single check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// One database location for a backend under test. The first `open` creates an empty store;
/// later ones reopen the same data, after the previous handle was dropped or (as a second
/// node would) beside it.
pub trait Backend: Send + 'static {
    type S: Store;
    fn open(&self, limits: StoreLimits) -> impl Future<Output = Self::S> + Send;
}

/// SQLite in a fresh temporary directory.
pub struct SqliteBackend {
    dir: tempfile::TempDir,
}

impl Default for SqliteBackend {
    fn default() -> SqliteBackend {
        SqliteBackend {
            dir: tempfile::tempdir().expect("create a temporary directory"),
        }
    }
}

impl Backend for SqliteBackend {
    type S = SqliteStore;

    async fn open(&self, limits: StoreLimits) -> SqliteStore {
        SqliteStore::open(self.dir.path().join("ds.sqlite3"), limits).expect("open SqliteStore")
    }
}

/// A schema of its own in the PostgreSQL test database.
pub struct PostgresBackend {
    database: TestDatabase,
}

impl PostgresBackend {
    /// `None` (and a printed reason) when PostgreSQL is not reachable outside CI.
    pub async fn connect() -> Option<PostgresBackend> {
        Some(PostgresBackend {
            database: TestDatabase::create().await?,
        })
    }
}

impl Backend for PostgresBackend {
    type S = PostgresStore;

    async fn open(&self, limits: StoreLimits) -> PostgresStore {
        PostgresStore::connect(&self.database.url, limits, PostgresOptions::default())
            .await
            .expect("open PostgresStore")
    }
}

/// Instantiates every check for one backend: `conformance!(module_name, backend_expression)`.
/// The expression is evaluated inside each (async) test, so it may `.await`.
macro_rules! conformance {
    ($module:ident, $backend:expr) => {
        mod $module {
            use super::*;

            conformance!(@checks $backend;
                register_is_idempotent_and_detects_name_taken,
                key_packages_are_claimed_exactly_once_under_concurrency,
                key_packages_are_claimed_oldest_first_then_last_resort,
                last_resort_is_reused_until_replaced,
                key_package_quota_is_enforced,
                create_group_rejects_existing_group,
                one_commit_per_epoch_under_concurrent_appends,
                two_handles_share_one_order,
                sequence_numbers_are_gap_free_under_concurrent_appends,
                retries_are_idempotent,
                an_accepted_message_is_always_stored_in_its_group,
                a_reused_message_id_with_other_bytes_is_refused,
                idempotency_outlives_purged_messages,
                application_messages_are_checked,
                membership_changes_route_welcome_and_cut_off_removed_members,
                a_member_removed_and_added_again_keeps_what_it_had_not_fetched,
                invalid_membership_changes_are_rejected_without_side_effects,
                ack_moves_cursor_forward_only_and_is_clamped,
                fetch_pages_through_the_log,
                group_backlog_quota_is_enforced_until_purged,
                purge_by_expiry_deletes_everything_and_keeps_sequence,
                purge_by_acks_deletes_only_messages_every_member_acked,
                purge_is_not_held_back_by_removed_members,
                backlog_quota_counts_the_messages_kept_for_removed_members,
                expired_key_packages_are_never_handed_out_and_are_purged,
                store_survives_reopen,
            );
        }
    };
    (@checks $backend:expr; $($(#[$attribute:meta])* $check:ident),+ $(,)?) => {
        $(
            $(#[$attribute])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let backend = $backend;
                tokio::time::timeout(CHECK_TIMEOUT, super::$check(backend))
                    .await
                    .expect(concat!(stringify!($check), " timed out"));
            }
        )+
    };
}

conformance!(sqlite, SqliteBackend::default());
conformance!(
    postgres,
    match PostgresBackend::connect().await {
        Some(backend) => backend,
        None => return,
    }
);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn user(name: &str) -> UserName {
    UserName::new(name).expect("valid user name")
}

fn group(name: &str) -> GroupId {
    GroupId::new(name.as_bytes().to_vec()).expect("valid group id")
}

/// A signature key that differs per name and seed.
fn key(name: &str, seed: u8) -> Vec<u8> {
    let mut key = vec![seed; 32];
    for (slot, byte) in key.iter_mut().zip(name.bytes()) {
        *slot ^= byte;
    }
    key
}

/// A distinct client message id per (tag, n).
fn message_id(tag: u8, n: u64) -> ClientMessageId {
    let mut id = [0u8; 16];
    id[0] = tag;
    id[8..].copy_from_slice(&n.to_be_bytes());
    id
}

fn application(
    group_id: &GroupId,
    sender: &UserName,
    epoch: Epoch,
    id: ClientMessageId,
    payload: &[u8],
) -> AppendRequest {
    AppendRequest {
        group_id: group_id.clone(),
        sender: sender.clone(),
        client_message_id: id,
        epoch,
        kind: DeliveryKind::Application,
        payload: payload.to_vec(),
        membership: None,
    }
}

fn commit(
    group_id: &GroupId,
    sender: &UserName,
    epoch: Epoch,
    id: ClientMessageId,
    payload: &[u8],
    membership: Option<MembershipChange>,
) -> AppendRequest {
    AppendRequest {
        group_id: group_id.clone(),
        sender: sender.clone(),
        client_message_id: id,
        epoch,
        kind: DeliveryKind::Commit,
        payload: payload.to_vec(),
        membership,
    }
}

fn adding(users: &[&UserName], welcome: &[u8]) -> Option<MembershipChange> {
    Some(MembershipChange {
        welcome: Some(welcome.to_vec()),
        added: users.iter().map(|user| (*user).clone()).collect(),
        removed: Vec::new(),
    })
}

fn removing(users: &[&UserName]) -> Option<MembershipChange> {
    Some(MembershipChange {
        welcome: None,
        added: Vec::new(),
        removed: users.iter().map(|user| (*user).clone()).collect(),
    })
}

async fn register<S: Store>(store: &S, name: &UserName) {
    store
        .register_user(name, &key(name.as_str(), 1))
        .await
        .expect("register user");
}

/// Registers `creator` and `members`, creates the group and adds the members in one commit
/// at epoch 0 (seq 1). The group is then at epoch 1.
async fn group_with_members<S: Store>(
    store: &S,
    group_id: &GroupId,
    creator: &UserName,
    members: &[&UserName],
) {
    register(store, creator).await;
    for member in members {
        register(store, member).await;
    }
    store
        .create_group(group_id, creator)
        .await
        .expect("create group");
    if !members.is_empty() {
        let appended = store
            .append(commit(
                group_id,
                creator,
                0,
                message_id(0xc0, 0),
                b"commit adding the members",
                adding(members, b"welcome for the members"),
            ))
            .await
            .expect("commit adding members");
        assert_eq!((appended.seq, appended.epoch), (1, 1));
    }
}

/// Every delivery `user` can fetch in `group_id` after `after`, following pages.
async fn fetch_all<S: Store>(
    store: &S,
    user: &UserName,
    group_id: &GroupId,
    after: Seq,
) -> Vec<mlschat_ds::protocol::Delivery> {
    let mut all = Vec::new();
    let mut after = after;
    for _ in 0..10_000 {
        let page = store
            .fetch(user, group_id, after, 100)
            .await
            .expect("fetch");
        if let Some(last) = page.deliveries.last() {
            after = last.seq;
        }
        all.extend(page.deliveries);
        if !page.more {
            return all;
        }
    }
    panic!("fetch never reported the end of the log");
}

/// Unix time now, in seconds.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

/// KeyPackages valid for the next 90 days.
fn fresh(key_packages: Vec<Vec<u8>>) -> Vec<NewKeyPackage> {
    key_packages
        .into_iter()
        .map(|key_package| NewKeyPackage {
            key_package,
            not_after: now() + 90 * 24 * 3600,
        })
        .collect()
}

/// A last-resort KeyPackage valid for the next 90 days.
fn resort(key_package: &[u8]) -> Option<NewKeyPackage> {
    fresh(vec![key_package.to_vec()]).pop()
}

fn seqs(deliveries: &[mlschat_ds::protocol::Delivery]) -> Vec<Seq> {
    deliveries.iter().map(|delivery| delivery.seq).collect()
}

fn memberships_map(memberships: Vec<Membership>) -> BTreeMap<Vec<u8>, Seq> {
    memberships
        .into_iter()
        .map(|membership| (membership.group_id.as_bytes().to_vec(), membership.cursor))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Users and KeyPackages
// ---------------------------------------------------------------------------------------------

async fn register_is_idempotent_and_detects_name_taken<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let first = key("alice", 1);
    let other = key("alice", 2);
    assert_eq!(
        store.register_user(&alice, &first).await,
        Ok(Registration::Created)
    );
    assert_eq!(
        store.register_user(&alice, &first).await,
        Ok(Registration::AlreadyRegistered)
    );
    assert_eq!(
        store.register_user(&alice, &other).await,
        Err(StoreError::NameTaken)
    );
    assert_eq!(store.user_key(&alice).await, Ok(Some(first.clone())));
    assert_eq!(store.user_key(&user("nobody")).await, Ok(None));

    // Concurrent registrations of one new name: exactly one key wins, the others are refused.
    let store = Arc::new(store);
    let bob = user("bob");
    let mut tasks = tokio::task::JoinSet::new();
    for seed in 0..10u8 {
        let store = Arc::clone(&store);
        let bob = bob.clone();
        tasks.spawn(async move { (seed, store.register_user(&bob, &key("bob", seed)).await) });
    }
    let mut winners = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (seed, outcome) = joined.expect("register task");
        match outcome {
            Ok(Registration::Created) => winners.push(seed),
            Err(StoreError::NameTaken) => {}
            other => panic!("unexpected registration outcome {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one registration creates bob");
    assert_eq!(store.user_key(&bob).await, Ok(Some(key("bob", winners[0]))));
}

async fn key_packages_are_claimed_exactly_once_under_concurrency<B: Backend>(backend: B) {
    let store = Arc::new(backend.open(StoreLimits::default()).await);
    let bob = user("bob");
    register(&*store, &bob).await;
    let packages: Vec<Vec<u8>> = (0..50).map(|n| format!("kp-{n}").into_bytes()).collect();
    assert_eq!(
        store
            .store_key_packages(&bob, fresh(packages.clone()), resort(b"kp-last-resort"))
            .await,
        Ok(50)
    );
    assert_eq!(store.count_key_packages(&bob).await, Ok((50, true)));

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let store = Arc::clone(&store);
        let bob = bob.clone();
        tasks.spawn(async move {
            let mut claimed = Vec::new();
            loop {
                let package = store
                    .claim_key_package(&bob)
                    .await
                    .expect("claim")
                    .expect("a KeyPackage or the last-resort one");
                if package.last_resort {
                    assert_eq!(package.key_package, b"kp-last-resort");
                    return claimed;
                }
                claimed.push(package.key_package);
            }
        });
    }
    let mut all = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        all.extend(joined.expect("claim task"));
    }
    let distinct: HashSet<&Vec<u8>> = all.iter().collect();
    assert_eq!(all.len(), 50, "every KeyPackage is handed out");
    assert_eq!(distinct.len(), 50, "no KeyPackage is handed out twice");
    assert_eq!(distinct, packages.iter().collect::<HashSet<_>>());
    assert_eq!(store.count_key_packages(&bob).await, Ok((0, true)));
    assert_eq!(
        store.claim_key_package(&bob).await,
        Ok(Some(ClaimedKeyPackage {
            key_package: b"kp-last-resort".to_vec(),
            last_resort: true
        }))
    );
}

async fn key_packages_are_claimed_oldest_first_then_last_resort<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let bob = user("bob");
    let carol = user("carol");
    register(&store, &bob).await;
    register(&store, &carol).await;
    assert_eq!(
        store
            .store_key_packages(&bob, fresh(vec![b"one".to_vec(), b"two".to_vec()]), None)
            .await,
        Ok(2)
    );
    assert_eq!(
        store
            .store_key_packages(&bob, fresh(vec![b"three".to_vec()]), None)
            .await,
        Ok(3)
    );
    // Another user's packages are separate.
    assert_eq!(
        store
            .store_key_packages(&carol, fresh(vec![b"carol-one".to_vec()]), None)
            .await,
        Ok(1)
    );
    for expected in [&b"one"[..], b"two", b"three"] {
        assert_eq!(
            store.claim_key_package(&bob).await,
            Ok(Some(ClaimedKeyPackage {
                key_package: expected.to_vec(),
                last_resort: false
            }))
        );
    }
    assert_eq!(store.claim_key_package(&bob).await, Ok(None));
    assert_eq!(store.count_key_packages(&bob).await, Ok((0, false)));
    assert_eq!(store.count_key_packages(&carol).await, Ok((1, false)));
    assert!(matches!(
        store.claim_key_package(&user("nobody")).await,
        Err(StoreError::UnknownUser(name)) if name == user("nobody")
    ));
}

async fn last_resort_is_reused_until_replaced<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let bob = user("bob");
    register(&store, &bob).await;
    assert_eq!(
        store
            .store_key_packages(&bob, Vec::new(), resort(b"resort-1"))
            .await,
        Ok(0)
    );
    assert_eq!(store.count_key_packages(&bob).await, Ok((0, true)));
    let resort_1 = Ok(Some(ClaimedKeyPackage {
        key_package: b"resort-1".to_vec(),
        last_resort: true,
    }));
    assert_eq!(store.claim_key_package(&bob).await, resort_1);
    assert_eq!(store.claim_key_package(&bob).await, resort_1);
    assert_eq!(store.count_key_packages(&bob).await, Ok((0, true)));

    // A regular package is preferred over the last-resort one.
    assert_eq!(
        store
            .store_key_packages(&bob, fresh(vec![b"regular".to_vec()]), None)
            .await,
        Ok(1)
    );
    assert_eq!(
        store.claim_key_package(&bob).await,
        Ok(Some(ClaimedKeyPackage {
            key_package: b"regular".to_vec(),
            last_resort: false
        }))
    );
    assert_eq!(store.claim_key_package(&bob).await, resort_1);

    // Uploading a new last-resort package replaces the old one.
    store
        .store_key_packages(&bob, Vec::new(), resort(b"resort-2"))
        .await
        .expect("replace last resort");
    assert_eq!(store.count_key_packages(&bob).await, Ok((0, true)));
    for _ in 0..2 {
        assert_eq!(
            store.claim_key_package(&bob).await,
            Ok(Some(ClaimedKeyPackage {
                key_package: b"resort-2".to_vec(),
                last_resort: true
            }))
        );
    }
}

async fn key_package_quota_is_enforced<B: Backend>(backend: B) {
    let limits = StoreLimits {
        max_key_packages_per_user: 10,
        ..StoreLimits::default()
    };
    let store = backend.open(limits).await;
    let bob = user("bob");
    register(&store, &bob).await;
    let batch = |from: u32, n: u32| -> Vec<NewKeyPackage> {
        fresh(
            (from..from + n)
                .map(|i| format!("kp-{i}").into_bytes())
                .collect(),
        )
    };
    assert_eq!(
        store.store_key_packages(&bob, batch(0, 6), None).await,
        Ok(6)
    );
    assert!(matches!(
        store.store_key_packages(&bob, batch(6, 5), None).await,
        Err(StoreError::QuotaExceeded(_))
    ));
    // A refused upload stores nothing at all.
    assert_eq!(store.count_key_packages(&bob).await, Ok((6, false)));
    assert_eq!(
        store.store_key_packages(&bob, batch(6, 4), None).await,
        Ok(10)
    );
    assert!(matches!(
        store.store_key_packages(&bob, batch(10, 1), None).await,
        Err(StoreError::QuotaExceeded(_))
    ));
    // The last-resort package does not count against the quota.
    assert_eq!(
        store
            .store_key_packages(&bob, Vec::new(), resort(b"resort"))
            .await,
        Ok(10)
    );
    assert_eq!(store.count_key_packages(&bob).await, Ok((10, true)));
    // Claiming frees room.
    store
        .claim_key_package(&bob)
        .await
        .expect("claim")
        .expect("a package");
    assert_eq!(
        store.store_key_packages(&bob, batch(10, 1), None).await,
        Ok(10)
    );
}

// ---------------------------------------------------------------------------------------------
// Groups, ordering and idempotency
// ---------------------------------------------------------------------------------------------

async fn create_group_rejects_existing_group<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let bob = user("bob");
    register(&store, &alice).await;
    register(&store, &bob).await;
    let g = group("group-1");
    assert_eq!(store.create_group(&g, &alice).await, Ok(()));
    assert_eq!(
        store.create_group(&g, &alice).await,
        Err(StoreError::GroupExists)
    );
    assert_eq!(
        store.create_group(&g, &bob).await,
        Err(StoreError::GroupExists)
    );
    assert_eq!(
        store.memberships(&alice).await,
        Ok(vec![Membership {
            group_id: g.clone(),
            cursor: 0
        }])
    );
    assert_eq!(store.memberships(&bob).await, Ok(Vec::new()));
    assert_eq!(store.cursor(&alice, &g).await, Ok(Some(0)));
    assert_eq!(store.cursor(&bob, &g).await, Ok(None));
    // The creator is the only member: the group starts at epoch 0 with an empty log.
    assert_eq!(fetch_all(&store, &alice, &g, 0).await, Vec::new());
    let appended = store
        .append(application(&g, &alice, 0, message_id(1, 1), b"hello"))
        .await
        .expect("first message");
    assert_eq!((appended.seq, appended.epoch), (1, 0));
}

async fn one_commit_per_epoch_under_concurrent_appends<B: Backend>(backend: B) {
    let store = Arc::new(backend.open(StoreLimits::default()).await);
    let alice = user("alice");
    let members: Vec<UserName> = (0..4).map(|n| user(&format!("member-{n}"))).collect();
    let g = group("racing");
    group_with_members(&*store, &g, &alice, &members.iter().collect::<Vec<_>>()).await;
    let mut senders = vec![alice.clone()];
    senders.extend(members.iter().cloned());

    let epoch = 1;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..20u64 {
        let store = Arc::clone(&store);
        let sender = senders[n as usize % senders.len()].clone();
        let g = g.clone();
        tasks.spawn(async move {
            let payload = format!("commit-{n}").into_bytes();
            let outcome = store
                .append(commit(&g, &sender, epoch, message_id(2, n), &payload, None))
                .await;
            (payload, outcome)
        });
    }
    let mut winners = Vec::new();
    let mut stale = 0;
    while let Some(joined) = tasks.join_next().await {
        let (payload, outcome) = joined.expect("append task");
        match outcome {
            Ok(appended) => {
                assert_eq!(appended.epoch, epoch + 1);
                assert!(!appended.duplicate);
                winners.push((appended.seq, payload));
            }
            Err(StoreError::StaleEpoch { current }) => {
                assert_eq!(current, epoch + 1, "the loser learns the new epoch");
                stale += 1;
            }
            Err(other) => panic!("unexpected append failure {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one commit wins epoch {epoch}");
    assert_eq!(stale, 19);
    let (seq, payload) = winners.remove(0);
    assert_eq!(seq, 2, "losing commits consume no sequence number");
    let log = fetch_all(&*store, &alice, &g, 1).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].seq, seq);
    assert_eq!(log[0].kind, DeliveryKind::Commit as u8);
    assert_eq!(log[0].epoch, epoch);
    assert_eq!(log[0].payload.as_slice(), payload.as_slice());

    // The old epoch is closed for every kind of message; the new one is open.
    assert_eq!(
        store
            .append(application(&g, &alice, epoch, message_id(3, 0), b"late"))
            .await,
        Err(StoreError::StaleEpoch { current: epoch + 1 })
    );
    let next = store
        .append(application(
            &g,
            &alice,
            epoch + 1,
            message_id(3, 1),
            b"on time",
        ))
        .await
        .expect("message in the new epoch");
    assert_eq!((next.seq, next.epoch), (3, epoch + 1));
}

/// Two stores on one location, as two DS nodes sharing a database: commits racing through both
/// still have exactly one winner per epoch, sequence numbers stay gap-free, a retry through the
/// other handle is recognised, and KeyPackages are claimed once.
async fn two_handles_share_one_order<B: Backend>(backend: B) {
    let first = Arc::new(backend.open(StoreLimits::default()).await);
    let second = Arc::new(backend.open(StoreLimits::default()).await);
    let alice = user("alice");
    let bob = user("bob");
    let g = group("two-nodes");
    group_with_members(&*first, &g, &alice, &[&bob]).await;
    let handles = [Arc::clone(&first), Arc::clone(&second)];

    for epoch in 1..=3u64 {
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..8u64 {
            let store = Arc::clone(&handles[(n % 2) as usize]);
            let sender = if n % 2 == 0 {
                alice.clone()
            } else {
                bob.clone()
            };
            let g = g.clone();
            tasks.spawn(async move {
                store
                    .append(commit(
                        &g,
                        &sender,
                        epoch,
                        message_id(20, epoch * 100 + n),
                        b"c",
                        None,
                    ))
                    .await
            });
        }
        let mut winners = 0;
        while let Some(joined) = tasks.join_next().await {
            match joined.expect("commit task") {
                Ok(appended) => {
                    assert_eq!(appended.epoch, epoch + 1);
                    winners += 1;
                }
                Err(StoreError::StaleEpoch { current }) => assert_eq!(current, epoch + 1),
                Err(other) => panic!("unexpected failure {other}"),
            }
        }
        assert_eq!(
            winners, 1,
            "exactly one commit wins epoch {epoch} across both handles"
        );
    }

    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..60u64 {
        let store = Arc::clone(&handles[(n % 2) as usize]);
        let sender = if n % 3 == 0 {
            bob.clone()
        } else {
            alice.clone()
        };
        let g = g.clone();
        tasks.spawn(async move {
            store
                .append(application(&g, &sender, 4, message_id(21, n), b"m"))
                .await
                .expect("append")
                .seq
        });
    }
    let mut seqs_seen = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        assert!(
            seqs_seen.insert(joined.expect("append task")),
            "a seq was handed out twice"
        );
    }
    // Seq 1 added bob, 2..=4 are the winning commits.
    assert_eq!(seqs_seen, (5..=64).collect());
    assert_eq!(
        seqs(&fetch_all(&*second, &bob, &g, 0).await),
        (1..=64).collect::<Vec<_>>()
    );
    // A retry through the other handle gets the original answer.
    let retry = second
        .append(application(&g, &alice, 4, message_id(21, 1), b"m"))
        .await
        .expect("retry");
    assert!(retry.duplicate);
    assert!(seqs_seen.contains(&retry.seq));

    // KeyPackages claimed through both handles at once are handed out once each.
    first
        .store_key_packages(&bob, fresh((0..20).map(|n| vec![n]).collect()), None)
        .await
        .expect("store");
    let mut claims = tokio::task::JoinSet::new();
    for n in 0..24usize {
        let store = Arc::clone(&handles[n % 2]);
        let bob = bob.clone();
        claims.spawn(async move { store.claim_key_package(&bob).await.expect("claim") });
    }
    let mut claimed = Vec::new();
    while let Some(joined) = claims.join_next().await {
        if let Some(package) = joined.expect("claim task") {
            claimed.push(package.key_package);
        }
    }
    claimed.sort();
    assert_eq!(claimed, (0..20).map(|n| vec![n]).collect::<Vec<_>>());
}

async fn sequence_numbers_are_gap_free_under_concurrent_appends<B: Backend>(backend: B) {
    let store = Arc::new(backend.open(StoreLimits::default()).await);
    let alice = user("alice");
    let members: Vec<UserName> = (0..4).map(|n| user(&format!("member-{n}"))).collect();
    let g = group("busy");
    group_with_members(&*store, &g, &alice, &members.iter().collect::<Vec<_>>()).await;
    let mut senders = vec![alice.clone()];
    senders.extend(members.iter().cloned());

    const PER_SENDER: u64 = 40;
    let mut tasks = tokio::task::JoinSet::new();
    for (index, sender) in senders.iter().enumerate() {
        for n in 0..PER_SENDER {
            let store = Arc::clone(&store);
            let sender = sender.clone();
            let g = g.clone();
            tasks.spawn(async move {
                let payload = format!("{sender}-{n}").into_bytes();
                let appended = store
                    .append(application(
                        &g,
                        &sender,
                        1,
                        message_id(index as u8, n),
                        &payload,
                    ))
                    .await
                    .expect("append");
                (appended, sender, payload)
            });
        }
    }
    let mut by_seq: BTreeMap<Seq, (UserName, Vec<u8>)> = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (appended, sender, payload) = joined.expect("append task");
        assert!(!appended.duplicate);
        assert_eq!(appended.epoch, 1);
        assert!(
            by_seq.insert(appended.seq, (sender, payload)).is_none(),
            "seq {} handed out twice",
            appended.seq
        );
    }
    let total = PER_SENDER * senders.len() as u64;
    // Seq 1 is the commit that added the members.
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (2..=total + 1).collect::<Vec<_>>(),
        "sequence numbers are exactly 2..={}",
        total + 1
    );
    for reader in &senders {
        let log = fetch_all(&*store, reader, &g, 1).await;
        assert_eq!(seqs(&log), (2..=total + 1).collect::<Vec<_>>());
        for delivery in &log {
            let (sender, payload) = &by_seq[&delivery.seq];
            assert_eq!(&delivery.sender, sender);
            assert_eq!(delivery.payload.as_slice(), payload.as_slice());
            assert_eq!(delivery.kind, DeliveryKind::Application as u8);
            assert_eq!(delivery.epoch, 1);
            assert_eq!(&delivery.group_id, &g);
        }
    }
}

async fn retries_are_idempotent<B: Backend>(backend: B) {
    let store = Arc::new(backend.open(StoreLimits::default()).await);
    let alice = user("alice");
    let bob = user("bob");
    let g = group("retries");
    group_with_members(&*store, &g, &alice, &[&bob]).await;

    let first = store
        .append(application(&g, &alice, 1, message_id(4, 1), b"once"))
        .await
        .expect("first send");
    assert!(!first.duplicate);
    let retry = store
        .append(application(&g, &alice, 1, message_id(4, 1), b"once"))
        .await
        .expect("retry");
    assert_eq!(
        (retry.seq, retry.epoch, retry.duplicate),
        (first.seq, first.epoch, true)
    );

    // The same id from another sender is another message.
    let bobs = store
        .append(application(&g, &bob, 1, message_id(4, 1), b"bob's own"))
        .await
        .expect("bob's send");
    assert!(!bobs.duplicate);
    assert_eq!(bobs.seq, first.seq + 1);

    // Concurrent retries of one new message: one stores it, the others see the duplicate.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let store = Arc::clone(&store);
        let g = g.clone();
        let alice = alice.clone();
        tasks.spawn(async move {
            store
                .append(application(
                    &g,
                    &alice,
                    1,
                    message_id(4, 2),
                    b"racing retry",
                ))
                .await
                .expect("concurrent retry")
        });
    }
    let mut outcomes: Vec<Appended> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        outcomes.push(joined.expect("retry task"));
    }
    assert_eq!(
        outcomes.iter().filter(|outcome| !outcome.duplicate).count(),
        1
    );
    let racing_seq = outcomes[0].seq;
    assert!(outcomes.iter().all(|outcome| outcome.seq == racing_seq));

    // A retried commit answers with the epoch it created, even after the group moved on.
    let committed = store
        .append(commit(&g, &alice, 1, message_id(4, 3), b"commit", None))
        .await
        .expect("commit");
    assert_eq!(committed.epoch, 2);
    store
        .append(commit(&g, &bob, 2, message_id(4, 4), b"next commit", None))
        .await
        .expect("next commit");
    let retried = store
        .append(commit(&g, &alice, 1, message_id(4, 3), b"commit", None))
        .await
        .expect("commit retry");
    assert_eq!(
        (retried.seq, retried.epoch, retried.duplicate),
        (committed.seq, 2, true)
    );

    // Each message is stored exactly once.
    let log = fetch_all(&*store, &bob, &g, 1).await;
    assert_eq!(
        seqs(&log),
        vec![
            first.seq,
            bobs.seq,
            racing_seq,
            committed.seq,
            committed.seq + 1
        ]
    );
    assert_eq!(log[0].payload.as_slice(), b"once");
    assert_eq!(log[1].payload.as_slice(), b"bob's own");
    assert_eq!(log[2].payload.as_slice(), b"racing retry");
}

/// Used to fail on `SqliteStore`: its idempotency lookup was keyed on (sender,
/// client_message_id) only, so a second message from the same sender with the same id in
/// *another group* was answered `Ok { duplicate: true, seq: <the first group's seq> }` and never
/// stored: the DS acknowledged a message it dropped. The key now includes the group.
async fn an_accepted_message_is_always_stored_in_its_group<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let first = group("first");
    let second = group("second");
    register(&store, &alice).await;
    store.create_group(&first, &alice).await.expect("first");
    store.create_group(&second, &alice).await.expect("second");
    let reused = message_id(16, 1);
    store
        .append(application(
            &first,
            &alice,
            0,
            reused,
            b"to the first group",
        ))
        .await
        .expect("first message");
    let outcome = store
        .append(application(
            &second,
            &alice,
            0,
            reused,
            b"to the second group",
        ))
        .await;
    if let Ok(appended) = outcome {
        let log = fetch_all(&store, &alice, &second, 0).await;
        assert!(
            log.iter().any(|delivery| delivery.seq == appended.seq
                && delivery.payload.as_slice() == b"to the second group"),
            "append answered {appended:?} but the second group holds {log:?}"
        );
    }
}

async fn application_messages_are_checked<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let bob = user("bob");
    let mallory = user("mallory");
    let g = group("checked");
    group_with_members(&store, &g, &alice, &[&bob]).await;
    register(&store, &mallory).await;

    assert_eq!(
        store
            .append(application(
                &group("no-such-group"),
                &alice,
                0,
                message_id(5, 1),
                b"x"
            ))
            .await,
        Err(StoreError::UnknownGroup)
    );
    assert_eq!(
        store
            .append(application(&g, &mallory, 1, message_id(5, 2), b"x"))
            .await,
        Err(StoreError::NotMember)
    );
    assert_eq!(
        store
            .append(commit(&g, &mallory, 1, message_id(5, 3), b"x", None))
            .await,
        Err(StoreError::NotMember)
    );
    for wrong_epoch in [0, 2, 99] {
        assert_eq!(
            store
                .append(application(
                    &g,
                    &alice,
                    wrong_epoch,
                    message_id(5, 10 + wrong_epoch),
                    b"x"
                ))
                .await,
            Err(StoreError::StaleEpoch { current: 1 })
        );
    }
    // A proposal follows the same epoch rule and does not change the epoch.
    let proposal = store
        .append(AppendRequest {
            kind: DeliveryKind::Proposal,
            ..application(&g, &bob, 1, message_id(5, 4), b"proposal")
        })
        .await
        .expect("proposal");
    assert_eq!((proposal.seq, proposal.epoch), (2, 1));
    // Rejected messages consumed no sequence number.
    let fine = store
        .append(application(&g, &alice, 1, message_id(5, 5), b"fine"))
        .await
        .expect("valid message");
    assert_eq!(fine.seq, 3);
    assert!(matches!(
        store.fetch(&mallory, &g, 0, 10).await,
        Err(StoreError::NotMember)
    ));
    assert!(matches!(
        store.fetch(&alice, &group("no-such-group"), 0, 10).await,
        Err(StoreError::NotMember | StoreError::UnknownGroup)
    ));
}

// ---------------------------------------------------------------------------------------------
// Membership, cursors, quotas and retention
// ---------------------------------------------------------------------------------------------

async fn membership_changes_route_welcome_and_cut_off_removed_members<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let bob = user("bob");
    let carol = user("carol");
    for name in [&alice, &bob, &carol] {
        register(&store, name).await;
    }
    let g = group("membership");
    store.create_group(&g, &alice).await.expect("create group");
    let before = store
        .append(application(&g, &alice, 0, message_id(6, 0), b"before bob"))
        .await
        .expect("message before bob");
    assert_eq!(before.seq, 1);

    let added = store
        .append(commit(
            &g,
            &alice,
            0,
            message_id(6, 1),
            b"commit add bob",
            adding(&[&bob], b"welcome bob"),
        ))
        .await
        .expect("add bob");
    assert_eq!((added.seq, added.epoch), (2, 1));
    assert_eq!(added.added, vec![bob.clone()]);
    assert!(added.removed.is_empty());
    assert_eq!(store.cursor(&bob, &g).await, Ok(Some(1)));
    assert_eq!(
        memberships_map(store.memberships(&bob).await.expect("memberships")),
        BTreeMap::from([(g.as_bytes().to_vec(), 1)])
    );

    // Bob gets the Welcome in place of the commit, and nothing from before he joined.
    let bobs_view = fetch_all(&store, &bob, &g, 0).await;
    assert_eq!(bobs_view.len(), 1);
    let welcome = &bobs_view[0];
    assert_eq!(welcome.seq, 2);
    assert_eq!(welcome.kind, DeliveryKind::Welcome as u8);
    assert_eq!(welcome.epoch, 1, "a Welcome carries the epoch it creates");
    assert_eq!(welcome.sender, alice);
    assert_eq!(welcome.payload.as_slice(), b"welcome bob");
    // Alice, who was there, gets the commit itself.
    let alices_view = fetch_all(&store, &alice, &g, 0).await;
    assert_eq!(seqs(&alices_view), vec![1, 2]);
    assert_eq!(alices_view[1].kind, DeliveryKind::Commit as u8);
    assert_eq!(alices_view[1].epoch, 0);
    assert_eq!(alices_view[1].payload.as_slice(), b"commit add bob");

    let from_bob = store
        .append(application(&g, &bob, 1, message_id(6, 2), b"hi from bob"))
        .await
        .expect("bob sends");
    assert_eq!(from_bob.seq, 3);

    // Adding carol while removing bob.
    let change = MembershipChange {
        welcome: Some(b"welcome carol".to_vec()),
        added: vec![carol.clone()],
        removed: vec![bob.clone()],
    };
    let removal = store
        .append(commit(
            &g,
            &alice,
            1,
            message_id(6, 3),
            b"commit remove bob add carol",
            Some(change),
        ))
        .await
        .expect("remove bob, add carol");
    assert_eq!((removal.seq, removal.epoch), (4, 2));
    assert_eq!(removal.removed, vec![bob.clone()]);
    assert_eq!(removal.added, vec![carol.clone()]);
    let after = store
        .append(application(&g, &alice, 2, message_id(6, 4), b"after bob"))
        .await
        .expect("message after removal");
    assert_eq!(after.seq, 5);

    // Bob sees up to and including the commit that removes him, and can no longer send.
    let bobs_view = fetch_all(&store, &bob, &g, 0).await;
    assert_eq!(seqs(&bobs_view), vec![2, 3, 4]);
    assert_eq!(bobs_view[2].kind, DeliveryKind::Commit as u8);
    assert_eq!(
        bobs_view[2].payload.as_slice(),
        b"commit remove bob add carol"
    );
    assert_eq!(
        seqs(&fetch_all(&store, &bob, &g, 4).await),
        Vec::<Seq>::new()
    );
    assert_eq!(
        store
            .append(application(&g, &bob, 2, message_id(6, 5), b"too late"))
            .await,
        Err(StoreError::NotMember)
    );
    // Carol sees her Welcome and what follows.
    let carols_view = fetch_all(&store, &carol, &g, 0).await;
    assert_eq!(seqs(&carols_view), vec![4, 5]);
    assert_eq!(carols_view[0].kind, DeliveryKind::Welcome as u8);
    assert_eq!(carols_view[0].epoch, 2);
    assert_eq!(carols_view[0].payload.as_slice(), b"welcome carol");
    assert_eq!(carols_view[1].payload.as_slice(), b"after bob");
    assert_eq!(
        memberships_map(store.memberships(&carol).await.expect("memberships")),
        BTreeMap::from([(g.as_bytes().to_vec(), 3)])
    );
    // Alice sees everything.
    assert_eq!(
        seqs(&fetch_all(&store, &alice, &g, 0).await),
        vec![1, 2, 3, 4, 5]
    );

    // Once bob acknowledged his removal he has no access at all; his ack cannot go past it.
    store.ack(&bob, &g, 5).await.expect("ack");
    assert!(matches!(store.cursor(&bob, &g).await, Ok(None | Some(4))));
    match store.fetch(&bob, &g, 0, 100).await {
        Err(StoreError::NotMember) => {}
        Ok(page) => assert!(page.deliveries.iter().all(|delivery| delivery.seq <= 4)),
        Err(other) => panic!("unexpected fetch failure {other}"),
    }

    // Bob can be added back: he gets the new Welcome, nothing from while he was away.
    let readded = store
        .append(commit(
            &g,
            &alice,
            2,
            message_id(6, 6),
            b"commit re-add bob",
            adding(&[&bob], b"welcome bob again"),
        ))
        .await
        .expect("re-add bob");
    assert_eq!(readded.seq, 6);
    let bobs_view = fetch_all(&store, &bob, &g, 0).await;
    assert_eq!(seqs(&bobs_view), vec![6]);
    assert_eq!(bobs_view[0].kind, DeliveryKind::Welcome as u8);
    assert_eq!(bobs_view[0].payload.as_slice(), b"welcome bob again");
}

/// A member removed and added again before it fetched its removal keeps the rest of its first
/// membership: its client must process the removal before it can take the new Welcome. Twice
/// over, so that three memberships of one user in one group are kept at once.
async fn a_member_removed_and_added_again_keeps_what_it_had_not_fetched<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let bob = user("bob");
    let g = group("in-and-out");
    group_with_members(&store, &g, &alice, &[&bob]).await;
    store.ack(&bob, &g, 1).await.expect("bob takes his Welcome");
    // Seqs: 2 for bob, 3 removes him, 4 not for him, 5 adds him again, 6 for him, 7 removes
    // him, 8 not for him, 9 adds him again, 10 for him.
    let mut epoch = 1;
    let mut n = 0;
    let mut next_id = || {
        n += 1;
        message_id(40, n)
    };
    for round in 0..2 {
        let text = format!("before removal {round}");
        store
            .append(application(&g, &alice, epoch, next_id(), text.as_bytes()))
            .await
            .expect("append");
        store
            .append(commit(
                &g,
                &alice,
                epoch,
                next_id(),
                b"remove bob",
                removing(&[&bob]),
            ))
            .await
            .expect("remove bob");
        epoch += 1;
        store
            .append(application(&g, &alice, epoch, next_id(), b"not for bob"))
            .await
            .expect("append");
        let welcome = format!("welcome bob {round}");
        let added = store
            .append(commit(
                &g,
                &alice,
                epoch,
                next_id(),
                b"add bob",
                adding(&[&bob], welcome.as_bytes()),
            ))
            .await
            .expect("add bob again");
        assert_eq!(added.added, vec![bob.clone()]);
        epoch += 1;
    }
    let last = store
        .append(application(&g, &alice, epoch, next_id(), b"after"))
        .await
        .expect("append");
    assert_eq!((last.seq, last.epoch), (10, 5));
    assert_eq!(
        store
            .append(commit(
                &g,
                &alice,
                epoch,
                next_id(),
                b"c",
                adding(&[&bob], b"w")
            ))
            .await,
        Err(StoreError::InvalidMembership(
            "bob is already a member".into()
        )),
        "only one membership is current"
    );

    let expected: Vec<(Seq, u8, Epoch, &[u8])> = vec![
        (2, DeliveryKind::Application as u8, 1, b"before removal 0"),
        (3, DeliveryKind::Commit as u8, 1, b"remove bob"),
        (5, DeliveryKind::Welcome as u8, 3, b"welcome bob 0"),
        (6, DeliveryKind::Application as u8, 3, b"before removal 1"),
        (7, DeliveryKind::Commit as u8, 3, b"remove bob"),
        (9, DeliveryKind::Welcome as u8, 5, b"welcome bob 1"),
        (10, DeliveryKind::Application as u8, 5, b"after"),
    ];
    let view = |deliveries: &[mlschat_ds::protocol::Delivery]| -> Vec<(Seq, u8, Epoch, Vec<u8>)> {
        deliveries
            .iter()
            .map(|d| (d.seq, d.kind, d.epoch, d.payload.as_slice().to_vec()))
            .collect()
    };
    let expected_view: Vec<(Seq, u8, Epoch, Vec<u8>)> = expected
        .iter()
        .map(|(seq, kind, epoch, payload)| (*seq, *kind, *epoch, payload.to_vec()))
        .collect();
    assert_eq!(view(&fetch_all(&store, &bob, &g, 1).await), expected_view);
    // One delivery per page, across the memberships, never an empty page that says "more".
    let mut paged = Vec::new();
    let mut after = 1;
    loop {
        let page = store.fetch(&bob, &g, after, 1).await.expect("fetch");
        assert!(page.deliveries.len() <= 1);
        if let Some(delivery) = page.deliveries.last() {
            after = delivery.seq;
        } else {
            assert!(!page.more, "an empty page said there was more");
        }
        paged.extend(page.deliveries);
        if !page.more {
            break;
        }
    }
    assert_eq!(view(&paged), expected_view);
    assert_eq!(
        memberships_map(store.memberships(&bob).await.expect("memberships")),
        BTreeMap::from([(g.as_bytes().to_vec(), 1)]),
        "the oldest membership's cursor"
    );
    assert_eq!(store.cursor(&bob, &g).await, Ok(Some(1)));

    // The purge keeps what bob has not fetched of each membership.
    store.ack(&alice, &g, 10).await.expect("ack");
    let purged = store.purge(0).await.expect("purge");
    assert_eq!(view(&fetch_all(&store, &bob, &g, 1).await), expected_view);
    assert_eq!(
        purged.messages, 3,
        "1, 4 and 8 were delivered to everyone who gets them"
    );

    // Acknowledging a removal ends that membership; the next one takes over.
    store.ack(&bob, &g, 3).await.expect("ack");
    assert_eq!(store.cursor(&bob, &g).await, Ok(Some(4)));
    assert_eq!(
        view(&fetch_all(&store, &bob, &g, 3).await),
        expected_view[2..]
    );
    store.ack(&bob, &g, 10).await.expect("ack");
    assert_eq!(store.cursor(&bob, &g).await, Ok(Some(10)));
    assert_eq!(
        memberships_map(store.memberships(&bob).await.expect("memberships")),
        BTreeMap::from([(g.as_bytes().to_vec(), 10)])
    );
    let from_bob = store
        .append(application(&g, &bob, epoch, next_id(), b"hello again"))
        .await
        .expect("bob sends in his current membership");
    assert_eq!(from_bob.seq, 11);
    // Removing him now ends only the current membership.
    store
        .append(commit(
            &g,
            &alice,
            epoch,
            next_id(),
            b"remove bob",
            removing(&[&bob]),
        ))
        .await
        .expect("remove bob");
    assert_eq!(seqs(&fetch_all(&store, &bob, &g, 10).await), vec![11, 12]);
}

async fn invalid_membership_changes_are_rejected_without_side_effects<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let bob = user("bob");
    let carol = user("carol");
    let g = group("invalid");
    group_with_members(&store, &g, &alice, &[&bob]).await;
    register(&store, &carol).await;

    let attempts: Vec<(&str, AppendRequest)> = vec![
        (
            "add an existing member",
            commit(&g, &alice, 1, message_id(7, 1), b"c", adding(&[&bob], b"w")),
        ),
        (
            "remove a non-member",
            commit(&g, &alice, 1, message_id(7, 2), b"c", removing(&[&carol])),
        ),
        (
            "remove the sender",
            commit(&g, &bob, 1, message_id(7, 3), b"c", removing(&[&bob])),
        ),
        (
            "add without a Welcome",
            commit(
                &g,
                &alice,
                1,
                message_id(7, 4),
                b"c",
                Some(MembershipChange {
                    welcome: None,
                    added: vec![carol.clone()],
                    removed: Vec::new(),
                }),
            ),
        ),
        (
            "a Welcome without added users",
            commit(
                &g,
                &alice,
                1,
                message_id(7, 5),
                b"c",
                Some(MembershipChange {
                    welcome: Some(b"w".to_vec()),
                    added: Vec::new(),
                    removed: Vec::new(),
                }),
            ),
        ),
        (
            "name a user twice",
            commit(
                &g,
                &alice,
                1,
                message_id(7, 6),
                b"c",
                adding(&[&carol, &carol], b"w"),
            ),
        ),
        (
            "membership change on an application message",
            AppendRequest {
                membership: adding(&[&carol], b"w"),
                ..application(&g, &alice, 1, message_id(7, 7), b"c")
            },
        ),
    ];
    for (what, request) in attempts {
        let outcome = store.append(request).await;
        assert!(
            matches!(outcome, Err(StoreError::InvalidMembership(_))),
            "{what}: expected InvalidMembership, got {outcome:?}"
        );
    }
    assert!(matches!(
        store
            .append(commit(
                &g,
                &alice,
                1,
                message_id(7, 8),
                b"c",
                adding(&[&user("unregistered")], b"w")
            ))
            .await,
        Err(StoreError::UnknownUser(name)) if name == user("unregistered")
    ));
    // Nothing changed: no seq used, still epoch 1, carol not a member, bob still one.
    assert_eq!(store.cursor(&carol, &g).await, Ok(None));
    let valid = store
        .append(commit(
            &g,
            &bob,
            1,
            message_id(7, 9),
            b"valid commit",
            adding(&[&carol], b"welcome carol"),
        ))
        .await
        .expect("valid commit");
    assert_eq!((valid.seq, valid.epoch), (2, 2));
    // A rejected attempt can be retried with the same id once it is valid.
    let retried = store
        .append(application(&g, &alice, 2, message_id(7, 7), b"now plain"))
        .await
        .expect("retry of a rejected id");
    assert!(!retried.duplicate);
    assert_eq!(retried.seq, 3);
}

async fn ack_moves_cursor_forward_only_and_is_clamped<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let bob = user("bob");
    let g = group("acks");
    let h = group("acks-2");
    group_with_members(&store, &g, &alice, &[&bob]).await;
    store.create_group(&h, &bob).await.expect("second group");
    for n in 0..5 {
        store
            .append(application(&g, &alice, 1, message_id(8, n), b"m"))
            .await
            .expect("append");
    }
    // Seqs 1..=6 exist in g.
    assert_eq!(store.cursor(&bob, &g).await, Ok(Some(0)));
    store.ack(&bob, &g, 3).await.expect("ack 3");
    assert_eq!(store.cursor(&bob, &g).await, Ok(Some(3)));
    store.ack(&bob, &g, 2).await.expect("ack 2");
    assert_eq!(store.cursor(&bob, &g).await, Ok(Some(3)), "never backwards");
    store.ack(&bob, &g, 1_000_000).await.expect("ack too far");
    assert_eq!(
        store.cursor(&bob, &g).await,
        Ok(Some(6)),
        "clamped to last seq"
    );
    store.ack(&alice, &g, 4).await.expect("alice ack");
    // Acks where the user is not a member, or for unknown groups, are ignored.
    store.ack(&alice, &h, 10).await.expect("ack as non-member");
    store
        .ack(&alice, &group("unknown"), 10)
        .await
        .expect("ack for unknown group");
    assert_eq!(store.cursor(&alice, &h).await, Ok(None));
    assert_eq!(store.cursor(&bob, &h).await, Ok(Some(0)));

    assert_eq!(
        memberships_map(store.memberships(&bob).await.expect("memberships")),
        BTreeMap::from([(g.as_bytes().to_vec(), 6), (h.as_bytes().to_vec(), 0)])
    );
    assert_eq!(
        memberships_map(store.memberships(&alice).await.expect("memberships")),
        BTreeMap::from([(g.as_bytes().to_vec(), 4)])
    );
    assert_eq!(store.memberships(&user("nobody")).await, Ok(Vec::new()));
    // The cursor does not limit what fetch returns (a client may re-read after a crash).
    assert_eq!(
        seqs(&fetch_all(&store, &bob, &g, 0).await),
        vec![1, 2, 3, 4, 5, 6]
    );
}

async fn fetch_pages_through_the_log<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let g = group("pages");
    group_with_members(&store, &g, &alice, &[]).await;
    for n in 1..=7u64 {
        store
            .append(application(
                &g,
                &alice,
                0,
                message_id(9, n),
                format!("m{n}").as_bytes(),
            ))
            .await
            .expect("append");
    }
    let page = store.fetch(&alice, &g, 0, 3).await.expect("page 1");
    assert_eq!(seqs(&page.deliveries), vec![1, 2, 3]);
    assert!(page.more);
    let page = store.fetch(&alice, &g, 3, 3).await.expect("page 2");
    assert_eq!(seqs(&page.deliveries), vec![4, 5, 6]);
    assert!(page.more);
    let page = store.fetch(&alice, &g, 6, 3).await.expect("page 3");
    assert_eq!(seqs(&page.deliveries), vec![7]);
    assert!(!page.more);
    assert_eq!(page.deliveries[0].payload.as_slice(), b"m7");
    let page = store.fetch(&alice, &g, 7, 3).await.expect("past the end");
    assert!(page.deliveries.is_empty());
    assert!(!page.more);
    let page = store.fetch(&alice, &g, 4, 3).await.expect("exact end");
    assert_eq!(seqs(&page.deliveries), vec![5, 6, 7]);
    assert!(!page.more, "no more beyond the last message");
}

async fn group_backlog_quota_is_enforced_until_purged<B: Backend>(backend: B) {
    let limits = StoreLimits {
        max_group_backlog: 5,
        ..StoreLimits::default()
    };
    let store = backend.open(limits).await;
    let alice = user("alice");
    let bob = user("bob");
    let g = group("backlog");
    // Seq 1: the commit that adds bob.
    group_with_members(&store, &g, &alice, &[&bob]).await;
    for n in 2..=5u64 {
        let appended = store
            .append(application(&g, &alice, 1, message_id(10, n), b"m"))
            .await
            .expect("within the backlog");
        assert_eq!(appended.seq, n);
    }
    let sixth = store
        .append(application(&g, &alice, 1, message_id(10, 6), b"m"))
        .await;
    assert!(
        matches!(sixth, Err(StoreError::QuotaExceeded(_))),
        "the 6th message exceeds a backlog of 5: {sixth:?}"
    );
    // A retry of a stored message is still answered.
    assert!(
        store
            .append(application(&g, &alice, 1, message_id(10, 2), b"m"))
            .await
            .expect("retry while full")
            .duplicate
    );
    // Alice's acks alone free nothing: bob has not acknowledged.
    store.ack(&alice, &g, 5).await.expect("alice acks");
    store.purge(0).await.expect("purge");
    assert!(matches!(
        store
            .append(application(&g, &alice, 1, message_id(10, 6), b"m"))
            .await,
        Err(StoreError::QuotaExceeded(_))
    ));
    // Bob acknowledges up to 3: three messages can go.
    store.ack(&bob, &g, 3).await.expect("bob acks");
    let purged = store.purge(0).await.expect("purge");
    assert_eq!(purged.messages, 3);
    for n in 6..=8u64 {
        let appended = store
            .append(application(&g, &alice, 1, message_id(10, n), b"m"))
            .await
            .expect("room after purge");
        assert_eq!(appended.seq, n, "rejections consumed no sequence number");
    }
    assert!(matches!(
        store
            .append(application(&g, &alice, 1, message_id(10, 9), b"m"))
            .await,
        Err(StoreError::QuotaExceeded(_))
    ));
    assert_eq!(
        seqs(&fetch_all(&store, &bob, &g, 0).await),
        vec![4, 5, 6, 7, 8]
    );
}

async fn purge_by_expiry_deletes_everything_and_keeps_sequence<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let bob = user("bob");
    let carol = user("carol");
    let g = group("expiry");
    group_with_members(&store, &g, &alice, &[&bob, &carol]).await;
    for n in 0..5 {
        store
            .append(application(&g, &alice, 1, message_id(11, n), b"m"))
            .await
            .expect("append");
    }
    // Remove carol (seq 7); she never acknowledges.
    store
        .append(commit(
            &g,
            &alice,
            1,
            message_id(11, 99),
            b"remove carol",
            removing(&[&carol]),
        ))
        .await
        .expect("remove carol");
    // Nothing is old enough for a purge with the epoch as the cut-off.
    let purged = store.purge(0).await.expect("purge nothing");
    assert_eq!(purged.messages, 0);
    assert_eq!(fetch_all(&store, &bob, &g, 0).await.len(), 7);
    // A fetch after the last possible seq asks only whether the requester has access: a
    // member and a removed member whose removal is still stored get an empty page.
    for member in [&alice, &carol] {
        let probed = store.fetch(member, &g, Seq::MAX, 1).await.expect("probe");
        assert!(probed.deliveries.is_empty() && !probed.more, "{member}");
    }

    let far_future = i64::MAX / 2;
    let purged = store.purge(far_future).await.expect("purge everything");
    assert_eq!(purged.messages, 7);
    assert_eq!(
        purged.idempotency_records, 7,
        "each expired message's idempotency record goes with it, and is counted"
    );
    assert!(fetch_all(&store, &alice, &g, 0).await.is_empty());
    assert!(fetch_all(&store, &bob, &g, 0).await.is_empty());
    // Carol's leftover membership can never be delivered to any more.
    assert_eq!(purged.memberships, 1);
    assert_eq!(store.memberships(&carol).await, Ok(Vec::new()));
    assert!(matches!(
        store.fetch(&carol, &g, Seq::MAX, 1).await,
        Err(StoreError::NotMember)
    ));
    let probed = store.fetch(&bob, &g, Seq::MAX, 1).await.expect("probe");
    assert!(probed.deliveries.is_empty() && !probed.more);
    // The group, its epoch and its members stay; sequence numbers are never reused.
    let next = store
        .append(application(
            &g,
            &bob,
            2,
            message_id(11, 100),
            b"after purge",
        ))
        .await
        .expect("append after purge");
    assert_eq!((next.seq, next.epoch), (8, 2));
    assert_eq!(seqs(&fetch_all(&store, &alice, &g, 0).await), vec![8]);
    assert_eq!(store.purge(far_future).await.expect("purge").messages, 1);
}

async fn purge_by_acks_deletes_only_messages_every_member_acked<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let bob = user("bob");
    let carol = user("carol");
    let g = group("acked");
    let other = group("other");
    group_with_members(&store, &g, &alice, &[&bob, &carol]).await;
    store.create_group(&other, &alice).await.expect("other");
    for n in 0..9 {
        store
            .append(application(&g, &alice, 1, message_id(12, n), b"m"))
            .await
            .expect("append");
        store
            .append(application(&other, &alice, 0, message_id(13, n), b"o"))
            .await
            .expect("append other");
    }
    // g holds seqs 1..=10, other 1..=9.
    store.ack(&alice, &g, 10).await.expect("ack");
    store.ack(&bob, &g, 6).await.expect("ack");
    store.ack(&carol, &g, 4).await.expect("ack");
    let purged = store.purge(0).await.expect("purge");
    assert_eq!(purged.messages, 4);
    assert_eq!(
        seqs(&fetch_all(&store, &bob, &g, 0).await),
        (5..=10).collect::<Vec<_>>()
    );
    assert_eq!(fetch_all(&store, &alice, &other, 0).await.len(), 9);
    assert_eq!(store.purge(0).await.expect("purge again").messages, 0);
    store.ack(&alice, &other, 9).await.expect("ack other");
    store.ack(&carol, &g, 10).await.expect("ack");
    let purged = store.purge(0).await.expect("purge");
    assert_eq!(purged.messages, 9 + 2);
    assert!(fetch_all(&store, &alice, &other, 0).await.is_empty());
    assert_eq!(
        seqs(&fetch_all(&store, &carol, &g, 0).await),
        (7..=10).collect::<Vec<_>>()
    );
}

/// Used to fail on `SqliteStore`: its purge deleted `seq <= MIN(cursor)` over every row in
/// `members`, including removed members' rows, so a removed member that never acknowledges
/// (a lost device is the usual reason for a removal) pinned the whole group's log until
/// retention expired it, and the group ran into `max_group_backlog`.
async fn purge_is_not_held_back_by_removed_members<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let bob = user("bob");
    let carol = user("carol");
    let g = group("removed-laggard");
    group_with_members(&store, &g, &alice, &[&bob, &carol]).await;
    for n in 2..=5u64 {
        store
            .append(application(&g, &alice, 1, message_id(15, n), b"m"))
            .await
            .expect("append");
    }
    // Seq 6 removes carol, who never acknowledges anything (her device is gone).
    store
        .append(commit(
            &g,
            &alice,
            1,
            message_id(15, 6),
            b"remove carol",
            removing(&[&carol]),
        ))
        .await
        .expect("remove carol");
    for n in 7..=10u64 {
        store
            .append(application(&g, &alice, 2, message_id(15, n), b"m"))
            .await
            .expect("append");
    }
    store.ack(&alice, &g, 10).await.expect("ack");
    store.ack(&bob, &g, 10).await.expect("ack");
    // Carol still needs 1..=6; 7..=10 were never hers and every member acknowledged them.
    let purged = store.purge(0).await.expect("purge");
    assert_eq!(
        seqs(&fetch_all(&store, &carol, &g, 0).await),
        (1..=6).collect::<Vec<_>>(),
        "a removed member keeps what it has not acknowledged up to its removal"
    );
    assert_eq!(
        purged.messages, 4,
        "messages after a removal must not wait for the removed member's acknowledgement"
    );
}

/// Purging around a removed member's window leaves holes in the log: the backlog quota counts
/// the messages actually stored, not `last_seq - first_seq`.
async fn backlog_quota_counts_the_messages_kept_for_removed_members<B: Backend>(backend: B) {
    let limits = StoreLimits {
        max_group_backlog: 6,
        ..StoreLimits::default()
    };
    let store = backend.open(limits).await;
    let alice = user("alice");
    let bob = user("bob");
    let g = group("holes");
    // Seq 1 adds bob; seq 2 is a message; seq 3 removes bob, who never acknowledges.
    group_with_members(&store, &g, &alice, &[&bob]).await;
    store
        .append(application(&g, &alice, 1, message_id(17, 2), b"m"))
        .await
        .expect("append");
    store
        .append(commit(
            &g,
            &alice,
            1,
            message_id(17, 3),
            b"remove bob",
            removing(&[&bob]),
        ))
        .await
        .expect("remove bob");
    for n in 4..=6u64 {
        store
            .append(application(&g, &alice, 2, message_id(17, n), b"m"))
            .await
            .expect("append");
    }
    store.ack(&alice, &g, 6).await.expect("ack");
    assert_eq!(store.purge(0).await.expect("purge").messages, 3, "4..=6 go");
    // Bob's window 1..=3 stays: 3 stored, so exactly 3 more fit.
    for n in 7..=9u64 {
        let appended = store
            .append(application(&g, &alice, 2, message_id(17, n), b"m"))
            .await
            .expect("room for three");
        assert_eq!(appended.seq, n);
    }
    assert!(matches!(
        store
            .append(application(&g, &alice, 2, message_id(17, 10), b"m"))
            .await,
        Err(StoreError::QuotaExceeded(_))
    ));
    // Bob catches up on his removal: his window goes, and so does the quota pressure.
    store.ack(&bob, &g, 3).await.expect("bob acks his removal");
    store.ack(&alice, &g, 9).await.expect("ack");
    assert_eq!(store.purge(0).await.expect("purge").messages, 6);
    assert_eq!(store.cursor(&bob, &g).await, Ok(None));
    let next = store
        .append(application(&g, &alice, 2, message_id(17, 10), b"m"))
        .await
        .expect("room again");
    assert_eq!(next.seq, 10);
}

/// The same (sender, group, client message id) with different bytes is not a retry: answering
/// it with the first message's seq would acknowledge a message that was never stored.
async fn a_reused_message_id_with_other_bytes_is_refused<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let g = group("reuse");
    let h = group("reuse-2");
    register(&store, &alice).await;
    store.create_group(&g, &alice).await.expect("g");
    store.create_group(&h, &alice).await.expect("h");
    let id = message_id(18, 1);
    let first = store
        .append(application(&g, &alice, 0, id, b"first"))
        .await
        .expect("first");
    assert_eq!(
        store
            .append(application(&g, &alice, 0, id, b"other bytes"))
            .await,
        Err(StoreError::ReusedMessageId { seq: first.seq })
    );
    // The same id in another group is another message.
    let elsewhere = store
        .append(application(&h, &alice, 0, id, b"other bytes"))
        .await
        .expect("same id, other group");
    assert!(!elsewhere.duplicate);
    assert_eq!(elsewhere.seq, 1);
    // The refusal consumed nothing and the real retry still works.
    let retry = store
        .append(application(&g, &alice, 0, id, b"first"))
        .await
        .expect("retry");
    assert_eq!((retry.seq, retry.duplicate), (first.seq, true));
    assert_eq!(seqs(&fetch_all(&store, &alice, &g, 0).await), vec![1]);
}

/// A retry after the message was delivered to everyone and purged is still recognised: the
/// idempotency record lives for the retention period, not as long as the message.
async fn idempotency_outlives_purged_messages<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let alice = user("alice");
    let bob = user("bob");
    let g = group("purged-retry");
    group_with_members(&store, &g, &alice, &[&bob]).await;
    let sent = store
        .append(commit(&g, &alice, 1, message_id(19, 1), b"commit", None))
        .await
        .expect("commit");
    assert_eq!((sent.seq, sent.epoch), (2, 2));
    store.ack(&alice, &g, 2).await.expect("ack");
    store.ack(&bob, &g, 2).await.expect("ack");
    let purged = store.purge(0).await.expect("purge");
    assert_eq!(purged.messages, 2);
    assert_eq!(
        purged.idempotency_records, 0,
        "records outlive their messages"
    );
    assert!(fetch_all(&store, &bob, &g, 0).await.is_empty());
    let retry = store
        .append(commit(&g, &alice, 1, message_id(19, 1), b"commit", None))
        .await
        .expect("retry after purge");
    assert_eq!(
        (retry.seq, retry.epoch, retry.duplicate),
        (2, 2, true),
        "the original answer, not StaleEpoch and not a second copy"
    );
    assert!(
        fetch_all(&store, &bob, &g, 0).await.is_empty(),
        "nothing stored"
    );
    // Past the retention period the record goes too.
    let purged = store.purge(i64::MAX / 2).await.expect("purge everything");
    assert_eq!(purged.idempotency_records, 2);
    assert_eq!(
        store
            .append(commit(&g, &alice, 1, message_id(19, 1), b"commit", None))
            .await,
        Err(StoreError::StaleEpoch { current: 2 })
    );
}

async fn expired_key_packages_are_never_handed_out_and_are_purged<B: Backend>(backend: B) {
    let store = backend.open(StoreLimits::default()).await;
    let bob = user("bob");
    register(&store, &bob).await;
    let expired = |key_package: &[u8]| NewKeyPackage {
        key_package: key_package.to_vec(),
        not_after: now() - 10,
    };
    let mut packages = vec![expired(b"old-1")];
    packages.extend(fresh(vec![b"good".to_vec()]));
    packages.push(expired(b"old-2"));
    assert_eq!(
        store
            .store_key_packages(&bob, packages, Some(expired(b"old-resort")))
            .await,
        Ok(3),
        "the uploaded count (the DS validates lifetimes before storing)"
    );
    assert_eq!(store.count_key_packages(&bob).await, Ok((1, false)));
    assert_eq!(
        store.claim_key_package(&bob).await,
        Ok(Some(ClaimedKeyPackage {
            key_package: b"good".to_vec(),
            last_resort: false
        }))
    );
    assert_eq!(
        store.claim_key_package(&bob).await,
        Ok(None),
        "neither an expired one-time package nor an expired last-resort one"
    );
    let purged = store.purge(0).await.expect("purge");
    assert_eq!(purged.key_packages, 3);
    // Expired packages do not count against the quota of the next upload either.
    assert_eq!(
        store
            .store_key_packages(&bob, fresh(vec![b"new".to_vec()]), resort(b"resort"))
            .await,
        Ok(1)
    );
    assert_eq!(store.count_key_packages(&bob).await, Ok((1, true)));
}

// ---------------------------------------------------------------------------------------------
// Durability of the state across reopening
// ---------------------------------------------------------------------------------------------

async fn store_survives_reopen<B: Backend>(backend: B) {
    let limits = StoreLimits::default();
    let alice = user("alice");
    let bob = user("bob");
    let carol = user("carol");
    let g = group("durable");
    let expected_log = {
        let store = backend.open(limits).await;
        group_with_members(&store, &g, &alice, &[&bob, &carol]).await;
        store
            .store_key_packages(
                &bob,
                fresh(vec![b"bob-kp-1".to_vec(), b"bob-kp-2".to_vec()]),
                resort(b"bob-resort"),
            )
            .await
            .expect("key packages");
        store
            .claim_key_package(&bob)
            .await
            .expect("claim")
            .expect("a package");
        for n in 0..20u64 {
            store
                .append(application(
                    &g,
                    &bob,
                    1,
                    message_id(14, n),
                    format!("durable-{n}").as_bytes(),
                ))
                .await
                .expect("append");
        }
        store
            .append(commit(
                &g,
                &alice,
                1,
                message_id(14, 100),
                b"remove carol",
                removing(&[&carol]),
            ))
            .await
            .expect("remove carol");
        store.ack(&alice, &g, 10).await.expect("ack");
        store.ack(&bob, &g, 5).await.expect("ack");
        let log = fetch_all(&store, &alice, &g, 0).await;
        assert_eq!(log.len(), 22);
        log
    };

    let store = backend.open(limits).await;
    assert_eq!(store.user_key(&alice).await, Ok(Some(key("alice", 1))));
    assert_eq!(
        store.register_user(&bob, &key("bob", 1)).await,
        Ok(Registration::AlreadyRegistered)
    );
    assert_eq!(
        store.register_user(&bob, &key("bob", 9)).await,
        Err(StoreError::NameTaken)
    );
    assert_eq!(store.count_key_packages(&bob).await, Ok((1, true)));
    assert_eq!(
        store.create_group(&g, &alice).await,
        Err(StoreError::GroupExists)
    );
    assert_eq!(fetch_all(&store, &alice, &g, 0).await, expected_log);
    assert_eq!(
        memberships_map(store.memberships(&alice).await.expect("memberships")),
        BTreeMap::from([(g.as_bytes().to_vec(), 10)])
    );
    assert_eq!(store.cursor(&bob, &g).await, Ok(Some(5)));
    // Carol, removed at seq 22, still gets everything up to her removal.
    assert_eq!(
        seqs(&fetch_all(&store, &carol, &g, 0).await),
        (1..=22).collect::<Vec<_>>()
    );
    assert_eq!(
        store
            .append(application(&g, &carol, 2, message_id(14, 200), b"x"))
            .await,
        Err(StoreError::NotMember)
    );
    // Idempotency, epoch and sequence survive too.
    let retry = store
        .append(application(&g, &bob, 1, message_id(14, 3), b"durable-3"))
        .await
        .expect("retry after reopen");
    assert_eq!((retry.seq, retry.duplicate), (5, true));
    assert_eq!(
        store
            .append(application(&g, &bob, 1, message_id(14, 300), b"stale"))
            .await,
        Err(StoreError::StaleEpoch { current: 2 })
    );
    let next = store
        .append(application(&g, &bob, 2, message_id(14, 301), b"next"))
        .await
        .expect("append after reopen");
    assert_eq!((next.seq, next.epoch), (23, 2));
    assert_eq!(
        store.claim_key_package(&bob).await,
        Ok(Some(ClaimedKeyPackage {
            key_package: b"bob-kp-2".to_vec(),
            last_resort: false
        }))
    );
    let distinct: BTreeSet<Seq> = seqs(&fetch_all(&store, &alice, &g, 0).await)
        .into_iter()
        .collect();
    assert_eq!(distinct, (1..=23).collect());
}
