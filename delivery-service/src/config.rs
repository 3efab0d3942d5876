//! DS settings: listen address, data directory and limits, with defaults and a TOML loader.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::StoreLimits;

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
}

/// The DS configuration file (TOML). Command-line flags override it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
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
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }
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
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<ConfigFile>("[limits]\nmax_conections = 7\n").is_err());
    }
}
