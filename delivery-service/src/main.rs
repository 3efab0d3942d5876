//! `mlschat-ds`: parses flags and the config file, prepares the certificate, store and endpoint,
//! and runs the DS until SIGINT or SIGTERM. The `--database` URL's scheme picks the store
//! backend; the server is instantiated for the one chosen.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Parser;
use mlschat_ds::config::{ConfigFile, Limits};
use mlschat_ds::dir_lock::DirLockError;
use mlschat_ds::store::{
    DatabaseUrl, PostgresOptions, PostgresStore, SqliteStore, Store, StoreError,
};
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
    /// Where to keep state: sqlite://PATH, or postgres://USER@HOST/DB to share one PostgreSQL
    /// database between several DS nodes [default: sqlite in the data directory]. Prefer the
    /// environment variable when the URL holds a password.
    #[arg(long, env = "MLSCHAT_DS_DATABASE", hide_env_values = true, value_parser = DatabaseUrl::parse)]
    database: Option<DatabaseUrl>,
}

fn default_data_dir() -> Result<PathBuf> {
    directories::ProjectDirs::from("", "", "mlschat-ds")
        .map(|dirs| dirs.data_dir().to_path_buf())
        .context("cannot determine a data directory; pass --data-dir")
}

/// Installs the SIGTERM, SIGINT and SIGHUP handlers now, before the banner tells anyone the DS
/// is up (a signal that arrived before would get the default action and kill the process without
/// a graceful shutdown), and returns the future that completes at the first of them. SIGHUP (the
/// terminal the DS runs in was closed) stops it gracefully too: its default action would end it
/// at once, even in the middle of a shutdown begun by Ctrl+C, without closing its connections.
/// A signal ignored when the DS started (`nohup` ignores SIGHUP, a background job SIGINT)
/// stays ignored.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let mut signals: Vec<(&'static str, tokio::signal::unix::Signal)> = {
        use tokio::signal::unix::{SignalKind, signal};
        [
            ("SIGTERM", SignalKind::terminate()),
            ("SIGINT", SignalKind::interrupt()),
            ("SIGHUP", SignalKind::hangup()),
        ]
        .into_iter()
        .filter(|(name, kind)| {
            *name == "SIGTERM" || !mlschat_ds::signals::ignored(kind.as_raw_value())
        })
        .filter_map(|(name, kind)| signal(kind).ok().map(|signal| (name, signal)))
        .collect()
    };
    async move {
        #[cfg(unix)]
        {
            if signals.is_empty() {
                let _ = tokio::signal::ctrl_c().await;
                tracing::info!("shutdown signal received");
            } else {
                let waits = signals.iter_mut().map(|(name, signal)| {
                    Box::pin(async move {
                        signal.recv().await;
                        *name
                    })
                });
                let (name, _, _) = futures::future::select_all(waits).await;
                tracing::info!(signal = name, "shutdown signal received");
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutdown signal received");
        }
    }
}

/// A line of the start-up banner on stdout. Unlike `println!`, it does not panic when stdout is
/// closed (the DS runs without anyone reading it): the address and fingerprint are logged too.
fn say(line: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match serve().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // Said once, on one line: the Debug form of the error would repeat each cause that
            // its message already ends with, under "Caused by".
            eprintln!("Error: {}", mlschat_ds::report::describe(error.chain()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a file or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (the pipe to `tee` or the terminal is gone) is lost,
        // and that is all: the fallback would report it with `eprintln!` to the same stderr,
        // which panics when stderr is broken and so ended the DS in the middle of a shutdown.
        .log_internal_errors(false)
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
    // Held until the process ends. Two DS processes on one SQLite database would each fan out
    // only what they accepted themselves, and with PostgreSQL each node needs its own directory
    // for its certificate anyway.
    let _data_dir_lock = mlschat_ds::dir_lock::lock(&data_dir).map_err(|error| match error {
        DirLockError::InUse { holder, .. } => anyhow::anyhow!(
            "the data directory {} is in use by another mlschat-ds{}; stop it first, or give \
             this one its own --data-dir",
            data_dir.display(),
            mlschat_ds::dir_lock::process_suffix(holder)
        ),
        error => error.into(),
    })?;

    let identity = match (cli.cert.or(file.cert), cli.key.or(file.key)) {
        (Some(cert), Some(key)) => ServerIdentity::from_pem_files(&cert, &key)?,
        (None, None) => {
            let (identity, generated) = ServerIdentity::load_or_generate(&data_dir)?;
            if generated {
                say(&format!(
                    "generated a self-signed certificate in {}",
                    data_dir.display()
                ));
            }
            identity
        }
        _ => anyhow::bail!("--cert and --key go together"),
    };
    let database = cli
        .database
        .or(file.database)
        .unwrap_or_else(|| DatabaseUrl::Sqlite(data_dir.join("ds.sqlite3")));
    let server = Server {
        identity,
        listen,
        limits,
        data_dir,
    };
    match database {
        DatabaseUrl::Sqlite(path) => {
            // Held until the process ends. The data directory's lock does not cover a
            // --database kept elsewhere, which a second DS with its own directory could open.
            let _database_lock =
                mlschat_ds::dir_lock::lock_database(&path).map_err(|error| match error {
                    DirLockError::InUse { holder, .. } => anyhow::anyhow!(
                        "the database {} is in use by another mlschat-ds{}; stop it first, or \
                         give this one its own --database",
                        path.display(),
                        mlschat_ds::dir_lock::process_suffix(holder)
                    ),
                    error => error.into(),
                })?;
            let store = SqliteStore::open(&path, server.limits.store_limits())
                .with_context(|| format!("cannot open the database {}", path.display()))?;
            let failed = store.failed();
            server.run(store, "sqlite", failed).await
        }
        DatabaseUrl::Postgres(ref url) => {
            let store = PostgresStore::connect(
                url,
                server.limits.store_limits(),
                PostgresOptions::default(),
            )
            .await
            .with_context(|| format!("cannot open the database {database}"))?;
            server
                .run(store, "postgres", std::future::pending::<StoreError>())
                .await
        }
    }
}

/// Everything but the store.
struct Server {
    identity: ServerIdentity,
    listen: SocketAddr,
    limits: Limits,
    data_dir: PathBuf,
}

impl Server {
    /// Serves until a shutdown signal, or until `store_failed` resolves: a store that can no
    /// longer make writes durable stops the DS with an error, so that a supervisor restarts
    /// it (the store recovers what reached the disk when it is opened again).
    async fn run<S: Store>(
        self,
        store: S,
        backend: &str,
        store_failed: impl std::future::Future<Output = StoreError> + Send + 'static,
    ) -> Result<()> {
        let fingerprint = self.identity.fingerprint();
        let reset_key = tls::StatelessResetKey::load_or_generate(&self.data_dir)?;
        let endpoint = tls::bind_server_endpoint(
            self.listen,
            tls::server_config(self.identity, &self.limits)?,
            &reset_key,
            self.limits.udp_buffer_bytes,
        )?;
        let address = endpoint.local_addr()?;
        let signal = shutdown_signal();
        let (failure_sender, mut failure) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            tokio::select! {
                () = signal => {}
                error = store_failed => {
                    tracing::error!(%error, "the store failed; stopping");
                    let _ = failure_sender.send(error);
                }
            }
        };
        say(&format!("mlschat-ds listening on {address}"));
        say(&format!("database: {backend}"));
        say(&format!("certificate SHA-256: {fingerprint}"));
        say(&format!("data directory: {}", self.data_dir.display()));
        tracing::info!(%address, %fingerprint, backend, "listening");
        mlschat_ds::run(endpoint, store, self.limits, shutdown).await;
        match failure.try_recv() {
            Ok(error) => Err(anyhow::anyhow!(
                "stopped because the store failed (restart to recover): {error}"
            )),
            Err(_) => Ok(()),
        }
    }
}
