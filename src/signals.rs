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

/// Whether `signal` is set to be ignored, as `nohup` sets SIGHUP: installing a handler would
/// undo that. Read from `/proc/self/status` (Linux); elsewhere every signal counts as not
/// ignored, so there `nohup` does not keep a client from quitting when its terminal closes.
pub fn ignored(signal: i32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|status| ignored_in_status(&status, signal))
}

/// Whether the `SigIgn` mask of a `/proc/PID/status` text has `signal`'s bit (bit 0 is
/// signal 1).
fn ignored_in_status(status: &str, signal: i32) -> bool {
    let Some(mask) = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return false;
    };
    (1..=64).contains(&signal) && mask & (1 << (signal - 1)) != 0
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The status of a real process started with SIGHUP ignored (what `nohup` does).
    fn status_with_sighup_ignored() -> Option<String> {
        let output = std::process::Command::new("sh")
            .args(["-c", "trap '' HUP; exec cat /proc/self/status"])
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&output.stdout).into_owned()).filter(|s| s.contains("SigIgn:"))
    }

    #[test]
    fn the_ignored_mask_is_read_bit_by_signal() {
        let status = "Name:\tx\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001001\n";
        assert!(ignored_in_status(status, 1));
        assert!(ignored_in_status(status, 13));
        assert!(!ignored_in_status(status, 2));
        assert!(!ignored_in_status(status, 15));
        assert!(!ignored_in_status(status, 0));
        assert!(!ignored_in_status("SigIgn:\tnot hex\n", 1));
        assert!(!ignored_in_status("", 1));
        // Only where /proc exists (Linux): the mask of a real process.
        if let Some(status) = status_with_sighup_ignored() {
            assert!(ignored_in_status(&status, 1), "{status}");
            assert!(!ignored_in_status(&status, 15), "{status}");
        }
    }
}
