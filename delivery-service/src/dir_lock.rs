//! One process per directory or database: an advisory `flock` on `lock` in a DS data directory
//! or a client profile, or on `NAME-lock` beside a DS's SQLite database `NAME`, held by the open
//! file for as long as its owner runs. The kernel drops it when the process ends, however it
//! ends, so a crash never leaves a stale lock behind. The file holds the holder's process id,
//! only to name it in the error.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    /// Another process holds the lock of `path` (the directory or the database); `holder` is
    /// its process id when the lock file names one.
    #[error("{} is in use by {}", .path.display(), holder_text(*.holder))]
    InUse { path: PathBuf, holder: Option<u32> },
    #[error("cannot lock {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn holder_text(holder: Option<u32>) -> String {
    holder.map_or_else(|| "another process".into(), |pid| format!("process {pid}"))
}

/// " (process N)" naming a lock's holder in a message, or nothing when it is not known.
pub fn process_suffix(holder: Option<u32>) -> String {
    holder.map_or_else(String::new, |pid| format!(" (process {pid})"))
}

/// The lock on a directory or a database; dropping it lets the next process in.
#[derive(Debug)]
pub struct DirLock {
    /// `None` where the file system cannot lock (see [`lock`]).
    _file: Option<File>,
}

/// Takes the lock of `dir` (which must exist), or says who holds it. Where the platform or the
/// file system has no locks (some unix systems' std, NFS mounted without locking, a read-only
/// file system), it warns and carries on unlocked, as before locks existed, rather than refusing
/// to start.
pub fn lock(dir: &Path) -> Result<DirLock, DirLockError> {
    lock_with(&dir.join("lock"), dir)
}

/// Takes the lock of the database file `database` (its directory must exist), held in
/// `NAME-lock` beside it as SQLite keeps `NAME-wal` and `NAME-shm`; the database itself is not
/// touched, so SQLite's own locks on it are not disturbed. As [`lock`] where locks are not
/// available.
pub fn lock_database(database: &Path) -> Result<DirLock, DirLockError> {
    let mut name = database.as_os_str().to_owned();
    name.push("-lock");
    lock_with(Path::new(&name), database)
}

/// Locks `lock_file`, which stands for `what` in errors.
fn lock_with(lock_file: &Path, what: &Path) -> Result<DirLock, DirLockError> {
    match try_lock(lock_file, what) {
        Err(DirLockError::Io { path, source }) if cannot_lock_here(&source) => {
            tracing::warn!(path = %path.display(), error = %source, "cannot lock here: carrying on without the lock, so nothing stops a second process from using this directory");
            Ok(DirLock { _file: None })
        }
        other => other,
    }
}

/// Errors that say locking is not available here, rather than that something is wrong.
fn cannot_lock_here(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::Unsupported | ErrorKind::ReadOnlyFilesystem
    ) || error.raw_os_error().is_some_and(|code| {
        code == libc::ENOLCK || code == libc::EOPNOTSUPP || code == libc::ENOSYS
    })
}

fn try_lock(lock_file: &Path, what: &Path) -> Result<DirLock, DirLockError> {
    let path = lock_file.to_path_buf();
    let io = |source| DirLockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(DirLockError::InUse {
                path: what.to_path_buf(),
                holder: holder.trim().parse().ok(),
            });
        }
        Err(TryLockError::Error(source)) => return Err(io(source)),
    }
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DirLock { _file: Some(file) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_process_id_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = lock(dir.path()).expect("the first lock");
        let refused = lock(dir.path()).expect_err("a second lock is refused");
        let DirLockError::InUse { holder, .. } = &refused else {
            panic!("refused as in use: {refused:?}");
        };
        assert_eq!(*holder, Some(std::process::id()));
        assert!(
            refused
                .to_string()
                .ends_with(&format!("is in use by process {}", std::process::id())),
            "{refused}"
        );
        drop(first);
        lock(dir.path()).expect("free again once the first holder let go");
    }

    #[test]
    fn a_database_is_locked_beside_it_apart_from_its_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let database = dir.path().join("ds.sqlite3");
        let _directory = lock(dir.path()).expect("the directory's lock");
        let first = lock_database(&database).expect("the database's lock, beside the directory's");
        assert!(dir.path().join("ds.sqlite3-lock").exists());
        assert!(!database.exists(), "the database itself is not created");
        let refused = lock_database(&database).expect_err("a second lock is refused");
        assert!(
            refused.to_string().starts_with(&format!(
                "{} is in use by process {}",
                database.display(),
                std::process::id()
            )),
            "{refused}"
        );
        drop(first);
        lock_database(&database).expect("free again once the first holder let go");
    }
}
