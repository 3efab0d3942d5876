//! The process signals that ask a client to stop: SIGTERM (a service manager, `kill`), SIGINT
//! (`kill -INT`; in the TUI's raw mode Ctrl+C arrives as a key instead) and SIGHUP (the
//! terminal was closed). Both front ends answer the first one as they answer `/quit`: the
//! queued messages go out and the read marks are saved before the process ends.

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
/// [`QuitSignals::next`] is not lost) until it is dropped.
pub struct QuitSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl QuitSignals {
    /// Installs the handlers. Must be called within a tokio runtime.
    pub fn new() -> io::Result<QuitSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(QuitSignals {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
                hangup: signal(SignalKind::hangup())?,
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
                Some(()) = self.terminate.recv() => QuitSignal::Terminate,
                Some(()) = self.interrupt.recv() => QuitSignal::Interrupt,
                Some(()) = self.hangup.recv() => QuitSignal::Hangup,
                // The runtime's signal driver is gone: no signal can arrive any more.
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
