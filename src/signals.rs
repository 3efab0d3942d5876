//! The process signals that ask a client to stop: SIGTERM (a service manager, `kill`), SIGINT
//! (`kill -INT`, Ctrl+C in the headless mode; in the TUI's raw mode Ctrl+C arrives as a key)
//! and SIGHUP (the terminal was closed). Both front ends answer the first one as they answer
//! `/quit`: the queued messages go out and the read marks are saved before the process ends.
//!
//! A signal the process was started with set to "ignore" stays ignored: `nohup` (SIGHUP) and a
//! shell's background jobs (SIGINT) rely on that.

use std::io;

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuitSignal {
    Terminate,
    Interrupt,
    /// The terminal is gone: nothing more can be drawn or read from it.
    Hangup,
}

impl QuitSignal {
    pub fn name(self) -> &'static str {
        match self {
            QuitSignal::Terminate => "SIGTERM",
            QuitSignal::Interrupt => "SIGINT",
            QuitSignal::Hangup => "SIGHUP",
        }
    }
}

/// Listens for the quit signals from the moment it is made (so one arriving before the first
/// [`QuitSignals::next`] is not lost) until it is dropped. Elsewhere than on unix, only Ctrl+C,
/// and only while [`QuitSignals::next`] waits.
pub struct QuitSignals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

#[cfg(unix)]
fn listen(
    kind: tokio::signal::unix::SignalKind,
) -> io::Result<Option<tokio::signal::unix::Signal>> {
    if ignored(kind.as_raw_value()) {
        return Ok(None);
    }
    tokio::signal::unix::signal(kind).map(Some)
}

pub use mlschat_ds::signals::ignored;

#[cfg(unix)]
async fn received(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => None,
    }
}

impl QuitSignals {
    /// Installs the handlers. Must be called within a tokio runtime.
    pub fn new() -> io::Result<QuitSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::SignalKind;
            Ok(QuitSignals {
                terminate: listen(SignalKind::terminate())?,
                interrupt: listen(SignalKind::interrupt())?,
                hangup: listen(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(QuitSignals {})
        }
    }

    /// Waits for the next quit signal.
    pub async fn next(&mut self) -> QuitSignal {
        #[cfg(unix)]
        {
            tokio::select! {
                Some(()) = received(&mut self.terminate) => QuitSignal::Terminate,
                Some(()) = received(&mut self.interrupt) => QuitSignal::Interrupt,
                Some(()) = received(&mut self.hangup) => QuitSignal::Hangup,
                // Nothing to listen for, or the runtime's signal driver is gone.
                else => std::future::pending().await,
            }
        }
        #[cfg(not(unix))]
        {
            match tokio::signal::ctrl_c().await {
                Ok(()) => QuitSignal::Interrupt,
                Err(_) => std::future::pending().await,
            }
        }
    }
}
