//! Command-line flags, the same for the TUI and the headless mode.

use std::path::PathBuf;

use clap::Parser;

/// End-to-end encrypted group chat for the terminal (MLS, RFC 9420).
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Your user name (lowercase letters, digits, '_', '-', '.').
    #[arg(long)]
    pub name: Option<String>,
    /// The delivery service, HOST:PORT. Without it, 127.0.0.1:4433 is used, and if no DS
    /// answers there one is started in-process.
    #[arg(long)]
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
