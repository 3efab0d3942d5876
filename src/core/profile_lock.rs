//! The profile's lock: one process at a time may use a profile. Two would each keep the
//! groups' MLS state in memory, move it on independently and overwrite each other's, and
//! take turns replacing each other's session at the DS.
//!
//! The lock is an advisory `flock` on `lock` in the profile directory, held by the open file
//! for as long as the core runs; the kernel drops it when the process ends, however it ends,
//! so a crash never leaves a stale lock behind. The file holds the holder's process id, only
//! to name it in the error.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;

use super::CoreError;

/// Takes the lock of the profile in `dir`, or says who holds it.
pub fn lock(dir: &Path) -> Result<File, CoreError> {
    let path = dir.join("lock");
    let cannot = |error: std::io::Error| {
        CoreError::Invalid(format!(
            "cannot lock the profile ({}): {error}",
            path.display()
        ))
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(cannot)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let by = if !holder.is_empty() && holder.bytes().all(|byte| byte.is_ascii_digit()) {
                format!(" (process {holder})")
            } else {
                String::new()
            };
            return Err(CoreError::InUse(format!(
                "the profile in {} is open in another mlschat{by}; quit that one first",
                dir.display()
            )));
        }
        Err(TryLockError::Error(error)) => return Err(cannot(error)),
    }
    file.set_len(0).map_err(cannot)?;
    file.seek(SeekFrom::Start(0)).map_err(cannot)?;
    writeln!(file, "{}", std::process::id()).map_err(cannot)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_process_id_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = lock(dir.path()).expect("the first lock");
        let refused = lock(dir.path()).expect_err("a second lock is refused");
        let CoreError::InUse(message) = &refused else {
            panic!("refused as in use: {refused:?}");
        };
        assert!(
            message.contains(&format!("(process {})", std::process::id())),
            "{message}"
        );
        drop(first);
        lock(dir.path()).expect("free again once the first holder let go");
    }
}
