//! The client's own tables in the profile database, beside openmls's: identity, groups with
//! their delivery cursor, message history, the outbox of intents, and the keys seen per user.

use mlschat_ds::protocol::{ClientMessageId, new_client_message_id};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::core::CoreError;

const SCHEMA_V1: &str = "
CREATE TABLE identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    signature_key BLOB NOT NULL,
    registered INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE groups (
    group_id BLOB PRIMARY KEY,
    name TEXT,
    cursor INTEGER NOT NULL,
    active INTEGER NOT NULL,
    announced INTEGER NOT NULL,
    leaving INTEGER NOT NULL DEFAULT 0,
    last_self_update INTEGER NOT NULL,
    joined_at INTEGER NOT NULL
);
CREATE TABLE history (
    id INTEGER PRIMARY KEY,
    group_id BLOB NOT NULL,
    seq INTEGER,
    sender TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    at INTEGER NOT NULL,
    outbox_id INTEGER,
    state TEXT
);
CREATE INDEX history_by_group ON history (group_id, id);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    group_id BLOB NOT NULL,
    intent TEXT NOT NULL,
    client_message_id BLOB NOT NULL,
    payload BLOB,
    welcome BLOB,
    added TEXT,
    removed TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX outbox_by_group ON outbox (group_id, id);
CREATE TABLE known_keys (
    user TEXT PRIMARY KEY,
    signature_key BLOB NOT NULL,
    previous_key BLOB,
    verified INTEGER NOT NULL DEFAULT 0,
    key_changed INTEGER NOT NULL DEFAULT 0
);
";

/// A SQLite error as a `CoreError`: [`CoreError::Unavailable`] if it says the storage failed
/// rather than the statement, for a step that is worth trying again.
pub(crate) fn sql(error: rusqlite::Error) -> CoreError {
    use rusqlite::ErrorCode::{
        CannotOpen, DatabaseBusy, DatabaseLocked, DiskFull, FileLockingProtocolFailed, OutOfMemory,
        ReadOnly, SystemIoFailure,
    };
    match &error {
        rusqlite::Error::SqliteFailure(failure, _)
            if matches!(
                failure.code,
                DatabaseBusy
                    | DatabaseLocked
                    | FileLockingProtocolFailed
                    | DiskFull
                    | SystemIoFailure
                    | ReadOnly
                    | CannotOpen
                    | OutOfMemory
            ) =>
        {
            CoreError::Unavailable(error.to_string())
        }
        _ => CoreError::Database(error.to_string()),
    }
}

/// How long a write waits for a lock another process holds on the profile.
pub const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// The same while the profile's storage is failing: every retry would otherwise stop the core
/// thread for `BUSY_WAIT`.
pub const BUSY_WAIT_WHILE_FAILING: std::time::Duration = std::time::Duration::from_millis(200);

pub fn set_busy_wait(connection: &Connection, wait: std::time::Duration) -> Result<(), CoreError> {
    connection.busy_timeout(wait).map_err(sql)
}

pub fn now_unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Opens (creating if needed) a profile database in WAL mode, through the VFS that writes a
/// transaction's WAL frames in one call (`mlschat_ds::store::wal_vfs`): SQLite writes each frame
/// as two calls otherwise, and a commit at 1,000 members rewrites a tree of about 120 pages,
/// which made the writes most of the client's cost of processing it (docs/benchmarks.md,
/// figure 3).
pub fn open(path: &std::path::Path) -> Result<Connection, CoreError> {
    let vfs = mlschat_ds::store::wal_vfs::register().map_err(|code| {
        CoreError::Database(format!("cannot register the WAL VFS: SQLite error {code}"))
    })?;
    let connection = Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), vfs)
        .map_err(sql)?;
    connection
        .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .map_err(sql)?;
    set_busy_wait(&connection, BUSY_WAIT)?;
    Ok(connection)
}

/// V2: outbox ids are never reused (AUTOINCREMENT). An id names one message for its whole life:
/// it is the `local_id` of `Queued`/`Sent`/`Failed`, and late DS answers are matched to it, so
/// a new message must not inherit the id of a settled one.
const SCHEMA_V2: &str = "
CREATE TABLE outbox_v2 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id BLOB NOT NULL,
    intent TEXT NOT NULL,
    client_message_id BLOB NOT NULL,
    payload BLOB,
    welcome BLOB,
    added TEXT,
    removed TEXT,
    created_at INTEGER NOT NULL
);
INSERT INTO outbox_v2 SELECT id, group_id, intent, client_message_id, payload, welcome, added, removed, created_at FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_v2 RENAME TO outbox;
CREATE INDEX outbox_by_group ON outbox (group_id, id);
";

/// V3: a one-row table that only [`sync`] writes. A commit fsyncs the WAL only if it changes
/// something, and that fsync also makes every unsynced commit before it durable.
const SCHEMA_V3: &str = "
CREATE TABLE synced (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    count INTEGER NOT NULL
);
";

/// V4: what the user has read of each group, so that unread counts and the group on screen
/// survive a restart. `read_seq` is the highest delivery seq the user has seen in the group;
/// an existing profile counts everything it has received as read. `viewed_at` is when the
/// user last looked at the group (unix seconds, 0 for never). `joined_epoch` is the epoch of
/// the Welcome (or creation) that made us a member, unknown for groups joined before;
/// `name_seq` the seq of the rename that gave the group its name (0: none since we joined).
const SCHEMA_V4: &str = "
ALTER TABLE groups ADD COLUMN read_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN viewed_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN joined_epoch INTEGER;
ALTER TABLE groups ADD COLUMN name_seq INTEGER NOT NULL DEFAULT 0;
UPDATE groups SET read_seq = cursor;
";

pub fn migrate(connection: &Connection) -> Result<(), CoreError> {
    let version: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(sql)?;
    let steps: &[(i64, &str)] = &[
        (1, SCHEMA_V1),
        (2, SCHEMA_V2),
        (3, SCHEMA_V3),
        (4, SCHEMA_V4),
    ];
    if version > 4 {
        return Err(CoreError::Database(format!(
            "the profile database has schema version {version}, newer than this mlschat understands"
        )));
    }
    for (target, schema) in steps.iter().filter(|(target, _)| *target > version) {
        connection
            .execute_batch(&format!(
                "BEGIN IMMEDIATE; {schema} PRAGMA user_version = {target}; COMMIT;"
            ))
            .map_err(|error| {
                let _ = connection.execute_batch("ROLLBACK");
                sql(error)
            })?;
    }
    Ok(())
}

/// Runs `step` in one IMMEDIATE transaction: everything it writes, openmls state included,
/// commits together or not at all.
pub fn transaction<T>(
    connection: &Connection,
    step: impl FnOnce() -> Result<T, CoreError>,
) -> Result<T, CoreError> {
    // Every fsync'd step sets it again, so that nothing can leave it at NORMAL for long.
    run_transaction(
        connection,
        "PRAGMA synchronous = FULL; BEGIN IMMEDIATE",
        step,
    )
}

/// Runs `begin`, then `step`, then COMMIT; rolls back if either of the last two fails.
fn run_transaction<T>(
    connection: &Connection,
    begin: &str,
    step: impl FnOnce() -> Result<T, CoreError>,
) -> Result<T, CoreError> {
    connection.execute_batch(begin).map_err(sql)?;
    match step() {
        Ok(value) => match connection.execute_batch("COMMIT") {
            Ok(()) => check_wal_writes(connection).map(|()| value),
            Err(error) => {
                let _ = connection.execute_batch("ROLLBACK");
                Err(sql(error))
            }
        },
        Err(error) => {
            let _ = connection.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

/// Like [`transaction`], but its commit is not fsync'd: it survives a crash of the process
/// (the write is in the operating system's hands) but not yet one of the machine. For a step
/// whose outcome the very next step normally makes durable: every fsync'd commit, and
/// [`sync`], also makes durable all that was committed before it (one WAL, written in order).
/// Without WAL mode (a file system that cannot share memory) that ordering does not hold, and
/// this is [`transaction`].
pub fn transaction_unsynced<T>(
    connection: &Connection,
    step: impl FnOnce() -> Result<T, CoreError>,
) -> Result<T, CoreError> {
    if !in_wal_mode(connection)? {
        return transaction(connection, step);
    }
    let result = run_transaction(
        connection,
        "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE",
        step,
    );
    // Committed is committed: a failure here is not the step's. The next fsync'd transaction
    // and the next sync set FULL again before they write.
    if let Err(error) = connection.execute_batch("PRAGMA synchronous = FULL") {
        tracing::error!(%error, "cannot set synchronous = FULL again");
    }
    result
}

fn in_wal_mode(connection: &Connection) -> Result<bool, CoreError> {
    let mode: String = connection
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .map_err(sql)?;
    Ok(mode.eq_ignore_ascii_case("wal"))
}

/// Makes every commit so far durable, with one fsync'd commit of a change to the `synced` row.
pub fn sync(connection: &Connection) -> Result<(), CoreError> {
    connection
        .execute_batch("PRAGMA synchronous = FULL")
        .map_err(sql)?;
    connection
        .execute(
            "INSERT INTO synced (id, count) VALUES (1, 1)
             ON CONFLICT (id) DO UPDATE SET count = count + 1",
            [],
        )
        .map_err(sql)?;
    check_wal_writes(connection)
}

/// Fails if the WAL VFS could not write bytes it had told SQLite were written, in a call whose
/// result SQLite ignores (`wal_vfs::deferred_write_failure`). The VFS then fails every later
/// call on the WAL, so nothing more commits (and nothing more is sent or acknowledged); this
/// says why, every time.
fn check_wal_writes(connection: &Connection) -> Result<(), CoreError> {
    let Some(wal) = mlschat_ds::store::wal_vfs::wal_name(connection) else {
        return Ok(());
    };
    match mlschat_ds::store::wal_vfs::deferred_write_failure(&wal) {
        None => Ok(()),
        // Unavailable, not Database: a delivery that fails on it must not be acknowledged.
        Some(code) => Err(CoreError::Unavailable(format!(
            "a write to the profile database's WAL failed after SQLite counted it written \
             (SQLite error {code}); nothing more can be saved: restart mlschat"
        ))),
    }
}

#[derive(Debug, Clone)]
pub struct IdentityRow {
    pub name: String,
    pub signature_key: Vec<u8>,
    pub registered: bool,
}

pub fn identity(connection: &Connection) -> Result<Option<IdentityRow>, CoreError> {
    connection
        .query_row(
            "SELECT name, signature_key, registered FROM identity WHERE id = 1",
            [],
            |row| {
                Ok(IdentityRow {
                    name: row.get(0)?,
                    signature_key: row.get(1)?,
                    registered: row.get::<_, i64>(2)? != 0,
                })
            },
        )
        .optional()
        .map_err(sql)
}

pub fn insert_identity(
    connection: &Connection,
    name: &str,
    signature_key: &[u8],
) -> Result<(), CoreError> {
    connection
        .execute(
            "INSERT INTO identity (id, name, signature_key, registered) VALUES (1, ?1, ?2, 0)",
            params![name, signature_key],
        )
        .map(|_| ())
        .map_err(sql)
}

pub fn set_registered(connection: &Connection, registered: bool) -> Result<(), CoreError> {
    connection
        .execute(
            "UPDATE identity SET registered = ?1 WHERE id = 1",
            params![i64::from(registered)],
        )
        .map(|_| ())
        .map_err(sql)
}

#[derive(Debug, Clone)]
pub struct GroupRow {
    pub group_id: Vec<u8>,
    pub name: Option<String>,
    pub cursor: u64,
    pub active: bool,
    /// Whether the DS knows the group (CreateGroup answered).
    pub announced: bool,
    pub leaving: bool,
    pub last_self_update: i64,
    /// The highest delivery seq the user has seen in the group.
    pub read_seq: u64,
    /// When the user last looked at the group (unix seconds, 0 for never).
    pub viewed_at: i64,
    /// The epoch we joined in, if known.
    pub joined_epoch: Option<u64>,
    /// The seq of the rename that named the group (0: none since we joined).
    pub name_seq: u64,
}

pub fn groups(connection: &Connection) -> Result<Vec<GroupRow>, CoreError> {
    let mut statement = connection
        .prepare(
            "SELECT group_id, name, cursor, active, announced, leaving, last_self_update, read_seq,
                    viewed_at, joined_epoch, name_seq
             FROM groups ORDER BY joined_at",
        )
        .map_err(sql)?;
    let rows = statement
        .query_map([], |row| {
            Ok(GroupRow {
                group_id: row.get(0)?,
                name: row.get(1)?,
                cursor: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                active: row.get::<_, i64>(3)? != 0,
                announced: row.get::<_, i64>(4)? != 0,
                leaving: row.get::<_, i64>(5)? != 0,
                last_self_update: row.get(6)?,
                read_seq: u64::try_from(row.get::<_, i64>(7)?).unwrap_or(0),
                viewed_at: row.get(8)?,
                joined_epoch: row
                    .get::<_, Option<i64>>(9)?
                    .and_then(|epoch| u64::try_from(epoch).ok()),
                name_seq: u64::try_from(row.get::<_, i64>(10)?).unwrap_or(0),
            })
        })
        .map_err(sql)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql)
}

/// Records that the user has seen the group up to delivery `seq` (never moving back) and is
/// looking at it now. `viewed_at` is the current time, but always later than any other
/// group's, so that two groups looked at within one second still tell which came last.
pub fn mark_read(connection: &Connection, group_id: &[u8], seq: u64) -> Result<(), CoreError> {
    connection
        .prepare_cached(
            "UPDATE groups SET read_seq = MAX(read_seq, ?2),
                 viewed_at = MAX(?3, COALESCE((SELECT MAX(viewed_at) FROM groups WHERE group_id != ?1), 0) + 1)
             WHERE group_id = ?1",
        )
        .and_then(|mut statement| {
            statement.execute(params![
                group_id,
                i64::try_from(seq).unwrap_or(i64::MAX),
                now_unix_secs()
            ])
        })
        .map(|_| ())
        .map_err(sql)
}

/// The texts of the messages from others after delivery `after_seq`, newest first, at most
/// `limit` of them: what the user has not read yet.
pub fn unread_texts(
    connection: &Connection,
    group_id: &[u8],
    after_seq: u64,
    me: &str,
    limit: u32,
) -> Result<Vec<String>, CoreError> {
    // Reads only the unread rows, among the group's newest `limit`: the floor is the newest
    // row at or below the mark (history is in delivery order), found by walking back from the
    // end, or else the oldest of those rows. A group read to its end costs a walk of `limit`
    // index entries and one row's lookup, where filtering its newest `limit` rows cost about
    // half a millisecond (50 such groups of 10,000 lines in an in-memory database: 4 ms
    // against 24 ms in all).
    let mut statement = connection
        .prepare_cached(
            "WITH oldest_looked_at AS (
                 SELECT MIN(id) AS id FROM (SELECT id FROM history WHERE group_id = ?1
                                            ORDER BY id DESC LIMIT ?4))
             SELECT text FROM history
             WHERE group_id = ?1 AND seq > ?2 AND kind = 'message' AND sender != ?3
               AND id > COALESCE(
                   (SELECT id FROM history
                    WHERE group_id = ?1 AND seq <= ?2 AND id >= (SELECT id FROM oldest_looked_at)
                    ORDER BY id DESC LIMIT 1),
                   (SELECT id FROM oldest_looked_at) - 1,
                   0)
             ORDER BY id DESC",
        )
        .map_err(sql)?;
    let rows = statement
        .query_map(
            params![
                group_id,
                i64::try_from(after_seq).unwrap_or(i64::MAX),
                me,
                limit
            ],
            |row| row.get(0),
        )
        .map_err(sql)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql)
}

pub fn insert_group(
    connection: &Connection,
    group_id: &[u8],
    name: Option<&str>,
    cursor: u64,
    announced: bool,
    joined_epoch: u64,
) -> Result<(), CoreError> {
    let now = now_unix_secs();
    connection
        .execute(
            // Joining again from a Welcome: what came before it is read. The group keeps its
            // place in the list (`joined_at`, which orders it) and when it was looked at last.
            "INSERT INTO groups (group_id, name, cursor, active, announced, leaving, last_self_update, joined_at, read_seq, joined_epoch)
             VALUES (?1, ?2, ?3, 1, ?4, 0, ?5, ?5, ?3, ?6)
             ON CONFLICT (group_id) DO UPDATE SET name = excluded.name, cursor = excluded.cursor,
                 active = 1, announced = excluded.announced, leaving = 0,
                 last_self_update = excluded.last_self_update, read_seq = excluded.read_seq,
                 joined_epoch = excluded.joined_epoch, name_seq = 0",
            params![
                group_id,
                name,
                i64::try_from(cursor).unwrap_or(i64::MAX),
                i64::from(announced),
                now,
                i64::try_from(joined_epoch).unwrap_or(i64::MAX)
            ],
        )
        .map(|_| ())
        .map_err(sql)
}

pub fn set_cursor(connection: &Connection, group_id: &[u8], cursor: u64) -> Result<(), CoreError> {
    connection
        .prepare_cached("UPDATE groups SET cursor = ?2 WHERE group_id = ?1")
        .and_then(|mut statement| {
            statement.execute(params![group_id, i64::try_from(cursor).unwrap_or(i64::MAX)])
        })
        .map(|_| ())
        .map_err(sql)
}

pub fn set_group_flag(
    connection: &Connection,
    group_id: &[u8],
    column: GroupFlag,
    value: bool,
) -> Result<(), CoreError> {
    let statement = match column {
        GroupFlag::Active => "UPDATE groups SET active = ?2 WHERE group_id = ?1",
        GroupFlag::Announced => "UPDATE groups SET announced = ?2 WHERE group_id = ?1",
        GroupFlag::Leaving => "UPDATE groups SET leaving = ?2 WHERE group_id = ?1",
    };
    connection
        .execute(statement, params![group_id, i64::from(value)])
        .map(|_| ())
        .map_err(sql)
}

#[derive(Debug, Clone, Copy)]
pub enum GroupFlag {
    Active,
    Announced,
    Leaving,
}

/// The group's name; `rename_seq` is the seq of the rename that gave it, `None` for a name
/// learned from an inviter (which leaves the last rename's seq as it is).
pub fn set_group_name(
    connection: &Connection,
    group_id: &[u8],
    name: &str,
    rename_seq: Option<u64>,
) -> Result<(), CoreError> {
    connection
        .execute(
            "UPDATE groups SET name = ?2, name_seq = COALESCE(?3, name_seq) WHERE group_id = ?1",
            params![
                group_id,
                name,
                rename_seq.map(|seq| i64::try_from(seq).unwrap_or(i64::MAX))
            ],
        )
        .map(|_| ())
        .map_err(sql)
}

pub fn set_last_self_update(
    connection: &Connection,
    group_id: &[u8],
    at: i64,
) -> Result<(), CoreError> {
    connection
        .execute(
            "UPDATE groups SET last_self_update = ?2 WHERE group_id = ?1",
            params![group_id, at],
        )
        .map(|_| ())
        .map_err(sql)
}

/// What a user asked for, kept until the DS has sequenced its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Intent {
    Text {
        text: String,
    },
    /// The group's name, for members who joined in this epoch.
    GroupName {
        name: String,
    },
    /// A new name for the group, for every member.
    Rename {
        name: String,
    },
    Invite {
        users: Vec<String>,
    },
    Kick {
        user: String,
    },
    Update,
    CommitProposals,
    Leave,
}

impl Intent {
    /// Application messages can be pipelined; everything else is a handshake message that
    /// must be alone in flight.
    pub fn is_application(&self) -> bool {
        matches!(
            self,
            Intent::Text { .. } | Intent::GroupName { .. } | Intent::Rename { .. }
        )
    }

    /// What kind of intent this is, for logs (never the text itself).
    pub fn label(&self) -> &'static str {
        match self {
            Intent::Text { .. } => "text",
            Intent::GroupName { .. } => "group_name",
            Intent::Rename { .. } => "rename",
            Intent::Invite { .. } => "invite",
            Intent::Kick { .. } => "kick",
            Intent::Update => "update",
            Intent::CommitProposals => "commit_proposals",
            Intent::Leave => "leave",
        }
    }
}

#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub group_id: Vec<u8>,
    pub intent: Intent,
    pub client_message_id: [u8; 16],
    /// The MLS message once encrypted; `None` while only the intent exists.
    pub payload: Option<Vec<u8>>,
    pub welcome: Option<Vec<u8>>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// When the user asked for it (unix seconds): a text message carries it as its time.
    pub created_at: i64,
}

/// A query of outbox rows in the column order [`read_outbox`] reads.
macro_rules! select_outbox {
    ($rest:literal) => {
        concat!(
            "SELECT id, group_id, intent, client_message_id, payload, welcome, added, removed, created_at FROM outbox ",
            $rest
        )
    };
}

/// Every queued item, oldest first.
pub fn outbox(connection: &Connection) -> Result<Vec<OutboxRow>, CoreError> {
    let mut statement = connection
        .prepare_cached(select_outbox!("ORDER BY id"))
        .map_err(sql)?;
    read_outbox(&mut statement, [])
}

/// A group's queued items, oldest first. Read at every delivery, so one index lookup (the
/// outbox of a client that only receives is empty) and not a read of every group's items.
pub fn outbox_of_group(
    connection: &Connection,
    group_id: &[u8],
) -> Result<Vec<OutboxRow>, CoreError> {
    let mut statement = connection
        .prepare_cached(select_outbox!("WHERE group_id = ?1 ORDER BY id"))
        .map_err(sql)?;
    read_outbox(&mut statement, [group_id])
}

/// One queued item, by its id.
pub fn outbox_row(connection: &Connection, id: i64) -> Result<Option<OutboxRow>, CoreError> {
    let mut statement = connection
        .prepare_cached(select_outbox!("WHERE id = ?1"))
        .map_err(sql)?;
    Ok(read_outbox(&mut statement, [id])?.pop())
}

fn read_outbox(
    statement: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<OutboxRow>, CoreError> {
    let parse_list = |list: Option<String>| -> Vec<String> {
        list.and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    };
    let rows = statement
        .query_map(params, |row| {
            let intent: String = row.get(2)?;
            let client_message_id: Vec<u8> = row.get(3)?;
            Ok((
                intent,
                client_message_id,
                OutboxRow {
                    id: row.get(0)?,
                    group_id: row.get(1)?,
                    intent: Intent::Update,
                    client_message_id: [0; 16],
                    payload: row.get(4)?,
                    welcome: row.get(5)?,
                    added: parse_list(row.get(6)?),
                    removed: parse_list(row.get(7)?),
                    created_at: row.get(8)?,
                },
            ))
        })
        .map_err(sql)?;
    let mut outbox = Vec::new();
    for row in rows {
        let (intent, client_message_id, mut entry) = row.map_err(sql)?;
        entry.intent = serde_json::from_str(&intent)
            .map_err(|error| CoreError::Database(format!("corrupt outbox intent: {error}")))?;
        entry.client_message_id = client_message_id
            .try_into()
            .map_err(|_| CoreError::Database("corrupt outbox message id".into()))?;
        outbox.push(entry);
    }
    Ok(outbox)
}

pub fn insert_outbox(
    connection: &Connection,
    group_id: &[u8],
    intent: &Intent,
) -> Result<i64, CoreError> {
    let intent =
        serde_json::to_string(intent).map_err(|error| CoreError::Database(error.to_string()))?;
    // A placeholder: the id the DS sees is made when the message is built
    // (`set_outbox_payload`).
    let client_message_id: [u8; 16] = rand::random();
    connection
        .execute(
            "INSERT INTO outbox (group_id, intent, client_message_id, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![group_id, intent, &client_message_id[..], now_unix_secs()],
        )
        .map_err(sql)?;
    Ok(connection.last_insert_rowid())
}

/// Records the encrypted form of an intent (and, for commits, its routing) with the client
/// message id it is sent under, made now: ids grow with time, which keeps the DS's index of
/// them cheap, and the time in an id made at build time (the client builds only while online)
/// is normally about when the DS receives it anyway, not when the message was written
/// (docs/threat-model.md says when it is not).
pub fn set_outbox_payload(
    connection: &Connection,
    id: i64,
    payload: &[u8],
    welcome: Option<&[u8]>,
    added: &[String],
    removed: &[String],
) -> Result<ClientMessageId, CoreError> {
    let added =
        serde_json::to_string(added).map_err(|error| CoreError::Database(error.to_string()))?;
    let removed =
        serde_json::to_string(removed).map_err(|error| CoreError::Database(error.to_string()))?;
    let client_message_id = new_client_message_id();
    connection
        .execute(
            "UPDATE outbox SET payload = ?2, welcome = ?3, added = ?4, removed = ?5, client_message_id = ?6 WHERE id = ?1",
            params![id, payload, welcome, added, removed, &client_message_id[..]],
        )
        .map_err(sql)?;
    Ok(client_message_id)
}

/// Forgets the encrypted form (it went stale). The message id changes at once, so that a late
/// answer to the stale form names an id no row has; the next build makes the id it is sent
/// under.
pub fn reset_outbox(connection: &Connection, id: i64) -> Result<(), CoreError> {
    let placeholder: [u8; 16] = rand::random();
    connection
        .execute(
            "UPDATE outbox SET payload = NULL, welcome = NULL, added = NULL, removed = NULL, client_message_id = ?2 WHERE id = ?1",
            params![id, &placeholder[..]],
        )
        .map(|_| ())
        .map_err(sql)
}

pub fn delete_outbox(connection: &Connection, id: i64) -> Result<(), CoreError> {
    connection
        .execute("DELETE FROM outbox WHERE id = ?1", params![id])
        .map(|_| ())
        .map_err(sql)
}

/// One line of a group's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub id: i64,
    pub seq: Option<u64>,
    pub sender: String,
    pub kind: String,
    pub text: String,
    pub at: i64,
    pub state: Option<String>,
    /// For our own messages still in the outbox: the item that will settle this line.
    pub outbox_id: Option<i64>,
}

/// The columns [`history_entry`] reads, in order.
const HISTORY_COLUMNS: &str = "id, seq, sender, kind, text, at, state, outbox_id";

fn history_entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<HistoryEntry> {
    Ok(HistoryEntry {
        id: row.get(0)?,
        seq: row
            .get::<_, Option<i64>>(1)?
            .and_then(|seq| u64::try_from(seq).ok()),
        sender: row.get(2)?,
        kind: row.get(3)?,
        text: row.get(4)?,
        at: row.get(5)?,
        state: row.get(6)?,
        outbox_id: row.get(7)?,
    })
}

/// A new line for a group's timeline.
#[derive(Debug, Clone, Copy)]
pub struct NewHistory<'a> {
    pub seq: Option<u64>,
    pub sender: &'a str,
    /// `message`, `system` or `warning`.
    pub kind: &'a str,
    pub text: &'a str,
    /// For our own messages: the outbox item that will settle the line.
    pub outbox_id: Option<i64>,
    /// For our own messages: `sending`, `sent`, `failed: ...`.
    pub state: Option<&'a str>,
    /// When it happened (unix seconds); `None`: now.
    pub at: Option<i64>,
}

impl<'a> NewHistory<'a> {
    pub fn system(seq: Option<u64>, text: &'a str) -> NewHistory<'a> {
        NewHistory {
            seq,
            sender: "",
            kind: "system",
            text,
            outbox_id: None,
            state: None,
            at: None,
        }
    }

    /// A system line that the timeline shows as a warning.
    pub fn warning(seq: Option<u64>, text: &'a str) -> NewHistory<'a> {
        NewHistory {
            kind: "warning",
            ..NewHistory::system(seq, text)
        }
    }

    pub fn message(seq: Option<u64>, sender: &'a str, text: &'a str) -> NewHistory<'a> {
        NewHistory {
            seq,
            sender,
            kind: "message",
            text,
            outbox_id: None,
            state: None,
            at: None,
        }
    }
}

pub fn insert_history(
    connection: &Connection,
    group_id: &[u8],
    line: NewHistory<'_>,
) -> Result<i64, CoreError> {
    connection
        .prepare_cached(
            "INSERT INTO history (group_id, seq, sender, kind, text, at, outbox_id, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .and_then(|mut statement| {
            statement.execute(params![
                group_id,
                line.seq.map(|seq| i64::try_from(seq).unwrap_or(i64::MAX)),
                line.sender,
                line.kind,
                line.text,
                line.at.unwrap_or_else(now_unix_secs),
                line.outbox_id,
                line.state
            ])
        })
        .map_err(sql)?;
    Ok(connection.last_insert_rowid())
}

/// Marks the history line of an outbox item as sent with its seq, or failed.
pub fn settle_history(
    connection: &Connection,
    outbox_id: i64,
    seq: Option<u64>,
    state: &str,
) -> Result<(), CoreError> {
    connection
        .execute(
            "UPDATE history SET seq = COALESCE(?2, seq), state = ?3, outbox_id = NULL WHERE outbox_id = ?1",
            params![outbox_id, seq.map(|seq| i64::try_from(seq).unwrap_or(i64::MAX)), state],
        )
        .map(|_| ())
        .map_err(sql)
}

pub fn history(
    connection: &Connection,
    group_id: &[u8],
    limit: u32,
) -> Result<Vec<HistoryEntry>, CoreError> {
    let mut statement = connection
        .prepare(&format!(
            "SELECT {HISTORY_COLUMNS} FROM history WHERE group_id = ?1 ORDER BY id DESC LIMIT ?2"
        ))
        .map_err(sql)?;
    let rows = statement
        .query_map(params![group_id, limit], history_entry)
        .map_err(sql)?;
    let mut entries = rows.collect::<Result<Vec<_>, _>>().map_err(sql)?;
    entries.reverse();
    Ok(entries)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownKey {
    pub signature_key: Vec<u8>,
    pub verified: bool,
    pub key_changed: bool,
}

pub fn known_key(connection: &Connection, user: &str) -> Result<Option<KnownKey>, CoreError> {
    connection
        .prepare_cached(
            "SELECT signature_key, verified, key_changed FROM known_keys WHERE user = ?1",
        )
        .and_then(|mut statement| {
            statement
                .query_row(params![user], |row| {
                    Ok(KnownKey {
                        signature_key: row.get(0)?,
                        verified: row.get::<_, i64>(1)? != 0,
                        key_changed: row.get::<_, i64>(2)? != 0,
                    })
                })
                .optional()
        })
        .map_err(sql)
}

/// What observing a user's key revealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyObservation {
    New,
    Same,
    Changed,
}

/// Records the key seen for `user`. A different key for a known name is stored but flagged
/// (and loses its verified mark): never silently accepted.
pub fn observe_key(
    connection: &Connection,
    user: &str,
    signature_key: &[u8],
) -> Result<KeyObservation, CoreError> {
    match known_key(connection, user)? {
        None => {
            connection
                .execute(
                    "INSERT INTO known_keys (user, signature_key) VALUES (?1, ?2)",
                    params![user, signature_key],
                )
                .map_err(sql)?;
            Ok(KeyObservation::New)
        }
        Some(known) if known.signature_key == signature_key => Ok(KeyObservation::Same),
        Some(known) => {
            connection
                .execute(
                    "UPDATE known_keys SET previous_key = ?2, signature_key = ?3, verified = 0, key_changed = 1 WHERE user = ?1",
                    params![user, known.signature_key, signature_key],
                )
                .map_err(sql)?;
            Ok(KeyObservation::Changed)
        }
    }
}

pub fn set_verified(connection: &Connection, user: &str) -> Result<bool, CoreError> {
    let changed = connection
        .execute(
            "UPDATE known_keys SET verified = 1, key_changed = 0 WHERE user = ?1",
            params![user],
        )
        .map_err(sql)?;
    Ok(changed > 0)
}

/// Messages of a group containing `text` (ASCII case-insensitive), at most `limit`, oldest first.
pub fn search_history(
    connection: &Connection,
    group_id: &[u8],
    text: &str,
    limit: u32,
) -> Result<Vec<HistoryEntry>, CoreError> {
    let pattern = format!(
        "%{}%",
        text.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    let mut statement = connection
        .prepare(&format!(
            "SELECT {HISTORY_COLUMNS} FROM history
             WHERE group_id = ?1 AND kind = 'message' AND text LIKE ?2 ESCAPE '\\' ORDER BY id DESC LIMIT ?3"
        ))
        .map_err(sql)?;
    let rows = statement
        .query_map(params![group_id, pattern, limit], history_entry)
        .map_err(sql)?;
    let mut entries = rows.collect::<Result<Vec<_>, _>>().map_err(sql)?;
    entries.reverse();
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile's transactions reach its WAL in a few writes, not two per page: the profile
    /// opens through the WAL VFS (this fails if `open` uses the default VFS, whose WAL the VFS
    /// does not know).
    #[test]
    fn a_profile_transaction_reaches_the_wal_in_a_few_writes() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let connection = open(&dir.path().join("profile.sqlite3")).expect("opens");
        migrate(&connection).expect("migrates");
        let wal = mlschat_ds::store::wal_vfs::wal_name(&connection).expect("a file database");
        let counts = || mlschat_ds::store::wal_vfs::write_counts(&wal);
        let (asked_before, made_before) = counts().expect("the profile's WAL is the VFS's");
        // About 40 pages: a large group's ratchet tree, as a commit rewrites it.
        let tree = vec![0x5a_u8; 160 * 1024];
        transaction_unsynced(&connection, || {
            connection
                .execute("CREATE TABLE tree (value BLOB)", [])
                .map_err(sql)?;
            connection
                .execute("INSERT INTO tree (value) VALUES (?1)", [&tree])
                .map_err(sql)?;
            Ok(())
        })
        .expect("commits");
        let (asked, made) = counts().expect("still open");
        let (asked, made) = (asked - asked_before, made - made_before);
        assert!(asked >= 80, "SQLite wrote only {asked} times for 40 pages");
        assert!(made <= 4, "{made} writes reached the WAL for {asked} asked");
        let stored: Vec<u8> = connection
            .query_row("SELECT value FROM tree", [], |row| row.get(0))
            .expect("reads back");
        assert!(stored == tree, "the stored tree differs");
        sync(&connection).expect("syncs");
    }

    #[test]
    fn outbox_ids_are_not_reused_after_migrating_a_v1_profile() {
        let connection = Connection::open_in_memory().expect("in-memory database");
        connection
            .execute_batch(&format!("{SCHEMA_V1} PRAGMA user_version = 1;"))
            .expect("a version 1 profile");
        let kept = insert_outbox(&connection, b"group", &Intent::Update).expect("insert");
        migrate(&connection).expect("migrate to the current schema");
        migrate(&connection).expect("migrating twice does nothing");
        let rows = outbox(&connection).expect("read the outbox");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].id, kept);
        assert_eq!(rows[0].intent, Intent::Update);

        let first = insert_outbox(&connection, b"group", &Intent::Text { text: "one".into() })
            .expect("insert");
        delete_outbox(&connection, first).expect("delete");
        let second = insert_outbox(&connection, b"group", &Intent::Text { text: "two".into() })
            .expect("insert");
        assert!(second > first, "id {first} was handed out again");
    }

    #[test]
    fn a_migrated_profile_counts_what_it_had_received_as_read() {
        let connection = Connection::open_in_memory().expect("in-memory database");
        connection
            .execute_batch(&format!(
                "{SCHEMA_V1} {SCHEMA_V2} {SCHEMA_V3} PRAGMA user_version = 3;"
            ))
            .expect("a version 3 profile");
        connection
            .execute(
                "INSERT INTO groups (group_id, name, cursor, active, announced, leaving, last_self_update, joined_at)
                 VALUES (x'67', 'team', 5, 1, 1, 0, 0, 0)",
                [],
            )
            .expect("a group");
        let store = |seq: u64, sender: &str, text: &str| {
            insert_history(
                &connection,
                b"g",
                NewHistory::message(Some(seq), sender, text),
            )
            .expect("a history line");
        };
        for seq in 4..=5 {
            store(seq, "bob", "received before the upgrade");
        }
        migrate(&connection).expect("migrate to the current schema");
        store(6, "bob", "new");
        store(7, "alice", "our own");
        store(8, "bob", "newer");
        let rows = groups(&connection).expect("groups");
        assert_eq!((rows[0].read_seq, rows[0].viewed_at), (5, 0));
        let unread =
            |after: u64| unread_texts(&connection, b"g", after, "alice", 1000).expect("count");
        assert_eq!(unread(5), ["newer", "new"]);
        assert_eq!(
            unread_texts(&connection, b"g", 0, "alice", 2).expect("count"),
            ["newer"],
            "only the newest lines are looked at"
        );

        mark_read(&connection, b"g", 6).expect("mark");
        mark_read(&connection, b"g", 2).expect("a lower mark");
        let rows = groups(&connection).expect("groups");
        assert_eq!(rows[0].read_seq, 6, "a mark never moves back");
        assert!(rows[0].viewed_at > 0);
        // Two groups looked at within one second still tell which came last.
        insert_group(&connection, b"h", Some("other"), 0, true, 0).expect("a second group");
        mark_read(&connection, b"h", 0).expect("mark");
        mark_read(&connection, b"g", 6).expect("mark");
        let viewed = |rows: &[GroupRow], id: &[u8]| {
            rows.iter()
                .find(|row| row.group_id == id)
                .map(|row| row.viewed_at)
                .expect("listed")
        };
        let rows = groups(&connection).expect("groups");
        assert!(viewed(&rows, b"g") > viewed(&rows, b"h"));
        mark_read(&connection, b"h", 0).expect("mark");
        let rows = groups(&connection).expect("groups");
        assert!(viewed(&rows, b"h") > viewed(&rows, b"g"));
        assert_eq!(unread(rows[0].read_seq), ["newer"]);
    }

    /// Joined again (a Welcome after a removal), a group keeps its place in the list, which
    /// Alt+1..9 number, and when it was looked at last; it is active, and what came before is
    /// read.
    #[test]
    fn joining_again_keeps_the_groups_place_and_view() {
        let connection = Connection::open_in_memory().expect("in-memory database");
        migrate(&connection).expect("migrates");
        insert_group(&connection, b"a", Some("first"), 0, true, 0).expect("first");
        insert_group(&connection, b"b", Some("second"), 0, true, 0).expect("second");
        connection
            .execute(
                "UPDATE groups SET joined_at = joined_at - 10 WHERE group_id = x'61'",
                [],
            )
            .expect("first joined earlier");
        mark_read(&connection, b"a", 3).expect("looked at");
        let before = groups(&connection).expect("groups");
        set_group_flag(&connection, b"a", GroupFlag::Active, false).expect("removed");
        insert_group(&connection, b"a", Some("first"), 9, true, 4).expect("joined again");
        let after = groups(&connection).expect("groups");
        let ids = |rows: &[GroupRow]| -> Vec<Vec<u8>> {
            rows.iter().map(|row| row.group_id.clone()).collect()
        };
        assert_eq!(ids(&after), ids(&before), "the same order");
        let (old, new) = (&before[0], &after[0]);
        assert_eq!(new.viewed_at, old.viewed_at);
        assert!(new.active);
        assert_eq!((new.cursor, new.read_seq), (9, 9));
    }

    #[test]
    fn a_message_gets_its_time_ordered_id_when_built_and_loses_it_when_reset() {
        let connection = Connection::open_in_memory().expect("in-memory database");
        migrate(&connection).expect("migrates");
        let stored_id = |id: i64| -> ClientMessageId {
            outbox(&connection)
                .expect("reads")
                .into_iter()
                .find(|row| row.id == id)
                .expect("the row")
                .client_message_id
        };
        let first = insert_outbox(&connection, b"group", &Intent::Update).expect("insert");
        let second = insert_outbox(&connection, b"group", &Intent::Update).expect("insert");
        let placeholder = stored_id(first);
        let built_first =
            set_outbox_payload(&connection, first, b"one", None, &[], &[]).expect("built");
        let built_second =
            set_outbox_payload(&connection, second, b"two", None, &[], &[]).expect("built");
        assert_ne!(built_first, placeholder, "building makes the id");
        assert_eq!(
            stored_id(first),
            built_first,
            "the id sent is the id stored"
        );
        assert_eq!(stored_id(second), built_second);
        // Time first: later builds sort after earlier ones, as the DS's index wants them.
        assert!(built_first[..8] <= built_second[..8]);
        assert_ne!(built_first[8..], built_second[8..]);

        reset_outbox(&connection, first).expect("reset");
        assert_ne!(
            stored_id(first),
            built_first,
            "a late answer to the stale form must not match the row"
        );
    }

    #[test]
    fn an_unsynced_transaction_leaves_the_connection_fsyncing_and_sync_commits_a_change() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let connection = open(&directory.path().join("profile.sqlite3")).expect("opens");
        migrate(&connection).expect("migrates");
        let synchronous = |connection: &Connection| -> i64 {
            connection
                .query_row("PRAGMA synchronous", [], |row| row.get(0))
                .expect("reads the setting")
        };
        let synced = |connection: &Connection| -> Option<i64> {
            connection
                .query_row("SELECT count FROM synced WHERE id = 1", [], |row| {
                    row.get(0)
                })
                .optional()
                .expect("reads the marker")
        };
        assert_eq!(synchronous(&connection), 2, "FULL by default");

        let id = transaction_unsynced(&connection, || {
            assert_eq!(synchronous(&connection), 1, "NORMAL inside");
            insert_outbox(&connection, b"group", &Intent::Update)
        })
        .expect("commits");
        assert_eq!(synchronous(&connection), 2, "FULL again after the commit");
        assert_eq!(outbox(&connection).expect("reads")[0].id, id);

        let failed: Result<(), CoreError> = transaction_unsynced(&connection, || {
            delete_outbox(&connection, id)?;
            Err(CoreError::Invalid("the step failed".into()))
        });
        assert!(failed.is_err());
        assert_eq!(synchronous(&connection), 2, "FULL again after a rollback");
        assert_eq!(outbox(&connection).expect("reads").len(), 1, "rolled back");

        // Without WAL (here: an in-memory database) the step is an ordinary transaction.
        let memory = Connection::open_in_memory().expect("in-memory database");
        migrate(&memory).expect("migrates");
        transaction_unsynced(&memory, || {
            assert_eq!(synchronous(&memory), 2, "FULL without WAL");
            insert_outbox(&memory, b"group", &Intent::Update)
        })
        .expect("commits");

        assert_eq!(synced(&connection), None);
        sync(&connection).expect("syncs");
        sync(&connection).expect("syncs again");
        assert_eq!(synced(&connection), Some(2), "each sync commits a change");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let connection = Connection::open_in_memory().expect("in-memory database");
        connection
            .execute_batch("PRAGMA user_version = 99;")
            .expect("set the version");
        assert!(migrate(&connection).is_err());
    }
}
