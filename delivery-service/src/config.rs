//! DS settings: listen address, data directory, database and limits, with defaults, a TOML
//! loader and validation that names the offending key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::{FrameKind, max_body_len};
use crate::store::{DatabaseUrl, StoreLimits};

/// Limits that protect the DS from its peers. Every field has a default suited to a team chat
/// server; a config file overrides any of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections the DS holds at once.
    pub max_connections: usize,
    /// Connections one IP address may hold at once.
    pub max_connections_per_ip: usize,
    /// Above this many connections, new ones must pass a stateless retry (address validation).
    pub retry_above_connections: usize,
    /// Sustained requests per second per connection.
    pub requests_per_second: u32,
    /// Requests a connection may send in a burst.
    pub request_burst: u32,
    /// Requests one connection may have in flight; further frames wait (backpressure).
    pub max_in_flight_requests: usize,
    /// Largest `Send` frame body accepted, in bytes (the protocol allows up to 16 MiB).
    pub max_send_bytes: u32,
    /// Unclaimed KeyPackages one user may store.
    pub max_key_packages_per_user: u32,
    /// `ClaimKeyPackage` requests one connection may make per minute (also the burst). Claims
    /// use up other users' KeyPackages, so RFC 9420 §16.8 says they SHOULD be rate-limited.
    pub key_package_claims_per_minute: u32,
    /// Stored messages one group may hold before sends get QuotaExceeded.
    pub max_group_backlog: u64,
    /// Messages older than this are deleted even if undelivered.
    pub retention_secs: u64,
    /// Time a new connection has to authenticate.
    pub auth_timeout_secs: u64,
    /// A connection silent for this long is closed (clients send keep-alives).
    pub idle_timeout_secs: u64,
    /// SO_RCVBUF and SO_SNDBUF of the UDP socket. quinn fan-out drops packets with the
    /// kernel defaults, even on loopback.
    pub udp_buffer_bytes: usize,
    /// How often expired and fully delivered messages are purged.
    pub purge_interval_secs: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 10_000,
            max_connections_per_ip: 256,
            retry_above_connections: 5_000,
            requests_per_second: 500,
            request_burst: 2_000,
            max_in_flight_requests: 256,
            max_send_bytes: 8 * 1024 * 1024,
            max_key_packages_per_user: 1_000,
            key_package_claims_per_minute: 60,
            max_group_backlog: 100_000,
            retention_secs: 30 * 24 * 3600,
            auth_timeout_secs: 10,
            idle_timeout_secs: 60,
            udp_buffer_bytes: 4 * 1024 * 1024,
            purge_interval_secs: 60,
        }
    }
}

impl Limits {
    pub fn store_limits(&self) -> StoreLimits {
        StoreLimits {
            max_key_packages_per_user: self.max_key_packages_per_user,
            max_group_backlog: self.max_group_backlog,
        }
    }

    pub fn auth_timeout(&self) -> Duration {
        Duration::from_secs(self.auth_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// Rejects values that would make the DS unusable or unsafe (a zero rate that never
    /// refills, a zero deadline, a buffer too small for one QUIC datagram burst...), naming the
    /// key, so that a typo fails at startup instead of at the first client.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check(key: &'static str, ok: bool, rule: String) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid { key, rule })
            }
        }
        const KIB: usize = 1024;
        const MIB: usize = 1024 * KIB;
        const DAY: u64 = 24 * 3600;
        let send_limit = max_body_len(FrameKind::Send);
        check(
            "max_connections",
            self.max_connections >= 1,
            "must be at least 1".into(),
        )?;
        check(
            "max_connections_per_ip",
            (1..=self.max_connections).contains(&self.max_connections_per_ip),
            format!("must be 1 to max_connections ({})", self.max_connections),
        )?;
        check(
            "requests_per_second",
            self.requests_per_second >= 1,
            "must be at least 1 (with 0 the rate limiter never refills)".into(),
        )?;
        check(
            "request_burst",
            self.request_burst >= 1,
            "must be at least 1".into(),
        )?;
        check(
            "max_in_flight_requests",
            (1..=65_536).contains(&self.max_in_flight_requests),
            "must be 1 to 65536".into(),
        )?;
        check(
            "max_send_bytes",
            (1024..=send_limit).contains(&self.max_send_bytes),
            format!("must be 1024 to {send_limit} bytes (the protocol's limit for Send)"),
        )?;
        check(
            "max_key_packages_per_user",
            self.max_key_packages_per_user >= 1,
            "must be at least 1".into(),
        )?;
        check(
            "key_package_claims_per_minute",
            self.key_package_claims_per_minute >= 1,
            "must be at least 1 (with 0 nobody could ever be invited)".into(),
        )?;
        check(
            "max_group_backlog",
            self.max_group_backlog >= 1,
            "must be at least 1".into(),
        )?;
        check(
            "retention_secs",
            (60..=10 * 365 * DAY).contains(&self.retention_secs),
            "must be 60 seconds to 10 years (with 0 every message is deleted at once)".into(),
        )?;
        check(
            "auth_timeout_secs",
            (1..=600).contains(&self.auth_timeout_secs),
            "must be 1 to 600 seconds".into(),
        )?;
        // Below two keep-alive intervals, a quiet but healthy client is timed out between two
        // keep-alives and reconnects over and over.
        let keep_alive = crate::tls::CLIENT_KEEP_ALIVE.as_secs();
        check(
            "idle_timeout_secs",
            (2 * keep_alive..=DAY).contains(&self.idle_timeout_secs),
            format!(
                "must be {} seconds (twice the clients' {keep_alive} s keep-alive) to 1 day",
                2 * keep_alive
            ),
        )?;
        check(
            "udp_buffer_bytes",
            (64 * KIB..=256 * MIB).contains(&self.udp_buffer_bytes),
            "must be 64 KiB (65536) to 256 MiB".into(),
        )?;
        check(
            "purge_interval_secs",
            (1..=DAY).contains(&self.purge_interval_secs),
            "must be 1 second to 1 day".into(),
        )
    }
}

/// The DS configuration file (TOML). Command-line flags override it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Where the DS keeps its state: `sqlite://PATH` or `postgres://...` (default: SQLite in
    /// the data directory). Its `Debug` hides any password.
    pub database: Option<DatabaseUrl>,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid limit `{key}`: {rule}")]
    Invalid { key: &'static str, rule: String },
}

impl ConfigFile {
    /// Reads, parses and validates the file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: ConfigFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        file.limits.validate()?;
        Ok(file)
    }
}

/// Creates the data directory (and missing parents). On unix the directory itself is created
/// with mode 0700: it holds the TLS private key and the database, whose metadata (who is in
/// which group, when they send) is nobody else's business. An existing directory is left as
/// it is.
pub fn create_data_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_file_keeps_defaults() {
        let config: ConfigFile =
            toml::from_str("listen = \"127.0.0.1:5000\"\n[limits]\nmax_connections = 7\n")
                .expect("valid config");
        assert_eq!(
            config.listen,
            Some("127.0.0.1:5000".parse().expect("address"))
        );
        assert_eq!(config.limits.max_connections, 7);
        assert_eq!(
            config.limits.max_send_bytes,
            Limits::default().max_send_bytes
        );
    }

    #[test]
    fn defaults_are_valid() {
        Limits::default()
            .validate()
            .expect("the defaults pass validation");
    }

    #[test]
    fn absurd_limits_are_rejected_by_name() {
        let cases: [(&str, Limits); 10] = [
            (
                "requests_per_second",
                Limits {
                    requests_per_second: 0,
                    ..Limits::default()
                },
            ),
            (
                "auth_timeout_secs",
                Limits {
                    auth_timeout_secs: 0,
                    ..Limits::default()
                },
            ),
            (
                "max_connections",
                Limits {
                    max_connections: 0,
                    ..Limits::default()
                },
            ),
            (
                "retention_secs",
                Limits {
                    retention_secs: 0,
                    ..Limits::default()
                },
            ),
            (
                "udp_buffer_bytes",
                Limits {
                    udp_buffer_bytes: 65_535,
                    ..Limits::default()
                },
            ),
            (
                "idle_timeout_secs",
                Limits {
                    idle_timeout_secs: 19,
                    ..Limits::default()
                },
            ),
            (
                "max_send_bytes",
                Limits {
                    max_send_bytes: 16 * 1024 * 1024 + 1,
                    ..Limits::default()
                },
            ),
            (
                "key_package_claims_per_minute",
                Limits {
                    key_package_claims_per_minute: 0,
                    ..Limits::default()
                },
            ),
            (
                "max_in_flight_requests",
                Limits {
                    max_in_flight_requests: 0,
                    ..Limits::default()
                },
            ),
            (
                "max_connections_per_ip",
                Limits {
                    max_connections: 5,
                    max_connections_per_ip: 6,
                    ..Limits::default()
                },
            ),
        ];
        for (key, limits) in cases {
            match limits.validate() {
                Err(ConfigError::Invalid { key: named, rule }) => {
                    assert_eq!(named, key, "{rule}");
                    let message = ConfigError::Invalid { key: named, rule }.to_string();
                    assert!(message.contains(key), "{message}");
                }
                other => panic!("{key}: expected Invalid, got {other:?}"),
            }
        }
        // The smallest sensible values pass.
        Limits {
            udp_buffer_bytes: 64 * 1024,
            max_send_bytes: 16 * 1024 * 1024,
            retention_secs: 60,
            auth_timeout_secs: 1,
            ..Limits::default()
        }
        .validate()
        .expect("edge values are valid");
    }

    #[test]
    fn load_validates() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ds.toml");
        std::fs::write(&path, "[limits]\nrequests_per_second = 0\n").expect("write");
        let error = ConfigFile::load(&path).expect_err("zero rate is invalid");
        assert!(error.to_string().contains("requests_per_second"), "{error}");
    }

    #[cfg(unix)]
    #[test]
    fn data_dir_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temporary directory");
        let data = dir.path().join("nested").join("data");
        create_data_dir(&data).expect("create");
        let mode = std::fs::metadata(&data)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "mode {mode:o}");
        create_data_dir(&data).expect("an existing directory is fine");
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<ConfigFile>("[limits]\nmax_conections = 7\n").is_err());
    }
}
