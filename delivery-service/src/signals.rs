//! Which process signals were set to "ignore" when the process started: `nohup` ignores SIGHUP
//! and a shell's background jobs ignore SIGINT, and installing a handler for such a signal would
//! undo that. Shared by the DS and the client, which both stop gracefully on the signals that
//! are not ignored.

/// Whether `signal` is set to be ignored, as `nohup` sets SIGHUP: installing a handler would
/// undo that. Read from `/proc/self/status` (Linux); elsewhere every signal counts as not
/// ignored, so there `nohup` does not keep a program from stopping when its terminal closes.
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
