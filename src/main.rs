//! `mlschat`: parse flags, set up logging to a file, start the client, and run the TUI or the
//! headless mode.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser as _;
use color_eyre::eyre::{Result, WrapErr as _, eyre};
use mlschat::cli::Cli;
use mlschat::client::{Client, ClientOptions, default_data_dir};
use mlschat::headless::Ended;
use mlschat::tui::{self, Launch};
use mlschat_ds::protocol::UserName;

/// `in_profile`: the log file is the default one, in the profile directory, which is what a
/// failure to create its directory is then about.
fn init_logging(path: &Path, in_profile: bool) -> Result<()> {
    if let Some(parent) = path.parent() {
        let what = if in_profile {
            "the profile directory"
        } else {
            "the log file's directory"
        };
        std::fs::create_dir_all(parent)
            .wrap_err_with(|| format!("cannot create {what} {}", parent.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .wrap_err_with(|| format!("cannot open the log file {}", path.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MLSCHAT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        // A log file that cannot be written (a full disk) loses lines, nothing more: the
        // fallback would print to stderr, which is the TUI's screen, or panic once the
        // terminal is gone.
        .log_internal_errors(false)
        .init();
    Ok(())
}

fn options_for(cli: &Cli, name: UserName) -> Result<ClientOptions> {
    let data_dir = match &cli.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir(&name)
            .ok_or_else(|| eyre!("cannot determine a data directory; pass --data-dir"))?,
    };
    let mut options = ClientOptions::new(name, data_dir);
    options.server = cli.server.clone();
    options.pinned = cli.server_cert_sha256.clone();
    if let Some(seconds) = cli.auto_update_secs {
        options.auto_update = (seconds > 0).then(|| Duration::from_secs(seconds));
    }
    Ok(options)
}

/// The log file: `--log-file`, else `mlschat.log` in the profile directory, else (first run
/// without a name yet) in the XDG data directory.
fn log_path(cli: &Cli, options: Option<&ClientOptions>) -> Result<PathBuf> {
    if let Some(path) = &cli.log_file {
        return Ok(path.clone());
    }
    if let Some(options) = options {
        return Ok(options.data_dir.join("mlschat.log"));
    }
    directories::ProjectDirs::from("", "", "mlschat")
        .map(|dirs| dirs.data_dir().join("mlschat.log"))
        .ok_or_else(|| eyre!("cannot determine where to log; pass --log-file"))
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // Said once, on one line: color-eyre's report would repeat each cause that its
            // message already ends with.
            eprintln!("Error: {}", mlschat_ds::report::describe(error.chain()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // Colours only for a person reading a terminal: a bot's stderr goes to a file or a journal.
    let theme = if std::io::stderr().is_terminal() {
        color_eyre::config::Theme::dark()
    } else {
        color_eyre::config::Theme::new()
    };
    color_eyre::config::HookBuilder::default()
        .theme(theme)
        .install()?;
    let cli = Cli::parse();
    let options = match &cli.name {
        Some(name) => {
            let name = UserName::new(name.clone()).map_err(|error| eyre!("--name: {error}"))?;
            Some(options_for(&cli, name)?)
        }
        None => None,
    };
    init_logging(&log_path(&cli, options.as_ref())?, cli.log_file.is_none())?;
    let runtime = tokio::runtime::Runtime::new().wrap_err("cannot start the async runtime")?;
    let result = if cli.headless {
        run_headless(&runtime, options)
    } else {
        run_tui(&runtime, cli, options).map(|()| Ended::Quit)
    };
    // A blocking task (a read of stdin that will never complete, a DNS lookup) must not keep
    // the process alive once the session is over: everything worth waiting for was awaited.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if result? == Ended::Interrupted {
        // End as interrupted, now that everything is flushed: a shell stops a script or a loop
        // only for a command that SIGINT ended, not for one that exited with a status.
        #[cfg(unix)]
        let _ = signal_hook::low_level::emulate_default_handler(signal_hook::consts::SIGINT);
        std::process::exit(130);
    }
    Ok(())
}

fn run_headless(
    runtime: &tokio::runtime::Runtime,
    options: Option<ClientOptions>,
) -> Result<Ended> {
    let options = options.ok_or_else(|| eyre!("--headless needs --name"))?;
    runtime.block_on(async move {
        // Listening before the client starts: a stop asked for meanwhile waits its turn.
        let signals = mlschat::signals::QuitSignals::new().wrap_err("cannot listen for signals")?;
        let client = Client::start(options).await?;
        if let Some(hosted) = &client.hosted {
            eprintln!(
                "no DS answered at {}: hosting one in-process (certificate SHA-256 {})",
                hosted.address(),
                hosted.fingerprint()
            );
        }
        mlschat::headless::run(
            client,
            tokio::io::BufReader::new(tokio::io::stdin()),
            tokio::io::stdout(),
            signals,
        )
        .await
        .wrap_err("headless session failed")
    })
}

fn run_tui(
    runtime: &tokio::runtime::Runtime,
    cli: Cli,
    options: Option<ClientOptions>,
) -> Result<()> {
    let settings_path = cli.config.clone().or_else(mlschat::config::default_path);
    let settings = match &settings_path {
        Some(path) => mlschat::config::load(path, cli.config.is_some())?,
        None => mlschat::config::Settings::default(),
    };
    let launch_cli = cli.clone();
    let launch = Launch {
        options,
        options_for: Box::new(move |name| options_for(&launch_cli, name)),
    };
    runtime.block_on(tui::run(launch, settings))
}
