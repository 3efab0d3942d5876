//! `mlschat`: parse flags, set up logging to a file, start the client, and run the TUI or the
//! headless mode.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;
use mlschat::cli::Cli;
use mlschat::client::{Client, ClientOptions, default_data_dir};
use mlschat_ds::protocol::UserName;

fn init_logging(path: &PathBuf) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MLSCHAT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .init();
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let Some(name) = cli.name.clone() else {
        bail!("--name is required (for example: mlschat --name alice)");
    };
    let name = UserName::new(name).map_err(|error| anyhow::anyhow!("--name: {error}"))?;
    let data_dir = match &cli.data_dir {
        Some(dir) => dir.clone(),
        None => {
            default_data_dir(&name).context("cannot determine a data directory; pass --data-dir")?
        }
    };
    let log_file = cli
        .log_file
        .clone()
        .unwrap_or_else(|| data_dir.join("mlschat.log"));
    init_logging(&log_file)?;
    let mut options = ClientOptions::new(name, data_dir);
    options.server = cli.server.clone();
    options.pinned = cli.server_cert_sha256.clone();
    if let Some(seconds) = cli.auto_update_secs {
        options.auto_update = (seconds > 0).then(|| std::time::Duration::from_secs(seconds));
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let client = Client::start(options).await?;
        if let Some(hosted) = &client.hosted {
            eprintln!(
                "no DS answered at {}: hosting one in-process (certificate SHA-256 {})",
                hosted.address(),
                hosted.fingerprint()
            );
        }
        if cli.headless {
            mlschat::headless::run(
                client,
                tokio::io::BufReader::new(tokio::io::stdin()),
                tokio::io::stdout(),
            )
            .await?;
            Ok(())
        } else {
            bail!("the terminal UI is not built yet; use --headless")
        }
    })
}
