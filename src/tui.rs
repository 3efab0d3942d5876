//! The terminal runner: sets the terminal up (raw mode, alternate screen, mouse capture,
//! bracketed paste), always restores it (on quit, Ctrl+C, SIGTERM and panic), and runs the
//! loop that feeds terminal input, core events, ticks and quit signals to [`app::update`],
//! redrawing only when something changed. A closed terminal (SIGHUP) still quits as `/quit`
//! does. The UI task never waits on crypto, disk or network.

use std::io::{IsTerminal as _, Write as _, stdout};
use std::time::Duration;

use color_eyre::eyre::{Result, WrapErr as _};
use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture, Event,
    EventStream,
};
use crossterm::execute;
use crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use futures::StreamExt as _;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;

use crate::app::{self, Effect, Mode, Msg, State};
use crate::client::{Client, ClientOptions};
use crate::config::Settings;
use crate::core::{CoreEvent, CoreInput};
use crate::signals::{QuitSignal, QuitSignals};
use crate::ui;

/// Puts the terminal back as it was. Safe to call more than once.
pub fn restore_terminal() {
    let _ = disable_raw_mode();
    let _ = execute!(
        stdout(),
        DisableBracketedPaste,
        DisableMouseCapture,
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

/// Restores the terminal before the panic message is printed, so it stays readable.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        previous(info);
    }));
}

struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn local_utc_offset() -> i32 {
    chrono::Local::now().offset().local_minus_utc()
}

/// What the runner needs to start a client once a name is known.
pub struct Launch {
    pub options: Option<ClientOptions>,
    /// Builds options for a name typed at the first-run prompt.
    pub options_for: Box<dyn Fn(mlschat_ds::protocol::UserName) -> Result<ClientOptions>>,
}

/// Whether the runner can still use the terminal.
struct TerminalState {
    /// `None` once the terminal is gone (SIGHUP, or its input or output failing): the runner
    /// then neither draws nor reads, but still quits as `/quit` does, so that queued messages
    /// go out and the read marks are saved.
    events: Option<EventStream>,
    /// Whether stdin was a terminal at start, and so is watched for becoming none.
    stdin_was_terminal: bool,
}

impl TerminalState {
    fn gone(&self) -> bool {
        self.events.is_none()
    }

    /// Notes that the terminal is gone. Returns the quit to start, unless one already is:
    /// losing the terminal is not someone insisting on quitting at once.
    fn lost(&mut self, state: &State, why: &str) -> Option<Msg> {
        if !self.gone() {
            tracing::warn!(why, "the terminal is gone; quitting");
        }
        self.events = None;
        (!state.quitting).then_some(Msg::Terminate)
    }
}

/// Runs the TUI until the user quits.
pub async fn run(launch: Launch, settings: Settings) -> Result<()> {
    // First: a signal that arrives while the client starts waits for the loop, instead of
    // killing the process with the terminal still in raw mode.
    let mut signals = QuitSignals::new().wrap_err("cannot listen for signals")?;
    install_panic_hook();
    enable_raw_mode().wrap_err("cannot switch the terminal to raw mode")?;
    let _guard = TerminalGuard;
    execute!(
        stdout(),
        EnterAlternateScreen,
        EnableMouseCapture,
        EnableBracketedPaste
    )
    .wrap_err("cannot set up the terminal")?;
    let mut terminal =
        Terminal::new(CrosstermBackend::new(stdout())).wrap_err("cannot start drawing")?;
    let size = terminal.size().wrap_err("cannot read the terminal size")?;
    let mut state = State::new(
        settings,
        (size.width, size.height),
        local_utc_offset(),
        now_unix(),
    );
    let mut client: Option<Client> = None;
    match launch.options {
        Some(options) => client = Some(start_client(&mut state, options).await?),
        None => state.mode = Mode::NamePrompt,
    }

    let mut screen = TerminalState {
        events: Some(EventStream::new()),
        stdin_was_terminal: std::io::stdin().is_terminal(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut pending: Option<Msg> = None;
    loop {
        if state.dirty && !screen.gone() {
            state.dirty = false;
            if let Err(error) = terminal.draw(|frame| ui::render(&state, frame)) {
                pending = screen.lost(&state, &format!("cannot draw: {error}"));
            }
        }
        // `None`: nothing for the app (an event it does not take, or a lost terminal while
        // already quitting).
        let message = match pending.take() {
            Some(message) => Some(message),
            None => tokio::select! {
                event = next_terminal_event(&mut screen.events) => match event {
                    Some(Ok(Event::Key(key))) => Some(Msg::Key(key)),
                    Some(Ok(Event::Paste(text))) => Some(Msg::Paste(text)),
                    Some(Ok(Event::Mouse(mouse))) => Some(Msg::Mouse(mouse)),
                    Some(Ok(Event::Resize(width, height))) => Some(Msg::Resize(width, height)),
                    Some(Ok(_)) => None,
                    Some(Err(error)) => screen.lost(&state, &format!("cannot read it: {error}")),
                    None => screen.lost(&state, "its input ended"),
                },
                event = next_core_event(&mut client) => {
                    Some(Msg::Core(event.unwrap_or(CoreEvent::Stopped)))
                }
                _ = tick.tick() => {
                    // A terminal that went away without a SIGHUP (crossterm keeps retrying
                    // a dead input rather than reporting it) is no terminal any more.
                    if !screen.gone()
                        && screen.stdin_was_terminal
                        && !std::io::stdin().is_terminal()
                    {
                        pending = screen.lost(&state, "stdin is no longer a terminal");
                    }
                    Some(Msg::Tick(now_unix()))
                }
                signal = signals.next() => {
                    tracing::info!(signal = signal.name(), "asked to quit");
                    if signal == QuitSignal::Hangup {
                        screen.lost(&state, "SIGHUP")
                    } else {
                        Some(Msg::Terminate)
                    }
                }
            },
        };
        let Some(message) = message else {
            continue;
        };
        for effect in app::update(&mut state, message) {
            match effect {
                Effect::Core(command) => {
                    if let Some(client) = &client {
                        let _ = client.inputs.send(CoreInput::Command(command));
                    }
                }
                Effect::Bell | Effect::Clear if screen.gone() => {}
                Effect::Bell => {
                    let _ = stdout().write_all(b"\x07").and_then(|()| stdout().flush());
                }
                Effect::Clear => match terminal.clear() {
                    Ok(()) => state.dirty = true,
                    Err(error) => {
                        pending = screen.lost(&state, &format!("cannot clear it: {error}"));
                    }
                },
                Effect::StartClient(name) => {
                    let options = (launch.options_for)(name)?;
                    client = Some(start_client(&mut state, options).await?);
                }
                Effect::Exit => {
                    if let Some(client) = client.take() {
                        client.finish().await;
                    }
                    return Ok(());
                }
            }
        }
    }
}

async fn next_terminal_event(events: &mut Option<EventStream>) -> Option<std::io::Result<Event>> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

async fn next_core_event(client: &mut Option<Client>) -> Option<CoreEvent> {
    match client {
        Some(client) => client.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn start_client(state: &mut State, options: ClientOptions) -> Result<Client> {
    state.me = options.name.to_string();
    let client = Client::start(options)
        .await
        .wrap_err("cannot start the client")?;
    state.server = client.server.clone();
    state.hosting = client.hosted.is_some();
    state.fingerprint = client.fingerprint.clone();
    if let Some(hosted) = &client.hosted {
        state.status = Some((
            format!(
                "no DS answered at {}: hosting one here; it stops when you quit",
                hosted.address()
            ),
            app::Severity::Info,
        ));
    }
    state.dirty = true;
    Ok(client)
}
