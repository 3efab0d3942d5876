//! The PostgreSQL backend, which several DS nodes share (`mlschat-ds --database postgres://…`).
//!
//! - **Ordering across nodes.** An append locks its group's row (`SELECT … FOR UPDATE`) before
//!   it reads the epoch, the last seq and the idempotency record, so two nodes can never hand
//!   out the same seq or let two commits win one epoch.
//! - **Group commit.** Appends go through a queue; a batcher takes whatever is waiting (up to
//!   [`PostgresOptions::max_batch`]) into one transaction, sorted by group id so that
//!   concurrent batches, here or on other nodes, always lock group rows in the same order and
//!   cannot deadlock. A few batches run at once ([`PostgresOptions::batch_workers`]). Every
//!   append is answered only after its transaction committed.
//! - **Cross-node fan-out.** Each append sends `NOTIFY` (delivered at commit) with the group id,
//!   seq and membership change; every node `LISTEN`s on a dedicated connection and passes what
//!   other nodes accepted to its hub ([`Store::remote_appends`]). The sessions' delivery tasks
//!   read the messages themselves from the database, so a lost notification costs latency,
//!   never a message: after the listening connection drops, every session is resynchronised.
//! - **Migrations** are applied at start under an advisory lock, so nodes may start together.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::StreamExt as _;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row, Statement};

use super::url::redact_postgres_url;
use super::{
    AppendRequest, Appended, ClaimedKeyPackage, FetchPage, MemberSpan, Membership, NewKeyPackage,
    Purged, Registration, RemoteAppend, Store, StoreError, StoreLimits, StoredMessage,
    check_append_rules, check_membership_shape, now_unix_secs, payload_hash,
};
use crate::protocol::{DeliveryKind, GroupId, Seq, UserName};

/// The schema version this code writes (table `mlschat_schema`).
const SCHEMA_VERSION: i32 = 2;
/// Key of the advisory lock that serialises migrations of nodes starting together.
const MIGRATION_LOCK: i64 = 0x6d6c_7363_6861_7401;
/// Tag of the advisory lock that lets one node at a time purge (combined with the schema, so
/// that deployments in other schemas of the database purge independently).
const PURGE_LOCK: &str = "mlschat-ds purge";
/// How long connecting to PostgreSQL may take, unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Appends queued beyond this many wait (backpressure on senders).
const APPEND_QUEUE: usize = 4096;
/// Remote appends queued for the hub before they are replaced by one resync of everything.
const REMOTE_QUEUE: usize = 4096;
/// A `NOTIFY` payload must stay below 8000 bytes; a larger one becomes a resync of everything.
const MAX_NOTIFY_PAYLOAD: usize = 7900;

/// Version 1. Columns are named to avoid SQL keywords (`user`, `cursor`); every table that
/// holds group data has `group_id` first in its primary key, so it can be distributed by
/// group id (see docs/operations.md, "Sharding").
const SCHEMA_V1: &str = "
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    signature_key BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE key_packages (
    id BIGSERIAL PRIMARY KEY,
    user_name TEXT NOT NULL,
    data BYTEA NOT NULL,
    last_resort BOOLEAN NOT NULL,
    not_after BIGINT NOT NULL
);
CREATE INDEX key_packages_by_user ON key_packages (user_name, last_resort, id);
CREATE INDEX key_packages_by_expiry ON key_packages (not_after);
CREATE TABLE groups (
    group_id BYTEA PRIMARY KEY,
    epoch BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    stored BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE members (
    group_id BYTEA NOT NULL,
    user_name TEXT NOT NULL,
    joined_seq BIGINT NOT NULL,
    left_seq BIGINT,
    cursor_seq BIGINT NOT NULL,
    PRIMARY KEY (group_id, user_name)
);
CREATE INDEX members_by_user ON members (user_name);
CREATE TABLE messages (
    group_id BYTEA NOT NULL,
    seq BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    kind SMALLINT NOT NULL,
    sender TEXT NOT NULL,
    payload BYTEA NOT NULL,
    welcome BYTEA,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (group_id, seq)
);
CREATE INDEX messages_by_time ON messages (created_at);
CREATE TABLE idempotency (
    group_id BYTEA NOT NULL,
    sender TEXT NOT NULL,
    client_message_id BYTEA NOT NULL,
    seq BIGINT NOT NULL,
    epoch_after BIGINT NOT NULL,
    payload_hash BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (group_id, sender, client_message_id)
);
CREATE INDEX idempotency_by_time ON idempotency (created_at);
";

/// Version 2: one row per membership, not per user and group, as in the SQLite backend's
/// version 6: a member removed and added again before it fetched its removal keeps the rest of
/// its first membership beside the new one. At most one membership per user and group is
/// current.
const SCHEMA_V2: &str = "
ALTER TABLE members DROP CONSTRAINT members_pkey;
ALTER TABLE members ADD PRIMARY KEY (group_id, user_name, joined_seq);
CREATE UNIQUE INDEX members_current ON members (group_id, user_name) WHERE left_seq IS NULL;
";

const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [SCHEMA_V1, SCHEMA_V2];

/// Tuning of the PostgreSQL backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Connections this node keeps to PostgreSQL (reads, writes and batches share them; the
    /// listening connection comes on top).
    pub pool_size: usize,
    /// The most appends one transaction commits together. 1 turns batching off.
    pub max_batch: usize,
    /// Append transactions that may run at once on this node.
    pub batch_workers: usize,
}

impl Default for PostgresOptions {
    fn default() -> PostgresOptions {
        PostgresOptions {
            pool_size: 16,
            max_batch: 256,
            batch_workers: 4,
        }
    }
}

/// The error with its causes: tokio-postgres and the pool print only "db error" or "error
/// connecting to server" themselves, and keep what the server said (a database that does not
/// exist, a refused connection) as their source.
fn backend(error: impl std::error::Error) -> StoreError {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some wrappers repeat their source in their own message.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    StoreError::Backend(text)
}

fn closed() -> StoreError {
    StoreError::Backend("the store is closed".into())
}

/// PostgreSQL stores integers as i64; sequence numbers, epochs and times never come near 2^63.
fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A quoted SQL identifier.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One append waiting for a batch.
struct AppendJob {
    request: AppendRequest,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

struct Inner {
    pool: Pool,
    limits: StoreLimits,
    /// Taken at `close`, which ends the batcher once the queue is empty.
    appends: Mutex<Option<mpsc::Sender<AppendJob>>>,
    batcher: Mutex<Option<JoinHandle<()>>>,
    listener: Mutex<Option<JoinHandle<()>>>,
    remote: Mutex<Option<mpsc::Receiver<RemoteAppend>>>,
    closed: AtomicBool,
    redacted_url: String,
    /// The key of this schema's purge lock.
    purge_lock: i64,
}

/// The PostgreSQL [`Store`]. Cheap to clone; every clone is the same store.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SECURITY: never the password of the URL.
        formatter
            .debug_struct("PostgresStore")
            .field("url", &self.inner.redacted_url)
            .finish()
    }
}

/// Where a node sends and hears notifications: one channel per schema, so that deployments
/// (or tests) sharing a database in different schemas do not hear each other. Channel names
/// are identifiers of at most 63 bytes; a truncated name shared by two schemas only costs
/// spurious wake-ups (the payload's group ids exist in one of them).
fn channel_name(schema: &str) -> String {
    let mut channel = format!("mlschat_ds.{schema}");
    while channel.len() > 63 {
        channel.pop();
    }
    channel
}

impl PostgresStore {
    /// Connects to `url`, applies migrations (in the first schema of the `search_path`),
    /// starts listening for other nodes' appends and starts the append batcher.
    pub async fn connect(
        url: &str,
        limits: StoreLimits,
        options: PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        let redacted_url = redact_postgres_url(url);
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|error| StoreError::Backend(format!("invalid PostgreSQL URL: {error}")))?;
        // Without a timeout an unreachable database (a failover in progress, a dropped route)
        // would hold requests for as long as the operating system retries TCP.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                // A connection that failed is dropped by the pool; checking each one before
                // use would cost a round trip per request.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .build()
            .map_err(backend)?;
        let schema = migrate(&pool).await?;
        let channel = channel_name(&schema);
        let purge_lock = {
            let digest = payload_hash(format!("{PURGE_LOCK} {schema}").as_bytes());
            i64::from_be_bytes([
                digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6],
                digest[7],
            ])
        };
        let node_id: u64 = rand::random();

        let (remote_sender, remote) = mpsc::channel(REMOTE_QUEUE);
        // The first LISTEN is in place before `connect` returns, so that no session of this
        // node can miss a notification sent after it attached.
        let listening = listen_once(&config, &channel).await?;
        let listener = tokio::spawn(listen(
            config,
            channel.clone(),
            node_id,
            remote_sender,
            listening,
        ));

        let (appends, queue) = mpsc::channel(APPEND_QUEUE);
        let batcher = tokio::spawn(batch_appends(
            pool.clone(),
            limits,
            queue,
            options,
            Arc::new(channel),
            node_id,
        ));
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                limits,
                appends: Mutex::new(Some(appends)),
                batcher: Mutex::new(Some(batcher)),
                listener: Mutex::new(Some(listener)),
                remote: Mutex::new(Some(remote)),
                closed: AtomicBool::new(false),
                redacted_url,
                purge_lock,
            }),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(closed());
        }
        self.inner.pool.get().await.map_err(backend)
    }
}

/// Creates or upgrades the schema; returns the schema's name.
async fn migrate(pool: &Pool) -> Result<String, StoreError> {
    let mut client = pool.get().await.map_err(backend)?;
    let transaction = client.transaction().await.map_err(backend)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(backend)?;
    let schema: Option<String> = transaction
        .query_one("SELECT current_schema()::text", &[])
        .await
        .map_err(backend)?
        .get(0);
    let Some(schema) = schema else {
        return Err(StoreError::Backend(
            "no schema on the search_path exists; create it first".into(),
        ));
    };
    transaction
        .batch_execute("CREATE TABLE IF NOT EXISTS mlschat_schema (version INTEGER NOT NULL)")
        .await
        .map_err(backend)?;
    let version: i32 = transaction
        .query_opt("SELECT version FROM mlschat_schema", &[])
        .await
        .map_err(backend)?
        .map_or(0, |row| row.get(0));
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "database schema version {version} is newer than this mlschat-ds understands ({SCHEMA_VERSION})"
        )));
    }
    if version < SCHEMA_VERSION {
        for migration in &MIGRATIONS[usize::try_from(version).unwrap_or(0)..] {
            transaction
                .batch_execute(migration)
                .await
                .map_err(backend)?;
        }
        transaction
            .execute("DELETE FROM mlschat_schema", &[])
            .await
            .map_err(backend)?;
        transaction
            .execute(
                "INSERT INTO mlschat_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(backend)?;
    }
    transaction.commit().await.map_err(backend)?;
    Ok(schema)
}

// ---------------------------------------------------------------------------------------------
// Cross-node notifications

/// A listening connection: notifications arrive on the receiver until the connection ends.
struct Listening {
    /// Keeps the connection open.
    _client: tokio_postgres::Client,
    notifications: mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    driver: JoinHandle<()>,
}

async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
) -> Result<Listening, StoreError> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(backend)?;
    let (forward, notifications) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages =
            futures::stream::poll_fn(move |context| connection.poll_message(context));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(notification)) => {
                    if forward.send(notification).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "the PostgreSQL listening connection failed");
                    return;
                }
            }
        }
    });
    let listened = client
        .batch_execute(&format!("LISTEN {}", quote_identifier(channel)))
        .await;
    if let Err(error) = listened {
        driver.abort();
        return Err(backend(error));
    }
    Ok(Listening {
        _client: client,
        notifications,
        driver,
    })
}

/// Passes other nodes' appends to the hub, reconnecting (with a resync of everything, since
/// notifications sent meanwhile are lost) whenever the listening connection drops. Ends when
/// the store is gone.
async fn listen(
    config: tokio_postgres::Config,
    channel: String,
    node_id: u64,
    out: mpsc::Sender<RemoteAppend>,
    first: Listening,
) {
    let mut listening = Some(first);
    let mut lost = false;
    loop {
        if let Some(mut current) = listening.take() {
            loop {
                let notification = tokio::select! {
                    notification = current.notifications.recv() => notification,
                    () = out.closed() => {
                        current.driver.abort();
                        return;
                    }
                };
                let Some(notification) = notification else {
                    break;
                };
                if let Some(remote) = parse_notification(notification.payload(), node_id) {
                    forward(&out, remote, &mut lost);
                }
            }
            current.driver.abort();
            tracing::warn!("lost the PostgreSQL listening connection; reconnecting");
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = out.closed() => return,
        }
        match listen_once(&config, &channel).await {
            Ok(again) => {
                tracing::info!("listening for other nodes again; resynchronising every session");
                forward(&out, RemoteAppend::ResyncAll, &mut lost);
                listening = Some(again);
            }
            Err(failure) => tracing::warn!(%failure, "cannot listen for other nodes yet"),
        }
    }
}

/// Queues a remote append without ever blocking the listener: when the hub falls behind, the
/// dropped items are replaced by one resync of everything.
fn forward(out: &mpsc::Sender<RemoteAppend>, remote: RemoteAppend, lost: &mut bool) {
    if *lost && out.try_send(RemoteAppend::ResyncAll).is_ok() {
        *lost = false;
    }
    if !*lost && out.try_send(remote).is_err() {
        *lost = true;
    }
}

/// `NODE:GROUP_HEX:SEQ:ADDED:REMOVED` (names comma-separated) or `NODE:resync`, NODE in hex.
fn notification_payload(
    node_id: u64,
    group_id: &GroupId,
    seq: Seq,
    added: &[UserName],
    removed: &[UserName],
) -> String {
    let join = |names: &[UserName]| {
        names
            .iter()
            .map(UserName::as_str)
            .collect::<Vec<_>>()
            .join(",")
    };
    let payload = format!(
        "{node_id:x}:{}:{seq}:{}:{}",
        hex::encode(group_id.as_bytes()),
        join(added),
        join(removed)
    );
    if payload.len() <= MAX_NOTIFY_PAYLOAD {
        payload
    } else {
        format!("{node_id:x}:resync")
    }
}

/// What another node announced; `None` for this node's own notifications. A payload this
/// version cannot read asks for a resync, which is always correct.
fn parse_notification(payload: &str, node_id: u64) -> Option<RemoteAppend> {
    let mut fields = payload.split(':');
    let sender = fields
        .next()
        .and_then(|node| u64::from_str_radix(node, 16).ok());
    if sender == Some(node_id) {
        return None;
    }
    let names = |field: Option<&str>| -> Option<Vec<UserName>> {
        field?
            .split(',')
            .filter(|name| !name.is_empty())
            .map(|name| UserName::new(name).ok())
            .collect()
    };
    let parsed = (|| {
        let group_id = GroupId::new(hex::decode(fields.next()?).ok()?).ok()?;
        let seq = fields.next()?.parse().ok()?;
        let added = names(fields.next())?;
        let removed = names(fields.next())?;
        Some(RemoteAppend::Appended {
            group_id,
            seq,
            added,
            removed,
        })
    })();
    Some(parsed.unwrap_or(RemoteAppend::ResyncAll))
}

// ---------------------------------------------------------------------------------------------
// Appends

/// Collects queued appends into batches and runs up to `batch_workers` of them at once. Ends
/// when every sender is gone, after the batches in flight finished.
async fn batch_appends(
    pool: Pool,
    limits: StoreLimits,
    mut queue: mpsc::Receiver<AppendJob>,
    options: PostgresOptions,
    channel: Arc<String>,
    node_id: u64,
) {
    let workers = options.batch_workers.max(1);
    let permits = Arc::new(Semaphore::new(workers));
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < options.max_batch.max(1) {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let pool = pool.clone();
        let channel = Arc::clone(&channel);
        tokio::spawn(async move {
            run_batch(&pool, &limits, batch, &channel, node_id).await;
            drop(permit);
        });
    }
    let _ = permits
        .acquire_many(u32::try_from(workers).unwrap_or(1))
        .await;
}

/// Runs a batch in one transaction and answers every append once it committed.
async fn run_batch(
    pool: &Pool,
    limits: &StoreLimits,
    mut batch: Vec<AppendJob>,
    channel: &str,
    node_id: u64,
) {
    // The same lock order in every transaction on every node: no deadlocks between batches.
    batch.sort_by(|a, b| {
        a.request
            .group_id
            .as_bytes()
            .cmp(b.request.group_id.as_bytes())
    });
    let outcomes = match execute_batch(pool, limits, &batch, channel, node_id).await {
        Ok(outcomes) => outcomes,
        Err(failure) => {
            tracing::error!(%failure, appends = batch.len(), "an append batch failed");
            batch.iter().map(|_| Err(failure.clone())).collect()
        }
    };
    for (job, outcome) in batch.into_iter().zip(outcomes) {
        // The requester may have gone away; the write stands regardless.
        let _ = job.reply.send(outcome);
    }
}

async fn execute_batch(
    pool: &Pool,
    limits: &StoreLimits,
    batch: &[AppendJob],
    channel: &str,
    node_id: u64,
) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
    let mut client = pool.get().await.map_err(backend)?;
    let transaction = client.transaction().await.map_err(backend)?;
    let statements = Statements::prepare(&transaction).await?;
    match run_appends(&transaction, &statements, limits, batch, channel, node_id).await {
        Ok(outcomes) => {
            transaction.commit().await.map_err(backend)?;
            Ok(outcomes)
        }
        Err(failure) => {
            // A database error aborts the whole transaction (PostgreSQL refuses every later
            // statement, and COMMIT would silently roll back), so the batch fails as one.
            let _ = transaction.rollback().await;
            Err(failure)
        }
    }
}

/// Runs the batch's appends inside `transaction`; a database error fails them all.
async fn run_appends(
    transaction: &deadpool_postgres::Transaction<'_>,
    statements: &Statements,
    limits: &StoreLimits,
    batch: &[AppendJob],
    channel: &str,
    node_id: u64,
) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
    // The writes of one append are sent together with the checks of the next, so that an
    // append costs one round trip: PostgreSQL runs them in the order they were sent, so the
    // checks see the writes. `checked` holds what each pending write borrows.
    let checked: Vec<OnceLock<Checked>> = batch.iter().map(|_| OnceLock::new()).collect();
    let mut pending: Option<Pending<'_>> = None;
    let mut outcomes = Vec::with_capacity(batch.len());
    for (job, slot) in batch.iter().zip(&checked) {
        let checking = check(transaction, statements, limits, &job.request);
        let (written, outcome) = match pending.take() {
            Some(writing) => futures::join!(writing, checking),
            None => (Ok(0), checking.await),
        };
        written.map_err(backend)?;
        if let Err(StoreError::Backend(detail)) = &outcome {
            return Err(StoreError::Backend(detail.clone()));
        }
        match outcome {
            Ok(Check::Duplicate(appended)) => outcomes.push(Ok(appended)),
            Ok(Check::Write(new)) => {
                outcomes.push(Ok(Appended {
                    seq: new.seq,
                    epoch: new.epoch_after,
                    duplicate: false,
                    added: new.change.added.clone(),
                    removed: new.change.removed.clone(),
                }));
                let _ = slot.set(new);
                if let Some(new) = slot.get() {
                    pending = Some(Box::pin(write(
                        transaction,
                        statements,
                        &job.request,
                        new,
                        channel,
                        node_id,
                    )));
                }
            }
            Err(refused) => outcomes.push(Err(refused)),
        }
    }
    if let Some(writing) = pending {
        writing.await.map_err(backend)?;
    }
    Ok(outcomes)
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// One statement parameter.
type Param<'a> = &'a (dyn ToSql + Sync);

/// The statements of an append, prepared once per connection (deadpool caches them).
struct Statements {
    lock: Statement,
    previous: Statement,
    member: Statement,
    user: Statement,
    insert_message: Statement,
    insert_record: Statement,
    update_group: Statement,
    remove: Statement,
    add: Statement,
    notify: Statement,
}

impl Statements {
    async fn prepare(
        transaction: &deadpool_postgres::Transaction<'_>,
    ) -> Result<Statements, StoreError> {
        let prepare = |sql: &'static str| async move {
            transaction.prepare_cached(sql).await.map_err(backend)
        };
        Ok(Statements {
            lock: prepare(
                "SELECT epoch, last_seq, stored FROM groups WHERE group_id = $1 FOR UPDATE",
            )
            .await?,
            previous: prepare(
                "SELECT seq, epoch_after, payload_hash FROM idempotency
                 WHERE group_id = $1 AND sender = $2 AND client_message_id = $3",
            )
            .await?,
            // The current membership only; earlier ones may still be waiting to be fetched.
            member: prepare(
                "SELECT left_seq FROM members
                 WHERE group_id = $1 AND user_name = $2 AND left_seq IS NULL",
            )
            .await?,
            user: prepare("SELECT 1 FROM users WHERE name = $1").await?,
            insert_message: prepare(
                "INSERT INTO messages (group_id, seq, epoch, kind, sender, payload, welcome, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .await?,
            insert_record: prepare(
                "INSERT INTO idempotency
                 (group_id, sender, client_message_id, seq, epoch_after, payload_hash, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await?,
            update_group: prepare(
                "UPDATE groups SET epoch = $2, last_seq = $3, stored = stored + 1 WHERE group_id = $1",
            )
            .await?,
            remove: prepare(
                "UPDATE members SET left_seq = $3
                 WHERE group_id = $1 AND user_name = $2 AND left_seq IS NULL",
            )
            .await?,
            add: prepare(
                // A membership that ended before its member fetched its removal stays beside
                // this one (schema version 2).
                "INSERT INTO members (group_id, user_name, joined_seq, left_seq, cursor_seq)
                 VALUES ($1, $2, $3, NULL, $4)",
            )
            .await?,
            notify: prepare("SELECT pg_notify($1, $2)").await?,
        })
    }
}

/// What the checks of an append decided.
enum Check {
    /// A retry: the original answer, nothing to write.
    Duplicate(Appended),
    Write(Checked),
}

/// An append that passed every check, with what its writes need.
struct Checked {
    seq: Seq,
    epoch_after: u64,
    change: super::MembershipChange,
    hash: [u8; 32],
    now: i64,
}

/// The checks of one append, in the order of the SQLite backend. Nothing is written, so a
/// refused append leaves nothing behind. Independent reads are pipelined (one round trip).
async fn check(
    transaction: &deadpool_postgres::Transaction<'_>,
    statements: &Statements,
    limits: &StoreLimits,
    request: &AppendRequest,
) -> Result<Check, StoreError> {
    let group_id = request.group_id.as_bytes();
    let sender = request.sender.as_str();
    let hash = payload_hash(&request.payload);
    let client_message_id = &request.client_message_id[..];
    let lock_params: [Param<'_>; 1] = [&group_id];
    let previous_params: [Param<'_>; 3] = [&group_id, &sender, &client_message_id];
    let member_params: [Param<'_>; 2] = [&group_id, &sender];
    // PostgreSQL runs pipelined statements in order: the group's lock is taken first, and the
    // reads after it see everything committed before it was granted (READ COMMITTED takes a
    // new snapshot per statement).
    let (group, previous, sender_row) = futures::try_join!(
        transaction.query_opt(&statements.lock, &lock_params),
        transaction.query_opt(&statements.previous, &previous_params),
        transaction.query_opt(&statements.member, &member_params),
    )
    .map_err(backend)?;

    // Idempotency first: a retry gets the original answer whatever happened since.
    if let Some(previous) = previous {
        let seq = from_sql(previous.get(0));
        let stored_hash: Vec<u8> = previous.get(2);
        // SECURITY: answering a different message with the first one's seq would acknowledge
        // a message the DS never stored.
        if stored_hash != hash {
            return Err(StoreError::ReusedMessageId { seq });
        }
        return Ok(Check::Duplicate(Appended {
            seq,
            epoch: from_sql(previous.get(1)),
            duplicate: true,
            added: Vec::new(),
            removed: Vec::new(),
        }));
    }
    let Some(group) = group else {
        return Err(StoreError::UnknownGroup);
    };
    let (epoch, last_seq, stored) = (
        from_sql(group.get(0)),
        from_sql(group.get(1)),
        from_sql(group.get(2)),
    );
    if !matches!(&sender_row, Some(row) if row.get::<_, Option<i64>>(0).is_none()) {
        return Err(StoreError::NotMember);
    }
    let change = check_append_rules(request, epoch, stored, limits)?;
    check_membership_shape(request, &change)?;
    if !change.added.is_empty() || !change.removed.is_empty() {
        validate_membership_change(transaction, statements, group_id, &change).await?;
    }
    Ok(Check::Write(Checked {
        seq: last_seq + 1,
        epoch_after: if request.kind == DeliveryKind::Commit {
            epoch + 1
        } else {
            epoch
        },
        change,
        hash,
        now: now_unix_secs(),
    }))
}

/// The writes of one checked append, sent together (one round trip).
async fn write(
    transaction: &deadpool_postgres::Transaction<'_>,
    statements: &Statements,
    request: &AppendRequest,
    checked: &Checked,
    channel: &str,
    node_id: u64,
) -> Result<u64, tokio_postgres::Error> {
    let group_id = request.group_id.as_bytes();
    let sender = request.sender.as_str();
    let client_message_id = &request.client_message_id[..];
    let seq = to_sql(checked.seq);
    let joined_cursor = to_sql(checked.seq - 1);
    let message_epoch = to_sql(request.epoch);
    let epoch_after = to_sql(checked.epoch_after);
    let kind = request.kind as i16;
    let hash = &checked.hash[..];
    let welcome = checked.change.welcome.as_deref();
    let payload = notification_payload(
        node_id,
        &request.group_id,
        checked.seq,
        &checked.change.added,
        &checked.change.removed,
    );
    let removed: Vec<&str> = checked
        .change
        .removed
        .iter()
        .map(UserName::as_str)
        .collect();
    let added: Vec<&str> = checked.change.added.iter().map(UserName::as_str).collect();
    let message_params: [Param<'_>; 8] = [
        &group_id,
        &seq,
        &message_epoch,
        &kind,
        &sender,
        &request.payload,
        &welcome,
        &checked.now,
    ];
    let record_params: [Param<'_>; 7] = [
        &group_id,
        &sender,
        &client_message_id,
        &seq,
        &epoch_after,
        &hash,
        &checked.now,
    ];
    let group_params: [Param<'_>; 3] = [&group_id, &epoch_after, &seq];
    let remove_params: Vec<[Param<'_>; 3]> = removed
        .iter()
        .map(|user| -> [Param<'_>; 3] { [&group_id, user, &seq] })
        .collect();
    let add_params: Vec<[Param<'_>; 4]> = added
        .iter()
        .map(|user| -> [Param<'_>; 4] { [&group_id, user, &seq, &joined_cursor] })
        .collect();
    let notify_params: [Param<'_>; 2] = [&channel, &payload];
    let mut writes: Vec<Pending<'_>> = vec![
        Box::pin(transaction.execute(&statements.insert_message, &message_params)),
        Box::pin(transaction.execute(&statements.insert_record, &record_params)),
        Box::pin(transaction.execute(&statements.update_group, &group_params)),
    ];
    for params in &remove_params {
        writes.push(Box::pin(transaction.execute(&statements.remove, params)));
    }
    for params in &add_params {
        writes.push(Box::pin(transaction.execute(&statements.add, params)));
    }
    // Delivered to the listening nodes only if the transaction commits.
    writes.push(Box::pin(
        transaction.execute(&statements.notify, &notify_params),
    ));
    let written = futures::future::try_join_all(writes).await?;
    Ok(written.into_iter().sum())
}

/// The database checks of a membership change: removed users are current members, added ones
/// are registered and not current members.
async fn validate_membership_change(
    transaction: &deadpool_postgres::Transaction<'_>,
    statements: &Statements,
    group_id: &[u8],
    change: &super::MembershipChange,
) -> Result<(), StoreError> {
    let (member, user) = (&statements.member, &statements.user);
    let is_active =
        |row: &Option<Row>| matches!(row, Some(row) if row.get::<_, Option<i64>>(0).is_none());
    let removed: Vec<&str> = change.removed.iter().map(UserName::as_str).collect();
    let added: Vec<&str> = change.added.iter().map(UserName::as_str).collect();
    let removed_params: Vec<[Param<'_>; 2]> = removed
        .iter()
        .map(|name| -> [Param<'_>; 2] { [&group_id, name] })
        .collect();
    let added_params: Vec<[Param<'_>; 2]> = added
        .iter()
        .map(|name| -> [Param<'_>; 2] { [&group_id, name] })
        .collect();
    let user_params: Vec<[Param<'_>; 1]> = added
        .iter()
        .map(|name| -> [Param<'_>; 1] { [name] })
        .collect();
    let removed_rows = futures::future::try_join_all(
        removed_params
            .iter()
            .map(|params| transaction.query_opt(member, params)),
    );
    let added_users = futures::future::try_join_all(
        user_params
            .iter()
            .map(|params| transaction.query_opt(user, params)),
    );
    let added_rows = futures::future::try_join_all(
        added_params
            .iter()
            .map(|params| transaction.query_opt(member, params)),
    );
    let (removed_rows, added_users, added_rows) =
        futures::try_join!(removed_rows, added_users, added_rows).map_err(backend)?;
    for (name, row) in change.removed.iter().zip(&removed_rows) {
        if !is_active(row) {
            return Err(StoreError::InvalidMembership(format!(
                "{name} is not a member"
            )));
        }
    }
    for ((name, exists), row) in change.added.iter().zip(&added_users).zip(&added_rows) {
        if exists.is_none() {
            return Err(StoreError::UnknownUser(name.clone()));
        }
        if is_active(row) {
            return Err(StoreError::InvalidMembership(format!(
                "{name} is already a member"
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The trait

impl Store for PostgresStore {
    async fn register_user(
        &self,
        name: &UserName,
        signature_key: &[u8],
    ) -> Result<Registration, StoreError> {
        let client = self.client().await?;
        // ON CONFLICT makes concurrent registrations of one name (on any node) pick one key.
        let inserted = client
            .query_opt(
                "INSERT INTO users (name, signature_key, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING RETURNING name",
                &[&name.as_str(), &signature_key, &now_unix_secs()],
            )
            .await
            .map_err(backend)?;
        if inserted.is_some() {
            return Ok(Registration::Created);
        }
        let existing: Vec<u8> = client
            .query_one(
                "SELECT signature_key FROM users WHERE name = $1",
                &[&name.as_str()],
            )
            .await
            .map_err(backend)?
            .get(0);
        if existing == signature_key {
            Ok(Registration::AlreadyRegistered)
        } else {
            Err(StoreError::NameTaken)
        }
    }

    async fn user_key(&self, name: &UserName) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT signature_key FROM users WHERE name = $1")
            .await
            .map_err(backend)?;
        Ok(client
            .query_opt(&statement, &[&name.as_str()])
            .await
            .map_err(backend)?
            .map(|row| row.get(0)))
    }

    async fn store_key_packages(
        &self,
        user: &UserName,
        key_packages: Vec<NewKeyPackage>,
        last_resort: Option<NewKeyPackage>,
    ) -> Result<u32, StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(backend)?;
        let user = user.as_str();
        let now = now_unix_secs();
        // The user's row serialises concurrent uploads, so the quota holds across nodes.
        transaction
            .query_opt("SELECT 1 FROM users WHERE name = $1 FOR UPDATE", &[&user])
            .await
            .map_err(backend)?;
        // Expired packages can never be handed out: drop them so they do not use the quota.
        transaction
            .execute(
                "DELETE FROM key_packages WHERE user_name = $1 AND not_after <= $2",
                &[&user, &now],
            )
            .await
            .map_err(backend)?;
        let stored: i64 = transaction
            .query_one(
                "SELECT COUNT(*) FROM key_packages WHERE user_name = $1 AND NOT last_resort",
                &[&user],
            )
            .await
            .map_err(backend)?
            .get(0);
        let stored = from_sql(stored);
        let total = stored + key_packages.len() as u64;
        let limit = u64::from(self.inner.limits.max_key_packages_per_user);
        if total > limit {
            return Err(StoreError::QuotaExceeded(format!(
                "at most {limit} unclaimed KeyPackages per user ({stored} stored)"
            )));
        }
        let insert = transaction
            .prepare_cached(
                "INSERT INTO key_packages (user_name, data, last_resort, not_after)
                 VALUES ($1, $2, $3, $4)",
            )
            .await
            .map_err(backend)?;
        for key_package in &key_packages {
            transaction
                .execute(
                    &insert,
                    &[
                        &user,
                        &key_package.key_package,
                        &false,
                        &to_sql(key_package.not_after),
                    ],
                )
                .await
                .map_err(backend)?;
        }
        if let Some(last_resort) = &last_resort {
            transaction
                .execute(
                    "DELETE FROM key_packages WHERE user_name = $1 AND last_resort",
                    &[&user],
                )
                .await
                .map_err(backend)?;
            transaction
                .execute(
                    &insert,
                    &[
                        &user,
                        &last_resort.key_package,
                        &true,
                        &to_sql(last_resort.not_after),
                    ],
                )
                .await
                .map_err(backend)?;
        }
        transaction.commit().await.map_err(backend)?;
        Ok(u32::try_from(total).unwrap_or(u32::MAX))
    }

    async fn claim_key_package(
        &self,
        user: &UserName,
    ) -> Result<Option<ClaimedKeyPackage>, StoreError> {
        let client = self.client().await?;
        let name = user.as_str();
        let now = now_unix_secs();
        let exists = client
            .query_opt("SELECT 1 FROM users WHERE name = $1", &[&name])
            .await
            .map_err(backend)?;
        if exists.is_none() {
            return Err(StoreError::UnknownUser(user.clone()));
        }
        // Deleted by the statement that hands it out: claimed exactly once. SKIP LOCKED lets
        // concurrent claims (on any node) take the next package instead of waiting for a row
        // another claim is deleting, and then finding nothing.
        let claimed = client
            .query_opt(
                "DELETE FROM key_packages WHERE id = (
                     SELECT id FROM key_packages
                     WHERE user_name = $1 AND NOT last_resort AND not_after > $2
                     ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING data",
                &[&name, &now],
            )
            .await
            .map_err(backend)?;
        if let Some(row) = claimed {
            return Ok(Some(ClaimedKeyPackage {
                key_package: row.get(0),
                last_resort: false,
            }));
        }
        let last_resort = client
            .query_opt(
                "SELECT data FROM key_packages WHERE user_name = $1 AND last_resort AND not_after > $2",
                &[&name, &now],
            )
            .await
            .map_err(backend)?;
        Ok(last_resort.map(|row| ClaimedKeyPackage {
            key_package: row.get(0),
            last_resort: true,
        }))
    }

    async fn count_key_packages(&self, user: &UserName) -> Result<(u32, bool), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE NOT last_resort), COUNT(*) FILTER (WHERE last_resort)
                 FROM key_packages WHERE user_name = $1 AND not_after > $2",
                &[&user.as_str(), &now_unix_secs()],
            )
            .await
            .map_err(backend)?;
        let unclaimed: i64 = row.get(0);
        let last_resort: i64 = row.get(1);
        Ok((u32::try_from(unclaimed).unwrap_or(0), last_resort > 0))
    }

    async fn create_group(&self, group_id: &GroupId, creator: &UserName) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(backend)?;
        let created = transaction
            .query_opt(
                "INSERT INTO groups (group_id, epoch, last_seq, stored, created_at)
                 VALUES ($1, 0, 0, 0, $2) ON CONFLICT (group_id) DO NOTHING RETURNING group_id",
                &[&group_id.as_bytes(), &now_unix_secs()],
            )
            .await
            .map_err(backend)?;
        if created.is_none() {
            return Err(StoreError::GroupExists);
        }
        transaction
            .execute(
                "INSERT INTO members (group_id, user_name, joined_seq, left_seq, cursor_seq)
                 VALUES ($1, $2, 0, NULL, 0)",
                &[&group_id.as_bytes(), &creator.as_str()],
            )
            .await
            .map_err(backend)?;
        transaction.commit().await.map_err(backend)
    }

    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        let sender = self
            .inner
            .appends
            .lock()
            .ok()
            .and_then(|appends| appends.clone())
            .ok_or_else(closed)?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(AppendJob { request, reply })
            .await
            .map_err(|_| closed())?;
        answer
            .await
            .map_err(|_| StoreError::Backend("the append batcher stopped".into()))?
    }

    async fn memberships(&self, user: &UserName) -> Result<Vec<Membership>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT group_id, MIN(cursor_seq) FROM members WHERE user_name = $1
                 GROUP BY group_id",
            )
            .await
            .map_err(backend)?;
        let rows = client
            .query(&statement, &[&user.as_str()])
            .await
            .map_err(backend)?;
        rows.into_iter()
            .map(|row| {
                let group_id = GroupId::new(row.get::<_, Vec<u8>>(0)).map_err(backend)?;
                Ok(Membership {
                    group_id,
                    cursor: from_sql(row.get(1)),
                })
            })
            .collect()
    }

    async fn cursor(&self, user: &UserName, group_id: &GroupId) -> Result<Option<Seq>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT MIN(cursor_seq) FROM members WHERE group_id = $1 AND user_name = $2",
            )
            .await
            .map_err(backend)?;
        let cursor: Option<i64> = client
            .query_one(&statement, &[&group_id.as_bytes(), &user.as_str()])
            .await
            .map_err(backend)?
            .get(0);
        Ok(cursor.map(from_sql))
    }

    async fn fetch(
        &self,
        user: &UserName,
        group_id: &GroupId,
        after_seq: Seq,
        limit: u32,
    ) -> Result<FetchPage, StoreError> {
        let client = self.client().await?;
        let member = client
            .prepare_cached(
                "SELECT joined_seq, left_seq, cursor_seq FROM members
                 WHERE group_id = $1 AND user_name = $2 ORDER BY joined_seq",
            )
            .await
            .map_err(backend)?;
        let spans: Vec<MemberSpan> = client
            .query(&member, &[&group_id.as_bytes(), &user.as_str()])
            .await
            .map_err(backend)?
            .into_iter()
            .map(|row| MemberSpan {
                joined_seq: from_sql(row.get(0)),
                left_seq: row.get::<_, Option<i64>>(1).map(from_sql),
                cursor: from_sql(row.get(2)),
            })
            .collect();
        if spans.is_empty() {
            return Err(StoreError::NotMember);
        }
        let limit = u64::from(limit.max(1));
        let statement = client
            .prepare_cached(
                "SELECT seq, epoch, kind, sender, payload, welcome FROM messages
                 WHERE group_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
            )
            .await
            .map_err(backend)?;
        let mut page = FetchPage {
            deliveries: Vec::new(),
            more: false,
        };
        for span in spans {
            let Some((start, end)) = span.range_after(after_seq) else {
                continue;
            };
            let rows = client
                .query(
                    &statement,
                    &[
                        &group_id.as_bytes(),
                        &to_sql(start),
                        &to_sql(end),
                        &to_sql(page.rows_to_read(limit)),
                    ],
                )
                .await
                .map_err(backend)?;
            for row in rows {
                let stored = StoredMessage {
                    seq: from_sql(row.get(0)),
                    epoch: from_sql(row.get(1)),
                    kind: i64::from(row.get::<_, i16>(2)),
                    sender: row.get(3),
                    payload: row.get(4),
                    welcome: row.get(5),
                };
                if page.push(group_id, &span, stored, limit)? {
                    return Ok(page);
                }
            }
        }
        Ok(page)
    }

    async fn ack(&self, user: &UserName, group_id: &GroupId, seq: Seq) -> Result<(), StoreError> {
        let client = self.client().await?;
        let advance = client
            .prepare_cached(
                "UPDATE members SET cursor_seq = GREATEST(cursor_seq, LEAST($3, COALESCE(left_seq,
                    (SELECT last_seq FROM groups WHERE groups.group_id = members.group_id))))
                 WHERE group_id = $1 AND user_name = $2",
            )
            .await
            .map_err(backend)?;
        client
            .execute(
                &advance,
                &[&group_id.as_bytes(), &user.as_str(), &to_sql(seq)],
            )
            .await
            .map_err(backend)?;
        // A removed member that has everything up to its removal no longer needs a cursor.
        let release = client
            .prepare_cached(
                "DELETE FROM members WHERE group_id = $1 AND user_name = $2
                 AND left_seq IS NOT NULL AND cursor_seq >= left_seq",
            )
            .await
            .map_err(backend)?;
        client
            .execute(&release, &[&group_id.as_bytes(), &user.as_str()])
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn purge(&self, expire_before_unix_secs: i64) -> Result<Purged, StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(backend)?;
        // Nodes purge on their own timers; one purge at a time is enough.
        let ours: bool = transaction
            .query_one(
                "SELECT pg_try_advisory_xact_lock($1)",
                &[&self.inner.purge_lock],
            )
            .await
            .map_err(backend)?
            .get(0);
        if !ours {
            return Ok(Purged::default());
        }
        let expired = transaction
            .query(
                "DELETE FROM messages WHERE created_at < $1 RETURNING group_id",
                &[&expire_before_unix_secs],
            )
            .await
            .map_err(backend)?;
        // As in the SQLite backend: every member that may still receive a message must have
        // acknowledged it; a removed member only holds its window (cursor, left_seq].
        let delivered = transaction
            .query(
                "DELETE FROM messages m
                 WHERE m.seq <= (SELECT MIN(a.cursor_seq) FROM members a
                                 WHERE a.group_id = m.group_id AND a.left_seq IS NULL)
                   AND NOT EXISTS (SELECT 1 FROM members r
                                   WHERE r.group_id = m.group_id AND r.left_seq IS NOT NULL
                                     AND r.cursor_seq < m.seq AND m.seq <= r.left_seq)
                 RETURNING m.group_id",
                &[],
            )
            .await
            .map_err(backend)?;
        let messages = (expired.len() + delivered.len()) as u64;
        let mut per_group: HashMap<Vec<u8>, i64> = HashMap::new();
        for row in expired.iter().chain(&delivered) {
            *per_group.entry(row.get(0)).or_default() += 1;
        }
        let mut per_group: Vec<(Vec<u8>, i64)> = per_group.into_iter().collect();
        // Group rows are locked in the order appends lock them: no deadlock with a batch.
        per_group.sort();
        for (group_id, deleted) in &per_group {
            transaction
                .execute(
                    "UPDATE groups SET stored = GREATEST(stored - $2, 0) WHERE group_id = $1",
                    &[group_id, deleted],
                )
                .await
                .map_err(backend)?;
        }
        transaction.commit().await.map_err(backend)?;
        // Each of these is one statement and touches no group row.
        let memberships = client
            .execute(
                "DELETE FROM members WHERE left_seq IS NOT NULL AND (cursor_seq >= left_seq OR NOT EXISTS
                    (SELECT 1 FROM messages WHERE messages.group_id = members.group_id
                        AND messages.seq > members.cursor_seq AND messages.seq <= members.left_seq))",
                &[],
            )
            .await
            .map_err(backend)?;
        let key_packages = client
            .execute(
                "DELETE FROM key_packages WHERE not_after <= $1",
                &[&now_unix_secs()],
            )
            .await
            .map_err(backend)?;
        let idempotency_records = client
            .execute(
                "DELETE FROM idempotency WHERE created_at < $1",
                &[&expire_before_unix_secs],
            )
            .await
            .map_err(backend)?;
        Ok(Purged {
            messages,
            memberships,
            key_packages,
            idempotency_records,
        })
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        // Without its sender the batcher ends once the queue is empty and the batches in
        // flight committed.
        drop(
            self.inner
                .appends
                .lock()
                .ok()
                .and_then(|mut appends| appends.take()),
        );
        let batcher = self
            .inner
            .batcher
            .lock()
            .ok()
            .and_then(|mut batcher| batcher.take());
        if let Some(batcher) = batcher
            && batcher.await.is_err()
        {
            tracing::error!("the append batcher did not end cleanly");
        }
        let listener = self
            .inner
            .listener
            .lock()
            .ok()
            .and_then(|mut listener| listener.take());
        if let Some(listener) = listener {
            listener.abort();
        }
        self.inner.pool.close();
    }

    fn remote_appends(&self) -> Option<mpsc::Receiver<RemoteAppend>> {
        self.inner
            .remote
            .lock()
            .ok()
            .and_then(|mut remote| remote.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> UserName {
        UserName::new(text).expect("valid name")
    }

    #[test]
    fn notifications_round_trip_and_skip_our_own() {
        let group_id = GroupId::new(vec![0, 1, 0xff]).expect("group id");
        let payload = notification_payload(7, &group_id, 42, &[name("bob"), name("c.d")], &[]);
        assert_eq!(parse_notification(&payload, 7), None, "our own");
        assert_eq!(
            parse_notification(&payload, 8),
            Some(RemoteAppend::Appended {
                group_id,
                seq: 42,
                added: vec![name("bob"), name("c.d")],
                removed: Vec::new(),
            })
        );
        assert_eq!(
            parse_notification("1:not hex:x::", 8),
            Some(RemoteAppend::ResyncAll),
            "unreadable means resync"
        );
        assert_eq!(
            parse_notification("1:resync", 8),
            Some(RemoteAppend::ResyncAll)
        );
    }

    #[test]
    fn oversized_notifications_become_a_resync() {
        let group_id = GroupId::new(vec![7; 255]).expect("group id");
        let many: Vec<UserName> = (0..400).map(|n| name(&format!("user-{n:026}"))).collect();
        let payload = notification_payload(9, &group_id, 1, &many, &[]);
        assert!(payload.len() <= MAX_NOTIFY_PAYLOAD);
        assert_eq!(
            parse_notification(&payload, 1),
            Some(RemoteAppend::ResyncAll)
        );
    }

    #[test]
    fn channel_names_fit_an_identifier() {
        assert_eq!(channel_name("public"), "mlschat_ds.public");
        assert_eq!(channel_name(&"s".repeat(100)).len(), 63);
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}
