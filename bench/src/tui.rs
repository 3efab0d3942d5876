//! Figure 8: TUI cold start to the first drawn frame with 50 stored groups. The real `mlschat`
//! binary runs in tmux; the clock runs from `tmux new-session` until `capture-pane` shows the
//! first frame, and until it shows the stored groups. The same clock on a program that prints
//! one line (tmux start-up plus polling) is reported beside it as the floor.

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use mlschat::client::{Client, ClientOptions};
use mlschat::core::{Command, CoreEvent, CoreInput};
use mlschat_ds::protocol::UserName;

use crate::ds::DsProcess;
use crate::report::{Row, median};
use crate::{Failures, Settings};

const GROUPS: usize = 50;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A tmux server of this run's own (its own socket, no user configuration), kept alive by an
/// idle session: with the shared default server, killing the only measured session shut the
/// server down while the next `new-session` was connecting to it, which then failed with
/// "server exited unexpectedly".
struct TmuxServer {
    socket: String,
}

impl TmuxServer {
    fn start() -> Result<TmuxServer> {
        let server = TmuxServer {
            socket: format!("mlschat-bench-{}", std::process::id()),
        };
        server.run(&["new-session", "-d", "-s", "keepalive", "sleep 86400"])?;
        Ok(server)
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let output = Process::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .context("tmux")?;
        if !output.status.success() {
            bail!("tmux {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for TmuxServer {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The `mlschat` binary beside this one, built first if needed (it shares the library build).
fn mlschat_binary() -> Result<PathBuf> {
    let beside = std::env::current_exe()?
        .parent()
        .context("no parent directory")?
        .join("mlschat");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = beside.to_string_lossy().contains("/release/");
    let mut build = Process::new(cargo);
    // Selecting the bench package too keeps feature unification identical to the bench's own
    // build, so only main.rs is compiled and linked (no second build of the dependencies).
    build.args([
        "build",
        "-q",
        "-p",
        "mlschat",
        "-p",
        "mlschat-bench",
        "--bins",
    ]);
    if release {
        build.arg("--release");
    }
    let status = build
        .status()
        .context("cannot run cargo to build mlschat")?;
    if !status.success() || !beside.exists() {
        bail!("cannot build the mlschat binary");
    }
    Ok(beside)
}

async fn create_profile(ds: &DsProcess, dir: &Path, name: &UserName) -> Result<()> {
    let mut options = ClientOptions::new(name.clone(), dir.to_path_buf());
    options.server = Some(ds.target.address.to_string());
    options.pinned = Some(ds.target.fingerprint.to_hex());
    options.auto_update = None;
    let mut client = Client::start(options).await?;
    let mut created = 0;
    let mut asked = false;
    while created < GROUPS {
        let event = tokio::time::timeout(TIMEOUT, client.events.recv())
            .await
            .map_err(|_| anyhow!("profile setup stalled"))?
            .context("the core stopped")?;
        match event {
            CoreEvent::Ready { .. } if !asked => {
                asked = true;
                for index in 0..GROUPS {
                    client
                        .inputs
                        .send(CoreInput::Command(Command::CreateGroup {
                            id: None,
                            name: format!("bench-g{index:02}"),
                        }))
                        .map_err(|_| anyhow!("the core stopped"))?;
                }
            }
            CoreEvent::GroupCreated { .. } => created += 1,
            CoreEvent::Error { message } => bail!("profile setup: {message}"),
            _ => {}
        }
    }
    let _ = client.inputs.send(CoreInput::Command(Command::Quit));
    client.finish().await;
    Ok(())
}

/// Starts `command` in a fresh tmux session and returns (first non-blank frame, frame that
/// contains `marker`), both measured from the session's start. With a `profile`, waits after
/// closing the session until the client has let go of it: closing its terminal makes the
/// client quit as `/quit` does, and the next start would find the profile in use.
fn time_to_frame(
    tmux: &TmuxServer,
    session: &str,
    command: &str,
    marker: &str,
    profile: Option<&Path>,
) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        session,
        "-x",
        "100",
        "-y",
        "30",
        command,
    ])?;
    let mut first = None;
    let result = loop {
        if started.elapsed() > TIMEOUT {
            break Err(anyhow!("no frame with {marker:?} within {TIMEOUT:?}"));
        }
        let screen = tmux
            .run(&["capture-pane", "-p", "-t", session])
            .unwrap_or_default();
        let elapsed = started.elapsed();
        if first.is_none() && screen.chars().any(|c| !c.is_whitespace()) {
            first = Some(elapsed);
        }
        if screen.contains(marker) {
            break Ok((first.unwrap_or(elapsed), elapsed));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = tmux.run(&["kill-session", "-t", session]);
    if let Some(profile) = profile {
        let deadline = Instant::now() + TIMEOUT;
        while mlschat_ds::dir_lock::lock(profile).is_err() {
            if Instant::now() > deadline {
                bail!("the TUI did not let go of its profile within {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    result
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

pub async fn figure(settings: &Settings, failures: &Failures) -> Vec<Row> {
    match run(settings).await {
        Ok(rows) => rows,
        Err(error) => {
            failures.error(format!("fig 8: {error:#}"));
            Vec::new()
        }
    }
}

async fn run(settings: &Settings) -> Result<Vec<Row>> {
    if Process::new("tmux").arg("-V").output().is_err() {
        bail!("tmux is not installed");
    }
    let binary = tokio::task::spawn_blocking(mlschat_binary).await??;
    let ds = DsProcess::spawn().await?;
    let dir = tempfile::Builder::new()
        .prefix("mlschat-bench-tui")
        .tempdir()?;
    let name = UserName::new("tuibench").map_err(|e| anyhow!("{e}"))?;
    let profile = dir.path().join("profile");
    eprintln!("  fig 8: creating a profile with {GROUPS} groups");
    create_profile(&ds, &profile, &name).await?;
    // An empty settings file: the defaults, whatever the machine's user has configured.
    let settings_file = dir.path().join("settings.toml");
    std::fs::write(&settings_file, b"")?;
    let command = format!(
        "{} --name {} --data-dir {} --server {} --server-cert-sha256 {} --log-file {} --config {}",
        shell_quote(&binary.to_string_lossy()),
        name,
        shell_quote(&profile.to_string_lossy()),
        ds.target.address,
        ds.target.fingerprint.to_hex(),
        shell_quote(&dir.path().join("tui.log").to_string_lossy()),
        shell_quote(&settings_file.to_string_lossy()),
    );
    let baseline = "sh -c 'echo floor-ready; sleep 30'".to_string();
    let repeats = if settings.quick {
        3
    } else {
        5 * settings.rounds.max(1)
    };
    let session = format!("mlschat-bench-{}", std::process::id());
    let (firsts, groups, floors) = tokio::task::spawn_blocking(move || {
        let tmux = TmuxServer::start()?;
        let mut firsts = Vec::new();
        let mut groups = Vec::new();
        let mut floors = Vec::new();
        for _ in 0..repeats {
            // Any group's name: the list shows the group it opens on, not always the first.
            let (first, listed) =
                time_to_frame(&tmux, &session, &command, "bench-g", Some(&profile))?;
            firsts.push(first.as_secs_f64() * 1e3);
            groups.push(listed.as_secs_f64() * 1e3);
            let (_, floor) = time_to_frame(&tmux, &session, &baseline, "floor-ready", None)?;
            floors.push(floor.as_secs_f64() * 1e3);
        }
        Ok::<_, anyhow::Error>((firsts, groups, floors))
    })
    .await??;
    ds.stop().await;
    let floor = median(&floors);
    Ok(vec![
        Row::new(8, "TUI cold start to first drawn frame", GROUPS, "ms")
            .ours(median(&firsts))
            .peer("tmux + echo (floor)", Some(floor))
            .note(format!(
                "median of {repeats}, real binary in tmux 100x30, capture-pane polled every 2 ms"
            )),
        Row::new(
            8,
            "TUI cold start to frame listing the groups",
            GROUPS,
            "ms",
        )
        .ours(median(&groups))
        .peer("tmux + echo (floor)", Some(floor))
        .note(format!("{GROUPS} stored groups; marker: a group's name")),
    ])
}
