//! The embedded SQLite backend: one writer thread that group-commits concurrent writes into one
//! transaction, and a bounded pool of reader connections (WAL mode lets them run beside the
//! writer).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    AppendRequest, Appended, ClaimedKeyPackage, FetchPage, MemberSpan, Membership,
    MembershipChange, NewKeyPackage, PendingAppend, Purged, Registration, Store, StoreError,
    StoreLimits, StoredMessage, check_append_rules, check_membership_shape, now_unix_secs,
    payload_hash,
};
use crate::protocol::{DeliveryKind, GroupId, Seq, UserName};

/// Writes queued beyond this many wait for the writer thread (backpressure on senders).
const WRITE_QUEUE: usize = 4096;
/// The most writes one transaction commits together.
const MAX_BATCH: usize = 512;
/// Committed batches that may wait for the WAL's fsync before the writer waits for it too.
const UNSYNCED_BATCHES: usize = 64;
/// Reader connections open at once. More concurrent reads wait for one to come back instead of
/// opening connections (and file descriptors, and blocking threads) without bound under load.
const MAX_READERS: usize = 8;
/// The schema version this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 6;
/// Groups whose state the writer thread keeps in memory; past this, one is forgotten (and read
/// again from the database when next needed) for each group loaded.
const MAX_CACHED_GROUPS: usize = 4096;
/// How often the background checkpointer copies the WAL into the database file while writes
/// keep coming, and how often it looks when they do not.
const CHECKPOINT_BUSY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
const CHECKPOINT_IDLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// WAL pages (4 KiB) past which the checkpointer works to get the WAL started over (see
/// [`checkpointer_loop`]): 32 MiB, which stays in the OS page cache and is reused.
const WAL_SOFT_LIMIT_PAGES: i64 = 8_192;
/// Frames the writer may be left to copy itself when the checkpointer asks it to finish.
const WAL_TAIL_PAGES: i64 = 512;
/// WAL pages past which the writer checkpoints everything itself between batches, whatever
/// the checkpointer managed: the WAL can never grow without bound.
const WAL_HARD_LIMIT_PAGES: i64 = 32_768;
/// The WAL file is truncated to this size when it is reset, so that a burst does not leave a
/// huge file behind.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

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

/// Version 3: fewer B-trees written per append. `messages` gets an `INTEGER PRIMARY KEY`
/// (appends go to the right edge of the table) with `(group_id, seq)` as a unique index; the
/// idempotency record of a stored message is part of its row (`payload_hash`, looked up through
/// `messages_by_client_id`), so `idempotency` only holds the records of messages purged before
/// the end of the retention period; `messages_by_time` is gone because `id` follows insertion
/// order, which the retention purge scans instead. Rows are copied by [`migrate`].
const SCHEMA_V3: &str = "
CREATE TABLE messages_v3 (
    id INTEGER PRIMARY KEY,
    group_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    sender TEXT NOT NULL,
    client_message_id BLOB NOT NULL,
    payload_hash BLOB NOT NULL,
    payload BLOB NOT NULL,
    welcome BLOB,
    created_at INTEGER NOT NULL
);
-- Oldest first, so that `id` order is storage order for the retention purge.
INSERT INTO messages_v3
    (group_id, seq, epoch, kind, sender, client_message_id, payload_hash, payload, welcome, created_at)
SELECT m.group_id, m.seq, m.epoch, m.kind, m.sender, m.client_message_id,
       COALESCE(i.payload_hash, x''), m.payload, m.welcome, m.created_at
FROM messages m LEFT JOIN idempotency i
    ON i.sender = m.sender AND i.group_id = m.group_id AND i.client_message_id = m.client_message_id
ORDER BY m.created_at, m.group_id, m.seq;
CREATE TABLE idempotency_v3 (
    group_id BLOB NOT NULL,
    client_message_id BLOB NOT NULL,
    sender TEXT NOT NULL,
    seq INTEGER NOT NULL,
    epoch_after INTEGER NOT NULL,
    payload_hash BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (group_id, client_message_id, sender)
) WITHOUT ROWID;
-- Records whose message is still stored now live in the message row. The index is built
-- first so that this check is one lookup per record, not a scan of the record's group.
CREATE INDEX messages_by_client_id ON messages_v3 (group_id, client_message_id);
INSERT INTO idempotency_v3
SELECT i.group_id, i.client_message_id, i.sender, i.seq, i.epoch_after, i.payload_hash, i.created_at
FROM idempotency i
WHERE NOT EXISTS (SELECT 1 FROM messages_v3 m WHERE m.group_id = i.group_id
                  AND m.client_message_id = i.client_message_id AND m.sender = i.sender);
DROP TABLE messages;
DROP TABLE idempotency;
ALTER TABLE messages_v3 RENAME TO messages;
ALTER TABLE idempotency_v3 RENAME TO idempotency;
CREATE UNIQUE INDEX messages_by_seq ON messages (group_id, seq);
CREATE INDEX idempotency_by_time ON idempotency (created_at);
";

/// Version 4: the retention purge finds expired messages by time, whatever order they were
/// stored in: a message stored while the clock ran ahead no longer holds back the expiry of
/// those stored after it. The index is appended to at its end (times only grow, but for clock
/// steps), so it costs an append little.
const SCHEMA_V4: &str = "CREATE INDEX messages_by_time ON messages (created_at);";

/// Version 5: the idempotency index leads with the client's message id instead of the group.
/// Led by the group, every append wrote its group's own page of the index (a group commit
/// of 100 messages in 100 groups wrote 100 pages); clients make ids that grow with time
/// ([`new_client_message_id`](crate::protocol::new_client_message_id)), so led by the id, a
/// whole group commit writes the same few pages (ids stored before, or from clients that send
/// random ids, sit elsewhere in the index and cost what they did). Lookups name both columns
/// either way.
const SCHEMA_V5: &str = "
DROP INDEX IF EXISTS messages_by_client_id;
CREATE INDEX messages_by_client_id ON messages (client_message_id, group_id);
";

/// Version 6: one row per membership, not per user and group. A member removed and added
/// again before its client fetched its removal keeps the rest of its first membership (up to
/// the commit that removed it) next to the new one, instead of having its cursor moved to the
/// new Welcome: its client must see the removal before it can take the Welcome. At most one
/// membership per user and group is current (`left_seq IS NULL`).
const SCHEMA_V6: &str = "
CREATE TABLE members_v6 (
    group_id BLOB NOT NULL,
    user TEXT NOT NULL,
    joined_seq INTEGER NOT NULL,
    left_seq INTEGER,
    cursor INTEGER NOT NULL,
    PRIMARY KEY (group_id, user, joined_seq)
);
INSERT INTO members_v6 SELECT group_id, user, joined_seq, left_seq, cursor FROM members;
DROP TABLE members;
ALTER TABLE members_v6 RENAME TO members;
CREATE INDEX members_by_user ON members (user);
CREATE UNIQUE INDEX members_current ON members (group_id, user) WHERE left_seq IS NULL;
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

/// The group's epoch once a stored message (epoch and kind columns) was accepted: a commit
/// advances it, anything else leaves it. Idempotency records answer retries with it.
fn epoch_after(epoch: i64, kind: i64) -> i64 {
    if kind == DeliveryKind::Commit as i64 {
        epoch.saturating_add(1)
    } else {
        epoch
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    configure_connection(Connection::open(path).map_err(backend)?)
}

/// The writer's connection: through the VFS that writes a commit's WAL frames in one call
/// (see `wal_vfs`).
fn open_writer_connection(path: &Path) -> Result<Connection, StoreError> {
    let vfs = super::wal_vfs::register().map_err(|code| {
        StoreError::Backend(format!("cannot register the WAL VFS: SQLite error {code}"))
    })?;
    configure_connection(
        Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), vfs)
            .map_err(backend)?,
    )
}

fn configure_connection(connection: Connection) -> Result<Connection, StoreError> {
    // SECURITY/DURABILITY: WAL with synchronous=FULL fsyncs the WAL on every commit, so an
    // acknowledged message survives power loss, not only a process crash. The store's writer
    // connection commits with NORMAL instead and fsyncs the WAL on its own thread before it
    // answers (see `SqliteStore::open_with`).
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
            let epoch_after =
                epoch_after(row.get(4).map_err(backend)?, row.get(5).map_err(backend)?);
            let payload: Vec<u8> = row.get(6).map_err(backend)?;
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
    if version < 3 {
        connection.execute_batch(SCHEMA_V3).map_err(backend)?;
        // A message stored without an idempotency record (none is expected) gets its hash
        // here: SQLite has no SHA-256 of its own.
        let mut select = connection
            .prepare("SELECT id, payload FROM messages WHERE payload_hash = x''")
            .map_err(backend)?;
        let mut update = connection
            .prepare("UPDATE messages SET payload_hash = ?2 WHERE id = ?1")
            .map_err(backend)?;
        let mut rows = select.query([]).map_err(backend)?;
        while let Some(row) = rows.next().map_err(backend)? {
            let id: i64 = row.get(0).map_err(backend)?;
            let payload: Vec<u8> = row.get(1).map_err(backend)?;
            update
                .execute(params![id, &payload_hash(&payload)[..]])
                .map_err(backend)?;
        }
    }
    if version < 4 {
        connection.execute_batch(SCHEMA_V4).map_err(backend)?;
    }
    if version < 5 {
        connection.execute_batch(SCHEMA_V5).map_err(backend)?;
    }
    if version < 6 {
        connection.execute_batch(SCHEMA_V6).map_err(backend)?;
    }
    connection
        .execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
        .map_err(backend)
}

/// The writer thread's connection and what it remembers between writes.
struct Writer {
    connection: Connection,
    limits: StoreLimits,
    groups: GroupCache,
    /// `PRAGMA data_version` when the writer last looked: it changes when another connection
    /// (a second store handle on the same file, an operator's `sqlite3`) commits, which makes
    /// everything in [`GroupCache`] suspect.
    data_version: Option<i64>,
    /// Shared with the checkpoint thread.
    wal: Arc<WalState>,
    /// The WAL's name as SQLite knows it, to ask the WAL VFS about writes it could not report.
    wal_name: Vec<u8>,
}

/// When the WAL is checkpointed: the constants above, smaller in tests.
#[derive(Debug, Clone, Copy)]
struct WalLimits {
    soft_pages: i64,
    tail_pages: i64,
    hard_pages: i64,
    busy_interval: std::time::Duration,
    idle_interval: std::time::Duration,
}

impl Default for WalLimits {
    fn default() -> WalLimits {
        WalLimits {
            soft_pages: WAL_SOFT_LIMIT_PAGES,
            tail_pages: WAL_TAIL_PAGES,
            hard_pages: WAL_HARD_LIMIT_PAGES,
            busy_interval: CHECKPOINT_BUSY_INTERVAL,
            idle_interval: CHECKPOINT_IDLE_INTERVAL,
        }
    }
}

/// What the checkpoint thread tells the writer.
#[derive(Default)]
struct WalState {
    limits: WalLimits,
    /// Frames in the WAL at the last checkpoint.
    pages: std::sync::atomic::AtomicI64,
    /// The WAL is large and nearly all copied: the writer should copy the rest between two
    /// batches, so that its next transaction starts the WAL over.
    finish: AtomicBool,
}

impl Writer {
    /// Between batches: copies what the checkpointer left of a large WAL (see
    /// [`checkpointer_loop`]). No commit can come in between, so the next transaction starts
    /// the WAL from the beginning.
    fn finish_checkpoint(&mut self) {
        let hard = self.wal.pages.load(Ordering::SeqCst) >= self.wal.limits.hard_pages;
        if !self.wal.finish.swap(false, Ordering::SeqCst) && !hard {
            return;
        }
        // Past the hard limit, RESTART waits (up to the busy timeout) for readers still on old
        // WAL frames, so that the WAL does start over: it bounds the WAL even while reads never
        // stop. Otherwise a PASSIVE pass copies the small tail the checkpointer left.
        let pragma = if hard {
            "PRAGMA wal_checkpoint(RESTART)"
        } else {
            "PRAGMA wal_checkpoint(PASSIVE)"
        };
        match self.connection.query_row(pragma, [], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        }) {
            // Only a complete checkpoint lets the next transaction start the WAL over.
            Ok((0, log, copied)) if log == copied => self.wal.pages.store(0, Ordering::SeqCst),
            Ok((busy, log, copied)) => {
                tracing::debug!(busy, log, copied, "WAL checkpoint incomplete");
            }
            Err(error) => tracing::warn!(%error, "WAL checkpoint failed"),
        }
    }

    /// Forgets the cached group state if anyone else wrote to the database since the last
    /// look. Called inside the batch transaction, whose write lock keeps others out until it
    /// ends.
    fn check_data_version(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .connection
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut statement| statement.query_row([], |row| row.get(0)))
            .map_err(backend)?;
        if self.data_version != Some(version) {
            self.groups.clear();
            self.data_version = Some(version);
        }
        Ok(())
    }
}

/// What the writer thread knows of a group, so that an append reads nothing but its
/// idempotency lookup. Only the writer thread changes groups and members of its database (any
/// other writer is noticed through `data_version`), and every change it makes in a batch that
/// is rolled back clears the cache.
struct GroupState {
    epoch: u64,
    last_seq: u64,
    /// Messages stored (not yet purged).
    stored: u64,
    /// Members not removed.
    active: std::collections::HashSet<String>,
    /// Whether `idempotency` may hold records of this group (messages purged early).
    purged_records: bool,
}

#[derive(Default)]
struct GroupCache {
    groups: HashMap<GroupId, GroupState>,
}

impl GroupCache {
    fn clear(&mut self) {
        self.groups.clear();
    }

    /// The group's state, read from the database if it is not cached; `None` for a group that
    /// does not exist (not cached: it may be created later).
    fn get<'a>(
        &'a mut self,
        connection: &Connection,
        group_id: &GroupId,
    ) -> Result<Option<&'a mut GroupState>, StoreError> {
        if !self.groups.contains_key(group_id) {
            let Some(state) = load_group(connection, group_id)? else {
                return Ok(None);
            };
            if self.groups.len() >= MAX_CACHED_GROUPS
                && let Some(evicted) = self.groups.keys().next().cloned()
            {
                self.groups.remove(&evicted);
            }
            self.groups.insert(group_id.clone(), state);
        }
        Ok(self.groups.get_mut(group_id))
    }
}

fn load_group(
    connection: &Connection,
    group_id: &GroupId,
) -> Result<Option<GroupState>, StoreError> {
    let group = connection
        .prepare_cached("SELECT epoch, last_seq, stored FROM groups WHERE group_id = ?1")
        .and_then(|mut statement| {
            statement
                .query_row(params![group_id.as_bytes()], |row| {
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
        return Ok(None);
    };
    let mut statement = connection
        .prepare_cached("SELECT user FROM members WHERE group_id = ?1 AND left_seq IS NULL")
        .map_err(backend)?;
    let active = statement
        .query_map(params![group_id.as_bytes()], |row| row.get::<_, String>(0))
        .and_then(|rows| rows.collect::<Result<_, _>>())
        .map_err(backend)?;
    let purged_records = connection
        .prepare_cached("SELECT 1 FROM idempotency WHERE group_id = ?1 LIMIT 1")
        .and_then(|mut statement| statement.exists(params![group_id.as_bytes()]))
        .map_err(backend)?;
    Ok(Some(GroupState {
        epoch,
        last_seq,
        stored,
        active,
        purged_records,
    }))
}

/// The transaction of a batch can no longer be committed: it is rolled back and every write in
/// it fails with this error.
struct BatchFailed(StoreError);

/// A write waiting for the writer thread.
trait WriteJob: Send {
    /// Runs inside the batch transaction. A write that is refused must leave the transaction
    /// as it found it; `Err` means it could not, and the whole batch is rolled back.
    fn run(&mut self, writer: &mut Writer) -> Result<(), BatchFailed>;
    /// Called once the batch committed (or failed to).
    fn finish(self: Box<Self>, commit: Result<(), StoreError>);
}

struct TypedJob<T, F> {
    operation: Option<F>,
    /// Whether the operation may change groups or members behind the writer's cache.
    touches_groups: bool,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> WriteJob for TypedJob<T, F>
where
    T: Send,
    F: FnOnce(&Connection, &StoreLimits) -> Result<T, StoreError> + Send,
{
    /// A general write may fail half-way, so it runs in a savepoint of its own.
    fn run(&mut self, writer: &mut Writer) -> Result<(), BatchFailed> {
        let Some(operation) = self.operation.take() else {
            return Ok(());
        };
        let connection = &writer.connection;
        let savepoint = |sql: &str| {
            connection
                .prepare_cached(sql)
                .and_then(|mut statement| statement.execute([]))
                .map(|_| ())
                .map_err(backend)
        };
        if let Err(error) = savepoint("SAVEPOINT job") {
            self.result = Some(Err(error));
            return Ok(());
        }
        let result = operation(connection, &writer.limits);
        if self.touches_groups {
            writer.groups.clear();
        }
        let ended = if result.is_ok() {
            savepoint("RELEASE job")
        } else {
            savepoint("ROLLBACK TO job").and_then(|()| savepoint("RELEASE job"))
        };
        match ended {
            Ok(()) => {
                self.result = Some(result);
                Ok(())
            }
            Err(error) => {
                self.result = Some(Err(error.clone()));
                Err(BatchFailed(error))
            }
        }
    }

    fn finish(self: Box<Self>, commit: Result<(), StoreError>) {
        answer(commit, self.result, self.reply);
    }
}

/// Answers a job's requester once its batch ended: the batch's failure overrides whatever the
/// job itself returned (nothing of it was kept).
fn answer<T>(
    commit: Result<(), StoreError>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
) {
    let outcome = match (commit, result) {
        (Err(error), _) => Err(error),
        (Ok(()), Some(result)) => result,
        (Ok(()), None) => Err(StoreError::Backend("write was not run".into())),
    };
    // The requester may have gone away (connection closed); the write stands regardless.
    let _ = reply.send(outcome);
}

/// An append: checked against the cached group state first and written only once it is
/// accepted, so it needs no savepoint (see [`append`]).
struct AppendJob {
    request: AppendRequest,
    /// Computed by the submitting task, off the writer thread.
    hash: [u8; 32],
    result: Option<Result<Appended, StoreError>>,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

impl WriteJob for AppendJob {
    fn run(&mut self, writer: &mut Writer) -> Result<(), BatchFailed> {
        let outcome = append(writer, &self.request, &self.hash);
        match outcome {
            Ok(appended) => {
                self.result = Some(Ok(appended));
                Ok(())
            }
            Err(AppendFailure::Refused(error)) => {
                self.result = Some(Err(error));
                Ok(())
            }
            Err(AppendFailure::Broken(error)) => {
                self.result = Some(Err(error.clone()));
                Err(BatchFailed(error))
            }
        }
    }

    fn finish(self: Box<Self>, commit: Result<(), StoreError>) {
        answer(commit, self.result, self.reply);
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
    /// How far commits are durable: reads wait for what they saw to be.
    durability: Arc<Durability>,
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
        SqliteStore::open_with(path.as_ref(), limits, WalLimits::default(), None)
    }

    fn open_with(
        path: &Path,
        limits: StoreLimits,
        wal_limits: WalLimits,
        wal_sync: Option<Box<dyn SyncWal>>,
    ) -> Result<SqliteStore, StoreError> {
        let path = path.to_path_buf();
        let connection = open_writer_connection(&path)?;
        migrate(&connection)?;
        let wal_name = super::wal_vfs::wal_name(&connection)
            .ok_or_else(|| StoreError::Backend("the store's database has no file name".into()))?;
        let wal_path = wal_file_path(&wal_name)?;
        check_wal_writes(&wal_name)?;
        let mut wal_sync = match wal_sync {
            Some(sync) => sync,
            None => {
                let file = WalFile::open(&wal_path).map_err(|error| {
                    StoreError::Backend(format!(
                        "cannot open the WAL {}: {error}",
                        wal_path.display()
                    ))
                })?;
                Box::new(file) as Box<dyn SyncWal>
            }
        };
        // The WAL may hold batches a killed DS committed but never synced; SQLite's recovery
        // has just made them visible. Sync them before anything can be read or delivered.
        wal_sync.sync().map_err(|error| {
            StoreError::Backend(format!("cannot fsync the WAL at start: {error}"))
        })?;
        // Checkpoints run on their own thread (see `checkpointer_loop`), not inside the
        // writer's commits, where they would stall every append of the batch. The writer's
        // page cache holds a batch's pages with room to spare, and a general write's savepoint
        // journal stays in memory.
        //
        // SECURITY/DURABILITY: the writer commits with synchronous=NORMAL, which writes the
        // WAL without an fsync, and the syncer thread fsyncs the WAL before any write of the
        // batch is answered and before any reader returns what the batch wrote (see
        // `Durability`). An acknowledged write is exactly as durable as with FULL; the fsync
        // just no longer holds the write lock, so the next batch runs while it is under way.
        connection
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = 0;
                 PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES};
                 PRAGMA temp_store = MEMORY;
                 PRAGMA synchronous = NORMAL;"
            ))
            .map_err(backend)?;
        let durability = Arc::new(Durability::default());
        let checkpointer = open_connection(&path)?;
        let writer = Writer {
            connection,
            limits,
            groups: GroupCache::default(),
            data_version: None,
            wal: Arc::new(WalState {
                limits: wal_limits,
                ..WalState::default()
            }),
            wal_name,
        };
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let (unsynced, to_sync) = std::sync::mpsc::sync_channel(UNSYNCED_BATCHES);
        let syncer_durability = Arc::clone(&durability);
        let syncer = std::thread::Builder::new()
            .name("mlschat-ds-sqlite-sync".into())
            .spawn(move || syncer_loop(wal_sync, &syncer_durability, to_sync))
            .map_err(|error| {
                StoreError::Backend(format!("cannot start the sync thread: {error}"))
            })?;
        let writer_durability = Arc::clone(&durability);
        let thread = std::thread::Builder::new()
            .name("mlschat-ds-sqlite-writer".into())
            .spawn(move || {
                writer_loop(
                    writer,
                    checkpointer,
                    queue,
                    writer_durability,
                    Syncer {
                        unsynced,
                        thread: syncer,
                    },
                )
            })
            .map_err(|error| {
                StoreError::Backend(format!("cannot start the writer thread: {error}"))
            })?;
        Ok(SqliteStore {
            writes,
            durability,
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

    /// Resolves once the store has failed for good: an fsync of its WAL failed, or one of its
    /// threads died. It then refuses every write and every read that could see an unsynced
    /// one, so the process should stop and be restarted (SQLite's recovery decides at the
    /// next open what reached the disk).
    pub fn failed(&self) -> impl std::future::Future<Output = StoreError> + Send + 'static {
        let durability = Arc::clone(&self.durability);
        async move {
            let mut changes = durability.synced.subscribe();
            loop {
                if let Some(failure) = durability.failure() {
                    return failure;
                }
                if changes.changed().await.is_err() {
                    // Cannot happen: `durability` owns the sender.
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Queues a write for the writer thread, which runs queued writes in order.
    async fn enqueue(&self, job: Box<dyn WriteJob>) -> Result<(), StoreError> {
        self.writes
            .send(WriterMessage::Job(job))
            .await
            .map_err(|_| StoreError::Backend("the store is closed".into()))
    }

    /// Runs a general write. `touches_groups`: whether it may change groups or members, whose
    /// state the writer caches for appends.
    async fn write<T, F>(&self, touches_groups: bool, operation: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &StoreLimits) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = TypedJob {
            operation: Some(operation),
            touches_groups,
            result: None,
            reply,
        };
        self.enqueue(Box::new(job)).await?;
        answer
            .await
            .map_err(|_| StoreError::Backend("the store writer stopped".into()))?
    }

    /// Queues an append; the receiver answers once it is committed.
    async fn enqueue_append(
        &self,
        request: AppendRequest,
    ) -> Result<oneshot::Receiver<Result<Appended, StoreError>>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = AppendJob {
            hash: payload_hash(&request.payload),
            request,
            result: None,
            reply,
        };
        self.enqueue(Box::new(job)).await?;
        Ok(answer)
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
        let durability = Arc::clone(&self.durability);
        let (result, seen) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let connection = readers.take()?;
            let result = operation(&connection);
            readers.put_back(connection);
            // Taken after the read: any batch the read saw had taken its number before.
            Ok::<_, StoreError>((result, durability.committing.load(Ordering::SeqCst)))
        })
        .await
        .map_err(|error| StoreError::Backend(format!("reader task failed: {error}")))??;
        // The read may have seen a batch that is committed but not yet fsync'd: answer only
        // once it is durable, so that nothing read can be lost to a power failure (a message
        // delivered from here and then lost would let its seq be reused). The connection and
        // the permit are already back for the next read.
        self.durability.wait_until_synced(seen).await?;
        result
    }
}

fn writer_loop(
    mut writer: Writer,
    checkpointer: Connection,
    mut queue: mpsc::Receiver<WriterMessage>,
    durability: Arc<Durability>,
    syncer: Syncer,
) {
    let _fail_on_panic = FailOnPanic {
        durability: &durability,
        thread: "writer",
    };
    let (stop_checkpoints, stopped) = std::sync::mpsc::channel::<()>();
    let wal = Arc::clone(&writer.wal);
    let checkpoint_durability = Arc::clone(&durability);
    let checkpoints = std::thread::Builder::new()
        .name("mlschat-ds-ckpt".into())
        .spawn(move || checkpointer_loop(checkpointer, &wal, &checkpoint_durability, stopped));
    if let Err(error) = &checkpoints {
        // Without it the WAL would grow without bound: fall back to SQLite's own checkpoints.
        tracing::error!(%error, "cannot start the checkpoint thread; checkpointing on the writer");
        if let Err(error) = writer
            .connection
            .execute_batch("PRAGMA wal_autocheckpoint = 1000")
        {
            tracing::error!(%error, "cannot turn automatic checkpoints back on");
        }
    }
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
        if let Some(failure) = durability.failure() {
            // Nothing can be made durable any more (see `syncer_loop`): write nothing.
            for job in batch {
                job.finish(Err(failure.clone()));
            }
            continue;
        }
        // Before the commit can make anything visible to readers (see `SqliteStore::read`).
        let number = durability.committing.fetch_add(1, Ordering::SeqCst) + 1;
        let mut commit = run_batch(&mut writer, &mut batch);
        if let Err(failure) = check_wal_writes(&writer.wal_name) {
            // Written frames may be missing from the WAL although SQLite counts them written:
            // nothing can be acknowledged from here on (a restart recovers the WAL up to its
            // last complete commit).
            durability.fail(failure.clone());
            commit = Err(failure);
        }
        if commit.is_err() {
            // The cache may hold changes of the rolled-back batch.
            writer.groups.clear();
        }
        // Answered by the syncer, once the WAL is fsync'd (a failed batch waits its turn too,
        // so that batches are answered in order).
        let unsynced = UnsyncedBatch {
            number,
            jobs: batch,
            commit,
        };
        if let Err(std::sync::mpsc::SendError(unsynced)) = syncer.unsynced.send(unsynced) {
            let failure = StoreError::Backend("the store's sync thread stopped".into());
            durability.fail(failure.clone());
            for job in unsynced.jobs {
                job.finish(Err(failure.clone()));
            }
        }
        if durability.failure().is_none() {
            writer.finish_checkpoint();
        }
    }
    // Every committed batch is answered (and durable) before the final checkpoint.
    let Syncer {
        unsynced,
        thread: syncer_thread,
    } = syncer;
    drop(unsynced);
    if syncer_thread.join().is_err() {
        tracing::error!("the store's sync thread panicked");
    }
    // Writes submitted after `close` are refused; none is left waiting for an answer.
    queue.close();
    while let Some(message) = queue.blocking_recv() {
        if let WriterMessage::Job(job) = message {
            job.finish(Err(StoreError::Backend("the store is closed".into())));
        }
    }
    drop(stop_checkpoints);
    if let Ok(checkpoints) = checkpoints
        && checkpoints.join().is_err()
    {
        tracing::error!("the checkpoint thread panicked");
    }
    // After a failure the WAL may index frames that never reached the disk: copying them
    // into the database file could make it inconsistent. SQLite's recovery at the next open
    // checks every frame's checksum and keeps only what is on disk.
    if closing && durability.failure().is_none() {
        // Move the WAL's contents into the database file, so that a closed store is one file
        // that a plain copy or another process can read. Best effort: the WAL is durable too.
        if let Err(error) = writer
            .connection
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        {
            tracing::warn!(%error, "cannot checkpoint the WAL at close");
        }
    }
    drop(writer);
}

/// Runs a batch in one transaction and commits it (without an fsync: see `syncer_loop`).
fn run_batch(writer: &mut Writer, batch: &mut [Box<dyn WriteJob>]) -> Result<(), StoreError> {
    if let Err(error) = writer.connection.execute_batch("BEGIN IMMEDIATE") {
        tracing::error!(%error, "store cannot begin a transaction");
        return Err(backend(error));
    }
    let mut ran = writer.check_data_version().map_err(BatchFailed);
    if ran.is_ok() {
        ran = batch.iter_mut().try_for_each(|job| {
            job.run(writer)?;
            // SQLite rolls the whole transaction back by itself on some errors (I/O, full
            // disk, out of memory), even when the statement that hit one was only a read that
            // a job answered as a refusal. A later job would then write outside any
            // transaction, on top of a batch that no longer exists: fail the batch instead.
            if writer.connection.is_autocommit() {
                return Err(BatchFailed(StoreError::Backend(
                    "SQLite rolled the transaction back after an error".into(),
                )));
            }
            Ok(())
        });
    }
    let failed = match ran {
        Ok(()) => match writer.connection.execute_batch("COMMIT") {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::error!(%error, "store commit failed; the batch is rolled back");
                backend(error)
            }
        },
        Err(BatchFailed(error)) => {
            tracing::error!(%error, "a write failed half-way; its batch is rolled back");
            error
        }
    };
    // SQLite may have rolled back already (it does for some I/O errors).
    if !writer.connection.is_autocommit() {
        let _ = writer.connection.execute_batch("ROLLBACK");
    }
    Err(failed)
}

/// The WAL file SQLite writes, from its name as SQLite gives it ([`super::wal_vfs::wal_name`]:
/// the database's full name, symbolic links resolved, with `-wal`).
fn wal_file_path(wal_name: &[u8]) -> Result<PathBuf, StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt as _;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(wal_name)))
    }
    // Elsewhere SQLite's file names are UTF-8.
    #[cfg(not(unix))]
    {
        std::str::from_utf8(wal_name)
            .map(PathBuf::from)
            .map_err(|_| StoreError::Backend("the WAL's name is not UTF-8".into()))
    }
}

/// Fails if the WAL VFS could not write bytes it had told SQLite were written (see
/// `wal_vfs::deferred_write_failure`).
fn check_wal_writes(wal_name: &[u8]) -> Result<(), StoreError> {
    match super::wal_vfs::deferred_write_failure(wal_name) {
        None => Ok(()),
        Some(code) => {
            tracing::error!(
                code,
                "a write to the store's WAL failed after SQLite counted it written"
            );
            Err(StoreError::Backend(format!(
                "a write to the WAL failed after SQLite counted it written (SQLite error {code})"
            )))
        }
    }
}

/// Makes what was written to the WAL durable. A trait so that tests can hold a sync back or
/// make it fail.
trait SyncWal: Send {
    fn sync(&mut self) -> std::io::Result<()>;
}

/// The WAL file, opened when the store opens and kept open: the store's own connections keep
/// SQLite from deleting it while the store is open (it deletes the WAL only when the last
/// connection closes), and an fsync through any descriptor of the file covers every write to
/// it.
struct WalFile {
    file: std::fs::File,
}

impl WalFile {
    fn open(path: &Path) -> std::io::Result<WalFile> {
        // Writable: some platforms flush only files opened for writing.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(WalFile { file })
    }
}

impl SyncWal for WalFile {
    fn sync(&mut self) -> std::io::Result<()> {
        // fdatasync: it covers the data and the file's new size, which is all the WAL needs.
        self.file.sync_data()
    }
}

/// How far the store's batches are durable. Batches are numbered in commit order; the writer
/// takes a number before a batch begins and the syncer marks it synced once an fsync that
/// began after its commit returned. Only this store's writer writes to the file (run one DS
/// per database), so a read never sees a batch this does not number.
struct Durability {
    /// The last batch number taken (its commit may be under way).
    committing: AtomicU64,
    /// The last batch number known durable; also woken when the store fails.
    synced: tokio::sync::watch::Sender<u64>,
    /// Set once an fsync failed, or a store thread died: the store then writes nothing,
    /// checkpoints nothing, and answers no read that could see a write that was not made
    /// durable.
    failed: Mutex<Option<StoreError>>,
}

impl Default for Durability {
    fn default() -> Durability {
        Durability {
            committing: AtomicU64::new(0),
            synced: tokio::sync::watch::Sender::new(0),
            failed: Mutex::new(None),
        }
    }
}

impl Durability {
    fn mark_synced(&self, number: u64) {
        self.synced.send_if_modified(|synced| {
            let advanced = number > *synced;
            *synced = (*synced).max(number);
            advanced
        });
    }

    fn fail(&self, error: StoreError) {
        if let Ok(mut failed) = self.failed.lock() {
            failed.get_or_insert(error);
        }
        // Wakes the readers waiting for a sync, which now never comes.
        self.synced.send_modify(|_| {});
    }

    fn failure(&self) -> Option<StoreError> {
        match self.failed.lock() {
            Ok(failed) => failed.clone(),
            Err(_) => Some(StoreError::Backend(
                "the store's durability state is lost".into(),
            )),
        }
    }

    /// Waits until batch `number` is durable (at once if it is already), or the store failed.
    async fn wait_until_synced(&self, number: u64) -> Result<(), StoreError> {
        let mut synced = self.synced.subscribe();
        loop {
            if *synced.borrow_and_update() >= number {
                return Ok(());
            }
            if let Some(error) = self.failure() {
                return Err(error);
            }
            // The sender lives as long as `self`, so this cannot end in an error.
            if synced.changed().await.is_err() {
                return Err(StoreError::Backend("the store is closed".into()));
            }
        }
    }
}

/// Fails the store if the thread that holds it unwinds (a bug): its batches would otherwise
/// never be synced, and reads would wait for them forever.
struct FailOnPanic<'a> {
    durability: &'a Durability,
    thread: &'static str,
}

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                thread = self.thread,
                "a store thread panicked; restart the DS"
            );
            self.durability.fail(StoreError::Backend(format!(
                "the store's {} thread panicked",
                self.thread
            )));
        }
    }
}

/// A committed (or failed) batch waiting for the WAL's fsync before its writes are answered.
struct UnsyncedBatch {
    number: u64,
    jobs: Vec<Box<dyn WriteJob>>,
    commit: Result<(), StoreError>,
}

/// The writer's end of the sync thread.
struct Syncer {
    unsynced: std::sync::mpsc::SyncSender<UnsyncedBatch>,
    thread: std::thread::JoinHandle<()>,
}

/// Answers committed batches once the WAL is fsync'd: one fsync covers every batch committed
/// before it began, so while one runs the writer commits the next batches (group commit of the
/// fsync itself). If an fsync fails, nothing written since the last good one can be trusted to
/// be on disk, yet SQLite already shows it to readers: the store then fails every write and
/// every read that could see it, stops checkpointing (which would copy such frames into the
/// database file), and [`SqliteStore::failed`] resolves so that the DS can stop. At the next
/// open SQLite's recovery checks each frame's checksum and keeps what is on disk.
fn syncer_loop(
    mut wal: Box<dyn SyncWal>,
    durability: &Durability,
    batches: std::sync::mpsc::Receiver<UnsyncedBatch>,
) {
    let _fail_on_panic = FailOnPanic {
        durability,
        thread: "sync",
    };
    while let Ok(first) = batches.recv() {
        let mut pending = vec![first];
        pending.extend(batches.try_iter());
        let last = pending.last().map_or(0, |batch| batch.number);
        let synced = match durability.failure() {
            Some(failure) => Err(failure),
            None if pending.iter().any(|batch| batch.commit.is_ok()) => {
                wal.sync().map_err(|error| {
                    tracing::error!(
                        %error,
                        "cannot fsync the store's WAL: refusing all writes; restart the DS"
                    );
                    let failure = StoreError::Backend(format!(
                        "the store cannot make writes durable (fsync failed: {error})"
                    ));
                    durability.fail(failure.clone());
                    failure
                })
            }
            None => Ok(()),
        };
        if synced.is_ok() {
            durability.mark_synced(last);
        }
        for batch in pending {
            let outcome = match &synced {
                Ok(()) => batch.commit,
                Err(error) => Err(error.clone()),
            };
            for job in batch.jobs {
                job.finish(outcome.clone());
            }
        }
    }
}

/// Copies the WAL into the database file from its own connection while the writer goes on
/// committing (a PASSIVE checkpoint never blocks it), until `stop` is dropped.
///
/// The WAL only starts over when a transaction begins with every frame copied, which a
/// checkpoint running beside a busy writer never achieves. So once the WAL passes
/// [`WAL_SOFT_LIMIT_PAGES`], the checkpointer repeats passes (each copies what came in during
/// the last) until little is left, and then asks the writer to copy that tail itself between
/// two batches ([`Writer::finish_checkpoint`]).
fn checkpointer_loop(
    connection: Connection,
    wal: &WalState,
    durability: &Durability,
    stop: std::sync::mpsc::Receiver<()>,
) {
    // After a failed fsync the WAL may index frames that never reached the disk; copying
    // them into the database file could corrupt it, so checkpoints stop (see `syncer_loop`).
    let checkpoint = || {
        if let Some(failure) = durability.failure() {
            return Err(failure);
        }
        connection
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                row.get::<_, i64>(1)
            })
            .map_err(backend)
    };
    let limits = wal.limits;
    let mut wait = limits.idle_interval;
    let mut last_log = 0;
    // Nothing is ever sent: the writer drops its end to stop this thread.
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(wait) {
        if durability.failure().is_some() {
            return;
        }
        let mut log = match checkpoint() {
            Ok(log) => log,
            Err(error) => {
                tracing::warn!(%error, "WAL checkpoint failed");
                wait = limits.idle_interval;
                continue;
            }
        };
        wal.pages.store(log, Ordering::SeqCst);
        // Each pass copies what the writer added during the previous one; a few are enough
        // unless the writer outruns the copying, in which case the hard limit takes over.
        for _ in 0..8 {
            if log < limits.soft_pages || wal.finish.load(Ordering::SeqCst) {
                break;
            }
            match checkpoint() {
                Ok(now) if now >= log && now - log <= limits.tail_pages => {
                    wal.finish.store(true, Ordering::SeqCst);
                    log = now;
                }
                Ok(now) => log = now,
                Err(error) => {
                    tracing::warn!(%error, "WAL checkpoint failed");
                    break;
                }
            }
            wal.pages.store(log, Ordering::SeqCst);
        }
        // The WAL changed since the last look: writes are coming in.
        wait = if std::mem::replace(&mut last_log, log) != log {
            limits.busy_interval
        } else {
            limits.idle_interval
        };
    }
}

/// The memberships of `user` in `group_id` that are current or not yet fully delivered, oldest
/// first: more than one when the user was removed and added again before it fetched its removal.
fn memberships_in_group(
    connection: &Connection,
    group_id: &GroupId,
    user: &UserName,
) -> Result<Vec<MemberSpan>, StoreError> {
    let mut statement = connection
        .prepare_cached(
            "SELECT joined_seq, left_seq, cursor FROM members WHERE group_id = ?1 AND user = ?2
             ORDER BY joined_seq",
        )
        .map_err(backend)?;
    let rows = statement
        .query_map(params![group_id.as_bytes(), user.as_str()], |row| {
            Ok(MemberSpan {
                joined_seq: from_sql_u64(row.get(0)?),
                left_seq: row.get::<_, Option<i64>>(1)?.map(from_sql_u64),
                cursor: from_sql_u64(row.get(2)?),
            })
        })
        .map_err(backend)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(backend)
}

fn user_exists(connection: &Connection, user: &UserName) -> Result<bool, StoreError> {
    connection
        .prepare_cached("SELECT 1 FROM users WHERE name = ?1")
        .and_then(|mut statement| statement.exists(params![user.as_str()]))
        .map_err(backend)
}

fn validate_membership_change(
    connection: &Connection,
    group: &GroupState,
    request: &AppendRequest,
    change: &MembershipChange,
) -> Result<(), StoreError> {
    check_membership_shape(request, change)?;
    for user in &change.removed {
        if !group.active.contains(user.as_str()) {
            return Err(StoreError::InvalidMembership(format!(
                "{user} is not a member"
            )));
        }
    }
    for user in &change.added {
        if !user_exists(connection, user)? {
            return Err(StoreError::UnknownUser(user.clone()));
        }
        if group.active.contains(user.as_str()) {
            return Err(StoreError::InvalidMembership(format!(
                "{user} is already a member"
            )));
        }
    }
    Ok(())
}

/// Why an append was not stored.
enum AppendFailure {
    /// Refused before anything was written: the batch goes on.
    Refused(StoreError),
    /// Failed while writing: the batch's transaction must be rolled back.
    Broken(StoreError),
}

/// Finds a stored message by its idempotency key, through `messages_by_client_id`.
const STORED_APPEND: &str = "SELECT seq, epoch, kind, payload_hash FROM messages
     WHERE group_id = ?1 AND client_message_id = ?2 AND sender = ?3";

/// The original answer to a retry, if (sender, group, client message id) was stored within the
/// retention period: in the message's row while it is stored, in `idempotency` after an early
/// purge.
fn previous_append(
    connection: &Connection,
    group: &GroupState,
    request: &AppendRequest,
) -> Result<Option<(Seq, u64, Vec<u8>)>, StoreError> {
    let key = params![
        request.group_id.as_bytes(),
        &request.client_message_id[..],
        request.sender.as_str()
    ];
    let stored = connection
        .prepare_cached(STORED_APPEND)
        .and_then(|mut statement| {
            statement
                .query_row(key, |row| {
                    Ok((
                        from_sql_u64(row.get(0)?),
                        from_sql_u64(epoch_after(row.get(1)?, row.get(2)?)),
                        row.get::<_, Vec<u8>>(3)?,
                    ))
                })
                .optional()
        })
        .map_err(backend)?;
    if stored.is_some() || !group.purged_records {
        return Ok(stored);
    }
    connection
        .prepare_cached(
            "SELECT seq, epoch_after, payload_hash FROM idempotency
             WHERE group_id = ?1 AND client_message_id = ?2 AND sender = ?3",
        )
        .and_then(|mut statement| {
            statement
                .query_row(key, |row| {
                    Ok((
                        from_sql_u64(row.get(0)?),
                        from_sql_u64(row.get(1)?),
                        row.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .optional()
        })
        .map_err(backend)
}

/// Checks an append against the group's state and stores it. Everything that can refuse it is
/// checked before the first write, so a refusal leaves the batch's transaction untouched and
/// an append needs no savepoint of its own; a failure while writing breaks the batch.
fn append(
    writer: &mut Writer,
    request: &AppendRequest,
    hash: &[u8; 32],
) -> Result<Appended, AppendFailure> {
    let connection = &writer.connection;
    let group = writer
        .groups
        .get(connection, &request.group_id)
        .map_err(AppendFailure::Refused)?
        .ok_or(AppendFailure::Refused(StoreError::UnknownGroup))?;
    // Idempotency first: a retry gets the original answer whatever happened since, even if the
    // message itself was purged (the record lives for the retention period).
    if let Some((seq, epoch, stored_hash)) =
        previous_append(connection, group, request).map_err(AppendFailure::Refused)?
    {
        // SECURITY: answering a different message with the first one's seq would acknowledge
        // a message the DS never stored.
        if stored_hash != hash[..] {
            return Err(AppendFailure::Refused(StoreError::ReusedMessageId { seq }));
        }
        return Ok(Appended {
            seq,
            epoch,
            duplicate: true,
            added: Vec::new(),
            removed: Vec::new(),
        });
    }
    if !group.active.contains(request.sender.as_str()) {
        return Err(AppendFailure::Refused(StoreError::NotMember));
    }
    let change = check_append_rules(request, group.epoch, group.stored, &writer.limits)
        .map_err(AppendFailure::Refused)?;
    validate_membership_change(connection, group, request, &change)
        .map_err(AppendFailure::Refused)?;

    let seq = group.last_seq + 1;
    let new_epoch = if request.kind == DeliveryKind::Commit {
        group.epoch + 1
    } else {
        group.epoch
    };
    write_append(connection, request, hash, &change, seq, new_epoch)
        .map_err(AppendFailure::Broken)?;
    group.epoch = new_epoch;
    group.last_seq = seq;
    group.stored += 1;
    for user in &change.removed {
        group.active.remove(user.as_str());
    }
    for user in &change.added {
        group.active.insert(user.as_str().to_owned());
    }
    Ok(Appended {
        seq,
        epoch: new_epoch,
        duplicate: false,
        added: change.added,
        removed: change.removed,
    })
}

/// The writes of an accepted append.
fn write_append(
    connection: &Connection,
    request: &AppendRequest,
    hash: &[u8; 32],
    change: &MembershipChange,
    seq: Seq,
    new_epoch: u64,
) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "INSERT INTO messages (group_id, seq, epoch, kind, sender, client_message_id,
                                   payload_hash, payload, welcome, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .and_then(|mut statement| {
            statement.execute(params![
                request.group_id.as_bytes(),
                to_sql_u64(seq),
                to_sql_u64(request.epoch),
                request.kind as i64,
                request.sender.as_str(),
                &request.client_message_id[..],
                &hash[..],
                &request.payload,
                change.welcome.as_deref(),
                now_unix_secs(),
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
            .prepare_cached(
                "UPDATE members SET left_seq = ?3 WHERE group_id = ?1 AND user = ?2 AND left_seq IS NULL",
            )
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
        // A membership that ended before its member fetched its removal stays beside this one
        // (schema version 6); one that was fully delivered was deleted by the last ack.
        connection
            .prepare_cached(
                "INSERT INTO members (group_id, user, joined_seq, left_seq, cursor)
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
    Ok(())
}

fn fetch(
    connection: &Connection,
    user: &UserName,
    group_id: &GroupId,
    after_seq: Seq,
    limit: u32,
) -> Result<FetchPage, StoreError> {
    let spans = memberships_in_group(connection, group_id, user)?;
    if spans.is_empty() {
        return Err(StoreError::NotMember);
    }
    let limit = u64::from(limit.max(1));
    let mut statement = connection
        .prepare_cached(
            "SELECT seq, epoch, kind, sender, payload, welcome FROM messages
             WHERE group_id = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4",
        )
        .map_err(backend)?;
    let mut page = FetchPage {
        deliveries: Vec::new(),
        more: false,
    };
    for span in spans {
        let Some((start, end)) = span.range_after(after_seq) else {
            continue;
        };
        let rows = statement
            .query_map(
                params![
                    group_id.as_bytes(),
                    to_sql_u64(start),
                    to_sql_u64(end),
                    to_sql_u64(page.rows_to_read(limit))
                ],
                |row| {
                    Ok(StoredMessage {
                        seq: from_sql_u64(row.get(0)?),
                        epoch: from_sql_u64(row.get(1)?),
                        kind: row.get(2)?,
                        sender: row.get(3)?,
                        payload: row.get(4)?,
                        welcome: row.get(5)?,
                    })
                },
            )
            .map_err(backend)?;
        for row in rows {
            let stored = row.map_err(backend)?;
            if page.push(group_id, &span, stored, limit)? {
                return Ok(page);
            }
        }
    }
    Ok(page)
}

impl Store for SqliteStore {
    async fn register_user(
        &self,
        name: &UserName,
        signature_key: &[u8],
    ) -> Result<Registration, StoreError> {
        let name = name.clone();
        let signature_key = signature_key.to_vec();
        self.write(false, move |connection, _| {
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
        self.write(false, move |connection, limits| {
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
        self.write(false, move |connection, _| {
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
        self.write(false, move |connection, _| {
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
        self.enqueue_append(request)
            .await?
            .await
            .map_err(|_| StoreError::Backend("the store writer stopped".into()))?
    }

    /// The writer thread runs queued writes in order and group-commits them, so queueing is
    /// all it takes to keep a connection's order while many of its messages are in flight.
    async fn submit_append(&self, request: AppendRequest) -> PendingAppend {
        match self.enqueue_append(request).await {
            Ok(answer) => PendingAppend::Queued(answer),
            Err(failure) => PendingAppend::Done(Err(failure)),
        }
    }

    async fn memberships(&self, user: &UserName) -> Result<Vec<Membership>, StoreError> {
        let user = user.clone();
        self.read(move |connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT group_id, MIN(cursor) FROM members WHERE user = ?1 GROUP BY group_id",
                )
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
            Ok(memberships_in_group(connection, &group_id, &user)?
                .iter()
                .map(|span| span.cursor)
                .min())
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
        self.write(false, move |connection, _| {
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
        // The purge runs as many small jobs, not one: the writer thread also commits every
        // append, and a purge of a large backlog in one job would hold appends back for as
        // long as it takes. Appends that land between two jobs are simply seen by the next.
        let mut purged = Purged::default();
        // A stored message carries its own idempotency record, which goes with it when it
        // expires: counted here, as the PostgreSQL store counts the rows it deletes.
        let mut expired_records = 0;
        loop {
            let (deleted, more) = self
                .write(true, move |connection, _| {
                    purge_expired_chunk(connection, expire_before_unix_secs)
                })
                .await?;
            purged.messages += deleted;
            expired_records += deleted;
            if !more {
                break;
            }
        }
        let mut from: Vec<u8> = Vec::new();
        loop {
            let (deleted, next) = self
                .write(true, move |connection, _| {
                    purge_delivered_chunk(connection, &from, expire_before_unix_secs)
                })
                .await?;
            purged.messages += deleted;
            match next {
                Some(next) => from = next,
                None => break,
            }
        }
        let (memberships, key_packages, idempotency_records) = self
            .write(true, move |connection, _| {
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
                Ok((memberships, key_packages, idempotency_records))
            })
            .await?;
        purged.memberships = memberships as u64;
        purged.key_packages = key_packages as u64;
        purged.idempotency_records = idempotency_records as u64 + expired_records;
        Ok(purged)
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

/// Messages one purge job deletes at most (about; a group's delivered range is deleted whole).
const PURGE_CHUNK_MESSAGES: i64 = 5_000;
/// Groups one purge job looks at at most.
const PURGE_CHUNK_GROUPS: i64 = 256;

/// Lowers the stored-message counts (used by the backlog quota) by what a purge job deleted.
fn subtract_stored(
    connection: &Connection,
    deleted_per_group: &HashMap<Vec<u8>, i64>,
) -> Result<(), StoreError> {
    let mut update = connection
        .prepare_cached("UPDATE groups SET stored = MAX(stored - ?2, 0) WHERE group_id = ?1")
        .map_err(backend)?;
    for (group_id, deleted) in deleted_per_group {
        update
            .execute(params![group_id, deleted])
            .map_err(backend)?;
    }
    Ok(())
}

/// One purge job: deletes up to [`PURGE_CHUNK_MESSAGES`] messages past their retention period.
/// Returns how many it deleted and whether more may be left.
fn purge_expired_chunk(
    connection: &Connection,
    expire_before_unix_secs: i64,
) -> Result<(u64, bool), StoreError> {
    // Through `messages_by_time`: the oldest expired messages first, at most one chunk per
    // job, whatever order they were stored in.
    let mut delete = connection
        .prepare_cached(
            "DELETE FROM messages WHERE id IN
                (SELECT id FROM messages WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)
             RETURNING group_id",
        )
        .map_err(backend)?;
    let mut rows = delete
        .query(params![expire_before_unix_secs, PURGE_CHUNK_MESSAGES])
        .map_err(backend)?;
    let mut deleted_per_group: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut deleted: u64 = 0;
    while let Some(row) = rows.next().map_err(backend)? {
        let group_id: Vec<u8> = row.get(0).map_err(backend)?;
        *deleted_per_group.entry(group_id).or_default() += 1;
        deleted += 1;
    }
    drop(rows);
    subtract_stored(connection, &deleted_per_group)?;
    // A whole chunk went: there may be more.
    let more = i64::try_from(deleted).unwrap_or(i64::MAX) >= PURGE_CHUNK_MESSAGES;
    Ok((deleted, more))
}

/// The seq ranges `(after, up_to]` of one group that every member which may still receive them
/// has acknowledged: up to the lowest cursor of the current members, minus the unacknowledged
/// window `(cursor, left_seq]` of each removed member. A removed member never holds back
/// messages after its removal, so a lost device that was removed cannot pin the group's log.
fn delivered_ranges(members: &[(i64, Option<i64>)]) -> Vec<(i64, i64)> {
    let Some(bound) = members
        .iter()
        .filter(|(_, left_seq)| left_seq.is_none())
        .map(|(cursor, _)| *cursor)
        .min()
    else {
        // No current member: nothing counts as delivered (expiry still applies).
        return Vec::new();
    };
    let mut windows: Vec<(i64, i64)> = members
        .iter()
        .filter_map(|(cursor, left_seq)| left_seq.map(|left_seq| (*cursor, left_seq)))
        .filter(|(cursor, left_seq)| cursor < left_seq)
        .collect();
    windows.sort_unstable();
    let mut ranges = Vec::new();
    let mut from = i64::MIN;
    for (cursor, left_seq) in windows {
        if cursor > from {
            ranges.push((from, cursor.min(bound)));
        }
        from = from.max(left_seq);
        if from >= bound {
            break;
        }
    }
    if from < bound {
        ranges.push((from, bound));
    }
    ranges.retain(|(after, up_to)| after < up_to);
    ranges
}

/// One purge job: deletes the delivered messages of the groups from `from` on (in group id
/// order), up to [`PURGE_CHUNK_MESSAGES`] messages or [`PURGE_CHUNK_GROUPS`] groups. A
/// deleted message still in its retention period keeps its idempotency record in
/// `idempotency`. Returns how many it deleted and where the next job starts, if anything may
/// be left.
fn purge_delivered_chunk(
    connection: &Connection,
    from: &[u8],
    expire_before_unix_secs: i64,
) -> Result<(u64, Option<Vec<u8>>), StoreError> {
    let groups: Vec<Vec<u8>> = {
        let mut statement = connection
            .prepare_cached(
                "SELECT group_id FROM groups WHERE stored > 0 AND group_id >= ?1
                 ORDER BY group_id LIMIT ?2",
            )
            .map_err(backend)?;
        let rows = statement
            .query_map(params![from, PURGE_CHUNK_GROUPS], |row| row.get(0))
            .map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)?
    };
    let mut members_of = connection
        .prepare_cached("SELECT cursor, left_seq FROM members WHERE group_id = ?1")
        .map_err(backend)?;
    let mut delete = connection
        .prepare_cached(
            "DELETE FROM messages WHERE group_id = ?1 AND seq > ?2 AND seq <= ?3
             RETURNING client_message_id, sender, seq, epoch, kind, payload_hash, created_at",
        )
        .map_err(backend)?;
    let mut keep_record = connection
        .prepare_cached(
            "INSERT OR IGNORE INTO idempotency
             (group_id, client_message_id, sender, seq, epoch_after, payload_hash, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(backend)?;
    let mut first_stored = connection
        .prepare_cached("SELECT MIN(seq) FROM messages WHERE group_id = ?1 AND seq > ?2")
        .map_err(backend)?;
    let mut deleted_per_group: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut deleted: i64 = 0;
    for group_id in &groups {
        let members: Vec<(i64, Option<i64>)> = members_of
            .query_map(params![group_id], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(backend)?
            .collect::<Result<_, _>>()
            .map_err(backend)?;
        for (after_seq, up_to) in delivered_ranges(&members) {
            // Seqs of a group are unique, so a span of `budget` seqs from the first one stored
            // holds at most `budget` messages: the job stays small even when a group's whole
            // backlog was delivered.
            let budget = PURGE_CHUNK_MESSAGES - deleted;
            if budget <= 0 {
                break;
            }
            let first: Option<i64> = first_stored
                .query_row(params![group_id, after_seq], |row| row.get(0))
                .map_err(backend)?;
            let Some(first) = first.filter(|first| *first <= up_to) else {
                continue;
            };
            let up_to = up_to.min(first.saturating_add(budget - 1));
            let mut rows = delete
                .query(params![group_id, after_seq, up_to])
                .map_err(backend)?;
            while let Some(row) = rows.next().map_err(backend)? {
                let created_at: i64 = row.get(6).map_err(backend)?;
                if created_at >= expire_before_unix_secs {
                    let epoch_after =
                        epoch_after(row.get(3).map_err(backend)?, row.get(4).map_err(backend)?);
                    keep_record
                        .execute(params![
                            group_id,
                            row.get::<_, Vec<u8>>(0).map_err(backend)?,
                            row.get::<_, String>(1).map_err(backend)?,
                            row.get::<_, i64>(2).map_err(backend)?,
                            epoch_after,
                            row.get::<_, Vec<u8>>(5).map_err(backend)?,
                            created_at,
                        ])
                        .map_err(backend)?;
                }
                *deleted_per_group.entry(group_id.clone()).or_default() += 1;
                deleted += 1;
            }
        }
        if deleted >= PURGE_CHUNK_MESSAGES {
            // This group may have more delivered messages: the next job starts with it again.
            subtract_stored(connection, &deleted_per_group)?;
            return Ok((u64::try_from(deleted).unwrap_or(0), Some(group_id.clone())));
        }
    }
    subtract_stored(connection, &deleted_per_group)?;
    let next = if groups.len() as i64 >= PURGE_CHUNK_GROUPS {
        // The smallest group id after the last one looked at.
        groups.last().map(|last| {
            let mut next = last.clone();
            next.push(0);
            next
        })
    } else {
        None
    };
    Ok((u64::try_from(deleted).unwrap_or(0), next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;

    /// A WAL sync the test holds back, or makes fail, and counts.
    #[derive(Clone, Default)]
    struct GatedSync {
        state: Arc<(Mutex<GateState>, Condvar)>,
    }

    #[derive(Default)]
    struct GateState {
        held: bool,
        failing: bool,
        syncs: usize,
    }

    impl GatedSync {
        fn set(&self, change: impl FnOnce(&mut GateState)) {
            let (state, changed) = &*self.state;
            change(&mut state.lock().expect("gate"));
            changed.notify_all();
        }

        fn syncs(&self) -> usize {
            self.state.0.lock().expect("gate").syncs
        }
    }

    impl SyncWal for GatedSync {
        fn sync(&mut self) -> std::io::Result<()> {
            let (state, changed) = &*self.state;
            let mut state = state.lock().expect("gate");
            while state.held {
                state = changed.wait(state).expect("gate");
            }
            state.syncs += 1;
            if state.failing {
                return Err(std::io::Error::other("injected fsync failure"));
            }
            Ok(())
        }
    }

    fn gated_store(path: &Path) -> (SqliteStore, GatedSync) {
        let gate = GatedSync::default();
        let store = SqliteStore::open_with(
            path,
            StoreLimits::default(),
            WalLimits::default(),
            Some(Box::new(gate.clone())),
        )
        .expect("open");
        (store, gate)
    }

    fn text_message(group_id: &GroupId, sender: &UserName, n: u8) -> AppendRequest {
        AppendRequest {
            group_id: group_id.clone(),
            sender: sender.clone(),
            client_message_id: [n; 16],
            epoch: 0,
            kind: DeliveryKind::Application,
            payload: vec![n; 8],
            membership: None,
        }
    }

    /// The writer writes through the WAL VFS: a batch's frames reach the file in far fewer
    /// write calls than SQLite makes (two per frame), and what it committed is read back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_gathers_a_batchs_wal_frames() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ds.sqlite3");
        let store = SqliteStore::open(&path, StoreLimits::default()).expect("open");
        let wal = {
            let connection = open_connection(&path).expect("connection");
            super::super::wal_vfs::wal_name(&connection).expect("WAL name")
        };
        let alice = UserName::new("alice").expect("name");
        let group_id = GroupId::new(b"gathered".to_vec()).expect("group id");
        store.create_group(&group_id, &alice).await.expect("create");
        let (asked_before, made_before) =
            super::super::wal_vfs::write_counts(&wal).expect("the writer's WAL is the VFS's");

        let appends: Vec<_> = (1..=100u8)
            .map(|n| {
                let store = store.clone();
                let mut request = text_message(&group_id, &alice, n);
                request.payload = vec![n; 1000];
                tokio::spawn(async move { store.append(request).await })
            })
            .collect();
        for append in appends {
            append.await.expect("task").expect("append");
        }

        let (asked, made) = super::super::wal_vfs::write_counts(&wal).expect("still open");
        let (asked, made) = (asked - asked_before, made - made_before);
        assert!(asked >= 50, "SQLite asked for {asked} WAL writes");
        assert!(
            made * 4 <= asked,
            "{made} writes reached the WAL for the {asked} SQLite asked for"
        );
        let page = store.fetch(&alice, &group_id, 0, 200).await.expect("fetch");
        assert_eq!(page.deliveries.len(), 100);
        store.close().await;
    }

    /// Nothing a batch wrote is answered, to its writer or to a reader, before the WAL is
    /// fsync'd: the writer commits without an fsync of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_answered_or_read_before_the_wal_is_synced() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (store, gate) = gated_store(&dir.path().join("ds.sqlite3"));
        let alice = UserName::new("alice").expect("name");
        let group_id = GroupId::new(b"gated".to_vec()).expect("group id");
        store.create_group(&group_id, &alice).await.expect("create");
        let synced_before = gate.syncs();
        assert!(synced_before >= 1, "creating the group synced the WAL");

        gate.set(|state| state.held = true);
        let appending = {
            let store = store.clone();
            let request = text_message(&group_id, &alice, 1);
            tokio::spawn(async move { store.append(request).await })
        };
        // Wait until the batch is committed: another connection sees the row.
        let observer = open_connection(&dir.path().join("ds.sqlite3")).expect("observer");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let rows: i64 = observer
                .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
                .expect("count");
            if rows == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the append never committed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        drop(observer);
        let fetching = {
            let store = store.clone();
            let (alice, group_id) = (alice.clone(), group_id.clone());
            tokio::spawn(async move { store.fetch(&alice, &group_id, 0, 10).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !appending.is_finished(),
            "the append was answered before the fsync"
        );
        assert!(!fetching.is_finished(), "a read returned before the fsync");

        gate.set(|state| state.held = false);
        let appended = appending.await.expect("task").expect("append");
        assert_eq!(appended.seq, 1);
        let page = fetching.await.expect("task").expect("fetch");
        assert_eq!(
            page.deliveries.len(),
            1,
            "the fetch saw the committed message"
        );
        assert!(gate.syncs() > synced_before);
        store.close().await;
    }

    /// The syncer fsyncs the WAL SQLite writes, also when the store is opened through a
    /// symbolic link (SQLite names the WAL after the link's target).
    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_opened_through_a_symbolic_link_syncs_its_wal() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let target = dir.path().join("data").join("ds.sqlite3");
        std::fs::create_dir(dir.path().join("data")).expect("data directory");
        let link = dir.path().join("link.sqlite3");
        std::os::unix::fs::symlink(&target, &link).expect("symbolic link");
        // Created through the target first, as an operator would before linking to it.
        SqliteStore::open(&target, StoreLimits::default())
            .expect("create")
            .close()
            .await;
        let store = SqliteStore::open(&link, StoreLimits::default()).expect("open the link");
        let alice = UserName::new("alice").expect("name");
        let group_id = GroupId::new(b"linked".to_vec()).expect("group id");
        store.create_group(&group_id, &alice).await.expect("create");
        let appended = store
            .append(text_message(&group_id, &alice, 1))
            .await
            .expect("append through the link");
        assert_eq!(appended.seq, 1);
        store.close().await;
    }

    /// A store thread that dies (a bug) fails the store instead of leaving reads waiting
    /// forever for a sync of its batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_write_fails_the_store_instead_of_hanging_reads() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ds.sqlite3");
        let store = SqliteStore::open(&path, StoreLimits::default()).expect("open");
        let alice = UserName::new("alice").expect("name");
        let group_id = GroupId::new(b"panics".to_vec()).expect("group id");
        store.create_group(&group_id, &alice).await.expect("create");
        let panicked = store
            .write(false, |connection, _| -> Result<(), StoreError> {
                connection
                    .execute("UPDATE groups SET epoch = 7", [])
                    .map_err(backend)?;
                panic!("a bug in a write job (expected by this test)");
            })
            .await;
        assert!(panicked.is_err(), "{panicked:?}");
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            store.fetch(&alice, &group_id, 0, 10),
        )
        .await
        .expect("the read did not hang");
        assert!(read.is_err(), "{read:?}");
        tokio::time::timeout(std::time::Duration::from_secs(10), store.failed())
            .await
            .expect("the store reports its failure");
        tokio::time::timeout(std::time::Duration::from_secs(10), store.close())
            .await
            .expect("close does not hang");
    }

    /// After a failed fsync the store cannot tell what reached the disk: the writes of the
    /// batch fail, every later write fails, and a read that could see them fails instead of
    /// returning them or hanging. Reopening (as a restarted DS does) recovers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fsync_fails_the_batch_and_every_later_write() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ds.sqlite3");
        let (store, gate) = gated_store(&path);
        let alice = UserName::new("alice").expect("name");
        let group_id = GroupId::new(b"failing".to_vec()).expect("group id");
        store.create_group(&group_id, &alice).await.expect("create");
        store
            .append(text_message(&group_id, &alice, 1))
            .await
            .expect("append before the failure");

        gate.set(|state| state.failing = true);
        let failed = store.append(text_message(&group_id, &alice, 2)).await;
        assert!(
            matches!(&failed, Err(StoreError::Backend(why)) if why.contains("fsync failed")),
            "{failed:?}"
        );
        gate.set(|state| state.failing = false);
        let later = store.append(text_message(&group_id, &alice, 3)).await;
        assert!(
            later.is_err(),
            "a write after a failed fsync was accepted: {later:?}"
        );
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            store.fetch(&alice, &group_id, 0, 10),
        )
        .await
        .expect("the read did not hang");
        assert!(
            read.is_err(),
            "a read that may see unsynced writes answered: {read:?}"
        );
        let failure = tokio::time::timeout(std::time::Duration::from_secs(10), store.failed())
            .await
            .expect("the store reports its failure");
        assert!(matches!(&failure, StoreError::Backend(why) if why.contains("fsync failed")));
        store.close().await;

        let reopened = SqliteStore::open(&path, StoreLimits::default()).expect("reopen");
        let page = reopened
            .fetch(&alice, &group_id, 0, 10)
            .await
            .expect("fetch after reopening");
        assert!(
            !page.deliveries.is_empty(),
            "the message synced before the failure is kept"
        );
        let retried = reopened
            .append(text_message(&group_id, &alice, 3))
            .await
            .expect("writes work again after reopening");
        assert!(
            !retried.duplicate,
            "the write refused after the failure was stored anyway"
        );
        reopened.close().await;
    }

    /// A purge larger than one job (more messages than [`PURGE_CHUNK_MESSAGES`] in one group,
    /// more groups than [`PURGE_CHUNK_GROUPS`]) still deletes everything delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_larger_than_one_job_finishes() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let limits = StoreLimits {
            max_group_backlog: 1_000_000,
            ..StoreLimits::default()
        };
        let store = SqliteStore::open(dir.path().join("ds.sqlite3"), limits).expect("open");
        let alice = UserName::new("alice").expect("name");
        let message = |group_id: &GroupId, n: u32| AppendRequest {
            group_id: group_id.clone(),
            sender: alice.clone(),
            client_message_id: {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&n.to_be_bytes());
                id
            },
            epoch: 0,
            kind: DeliveryKind::Application,
            payload: b"m".to_vec(),
            membership: None,
        };
        let busy = GroupId::new(b"busy".to_vec()).expect("group id");
        store.create_group(&busy, &alice).await.expect("create");
        let busy_messages = u32::try_from(PURGE_CHUNK_MESSAGES).expect("small") + 100;
        let mut appends = tokio::task::JoinSet::new();
        for n in 0..busy_messages {
            let store = store.clone();
            let request = message(&busy, n);
            appends.spawn(async move { store.append(request).await });
        }
        while let Some(appended) = appends.join_next().await {
            appended.expect("task").expect("append");
        }
        store
            .ack(&alice, &busy, u64::from(busy_messages))
            .await
            .expect("ack");
        let quiet_groups = u32::try_from(PURGE_CHUNK_GROUPS).expect("small") + 44;
        for n in 0..quiet_groups {
            let group_id = GroupId::new(format!("quiet-{n:04}").into_bytes()).expect("id");
            store.create_group(&group_id, &alice).await.expect("create");
            store.append(message(&group_id, n)).await.expect("append");
            store.ack(&alice, &group_id, 1).await.expect("ack");
        }
        let purged = store.purge(0).await.expect("purge");
        assert_eq!(
            purged.messages,
            u64::from(busy_messages) + u64::from(quiet_groups)
        );
        let (left, stored): (i64, i64) = store
            .read(|connection| {
                connection
                    .query_row(
                        "SELECT (SELECT COUNT(*) FROM messages), (SELECT SUM(stored) FROM groups)",
                        [],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .map_err(backend)
            })
            .await
            .expect("read");
        assert_eq!((left, stored), (0, 0));
        // Unacknowledged messages past their retention period go in several jobs too.
        let mut appends = tokio::task::JoinSet::new();
        for n in busy_messages..2 * busy_messages {
            let store = store.clone();
            let request = message(&busy, n);
            appends.spawn(async move { store.append(request).await });
        }
        while let Some(appended) = appends.join_next().await {
            appended.expect("task").expect("append");
        }
        let purged = store.purge(i64::MAX).await.expect("purge expired");
        assert_eq!(purged.messages, u64::from(busy_messages));
        let page = store.fetch(&alice, &busy, 0, 10).await.expect("fetch");
        assert!(page.deliveries.is_empty());
        store.close().await;
    }

    /// A message stored while the clock ran ahead does not hold back the expiry of those
    /// stored after it (the purge goes by time, not by storage order).
    #[tokio::test]
    async fn a_message_from_a_clock_ahead_does_not_hold_back_expiry() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store =
            SqliteStore::open(dir.path().join("ds.sqlite3"), StoreLimits::default()).expect("open");
        let alice = UserName::new("alice").expect("name");
        let group_id = GroupId::new(b"clock".to_vec()).expect("group id");
        store.create_group(&group_id, &alice).await.expect("create");
        for n in 0..3u8 {
            store
                .append(AppendRequest {
                    group_id: group_id.clone(),
                    sender: alice.clone(),
                    client_message_id: [n; 16],
                    epoch: 0,
                    kind: DeliveryKind::Application,
                    payload: vec![n],
                    membership: None,
                })
                .await
                .expect("append");
        }
        // The first message was stored with the clock a year ahead.
        let ahead = now_unix_secs() + 365 * 24 * 3600;
        store
            .write(true, move |connection, _| {
                connection
                    .execute(
                        "UPDATE messages SET created_at = ?1 WHERE seq = 1",
                        params![ahead],
                    )
                    .map_err(backend)
            })
            .await
            .expect("set the clock ahead");
        let purged = store.purge(now_unix_secs() + 60).await.expect("purge");
        assert_eq!(
            purged.messages, 2,
            "the two messages stored after it expire"
        );
        let left = store.fetch(&alice, &group_id, 0, 10).await.expect("fetch");
        assert_eq!(
            left.deliveries.iter().map(|d| d.seq).collect::<Vec<_>>(),
            vec![1]
        );
        store.close().await;
    }

    /// With the checkpointer never finishing a WAL by the soft path, the writer's hard limit
    /// alone keeps the WAL file small while appends and reads go on. (Without it the WAL
    /// holds every append: about nine times the bound checked here.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hard_limit_bounds_the_wal_while_appends_and_reads_go_on() {
        const HARD_PAGES: i64 = 64;
        const APPENDS: u32 = 1_500;
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ds.sqlite3");
        let limits = StoreLimits {
            max_group_backlog: 1_000_000,
            ..StoreLimits::default()
        };
        let wal_limits = WalLimits {
            soft_pages: i64::MAX,
            tail_pages: 0,
            hard_pages: HARD_PAGES,
            busy_interval: std::time::Duration::from_millis(5),
            idle_interval: std::time::Duration::from_millis(5),
        };
        let store = SqliteStore::open_with(&path, limits, wal_limits, None).expect("open");
        let alice = UserName::new("alice").expect("name");
        let group_id = GroupId::new(b"walgroup".to_vec()).expect("group id");
        store.create_group(&group_id, &alice).await.expect("create");
        let reading = Arc::new(AtomicBool::new(true));
        let reader = {
            let store = store.clone();
            let reading = Arc::clone(&reading);
            tokio::spawn(async move {
                let mut reads = 0u64;
                while reading.load(Ordering::SeqCst) {
                    store
                        .read(|connection| {
                            connection
                                .query_row("SELECT COUNT(*) FROM messages", [], |row| {
                                    row.get::<_, i64>(0)
                                })
                                .map_err(backend)
                        })
                        .await
                        .expect("read");
                    reads += 1;
                }
                reads
            })
        };
        for n in 0..APPENDS {
            let mut client_message_id = [0u8; 16];
            client_message_id[..4].copy_from_slice(&n.to_be_bytes());
            store
                .append(AppendRequest {
                    group_id: group_id.clone(),
                    sender: alice.clone(),
                    client_message_id,
                    epoch: 0,
                    kind: DeliveryKind::Application,
                    payload: vec![0x5a; 4096],
                    membership: None,
                })
                .await
                .expect("append");
        }
        reading.store(false, Ordering::SeqCst);
        let reads = reader.await.expect("reader");
        assert!(reads > 0, "the reader never ran");
        // Without the hard limit the WAL ends near 39 MB here (about six pages per append:
        // the overflowing row, index and group pages). With it, it peaked at 130-175 pages on
        // an idle machine; the bound leaves room for a loaded one, where more is appended
        // between the checkpointer's count and the writer's next look at it.
        let wal_bytes = std::fs::metadata(dir.path().join("ds.sqlite3-wal"))
            .expect("WAL file")
            .len();
        let frame_bytes = 4096 + 24;
        let bound = (HARD_PAGES as u64 + 1024) * frame_bytes;
        assert!(
            wal_bytes <= bound,
            "WAL reached {wal_bytes} bytes, more than {bound}"
        );
        let stored = store
            .fetch(&alice, &group_id, 0, 10)
            .await
            .expect("fetch")
            .deliveries
            .len();
        assert_eq!(stored, 10);
        store.close().await;
    }

    #[test]
    fn delivered_ranges_stop_at_the_slowest_member_and_skip_removed_members_windows() {
        // No current member: nothing is delivered.
        assert!(delivered_ranges(&[(5, Some(9))]).is_empty());
        // Current members only: up to the lowest cursor.
        assert_eq!(
            delivered_ranges(&[(7, None), (4, None)]),
            vec![(i64::MIN, 4)]
        );
        // A removed member's unacknowledged window (3, 6] is kept; below and above it go.
        assert_eq!(
            delivered_ranges(&[(10, None), (3, Some(6))]),
            vec![(i64::MIN, 3), (6, 10)]
        );
        // Overlapping windows merge; a window past the bound cuts nothing above the bound.
        assert_eq!(
            delivered_ranges(&[(10, None), (2, Some(5)), (4, Some(8)), (9, Some(20))]),
            vec![(i64::MIN, 2), (8, 9)]
        );
        // A removed member that acknowledged everything up to its removal holds nothing.
        assert_eq!(
            delivered_ranges(&[(10, None), (6, Some(6))]),
            vec![(i64::MIN, 10)]
        );
        // A window starting at the bound leaves everything below it.
        assert_eq!(
            delivered_ranges(&[(4, None), (4, Some(9))]),
            vec![(i64::MIN, 4)]
        );
    }

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
                     INSERT INTO messages VALUES (x'67', 1, 0, 3, 'alice', x'01010000000000000000000000000000', x'aa', NULL, 0);
                     INSERT INTO messages VALUES (x'67', 2, 1, 1, 'alice', x'02020000000000000000000000000000', x'bb', NULL, 0);
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
        // Every old message carries its idempotency record; the commit's answers with the
        // epoch it made.
        let (hashed, records, stored): (i64, i64, i64) = store
            .read(|connection| {
                connection
                    .query_row(
                        "SELECT (SELECT COUNT(*) FROM messages WHERE length(payload_hash) = 32),
                                (SELECT COUNT(*) FROM idempotency),
                                (SELECT stored FROM groups)",
                        [],
                        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                    )
                    .map_err(backend)
            })
            .await
            .expect("count");
        assert_eq!((hashed, records, stored), (2, 0, 2));
        let retry = store
            .append(message(1, DeliveryKind::Commit, 0, &[0xaa]))
            .await
            .expect("retry of the old commit");
        assert_eq!((retry.seq, retry.epoch, retry.duplicate), (1, 1, true));
        assert_eq!(
            store
                .append(message(2, DeliveryKind::Application, 1, b"other"))
                .await,
            Err(StoreError::ReusedMessageId { seq: 2 })
        );
        let next = store
            .append(message(3, DeliveryKind::Application, 1, b"new"))
            .await
            .expect("append after migration");
        assert_eq!(next.seq, 3);
        assert_eq!(store.count_key_packages(&alice).await, Ok((1, false)));
        store.close().await;
    }

    #[tokio::test]
    async fn a_retry_is_found_through_the_client_id_index() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store =
            SqliteStore::open(dir.path().join("ds.sqlite3"), StoreLimits::default()).expect("open");
        let plan: String = store
            .read(|connection| {
                let mut statement = connection
                    .prepare(&format!("EXPLAIN QUERY PLAN {STORED_APPEND}"))
                    .map_err(backend)?;
                let details = statement
                    .query_map(params![b"g".to_vec(), vec![0u8; 16], "alice"], |row| {
                        row.get::<_, String>(3)
                    })
                    .map_err(backend)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(backend)?;
                Ok(details.join("; "))
            })
            .await
            .expect("query plan");
        // Led by the id, so that time-ordered ids append at the index's end (schema v5).
        assert!(
            plan.contains("USING INDEX messages_by_client_id (client_message_id=? AND group_id=?)"),
            "{plan}"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_version_4_database_is_migrated() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ds.sqlite3");
        let id = [7u8; 16];
        {
            let connection = Connection::open(&path).expect("open");
            connection
                .execute_batch(&format!(
                    "{SCHEMA_V1}
                     {SCHEMA_V2}
                     {SCHEMA_V3}
                     {SCHEMA_V4}
                     PRAGMA user_version = 4;
                     INSERT INTO users VALUES ('alice', x'01', 0);
                     INSERT INTO groups (group_id, epoch, last_seq, first_seq, created_at, stored)
                         VALUES (x'67', 0, 1, 1, 0, 1);
                     INSERT INTO members VALUES (x'67', 'alice', 0, NULL, 0);
                     INSERT INTO messages (group_id, seq, epoch, kind, sender, client_message_id,
                                           payload_hash, payload, welcome, created_at)
                         VALUES (x'67', 1, 0, 1, 'alice', x'{}', x'{}', x'aa', NULL, 10);",
                    hex::encode(id),
                    hex::encode(payload_hash(&[0xaa])),
                ))
                .expect("a version 4 database");
        }
        let store = SqliteStore::open(&path, StoreLimits::default()).expect("migrate");
        let (version, columns): (i64, String) = store
            .read(|connection| {
                connection
                    .query_row(
                        "SELECT (SELECT user_version FROM pragma_user_version),
                                (SELECT group_concat(name) FROM
                                    (SELECT name FROM pragma_index_info('messages_by_client_id')
                                     ORDER BY seqno))",
                        [],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .map_err(backend)
            })
            .await
            .expect("read");
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(columns, "client_message_id,group_id");
        // The stored message's record is still found through the rebuilt index.
        let retry = store
            .append(AppendRequest {
                group_id: GroupId::new(b"g".to_vec()).expect("group id"),
                sender: UserName::new("alice").expect("name"),
                client_message_id: id,
                epoch: 0,
                kind: DeliveryKind::Application,
                payload: vec![0xaa],
                membership: None,
            })
            .await
            .expect("retry");
        assert_eq!((retry.seq, retry.duplicate), (1, true));
        store.close().await;
    }

    #[tokio::test]
    async fn a_version_5_database_is_migrated() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ds.sqlite3");
        {
            let connection = Connection::open(&path).expect("open");
            // Seq 1 added bob, seq 2 removed him before he fetched anything.
            connection
                .execute_batch(&format!(
                    "{SCHEMA_V1}
                     {SCHEMA_V2}
                     {SCHEMA_V3}
                     {SCHEMA_V4}
                     {SCHEMA_V5}
                     PRAGMA user_version = 5;
                     INSERT INTO users VALUES ('alice', x'01', 0);
                     INSERT INTO users VALUES ('bob', x'02', 0);
                     INSERT INTO groups (group_id, epoch, last_seq, first_seq, created_at, stored)
                         VALUES (x'67', 2, 2, 1, 0, 2);
                     INSERT INTO members VALUES (x'67', 'alice', 0, NULL, 2);
                     INSERT INTO members VALUES (x'67', 'bob', 1, 2, 0);
                     INSERT INTO messages (group_id, seq, epoch, kind, sender, client_message_id,
                                           payload_hash, payload, welcome, created_at)
                         VALUES (x'67', 1, 0, 3, 'alice', x'{}', x'{}', x'aa', x'77', 10),
                                (x'67', 2, 1, 3, 'alice', x'{}', x'{}', x'bb', NULL, 20);",
                    hex::encode([1u8; 16]),
                    hex::encode(payload_hash(&[0xaa])),
                    hex::encode([2u8; 16]),
                    hex::encode(payload_hash(&[0xbb])),
                ))
                .expect("a version 5 database");
        }
        let store = SqliteStore::open(&path, StoreLimits::default()).expect("migrate");
        let bob = UserName::new("bob").expect("name");
        let g = GroupId::new(b"g".to_vec()).expect("group id");
        let added = store
            .append(AppendRequest {
                group_id: g.clone(),
                sender: UserName::new("alice").expect("name"),
                client_message_id: [3u8; 16],
                epoch: 2,
                kind: DeliveryKind::Commit,
                payload: vec![0xcc],
                membership: Some(MembershipChange {
                    welcome: Some(vec![0x78]),
                    added: vec![bob.clone()],
                    removed: Vec::new(),
                }),
            })
            .await
            .expect("add bob again");
        assert_eq!(added.seq, 3);
        // Bob's first membership survived the migration, beside the new one.
        let page = store.fetch(&bob, &g, 0, 10).await.expect("fetch");
        let seen: Vec<(Seq, u8, Vec<u8>)> = page
            .deliveries
            .iter()
            .map(|delivery| {
                (
                    delivery.seq,
                    delivery.kind,
                    delivery.payload.as_slice().to_vec(),
                )
            })
            .collect();
        let (welcome, commit) = (DeliveryKind::Welcome as u8, DeliveryKind::Commit as u8);
        assert_eq!(
            seen,
            vec![
                (1, welcome, vec![0x77]),
                (2, commit, vec![0xbb]),
                (3, welcome, vec![0x78])
            ]
        );
        let version: i64 = store
            .read(|connection| {
                connection
                    .query_row("PRAGMA user_version", [], |row| row.get(0))
                    .map_err(backend)
            })
            .await
            .expect("read");
        assert_eq!(version, SCHEMA_VERSION);
        store.close().await;
    }

    #[tokio::test]
    async fn a_version_2_database_is_migrated() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ds.sqlite3");
        let hash = |payload: &[u8]| hex::encode(payload_hash(payload));
        {
            let connection = Connection::open(&path).expect("open");
            // Seq 1 was delivered and purged (only its record is left); seqs 2 and 3 are
            // stored, inserted out of time order.
            connection
                .execute_batch(&format!(
                    "{SCHEMA_V1}
                     {SCHEMA_V2}
                     PRAGMA user_version = 2;
                     INSERT INTO users VALUES ('alice', x'01', 0);
                     INSERT INTO groups (group_id, epoch, last_seq, first_seq, created_at, stored)
                         VALUES (x'67', 1, 3, 1, 0, 2);
                     INSERT INTO members VALUES (x'67', 'alice', 0, NULL, 0);
                     INSERT INTO messages VALUES (x'67', 3, 1, 1, 'alice', x'03030000000000000000000000000000', x'cc', NULL, 30);
                     INSERT INTO messages VALUES (x'67', 2, 1, 1, 'alice', x'02020000000000000000000000000000', x'bb', NULL, 20);
                     INSERT INTO idempotency VALUES ('alice', x'67', x'01010000000000000000000000000000', 1, 1, x'{}', 10);
                     INSERT INTO idempotency VALUES ('alice', x'67', x'02020000000000000000000000000000', 2, 1, x'{}', 20);
                     INSERT INTO idempotency VALUES ('alice', x'67', x'03030000000000000000000000000000', 3, 1, x'{}', 30);",
                    hash(&[0xaa]),
                    hash(&[0xbb]),
                    hash(&[0xcc]),
                ))
                .expect("a version 2 database");
        }
        let store = SqliteStore::open(&path, StoreLimits::default()).expect("migrate");
        let alice = UserName::new("alice").expect("name");
        let g = GroupId::new(b"g".to_vec()).expect("group id");
        let message = |id: u8, epoch: u64, payload: &[u8]| AppendRequest {
            group_id: g.clone(),
            sender: alice.clone(),
            client_message_id: {
                let mut full = [0u8; 16];
                full[..2].copy_from_slice(&[id, id]);
                full
            },
            epoch,
            kind: DeliveryKind::Application,
            payload: payload.to_vec(),
            membership: None,
        };
        let (version, records, order): (i64, i64, String) = store
            .read(|connection| {
                connection
                    .query_row(
                        "SELECT (SELECT user_version FROM pragma_user_version),
                                (SELECT COUNT(*) FROM idempotency),
                                (SELECT group_concat(seq) FROM (SELECT seq FROM messages ORDER BY id))",
                        [],
                        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                    )
                    .map_err(backend)
            })
            .await
            .expect("read");
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(records, 1, "only the purged message's record stays apart");
        assert_eq!(order, "2,3", "rows in storage order");
        // Retries are answered from both places; reuse with other bytes is refused.
        for (id, payload, seq) in [(1, 0xaa, 1), (2, 0xbb, 2), (3, 0xcc, 3)] {
            let retry = store
                .append(message(id, 0, &[payload]))
                .await
                .expect("retry");
            assert_eq!((retry.seq, retry.epoch, retry.duplicate), (seq, 1, true));
            assert_eq!(
                store.append(message(id, 1, b"other")).await,
                Err(StoreError::ReusedMessageId { seq })
            );
        }
        let next = store
            .append(message(4, 1, b"new"))
            .await
            .expect("append after migration");
        assert_eq!(next.seq, 4);
        // Seqs 2 and 3 are older than 31. Three records go: seq 1's from the separate table,
        // and the two inside the expired rows.
        let purged = store.purge(31).await.expect("purge");
        assert_eq!((purged.messages, purged.idempotency_records), (2, 3));
        let page = store.fetch(&alice, &g, 0, 10).await.expect("fetch");
        assert_eq!(
            page.deliveries.iter().map(|d| d.seq).collect::<Vec<_>>(),
            vec![4]
        );
        store.close().await;
    }
}
