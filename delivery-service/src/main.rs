//! `mlschat-ds`: parses flags and the config file, prepares the certificate, store and endpoint,
//! and runs the DS until SIGINT or SIGTERM.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Parser;
use mlschat_ds::config::ConfigFile;
use mlschat_ds::store::SqliteStore;
use mlschat_ds::tls::{self, ServerIdentity};

const DEFAULT_LISTEN: &str = "127.0.0.1:4433";

/// The mlschat delivery service: stores and forwards MLS ciphertext over QUIC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Address to listen on (UDP).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory for the database and the generated certificate [default: the XDG data dir].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// PEM certificate chain to serve instead of the generated self-signed one (needs --key).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// TOML config file with limits (see docs/operations.md).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn default_data_dir() -> Result<PathBuf> {
    directories::ProjectDirs::from("", "", "mlschat-ds")
        .map(|dirs| dirs.data_dir().to_path_buf())
        .context("cannot determine a data directory; pass --data-dir")
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a file or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let limits = file.limits;
    limits.validate()?;
    let listen = match cli.listen.or(file.listen) {
        Some(listen) => listen,
        None => DEFAULT_LISTEN.parse().context("default listen address")?,
    };
    let data_dir = match cli.data_dir.or(file.data_dir) {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    mlschat_ds::config::create_data_dir(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;

    let identity = match (cli.cert.or(file.cert), cli.key.or(file.key)) {
        (Some(cert), Some(key)) => ServerIdentity::from_pem_files(&cert, &key)?,
        (None, None) => {
            let (identity, generated) = ServerIdentity::load_or_generate(&data_dir)?;
            if generated {
                println!(
                    "generated a self-signed certificate in {}",
                    data_dir.display()
                );
            }
            identity
        }
        _ => anyhow::bail!("--cert and --key go together"),
    };
    let fingerprint = identity.fingerprint();
    let store = SqliteStore::open(data_dir.join("ds.sqlite3"), limits.store_limits())?;
    let endpoint = tls::bind_endpoint(
        listen,
        Some(tls::server_config(identity, &limits)?),
        limits.udp_buffer_bytes,
    )?;
    let address = endpoint.local_addr()?;
    println!("mlschat-ds listening on {address}");
    println!("certificate SHA-256: {fingerprint}");
    println!("data directory: {}", data_dir.display());
    tracing::info!(%address, %fingerprint, "listening");
    mlschat_ds::run(endpoint, store, limits, shutdown_signal()).await;
    Ok(())
}
