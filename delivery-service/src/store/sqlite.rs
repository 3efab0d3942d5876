//! The embedded SQLite backend: one writer thread that group-commits concurrent writes into one
//! transaction, and a bounded pool of reader connections (WAL mode lets them run beside the
//! writer).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    AppendRequest, Appended, ClaimedKeyPackage, FetchPage, Membership, MembershipChange,
    NewKeyPackage, PendingAppend, Purged, Registration, Store, StoreError, StoreLimits,
    StoredMessage, check_append_rules, check_membership_shape, delivery_for_member, now_unix_secs,
    payload_hash,
};
use crate::protocol::{DeliveryKind, GroupId, Seq, UserName};

/// Writes queued beyond this many wait for the writer thread (backpressure on senders).
const WRITE_QUEUE: usize = 4096;
/// The most writes one transaction commits together.
const MAX_BATCH: usize = 512;
/// Reader connections open at once. More concurrent reads wait for one to come back instead of
/// opening connections (and file descriptors, and blocking threads) without bound under load.
const MAX_READERS: usize = 8;
/// The schema version this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 2;

const SCHEMA_V1: &str = "
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    signature_key BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE key_packages (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    data BLOB NOT NULL,
    last_resort INTEGER NOT NULL
);
CREATE INDEX key_packages_by_user ON key_packages (user, last_resort, id);
CREATE TABLE groups (
    group_id BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE members (
    group_id BLOB NOT NULL,
    user TEXT NOT NULL,
    joined_seq INTEGER NOT NULL,
    left_seq INTEGER,
    cursor INTEGER NOT NULL,
    PRIMARY KEY (group_id, user)
);
CREATE INDEX members_by_user ON members (user);
CREATE TABLE messages (
    group_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    sender TEXT NOT NULL,
    client_message_id BLOB NOT NULL,
    payload BLOB NOT NULL,
    welcome BLOB,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (group_id, seq)
);
CREATE UNIQUE INDEX messages_by_client_id ON messages (sender, client_message_id);
CREATE INDEX messages_by_time ON messages (created_at);
";

/// Version 2: idempotency records in their own table, keyed by group too and kept for the
/// retention period independently of message purging; a count of stored messages per group
/// (purging leaves holes below a removed member's window, so `last_seq - first_seq` no longer
/// counts them); KeyPackage expiry. `groups.first_seq` is no longer used.
/// The idempotency rows of existing messages are filled in by [`migrate`].
const SCHEMA_V2: &str = "
DROP INDEX messages_by_client_id;
CREATE TABLE idempotency (
    sender TEXT NOT NULL,
    group_id BLOB NOT NULL,
    client_message_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    epoch_after INTEGER NOT NULL,
    payload_hash BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (sender, group_id, client_message_id)
);
CREATE INDEX idempotency_by_time ON idempotency (created_at);
ALTER TABLE groups ADD COLUMN stored INTEGER NOT NULL DEFAULT 0;
UPDATE groups SET stored = (SELECT COUNT(*) FROM messages WHERE messages.group_id = groups.group_id);
-- KeyPackages stored before version 2 have no recorded lifetime: they never expire here
-- (clients still reject an expired KeyPackage when they use it).
ALTER TABLE key_packages ADD COLUMN not_after INTEGER NOT NULL DEFAULT 9223372036854775807;
CREATE INDEX key_packages_by_expiry ON key_packages (not_after);
";

fn backend(error: rusqlite::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// SQLite stores integers as i64; sequence numbers and epochs never come near 2^63.
fn to_sql_u64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let connection = Connection::open(path).map_err(backend)?;
    // SECURITY/DURABILITY: WAL with synchronous=FULL fsyncs the WAL on every commit, so an
    // acknowledged message survives power loss, not only a process crash.
    connection
        .execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 10000;
             PRAGMA foreign_keys = OFF;",
        )
        .map_err(backend)?;
    Ok(connection)
}

/// Applies the missing migrations, all in one transaction.
fn migrate(connection: &Connection) -> Result<(), StoreError> {
    let version: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(backend)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "database schema version {version} is newer than this mlschat-ds understands ({SCHEMA_VERSION})"
        )));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    connection
        .execute_batch("BEGIN IMMEDIATE")
        .map_err(backend)?;
    let migrated = migrate_in_transaction(connection, version);
    let end = if migrated.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    connection.execute_batch(end).map_err(backend)?;
    migrated
}

fn migrate_in_transaction(connection: &Connection, version: i64) -> Result<(), StoreError> {
    if version < 1 {
        connection.execute_batch(SCHEMA_V1).map_err(backend)?;
    }
    if version < 2 {
        connection.execute_batch(SCHEMA_V2).map_err(backend)?;
        // The payload hash is computed here because SQLite has no SHA-256 of its own.
        let mut select = connection
            .prepare(
                "SELECT sender, group_id, client_message_id, seq, epoch, kind, payload, created_at
                 FROM messages",
            )
            .map_err(backend)?;
        let mut insert = connection
            .prepare(
                "INSERT OR IGNORE INTO idempotency
                 (sender, group_id, client_message_id, seq, epoch_after, payload_hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(backend)?;
        let mut rows = select.query([]).map_err(backend)?;
        while let Some(row) = rows.next().map_err(backend)? {
            let epoch: i64 = row.get(4).map_err(backend)?;
            let kind: i64 = row.get(5).map_err(backend)?;
            let payload: Vec<u8> = row.get(6).map_err(backend)?;
            let epoch_after = if kind == DeliveryKind::Commit as i64 {
                epoch.saturating_add(1)
            } else {
                epoch
            };
            insert
                .execute(params![
                    row.get::<_, String>(0).map_err(backend)?,
                    row.get::<_, Vec<u8>>(1).map_err(backend)?,
                    row.get::<_, Vec<u8>>(2).map_err(backend)?,
                    row.get::<_, i64>(3).map_err(backend)?,
                    epoch_after,
                    &payload_hash(&payload)[..],
                    row.get::<_, i64>(7).map_err(backend)?,
                ])
                .map_err(backend)?;
        }
    }
    connection
        .execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
        .map_err(backend)
}

/// A write waiting for the writer thread.
trait WriteJob: Send {
    /// Runs inside the batch transaction, within its own savepoint.
    fn run(&mut self, connection: &Connection, limits: &StoreLimits);
    /// Called once the batch committed (or failed to).
    fn finish(self: Box<Self>, commit: Result<(), StoreError>);
}

struct TypedJob<T, F> {
    operation: Option<F>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> WriteJob for TypedJob<T, F>
where
    T: Send,
    F: FnOnce(&Connection, &StoreLimits) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, connection: &Connection, limits: &StoreLimits) {
        let Some(operation) = self.operation.take() else {
            return;
        };
        if let Err(error) = connection.execute_batch("SAVEPOINT job") {
            self.result = Some(Err(backend(error)));
            return;
        }
        let result = operation(connection, limits);
        let end = if result.is_ok() {
            "RELEASE job"
        } else {
            "ROLLBACK TO job; RELEASE job"
        };
        self.result = Some(match connection.execute_batch(end) {
            Ok(()) => result,
            Err(error) => Err(backend(error)),
        });
    }

    fn finish(self: Box<Self>, commit: Result<(), StoreError>) {
        let outcome = match (commit, self.result) {
            (Err(error), _) => Err(error),
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Backend("write was not run".into())),
        };
        // The requester may have gone away (connection closed); the write stands regardless.
        let _ = self.reply.send(outcome);
    }
}

/// What the writer thread receives.
enum WriterMessage {
    Job(Box<dyn WriteJob>),
    /// Commit what came before, checkpoint the WAL and stop.
    Close,
}

/// Reader connections. At most [`MAX_READERS`] exist at once: a read first takes a permit, so
/// excess readers wait (asynchronously) instead of opening more connections.
struct ReaderPool {
    path: PathBuf,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Connection>>,
    /// Connections currently open (idle or in use).
    open: AtomicUsize,
    /// The most that were ever open at once (for tests).
    peak: AtomicUsize,
    closed: AtomicBool,
}

impl ReaderPool {
    /// Only called with a permit held, so at most [`MAX_READERS`] connections are open.
    fn take(&self) -> Result<Connection, StoreError> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match idle {
            Some(connection) => Ok(connection),
            None => {
                let connection = open_connection(&self.path)?;
                let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
                self.peak.fetch_max(open, Ordering::SeqCst);
                Ok(connection)
            }
        }
    }

    fn put_back(&self, connection: Connection) {
        if !self.closed.load(Ordering::SeqCst)
            && let Ok(mut idle) = self.idle.lock()
        {
            idle.push(connection);
            return;
        }
        self.open.fetch_sub(1, Ordering::SeqCst);
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let idle = self
            .idle
            .lock()
            .map(|mut idle| std::mem::take(&mut *idle))
            .unwrap_or_default();
        self.open.fetch_sub(idle.len(), Ordering::SeqCst);
    }
}

/// The SQLite [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    writes: mpsc::Sender<WriterMessage>,
    readers: Arc<ReaderPool>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SqliteStore")
            .field("path", &self.readers.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies migrations and starts the
    /// writer thread. The thread ends at [`Store::close`], or when the last clone of the store
    /// is dropped.
    pub fn open(path: impl AsRef<Path>, limits: StoreLimits) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let writer = open_connection(&path)?;
        migrate(&writer)?;
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let thread = std::thread::Builder::new()
            .name("mlschat-ds-sqlite-writer".into())
            .spawn(move || writer_loop(writer, queue, limits))
            .map_err(|error| {
                StoreError::Backend(format!("cannot start the writer thread: {error}"))
            })?;
        Ok(SqliteStore {
            writes,
            readers: Arc::new(ReaderPool {
                path,
                permits: Arc::new(Semaphore::new(MAX_READERS)),
                idle: Mutex::new(Vec::new()),
                open: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
            }),
            writer: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Queues a write for the writer thread, which runs queued writes in order.
    async fn enqueue<T, F>(
        &self,
        operation: F,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &StoreLimits) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = TypedJob {
            operation: Some(operation),
            result: None,
            reply,
        };
        self.writes
            .send(WriterMessage::Job(Box::new(job)))
            .await
            .map_err(|_| StoreError::Backend("the store is closed".into()))?;
        Ok(answer)
    }

    async fn write<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &StoreLimits) -> Result<T, StoreError> + Send + 'static,
    {
        self.enqueue(operation)
            .await?
            .await
            .map_err(|_| StoreError::Backend("the store writer stopped".into()))?
    }

    async fn read<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        if readers.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("the store is closed".into()));
        }
        let permit = Arc::clone(&readers.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Backend("the store is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let connection = readers.take()?;
            let result = operation(&connection);
            readers.put_back(connection);
            result
        })
        .await
        .map_err(|error| StoreError::Backend(format!("reader task failed: {error}")))?
    }
}

fn writer_loop(
    connection: Connection,
    mut queue: mpsc::Receiver<WriterMessage>,
    limits: StoreLimits,
) {
    let mut closing = false;
    while !closing {
        let mut batch = Vec::new();
        match queue.blocking_recv() {
            Some(WriterMessage::Job(job)) => batch.push(job),
            Some(WriterMessage::Close) => closing = true,
            None => break,
        }
        while !closing && batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(WriterMessage::Job(job)) => batch.push(job),
                Ok(WriterMessage::Close) => closing = true,
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let commit = match connection.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => {
                for job in &mut batch {
                    job.run(&connection, &limits);
                }
                connection.execute_batch("COMMIT").map_err(|error| {
                    tracing::error!(%error, "store commit failed; the batch is rolled back");
                    let _ = connection.execute_batch("ROLLBACK");
                    backend(error)
                })
            }
            Err(error) => {
                tracing::error!(%error, "store cannot begin a transaction");
                Err(backend(error))
            }
        };
        for job in batch {
            job.finish(commit.clone());
        }
    }
    // Writes submitted after `close` are refused; none is left waiting for an answer.
    queue.close();
    while let Some(message) = queue.blocking_recv() {
        if let WriterMessage::Job(job) = message {
            job.finish(Err(StoreError::Backend("the store is closed".into())));
        }
    }
    if closing {
        // Move the WAL's contents into the database file, so that a closed store is one file
        // that a plain copy or another process can read. Best effort: the WAL is durable too.
        if let Err(error) = connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(%error, "cannot checkpoint the WAL at close");
        }
    }
    drop(connection);
}

fn member_row(
    connection: &Connection,
    group_id: &GroupId,
    user: &UserName,
) -> Result<Option<(u64, Option<u64>, u64)>, StoreError> {
    connection
        .prepare_cached(
            "SELECT joined_seq, left_seq, cursor FROM members WHERE group_id = ?1 AND user = ?2",
        )
        .and_then(|mut statement| {
            statement
                .query_row(params![group_id.as_bytes(), user.as_str()], |row| {
                    Ok((
                        from_sql_u64(row.get(0)?),
                        row.get::<_, Option<i64>>(1)?.map(from_sql_u64),
                        from_sql_u64(row.get(2)?),
                    ))
                })
                .optional()
        })
        .map_err(backend)
}

fn is_active_member(
    connection: &Connection,
    group_id: &GroupId,
    user: &UserName,
) -> Result<bool, StoreError> {
    Ok(matches!(
        member_row(connection, group_id, user)?,
        Some((_, None, _))
    ))
}

fn user_exists(connection: &Connection, user: &UserName) -> Result<bool, StoreError> {
    connection
        .prepare_cached("SELECT 1 FROM users WHERE name = ?1")
        .and_then(|mut statement| statement.exists(params![user.as_str()]))
        .map_err(backend)
}

fn validate_membership_change(
    connection: &Connection,
    request: &AppendRequest,
    change: &MembershipChange,
) -> Result<(), StoreError> {
    check_membership_shape(request, change)?;
    for user in &change.removed {
        if !is_active_member(connection, &request.group_id, user)? {
            return Err(StoreError::InvalidMembership(format!(
                "{user} is not a member"
            )));
        }
    }
    for user in &change.added {
        if !user_exists(connection, user)? {
            return Err(StoreError::UnknownUser(user.clone()));
        }
        if is_active_member(connection, &request.group_id, user)? {
            return Err(StoreError::InvalidMembership(format!(
                "{user} is already a member"
            )));
        }
    }
    Ok(())
}

fn append(
    connection: &Connection,
    limits: &StoreLimits,
    request: AppendRequest,
) -> Result<Appended, StoreError> {
    let hash = payload_hash(&request.payload);
    // Idempotency first: a retry gets the original answer whatever happened since, even if the
    // message itself was purged (the record lives for the retention period).
    let previous = connection
        .prepare_cached(
            "SELECT seq, epoch_after, payload_hash FROM idempotency
             WHERE sender = ?1 AND group_id = ?2 AND client_message_id = ?3",
        )
        .and_then(|mut statement| {
            statement
                .query_row(
                    params![
                        request.sender.as_str(),
                        request.group_id.as_bytes(),
                        &request.client_message_id[..]
                    ],
                    |row| {
                        Ok((
                            from_sql_u64(row.get(0)?),
                            from_sql_u64(row.get(1)?),
                            row.get::<_, Vec<u8>>(2)?,
                        ))
                    },
                )
                .optional()
        })
        .map_err(backend)?;
    if let Some((seq, epoch, stored_hash)) = previous {
        // SECURITY: answering a different message with the first one's seq would acknowledge
        // a message the DS never stored.
        if stored_hash != hash {
            return Err(StoreError::ReusedMessageId { seq });
        }
        return Ok(Appended {
            seq,
            epoch,
            duplicate: true,
            added: Vec::new(),
            removed: Vec::new(),
        });
    }

    let group = connection
        .prepare_cached("SELECT epoch, last_seq, stored FROM groups WHERE group_id = ?1")
        .and_then(|mut statement| {
            statement
                .query_row(params![request.group_id.as_bytes()], |row| {
                    Ok((
                        from_sql_u64(row.get(0)?),
                        from_sql_u64(row.get(1)?),
                        from_sql_u64(row.get(2)?),
                    ))
                })
                .optional()
        })
        .map_err(backend)?;
    let Some((epoch, last_seq, stored)) = group else {
        return Err(StoreError::UnknownGroup);
    };
    if !is_active_member(connection, &request.group_id, &request.sender)? {
        return Err(StoreError::NotMember);
    }
    let change = check_append_rules(&request, epoch, stored, limits)?;
    validate_membership_change(connection, &request, &change)?;

    let seq = last_seq + 1;
    let new_epoch = if request.kind == DeliveryKind::Commit {
        epoch + 1
    } else {
        epoch
    };
    let now = now_unix_secs();
    connection
        .prepare_cached(
            "INSERT INTO messages (group_id, seq, epoch, kind, sender, client_message_id, payload, welcome, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .and_then(|mut statement| {
            statement.execute(params![
                request.group_id.as_bytes(),
                to_sql_u64(seq),
                to_sql_u64(request.epoch),
                request.kind as i64,
                request.sender.as_str(),
                &request.client_message_id[..],
                &request.payload,
                change.welcome.as_deref(),
                now,
            ])
        })
        .map_err(backend)?;
    connection
        .prepare_cached(
            "INSERT INTO idempotency
             (sender, group_id, client_message_id, seq, epoch_after, payload_hash, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .and_then(|mut statement| {
            statement.execute(params![
                request.sender.as_str(),
                request.group_id.as_bytes(),
                &request.client_message_id[..],
                to_sql_u64(seq),
                to_sql_u64(new_epoch),
                &hash[..],
                now,
            ])
        })
        .map_err(backend)?;
    connection
        .prepare_cached(
            "UPDATE groups SET epoch = ?2, last_seq = ?3, stored = stored + 1 WHERE group_id = ?1",
        )
        .and_then(|mut statement| {
            statement.execute(params![
                request.group_id.as_bytes(),
                to_sql_u64(new_epoch),
                to_sql_u64(seq)
            ])
        })
        .map_err(backend)?;
    for user in &change.removed {
        connection
            .prepare_cached("UPDATE members SET left_seq = ?3 WHERE group_id = ?1 AND user = ?2")
            .and_then(|mut statement| {
                statement.execute(params![
                    request.group_id.as_bytes(),
                    user.as_str(),
                    to_sql_u64(seq)
                ])
            })
            .map_err(backend)?;
    }
    for user in &change.added {
        connection
            .prepare_cached(
                "INSERT OR REPLACE INTO members (group_id, user, joined_seq, left_seq, cursor)
                 VALUES (?1, ?2, ?3, NULL, ?4)",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    request.group_id.as_bytes(),
                    user.as_str(),
                    to_sql_u64(seq),
                    to_sql_u64(seq - 1)
                ])
            })
            .map_err(backend)?;
    }
    Ok(Appended {
        seq,
        epoch: new_epoch,
        duplicate: false,
        added: change.added,
        removed: change.removed,
    })
}

fn fetch(
    connection: &Connection,
    user: &UserName,
    group_id: &GroupId,
    after_seq: Seq,
    limit: u32,
) -> Result<FetchPage, StoreError> {
    let Some((joined_seq, left_seq, _cursor)) = member_row(connection, group_id, user)? else {
        return Err(StoreError::NotMember);
    };
    let start = after_seq.max(joined_seq.saturating_sub(1));
    let end = left_seq.unwrap_or(u64::MAX);
    let limit = u64::from(limit.max(1));
    let mut statement = connection
        .prepare_cached(
            "SELECT seq, epoch, kind, sender, payload, welcome FROM messages
             WHERE group_id = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4",
        )
        .map_err(backend)?;
    let rows = statement
        .query_map(
            params![
                group_id.as_bytes(),
                to_sql_u64(start),
                to_sql_u64(end),
                to_sql_u64(limit + 1)
            ],
            |row| {
                Ok((
                    from_sql_u64(row.get(0)?),
                    from_sql_u64(row.get(1)?),
                    row.get::<_, i64>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, Vec<u8>>(4)?,
                    row.get::<_, Option<Vec<u8>>>(5)?,
                ))
            },
        )
        .map_err(backend)?;
    let mut deliveries = Vec::new();
    let mut more = false;
    for row in rows {
        let (seq, epoch, kind, sender, payload, welcome) = row.map_err(backend)?;
        if deliveries.len() as u64 == limit {
            more = true;
            break;
        }
        let stored = StoredMessage {
            seq,
            epoch,
            kind,
            sender,
            payload,
            welcome,
        };
        if let Some(delivery) = delivery_for_member(group_id, joined_seq, stored)? {
            deliveries.push(delivery);
        }
    }
    Ok(FetchPage { deliveries, more })
}

impl Store for SqliteStore {
    async fn register_user(
        &self,
        name: &UserName,
        signature_key: &[u8],
    ) -> Result<Registration, StoreError> {
        let name = name.clone();
        let signature_key = signature_key.to_vec();
        self.write(move |connection, _| {
            let existing: Option<Vec<u8>> = connection
                .query_row("SELECT signature_key FROM users WHERE name = ?1", params![name.as_str()], |row| {
                    row.get(0)
                })
                .optional()
                .map_err(backend)?;
            match existing {
                Some(key) if key == signature_key => Ok(Registration::AlreadyRegistered),
                Some(_) => Err(StoreError::NameTaken),
                None => {
                    connection
                        .execute(
                            "INSERT INTO users (name, signature_key, created_at) VALUES (?1, ?2, ?3)",
                            params![name.as_str(), signature_key, now_unix_secs()],
                        )
                        .map_err(backend)?;
                    Ok(Registration::Created)
                }
            }
        })
        .await
    }

    async fn user_key(&self, name: &UserName) -> Result<Option<Vec<u8>>, StoreError> {
        let name = name.clone();
        self.read(move |connection| {
            connection
                .prepare_cached("SELECT signature_key FROM users WHERE name = ?1")
                .and_then(|mut statement| {
                    statement
                        .query_row(params![name.as_str()], |row| row.get(0))
                        .optional()
                })
                .map_err(backend)
        })
        .await
    }

    async fn store_key_packages(
        &self,
        user: &UserName,
        key_packages: Vec<NewKeyPackage>,
        last_resort: Option<NewKeyPackage>,
    ) -> Result<u32, StoreError> {
        let user = user.clone();
        self.write(move |connection, limits| {
            let now = now_unix_secs();
            // Expired packages can never be handed out: drop them so they do not use the quota.
            connection
                .execute(
                    "DELETE FROM key_packages WHERE user = ?1 AND not_after <= ?2",
                    params![user.as_str(), now],
                )
                .map_err(backend)?;
            let stored: i64 = connection
                .query_row(
                    "SELECT COUNT(*) FROM key_packages WHERE user = ?1 AND last_resort = 0",
                    params![user.as_str()],
                    |row| row.get(0),
                )
                .map_err(backend)?;
            let stored = u64::try_from(stored).unwrap_or(0);
            let total = stored + key_packages.len() as u64;
            if total > u64::from(limits.max_key_packages_per_user) {
                return Err(StoreError::QuotaExceeded(format!(
                    "at most {} unclaimed KeyPackages per user ({stored} stored)",
                    limits.max_key_packages_per_user
                )));
            }
            for key_package in &key_packages {
                connection
                    .execute(
                        "INSERT INTO key_packages (user, data, last_resort, not_after) VALUES (?1, ?2, 0, ?3)",
                        params![user.as_str(), key_package.key_package, to_sql_u64(key_package.not_after)],
                    )
                    .map_err(backend)?;
            }
            if let Some(last_resort) = &last_resort {
                connection
                    .execute(
                        "DELETE FROM key_packages WHERE user = ?1 AND last_resort = 1",
                        params![user.as_str()],
                    )
                    .map_err(backend)?;
                connection
                    .execute(
                        "INSERT INTO key_packages (user, data, last_resort, not_after) VALUES (?1, ?2, 1, ?3)",
                        params![user.as_str(), last_resort.key_package, to_sql_u64(last_resort.not_after)],
                    )
                    .map_err(backend)?;
            }
            Ok(u32::try_from(total).unwrap_or(u32::MAX))
        })
        .await
    }

    async fn claim_key_package(
        &self,
        user: &UserName,
    ) -> Result<Option<ClaimedKeyPackage>, StoreError> {
        let user = user.clone();
        self.write(move |connection, _| {
            if !user_exists(connection, &user)? {
                return Err(StoreError::UnknownUser(user));
            }
            let now = now_unix_secs();
            let unclaimed: Option<(i64, Vec<u8>)> = connection
                .query_row(
                    "SELECT id, data FROM key_packages
                     WHERE user = ?1 AND last_resort = 0 AND not_after > ?2 ORDER BY id LIMIT 1",
                    params![user.as_str(), now],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(backend)?;
            if let Some((id, key_package)) = unclaimed {
                // Deleted in the same transaction that hands it out: claimed exactly once.
                connection
                    .execute("DELETE FROM key_packages WHERE id = ?1", params![id])
                    .map_err(backend)?;
                return Ok(Some(ClaimedKeyPackage { key_package, last_resort: false }));
            }
            let last_resort: Option<Vec<u8>> = connection
                .query_row(
                    "SELECT data FROM key_packages WHERE user = ?1 AND last_resort = 1 AND not_after > ?2",
                    params![user.as_str(), now],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?;
            Ok(last_resort.map(|key_package| ClaimedKeyPackage { key_package, last_resort: true }))
        })
        .await
    }

    async fn count_key_packages(&self, user: &UserName) -> Result<(u32, bool), StoreError> {
        let user = user.clone();
        self.read(move |connection| {
            let (unclaimed, last_resort): (i64, i64) = connection
                .query_row(
                    "SELECT COALESCE(SUM(last_resort = 0), 0), COALESCE(SUM(last_resort = 1), 0)
                     FROM key_packages WHERE user = ?1 AND not_after > ?2",
                    params![user.as_str(), now_unix_secs()],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .map_err(backend)?;
            Ok((u32::try_from(unclaimed).unwrap_or(0), last_resort > 0))
        })
        .await
    }

    async fn create_group(&self, group_id: &GroupId, creator: &UserName) -> Result<(), StoreError> {
        let group_id = group_id.clone();
        let creator = creator.clone();
        self.write(move |connection, _| {
            let exists = connection
                .prepare_cached("SELECT 1 FROM groups WHERE group_id = ?1")
                .and_then(|mut statement| statement.exists(params![group_id.as_bytes()]))
                .map_err(backend)?;
            if exists {
                return Err(StoreError::GroupExists);
            }
            connection
                .execute(
                    "INSERT INTO groups (group_id, epoch, last_seq, first_seq, created_at) VALUES (?1, 0, 0, 1, ?2)",
                    params![group_id.as_bytes(), now_unix_secs()],
                )
                .map_err(backend)?;
            connection
                .execute(
                    "INSERT INTO members (group_id, user, joined_seq, left_seq, cursor) VALUES (?1, ?2, 0, NULL, 0)",
                    params![group_id.as_bytes(), creator.as_str()],
                )
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        self.write(move |connection, limits| append(connection, limits, request))
            .await
    }

    /// The writer thread runs queued writes in order and group-commits them, so queueing is
    /// all it takes to keep a connection's order while many of its messages are in flight.
    async fn submit_append(&self, request: AppendRequest) -> PendingAppend {
        match self
            .enqueue(move |connection, limits| append(connection, limits, request))
            .await
        {
            Ok(answer) => PendingAppend::Queued(answer),
            Err(failure) => PendingAppend::Done(Err(failure)),
        }
    }

    async fn memberships(&self, user: &UserName) -> Result<Vec<Membership>, StoreError> {
        let user = user.clone();
        self.read(move |connection| {
            let mut statement = connection
                .prepare_cached("SELECT group_id, cursor FROM members WHERE user = ?1")
                .map_err(backend)?;
            let rows = statement
                .query_map(params![user.as_str()], |row| {
                    Ok((row.get::<_, Vec<u8>>(0)?, from_sql_u64(row.get(1)?)))
                })
                .map_err(backend)?;
            let mut memberships = Vec::new();
            for row in rows {
                let (group_id, cursor) = row.map_err(backend)?;
                let group_id = GroupId::new(group_id)
                    .map_err(|error| StoreError::Backend(error.to_string()))?;
                memberships.push(Membership { group_id, cursor });
            }
            Ok(memberships)
        })
        .await
    }

    async fn cursor(&self, user: &UserName, group_id: &GroupId) -> Result<Option<Seq>, StoreError> {
        let user = user.clone();
        let group_id = group_id.clone();
        self.read(move |connection| {
            Ok(member_row(connection, &group_id, &user)?.map(|(_, _, cursor)| cursor))
        })
        .await
    }

    async fn fetch(
        &self,
        user: &UserName,
        group_id: &GroupId,
        after_seq: Seq,
        limit: u32,
    ) -> Result<FetchPage, StoreError> {
        let user = user.clone();
        let group_id = group_id.clone();
        self.read(move |connection| fetch(connection, &user, &group_id, after_seq, limit))
            .await
    }

    async fn ack(&self, user: &UserName, group_id: &GroupId, seq: Seq) -> Result<(), StoreError> {
        let user = user.clone();
        let group_id = group_id.clone();
        self.write(move |connection, _| {
            connection
                .prepare_cached(
                    "UPDATE members SET cursor = MAX(cursor, MIN(?3, COALESCE(left_seq,
                        (SELECT last_seq FROM groups WHERE groups.group_id = members.group_id))))
                     WHERE group_id = ?1 AND user = ?2",
                )
                .and_then(|mut statement| {
                    statement.execute(params![group_id.as_bytes(), user.as_str(), to_sql_u64(seq)])
                })
                .map_err(backend)?;
            // A removed member that has everything up to its removal no longer needs a cursor.
            connection
                .prepare_cached(
                    "DELETE FROM members WHERE group_id = ?1 AND user = ?2 AND left_seq IS NOT NULL AND cursor >= left_seq",
                )
                .and_then(|mut statement| statement.execute(params![group_id.as_bytes(), user.as_str()]))
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn purge(&self, expire_before_unix_secs: i64) -> Result<Purged, StoreError> {
        self.write(move |connection, _| {
            let mut deleted_per_group: HashMap<Vec<u8>, i64> = HashMap::new();
            let mut count_deleted = |statement: &mut rusqlite::CachedStatement<'_>,
                                     parameters: &[&dyn rusqlite::ToSql]|
             -> Result<u64, StoreError> {
                let mut rows = statement.query(parameters).map_err(backend)?;
                let mut deleted = 0;
                while let Some(row) = rows.next().map_err(backend)? {
                    let group_id: Vec<u8> = row.get(0).map_err(backend)?;
                    *deleted_per_group.entry(group_id).or_default() += 1;
                    deleted += 1;
                }
                Ok(deleted)
            };
            let expired = count_deleted(
                &mut connection
                    .prepare_cached("DELETE FROM messages WHERE created_at < ?1 RETURNING group_id")
                    .map_err(backend)?,
                &[&expire_before_unix_secs],
            )?;
            // A message can go once every member that may still receive it has acknowledged
            // it: every current member, and every removed member whose unacknowledged window
            // (cursor, left_seq] contains it. A removed member never holds back messages after
            // its removal, so a lost device that was removed cannot pin the group's log.
            let delivered = count_deleted(
                &mut connection
                    .prepare_cached(
                        "DELETE FROM messages
                         WHERE seq <= (SELECT MIN(cursor) FROM members
                                       WHERE members.group_id = messages.group_id
                                         AND members.left_seq IS NULL)
                           AND NOT EXISTS (SELECT 1 FROM members
                                           WHERE members.group_id = messages.group_id
                                             AND members.left_seq IS NOT NULL
                                             AND members.cursor < messages.seq
                                             AND messages.seq <= members.left_seq)
                         RETURNING group_id",
                    )
                    .map_err(backend)?,
                &[],
            )?;
            for (group_id, deleted) in &deleted_per_group {
                connection
                    .prepare_cached(
                        "UPDATE groups SET stored = MAX(stored - ?2, 0) WHERE group_id = ?1",
                    )
                    .and_then(|mut statement| statement.execute(params![group_id, deleted]))
                    .map_err(backend)?;
            }
            // Removed members that have everything up to their removal, or whose remaining
            // messages expired, can never be delivered to again.
            let memberships = connection
                .execute(
                    "DELETE FROM members WHERE left_seq IS NOT NULL AND (cursor >= left_seq OR NOT EXISTS
                        (SELECT 1 FROM messages WHERE messages.group_id = members.group_id
                            AND messages.seq > members.cursor AND messages.seq <= members.left_seq))",
                    [],
                )
                .map_err(backend)?;
            let key_packages = connection
                .execute(
                    "DELETE FROM key_packages WHERE not_after <= ?1",
                    params![now_unix_secs()],
                )
                .map_err(backend)?;
            let idempotency_records = connection
                .execute(
                    "DELETE FROM idempotency WHERE created_at < ?1",
                    params![expire_before_unix_secs],
                )
                .map_err(backend)?;
            Ok(Purged {
                messages: expired + delivered,
                memberships: memberships as u64,
                key_packages: key_packages as u64,
                idempotency_records: idempotency_records as u64,
            })
        })
        .await
    }

    async fn close(&self) {
        self.readers.close();
        // The writer handles `Close` after every job queued before it.
        let _ = self.writes.send(WriterMessage::Close).await;
        let thread = self.writer.lock().ok().and_then(|mut writer| writer.take());
        if let Some(thread) = thread {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the store writer thread did not end cleanly");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reads_share_a_bounded_pool() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store =
            SqliteStore::open(dir.path().join("ds.sqlite3"), StoreLimits::default()).expect("open");
        let mut reads = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let store = store.clone();
            reads.spawn(async move {
                store
                    .read(|connection| {
                        // Hold the connection long enough that the reads overlap.
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        connection
                            .query_row("SELECT 1", [], |row| row.get::<_, i64>(0))
                            .map_err(backend)
                    })
                    .await
            });
        }
        while let Some(read) = reads.join_next().await {
            assert_eq!(read.expect("read task"), Ok(1));
        }
        let peak = store.readers.peak.load(Ordering::SeqCst);
        assert!(
            (1..=MAX_READERS).contains(&peak),
            "{peak} reader connections were open at once"
        );
        store.close().await;
        assert_eq!(store.readers.open.load(Ordering::SeqCst), 0);
        assert!(store.read(|_| Ok(())).await.is_err(), "closed for reads");
        assert!(
            store
                .register_user(&UserName::new("alice").expect("name"), &[1; 32])
                .await
                .is_err(),
            "closed for writes"
        );
    }

    #[tokio::test]
    async fn close_joins_the_writer_and_checkpoints_the_wal() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ds.sqlite3");
        let store = SqliteStore::open(&path, StoreLimits::default()).expect("open");
        let alice = UserName::new("alice").expect("name");
        store
            .register_user(&alice, &[1; 32])
            .await
            .expect("register");
        store.close().await;
        let wal = dir.path().join("ds.sqlite3-wal");
        let wal_len = std::fs::metadata(&wal)
            .map(|metadata| metadata.len())
            .unwrap_or(0);
        assert_eq!(wal_len, 0, "the WAL is checkpointed and empty after close");
        assert!(
            store.register_user(&alice, &[1; 32]).await.is_err(),
            "a closed store refuses writes"
        );
        let reopened = SqliteStore::open(&path, StoreLimits::default()).expect("reopen");
        assert_eq!(reopened.user_key(&alice).await, Ok(Some(vec![1; 32])));
    }

    #[tokio::test]
    async fn a_version_1_database_is_migrated() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ds.sqlite3");
        {
            let connection = Connection::open(&path).expect("open");
            connection
                .execute_batch(&format!(
                    "{SCHEMA_V1}
                     PRAGMA user_version = 1;
                     INSERT INTO users VALUES ('alice', x'01', 0);
                     INSERT INTO groups VALUES (x'67', 1, 2, 1, 0);
                     INSERT INTO members VALUES (x'67', 'alice', 0, NULL, 0);
                     INSERT INTO messages VALUES (x'67', 1, 0, 3, 'alice', x'0101', x'aa', NULL, 0);
                     INSERT INTO messages VALUES (x'67', 2, 1, 1, 'alice', x'0202', x'bb', NULL, 0);
                     INSERT INTO key_packages VALUES (1, 'alice', x'cc', 0);"
                ))
                .expect("a version 1 database");
        }
        let store = SqliteStore::open(&path, StoreLimits::default()).expect("migrate");
        let alice = UserName::new("alice").expect("name");
        let g = GroupId::new(b"g".to_vec()).expect("group id");
        let message = |id: u8, kind: DeliveryKind, epoch: u64, payload: &[u8]| AppendRequest {
            group_id: g.clone(),
            sender: alice.clone(),
            client_message_id: {
                let mut full = [0u8; 16];
                full[..2].copy_from_slice(&[id, id]);
                full
            },
            epoch,
            kind,
            payload: payload.to_vec(),
            membership: None,
        };
        // Every old message got its idempotency record; the commit's records the epoch it made.
        let records: i64 = store
            .read(|connection| {
                connection
                    .query_row("SELECT COUNT(*) FROM idempotency", [], |row| row.get(0))
                    .map_err(backend)
            })
            .await
            .expect("count");
        assert_eq!(records, 2);
        let (epoch_after, stored): (i64, i64) = store
            .read(|connection| {
                connection
                    .query_row(
                        "SELECT i.epoch_after, g.stored FROM idempotency i, groups g WHERE i.seq = 1",
                        [],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .map_err(backend)
            })
            .await
            .expect("record");
        assert_eq!((epoch_after, stored), (1, 2));
        let next = store
            .append(message(3, DeliveryKind::Application, 1, b"new"))
            .await
            .expect("append after migration");
        assert_eq!(next.seq, 3);
        assert_eq!(store.count_key_packages(&alice).await, Ok((1, false)));
        store.close().await;
    }
}
