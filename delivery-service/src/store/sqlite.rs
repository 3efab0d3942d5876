//! The embedded SQLite backend: one writer thread that group-commits concurrent writes into one
//! transaction, and a small pool of reader connections (WAL mode lets them run beside the writer).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    AppendRequest, Appended, ClaimedKeyPackage, FetchPage, Membership, MembershipChange, Purged,
    Registration, Store, StoreError, StoreLimits,
};
use crate::protocol::{Delivery, DeliveryKind, GroupId, Seq, UserName};

/// Writes queued beyond this many wait for the writer thread (backpressure on senders).
const WRITE_QUEUE: usize = 4096;
/// The most writes one transaction commits together.
const MAX_BATCH: usize = 512;

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

fn backend(error: rusqlite::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

fn now_unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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

fn migrate(connection: &Connection) -> Result<(), StoreError> {
    let version: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(backend)?;
    if version < 1 {
        connection
            .execute_batch(&format!(
                "BEGIN IMMEDIATE; {SCHEMA_V1} PRAGMA user_version = 1; COMMIT;"
            ))
            .map_err(backend)?;
    } else if version > 1 {
        return Err(StoreError::Backend(format!(
            "database schema version {version} is newer than this mlschat-ds understands (1)"
        )));
    }
    Ok(())
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

struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    fn take(&self) -> Result<Connection, StoreError> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match idle {
            Some(connection) => Ok(connection),
            None => open_connection(&self.path),
        }
    }

    fn put_back(&self, connection: Connection) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < 8
        {
            idle.push(connection);
        }
    }
}

/// The SQLite [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    writes: mpsc::Sender<Box<dyn WriteJob>>,
    readers: Arc<ReaderPool>,
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
    /// writer thread. The thread ends when the last clone of the store is dropped.
    pub fn open(path: impl AsRef<Path>, limits: StoreLimits) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let writer = open_connection(&path)?;
        migrate(&writer)?;
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        std::thread::Builder::new()
            .name("mlschat-ds-sqlite-writer".into())
            .spawn(move || writer_loop(writer, queue, limits))
            .map_err(|error| {
                StoreError::Backend(format!("cannot start the writer thread: {error}"))
            })?;
        Ok(SqliteStore {
            writes,
            readers: Arc::new(ReaderPool {
                path,
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    async fn write<T, F>(&self, operation: F) -> Result<T, StoreError>
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
            .send(Box::new(job))
            .await
            .map_err(|_| StoreError::Backend("the store is closed".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Backend("the store writer stopped".into()))?
    }

    async fn read<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
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
    mut queue: mpsc::Receiver<Box<dyn WriteJob>>,
    limits: StoreLimits,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
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
    let mut seen = std::collections::HashSet::new();
    for user in change.added.iter().chain(&change.removed) {
        if !seen.insert(user) {
            return Err(StoreError::InvalidMembership(format!(
                "{user} is named twice"
            )));
        }
    }
    for user in &change.removed {
        if user == &request.sender {
            return Err(StoreError::InvalidMembership(
                "a commit cannot remove its own sender (RFC 9420 §12.4)".into(),
            ));
        }
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
    if change.added.is_empty() != change.welcome.is_none() {
        return Err(StoreError::InvalidMembership(
            "a Welcome must come with added users, and added users need a Welcome".into(),
        ));
    }
    Ok(())
}

fn append(
    connection: &Connection,
    limits: &StoreLimits,
    request: AppendRequest,
) -> Result<Appended, StoreError> {
    // Idempotency first: a retry gets the original answer whatever happened since.
    let duplicate = connection
        .prepare_cached(
            "SELECT seq, epoch, kind FROM messages WHERE sender = ?1 AND client_message_id = ?2",
        )
        .and_then(|mut statement| {
            statement
                .query_row(
                    params![request.sender.as_str(), &request.client_message_id[..]],
                    |row| {
                        Ok((
                            from_sql_u64(row.get(0)?),
                            from_sql_u64(row.get(1)?),
                            row.get::<_, i64>(2)?,
                        ))
                    },
                )
                .optional()
        })
        .map_err(backend)?;
    if let Some((seq, epoch, kind)) = duplicate {
        let epoch = if kind == DeliveryKind::Commit as i64 {
            epoch + 1
        } else {
            epoch
        };
        return Ok(Appended {
            seq,
            epoch,
            duplicate: true,
            added: Vec::new(),
            removed: Vec::new(),
        });
    }

    let group = connection
        .prepare_cached("SELECT epoch, last_seq, first_seq FROM groups WHERE group_id = ?1")
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
    let Some((epoch, last_seq, first_seq)) = group else {
        return Err(StoreError::UnknownGroup);
    };
    if !is_active_member(connection, &request.group_id, &request.sender)? {
        return Err(StoreError::NotMember);
    }
    // RFC 9420 §14: the DS accepts exactly one commit per epoch; every handshake and
    // application message must be for the current epoch.
    if request.epoch != epoch {
        return Err(StoreError::StaleEpoch { current: epoch });
    }
    if (last_seq + 1).saturating_sub(first_seq) >= limits.max_group_backlog {
        return Err(StoreError::QuotaExceeded(format!(
            "the group holds {} undelivered messages",
            limits.max_group_backlog
        )));
    }
    let change = request.membership.clone().unwrap_or_default();
    if request.kind != DeliveryKind::Commit && request.membership.is_some() {
        return Err(StoreError::InvalidMembership(
            "only commits change membership".into(),
        ));
    }
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
        .prepare_cached("UPDATE groups SET epoch = ?2, last_seq = ?3 WHERE group_id = ?1")
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
        let sender =
            UserName::new(sender).map_err(|error| StoreError::Backend(error.to_string()))?;
        let delivery = if seq == joined_seq && joined_seq > 0 {
            // The member was added by this commit: it gets the Welcome instead (see protocol.md).
            let Some(welcome) = welcome else { continue };
            Delivery {
                group_id: group_id.clone(),
                seq,
                epoch: epoch + 1,
                kind: DeliveryKind::Welcome as u8,
                sender,
                payload: welcome.into(),
            }
        } else {
            let kind = u8::try_from(kind)
                .map_err(|_| StoreError::Backend("corrupt message kind".into()))?;
            Delivery {
                group_id: group_id.clone(),
                seq,
                epoch,
                kind,
                sender,
                payload: payload.into(),
            }
        };
        deliveries.push(delivery);
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
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<u32, StoreError> {
        let user = user.clone();
        self.write(move |connection, limits| {
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
                        "INSERT INTO key_packages (user, data, last_resort) VALUES (?1, ?2, 0)",
                        params![user.as_str(), key_package],
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
                        "INSERT INTO key_packages (user, data, last_resort) VALUES (?1, ?2, 1)",
                        params![user.as_str(), last_resort],
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
            let unclaimed: Option<(i64, Vec<u8>)> = connection
                .query_row(
                    "SELECT id, data FROM key_packages WHERE user = ?1 AND last_resort = 0 ORDER BY id LIMIT 1",
                    params![user.as_str()],
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
                    "SELECT data FROM key_packages WHERE user = ?1 AND last_resort = 1",
                    params![user.as_str()],
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
                     FROM key_packages WHERE user = ?1",
                    params![user.as_str()],
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
            let expired = connection
                .execute("DELETE FROM messages WHERE created_at < ?1", params![expire_before_unix_secs])
                .map_err(backend)?;
            let delivered = connection
                .execute(
                    "DELETE FROM messages WHERE seq <= (SELECT MIN(cursor) FROM members
                        WHERE members.group_id = messages.group_id)",
                    [],
                )
                .map_err(backend)?;
            connection
                .execute(
                    "UPDATE groups SET first_seq = COALESCE(
                        (SELECT MIN(seq) FROM messages WHERE messages.group_id = groups.group_id), last_seq + 1)",
                    [],
                )
                .map_err(backend)?;
            // Removed members whose remaining messages expired can never be delivered to.
            let memberships = connection
                .execute(
                    "DELETE FROM members WHERE left_seq IS NOT NULL AND (cursor >= left_seq OR left_seq <
                        (SELECT first_seq FROM groups WHERE groups.group_id = members.group_id))",
                    [],
                )
                .map_err(backend)?;
            Ok(Purged { messages: (expired + delivered) as u64, memberships: memberships as u64 })
        })
        .await
    }
}
