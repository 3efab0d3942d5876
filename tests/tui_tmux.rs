//! The TUI in a real terminal: two `mlschat` processes in tmux against a real DS on
//! 127.0.0.1:0. They create a group, invite, exchange messages (each sees the other's text on
//! screen), one renames the group, one resizes, both quit, and the terminal is restored
//! (alternate screen off); one comes back to the group it was reading, with the other group's
//! unread message counted, and after closing its terminal still finds what it read marked read.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mlschat_ds::LocalServer;
use mlschat_ds::config::Limits;

/// A private tmux server, killed when the test ends (even on failure).
struct Tmux {
    socket: String,
    /// Where each session's shell writes the program's exit status.
    status_dir: tempfile::TempDir,
}

impl Tmux {
    fn new() -> Tmux {
        let socket = format!("mlschat-test-{}-{}", std::process::id(), rand_suffix());
        let status_dir = tempfile::tempdir().expect("temp dir");
        Tmux { socket, status_dir }
    }

    fn run(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux must be installed to test the TUI (apt-get install tmux)");
        assert!(
            output.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn status_file(&self, session: &str) -> std::path::PathBuf {
        self.status_dir.path().join(format!("{session}.status"))
    }

    fn start(&self, session: &str, width: u16, height: u16, command: &str) {
        // The shell records the exit status itself: tmux's #{pane_dead_status} is not always
        // filled in when the pane's shell is reaped.
        let wrapped = format!(
            "{command}; echo $? > {}",
            self.status_file(session).display()
        );
        self.run(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            &wrapped,
        ]);
        self.run(&["set-option", "-t", session, "remain-on-exit", "on"]);
    }

    fn screen(&self, session: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", session])
    }

    fn type_line(&self, session: &str, text: &str) {
        self.run(&["send-keys", "-t", session, "-l", text]);
        self.run(&["send-keys", "-t", session, "Enter"]);
    }

    fn keys(&self, session: &str, keys: &str) {
        self.run(&["send-keys", "-t", session, keys]);
    }

    fn display(&self, session: &str, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", session, format])
            .trim()
            .to_string()
    }

    /// Waits until the screen contains `needle`, failing with the screen's content.
    fn wait_for(&self, session: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen(session);
            if screen.contains(needle) {
                return screen;
            }
            if Instant::now() > deadline {
                panic!("{session}'s screen never showed {needle:?}; it shows:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the program to exit and checks it left the terminal as it found it: off the
    /// alternate screen, with exit status 0 (not killed by a signal).
    fn assert_exited_cleanly(&self, session: &str, timeout: Duration) {
        let status = self.wait_exit(session, timeout);
        assert_eq!(
            status,
            "0",
            "{session} exited with status {status}; screen:\n{}",
            self.screen(session)
        );
        assert_eq!(
            self.display(session, "#{alternate_on}"),
            "0",
            "{session}'s terminal left the alternate screen"
        );
    }

    /// Waits for the program to exit and returns its exit status.
    fn wait_exit(&self, session: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(status) = std::fs::read_to_string(self.status_file(session))
                && !status.trim().is_empty()
            {
                return status.trim().to_string();
            }
            if Instant::now() > deadline {
                panic!(
                    "{session} did not exit; its screen:\n{}",
                    self.screen(session)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

/// Waits until no process holds the profile's lock, that is until its client has exited.
fn wait_profile_free(profile: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while mlschat_ds::dir_lock::lock(profile).is_err() {
        assert!(
            Instant::now() < deadline,
            "the client of {} did not exit",
            profile.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn client_command(name: &str, dir: &Path, server: &LocalServer) -> String {
    format!(
        "{} --name {name} --server {} --server-cert-sha256 {} --data-dir {} --log-file {}",
        env!("CARGO_BIN_EXE_mlschat"),
        server.address(),
        server.fingerprint(),
        dir.join(name).display(),
        dir.join(format!("{name}.log")).display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_in_real_terminals() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start(
        "127.0.0.1:0".parse().expect("address"),
        &dir.path().join("ds"),
        Limits::default(),
    )
    .await
    .expect("DS starts");
    let alice_command = client_command("alice", dir.path(), &server);
    let bob_command = client_command("bob", dir.path(), &server);
    let bob_profile = dir.path().join("bob");
    let result = tokio::task::spawn_blocking(move || {
        let tmux = Tmux::new();
        let patience = Duration::from_secs(20);
        tmux.start("alice", 100, 30, &alice_command);
        tmux.start("bob", 80, 24, &bob_command);
        // Asked only once the UI has drawn: right after tmux starts it, the binary may not
        // have switched to the alternate screen yet (this raced on a loaded machine).
        tmux.wait_for("alice", "● connected", patience);
        tmux.wait_for("bob", "● connected", patience);
        assert_eq!(
            tmux.display("alice", "#{alternate_on}"),
            "1",
            "the TUI uses the alternate screen"
        );

        // Alice creates a group (and looks at it) and adds bob.
        let create_and_invite_bob = |group: &str| {
            tmux.type_line("alice", &format!("/create {group}"));
            tmux.wait_for("alice", &format!("you created {group}"), patience);
            // Bob may still be uploading KeyPackages right after connecting: retry the invite.
            let deadline = Instant::now() + patience;
            loop {
                tmux.type_line("alice", "/invite bob");
                std::thread::sleep(Duration::from_millis(700));
                if tmux.screen("alice").contains("alice added bob") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the invite never went through:\n{}",
                    tmux.screen("alice")
                );
            }
        };
        create_and_invite_bob("team");
        tmux.wait_for("bob", "alice added you", patience);

        tmux.type_line("alice", "hello from alice, 漢字も");
        tmux.wait_for("bob", "hello from alice, 漢字も", patience);
        tmux.type_line("bob", "hi alice, bob here");
        let alice_screen = tmux.wait_for("alice", "hi alice, bob here", patience);
        assert!(
            alice_screen.contains("hello from alice, 漢字も ✓"),
            "alice sees her message as sent:\n{alice_screen}"
        );

        // A multi-line paste lands in the composer and is not sent by itself.
        tmux.run(&[
            "set-buffer",
            "-b",
            "paste",
            "first pasted line\nsecond pasted line",
        ]);
        tmux.run(&["paste-buffer", "-p", "-b", "paste", "-t", "bob"]);
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !tmux.screen("alice").contains("first pasted line"),
            "a paste must not be sent by itself"
        );
        tmux.keys("bob", "Enter");
        tmux.wait_for("alice", "second pasted line", patience);

        // A rename reaches the other member, who is told who did it.
        tmux.type_line("bob", "/rename team two");
        let alice_screen = tmux.wait_for("alice", "bob renamed the group to team two", patience);
        assert!(
            alice_screen.contains("┌ team two ·"),
            "alice's title shows the new name:\n{alice_screen}"
        );

        // Resizing redraws cleanly at the new size.
        tmux.run(&["resize-window", "-t", "bob", "-x", "50", "-y", "15"]);
        std::thread::sleep(Duration::from_millis(500));
        let small = tmux.wait_for("bob", "connected", patience);
        let lines: Vec<&str> = small.lines().collect();
        assert!(lines.len() <= 15, "{small}");
        assert!(
            small.contains("┌ Groups"),
            "the layout is redrawn after resizing:\n{small}"
        );
        tmux.type_line("bob", "still here after resizing");
        tmux.wait_for("alice", "still here after resizing", patience);

        // A message in a group bob has not looked at yet waits for him there.
        create_and_invite_bob("later");
        tmux.type_line("alice", "something new in later");
        tmux.wait_for("alice", "something new in later ✓", patience);

        // Quitting restores the terminal: no alternate screen, exit status 0.
        tmux.type_line("alice", "/quit");
        tmux.assert_exited_cleanly("alice", patience);
        tmux.keys("bob", "C-c");
        tmux.assert_exited_cleanly("bob", patience);

        // Bob comes back to the group he was reading, not to the one he joined last, and the
        // other still counts its unread message.
        tmux.start("bob-again", 80, 24, &bob_command);
        let screen = tmux.wait_for("bob-again", "● connected", patience);
        assert!(
            screen.contains("┌ team two ·"),
            "bob reopens on the group he read last:\n{screen}"
        );
        let later = screen
            .lines()
            .find(|line| line.contains("later"))
            .unwrap_or_else(|| panic!("the group list shows later:\n{screen}"));
        let badge = later
            .split('│')
            .nth(1)
            .map(str::trim_end)
            .unwrap_or_default();
        assert!(
            badge.ends_with(" 1"),
            "later shows one unread message: {badge:?}\n{screen}"
        );
        // Bob reads the other group, then closes his terminal (SIGHUP) at once, well within
        // the 10 s between periodic read marks: the TUI still quits as /quit does.
        tmux.type_line("bob-again", "/switch later");
        tmux.wait_for("bob-again", "┌ later ·", patience);
        tmux.wait_for("bob-again", "something new in later", patience);
        tmux.run(&["kill-session", "-t", "bob-again"]);
        wait_profile_free(&bob_profile, patience);
        tmux.start("bob-third", 80, 24, &bob_command);
        // The read mark that quitting saved also records the group as the one looked at last.
        let screen = tmux.wait_for("bob-third", "● connected", patience);
        assert!(
            screen.contains("┌ later ·"),
            "bob reopens on the group he read before the terminal closed:\n{screen}"
        );
        tmux.keys("bob-third", "C-c");
        tmux.assert_exited_cleanly("bob-third", patience);
    })
    .await;
    server.shutdown().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic.into_panic());
    }
}
