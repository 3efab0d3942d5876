//! The trust-on-first-use record: one line `host:port sha256-hex` per DS, like SSH's
//! known_hosts. A person can read it and delete a line to re-pin a server.

use std::io::Write as _;
use std::path::Path;

use mlschat_ds::tls::CertFingerprint;

#[derive(Debug, thiserror::Error)]
pub enum KnownServersError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line} is not `host:port sha256-hex`")]
    Corrupt { path: String, line: usize },
}

/// The pinned fingerprint of `server`, if any.
pub fn lookup(path: &Path, server: &str) -> Result<Option<CertFingerprint>, KnownServersError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(KnownServersError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let corrupt = || KnownServersError::Corrupt {
            path: path.display().to_string(),
            line: index + 1,
        };
        let (address, fingerprint) = line.split_once(char::is_whitespace).ok_or_else(corrupt)?;
        if address == server {
            return CertFingerprint::from_hex(fingerprint.trim())
                .map(Some)
                .map_err(|_| corrupt());
        }
    }
    Ok(None)
}

/// Appends a pin for `server`.
pub fn pin(
    path: &Path,
    server: &str,
    fingerprint: CertFingerprint,
) -> Result<(), KnownServersError> {
    let write_error = |source| KnownServersError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(write_error)?;
    writeln!(file, "{server} {fingerprint}")
        .and_then(|()| file.sync_all())
        .map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_then_lookup() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("known_servers");
        assert_eq!(
            lookup(&path, "127.0.0.1:4433").expect("missing file is empty"),
            None
        );
        let fingerprint = CertFingerprint([9; 32]);
        pin(&path, "127.0.0.1:4433", fingerprint).expect("pin");
        pin(&path, "example.org:4433", CertFingerprint([1; 32])).expect("pin");
        assert_eq!(
            lookup(&path, "127.0.0.1:4433").expect("lookup"),
            Some(fingerprint)
        );
        std::fs::write(&path, "garbage\n").expect("write");
        assert!(lookup(&path, "127.0.0.1:4433").is_err());
    }
}
