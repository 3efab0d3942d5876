//! Command-line flags, the same for the TUI and the headless mode.

use std::path::PathBuf;

use clap::Parser;

/// The DS's port when `--server` names none.
pub const DEFAULT_PORT: u16 = 4433;

/// Checks a `--server` value and gives it its port: `HOST:PORT`, `HOST`, `IPv4`, `IPv4:PORT`,
/// `[IPv6]`, `[IPv6]:PORT` or a bare IPv6 address. Refused at once rather than retried for
/// ever by the connection loop, which takes a failed name lookup for a network outage.
pub fn server_address(text: &str) -> Result<String, String> {
    let text = text.trim();
    if let Ok(address) = text.parse::<std::net::SocketAddr>() {
        if address.port() == 0 {
            return Err("port 0 is not a port a DS listens on (1-65535)".into());
        }
        return Ok(text.to_string());
    }
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, DEFAULT_PORT).to_string());
    }
    if let Some(inner) = text
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
    {
        return match inner.parse::<std::net::Ipv6Addr>() {
            Ok(ip) => Ok(format!("[{ip}]:{DEFAULT_PORT}")),
            Err(_) => Err(format!("{inner:?} is not an IPv6 address")),
        };
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => {
            let port: u16 = port
                .parse()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
            (host, port)
        }
        None => (text, DEFAULT_PORT),
    };
    let is_name_character = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
    if host.is_empty() || host.contains(':') || !host.chars().all(is_name_character) {
        return Err(format!(
            "{host:?} is not a host name or address (expected HOST:PORT, for example \
             chat.example.org:4433)"
        ));
    }
    Ok(format!("{host}:{port}"))
}

/// End-to-end encrypted group chat for the terminal (MLS, RFC 9420).
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Your user name (lowercase letters, digits, '_', '-', '.').
    #[arg(long)]
    pub name: Option<String>,
    /// The delivery service, HOST:PORT (the port defaults to 4433). Without it, 127.0.0.1:4433
    /// is used, and if no DS answers there one is started in-process.
    #[arg(long, value_parser = server_address)]
    pub server: Option<String>,
    /// Profile directory [default: <XDG data dir>/mlschat/<name>].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Pin the DS certificate's SHA-256 (64 hex digits) instead of trusting it on first use.
    #[arg(long = "server-cert-sha256", value_name = "HEX")]
    pub server_cert_sha256: Option<String>,
    /// Read commands on stdin and write JSON events on stdout instead of drawing the TUI.
    #[arg(long)]
    pub headless: bool,
    /// Self-update every group after this many seconds (0 disables it) [default: 7 days].
    #[arg(long, value_name = "SECONDS")]
    pub auto_update_secs: Option<u64>,
    /// Log file [default: mlschat.log in the profile directory].
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// TUI settings file (key bindings, colours) [default: <XDG config dir>/mlschat/config.toml].
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_gets_the_default_port_and_bad_ones_are_refused() {
        for (given, meant) in [
            ("127.0.0.1:4500", "127.0.0.1:4500"),
            ("127.0.0.1", "127.0.0.1:4433"),
            ("chat.example.org", "chat.example.org:4433"),
            ("chat.example.org:443", "chat.example.org:443"),
            ("localhost", "localhost:4433"),
            ("::1", "[::1]:4433"),
            ("[::1]", "[::1]:4433"),
            ("[::1]:4500", "[::1]:4500"),
        ] {
            assert_eq!(server_address(given).as_deref(), Ok(meant), "{given}");
        }
        for bad in [
            "",
            ":4433",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "host:port",
            "[::1",
            "[nope]",
            "two words",
            "a/b:4433",
        ] {
            assert!(server_address(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
