//! The `--headless` contract, through the real binary: commands on stdin, one JSON object per
//! line on stdout (every line has an "event"), and exit code 0 on EOF once the outbox is
//! flushed. Also: with the most verbose logging, no message text reaches the log file.

mod common;

use std::time::{Duration, Instant};

use common::{Ds, Headless, STEP, timed};
use serde_json::Value;

fn is_fingerprint(text: &Value) -> bool {
    text.as_str().is_some_and(|text| {
        text.split(' ').count() == 12
            && text
                .split(' ')
                .all(|group| group.len() == 5 && group.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Polls `/status` on both until they agree; returns alice's answer.
async fn same_status(alice: &mut Headless, bob: &mut Headless) -> Value {
    let deadline = Instant::now() + STEP;
    loop {
        let a = alice.status().await;
        let b = bob.status().await;
        if a["epoch_authenticator"] == b["epoch_authenticator"] && a["epoch"] == b["epoch"] {
            return a;
        }
        assert!(Instant::now() < deadline, "no agreement: {a} vs {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_contract() {
    timed(Duration::from_secs(90), async {
        let ds = Ds::start().await;
        let root = tempfile::tempdir().expect("temporary directory");
        let mut alice = Headless::start(&ds, "alice", root.path(), &[]).await;
        let mut bob = Headless::start(&ds, "bob", root.path(), &[]).await;
        let ready_alice = alice
            .log
            .iter()
            .find(|e| e["event"] == "ready")
            .cloned()
            .expect("ready");
        let ready_bob = bob
            .log
            .iter()
            .find(|e| e["event"] == "ready")
            .cloned()
            .expect("ready");
        assert!(is_fingerprint(&ready_alice["fingerprint"]), "{ready_alice}");
        assert!(is_fingerprint(&ready_bob["fingerprint"]), "{ready_bob}");
        assert_ne!(ready_alice["fingerprint"], ready_bob["fingerprint"]);

        // Bad input is answered with an error event, and the session goes on.
        alice.send_line("/frobnicate").await;
        let error = alice.wait_event("error", |e| e["event"] == "error").await;
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("frobnicate")),
            "{error}"
        );
        alice.send_line("hello nobody").await;
        let error = alice.wait_event("error", |e| e["event"] == "error").await;
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("group")),
            "{error}"
        );

        alice.send_line("/create room1").await;
        let created = alice
            .wait_event("group_created", |e| e["event"] == "group_created")
            .await;
        assert_eq!(created["group"], "room1");
        let room1 = created["group_id"].as_str().expect("group_id").to_string();

        alice.send_line("/invite bob").await;
        let added = alice
            .wait_event("member_added", |e| e["event"] == "member_added")
            .await;
        assert_eq!(added["user"], "bob");
        assert_eq!(added["by"], "alice");
        assert_eq!(added["group"], "room1");
        assert_eq!(added["group_id"], room1.as_str());
        let joined = bob.wait_event("joined", |e| e["event"] == "joined").await;
        assert_eq!(joined["group_id"], room1.as_str());
        assert_eq!(joined["by"], "alice");
        assert!(joined["group"].is_string(), "{joined}");
        bob.wait_event("group name", |e| {
            e["event"] == "group_renamed"
                && e["group"] == "room1"
                && e["group_id"] == room1.as_str()
        })
        .await;

        // Messages: the receiver gets message, the sender gets sent with the same seq.
        alice.send_line("hi bob").await;
        let message = bob.wait_event("message", |e| e["event"] == "message").await;
        assert_eq!(message["text"], "hi bob");
        assert_eq!(message["from"], "alice");
        assert_eq!(message["group"], "room1");
        assert_eq!(message["group_id"], room1.as_str());
        let sent = alice.wait_event("sent", |e| e["event"] == "sent").await;
        assert_eq!(sent["group"], "room1");

        // `/search` finds messages of the current group, case-insensitively.
        bob.send_line("/search HI B").await;
        let found = bob
            .wait_event("search_results", |e| e["event"] == "search_results")
            .await;
        assert_eq!(found["group_id"], room1.as_str(), "{found}");
        assert_eq!(found["text"], "HI B");
        assert_eq!(
            found["results"].as_array().map(Vec::len),
            Some(1),
            "{found}"
        );
        assert_eq!(found["results"][0]["from"], "alice");
        assert_eq!(found["results"][0]["text"], "hi bob");
        assert_eq!(found["results"][0]["seq"], message["seq"]);
        assert_eq!(sent["group_id"], room1.as_str());
        assert!(message["seq"].as_u64().is_some());
        assert_eq!(sent["seq"], message["seq"]);

        // `//` escapes a leading slash.
        bob.send_line("//escaped").await;
        let message = alice
            .wait_event("message", |e| e["event"] == "message")
            .await;
        assert_eq!(message["text"], "/escaped");
        assert_eq!(message["from"], "bob");

        alice.send_line("/members").await;
        let members = alice
            .wait_event("members", |e| e["event"] == "members")
            .await;
        let list = members["members"].as_array().expect("a member list");
        assert_eq!(list.len(), 2, "{members}");
        for (name, ready) in [("alice", &ready_alice), ("bob", &ready_bob)] {
            let member = list
                .iter()
                .find(|m| m["name"] == name)
                .expect("member listed");
            assert_eq!(member["fingerprint"], ready["fingerprint"], "{members}");
        }

        alice.send_line("/fingerprint").await;
        let own = alice
            .wait_event("fingerprint", |e| e["event"] == "fingerprint")
            .await;
        assert_eq!(own["user"], "alice");
        assert_eq!(own["fingerprint"], ready_alice["fingerprint"]);
        alice.send_line("/fingerprint bob").await;
        let theirs = alice
            .wait_event("fingerprint", |e| e["event"] == "fingerprint")
            .await;
        assert_eq!(theirs["user"], "bob");
        assert_eq!(theirs["fingerprint"], ready_bob["fingerprint"]);

        let status = same_status(&mut alice, &mut bob).await;
        assert_eq!(
            status["ciphersuite"],
            "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519"
        );
        assert_eq!(status["epoch"], 1);
        assert_eq!(status["group_id"], room1.as_str());
        assert!(
            status["epoch_authenticator"]
                .as_str()
                .is_some_and(|a| a.len() == 64)
        );

        // A second group becomes current; /switch goes back.
        alice.send_line("/create room2").await;
        let created = alice
            .wait_event("group_created", |e| e["event"] == "group_created")
            .await;
        assert_eq!(created["group"], "room2");
        let room2 = created["group_id"].as_str().expect("group_id").to_string();
        assert_ne!(room1, room2);
        alice.send_line("/status").await;
        let status = alice.wait_event("status", |e| e["event"] == "status").await;
        assert_eq!(status["group_id"], room2.as_str());
        alice.send_line("/switch room1").await;
        let switched = alice
            .wait_event("switched", |e| e["event"] == "switched")
            .await;
        assert_eq!(switched["group_id"], room1.as_str());
        alice.send_line("back in room1").await;
        let message = bob.wait_event("message", |e| e["event"] == "message").await;
        assert_eq!(message["text"], "back in room1");
        assert_eq!(message["group_id"], room1.as_str());
        alice.send_line("/switch room2").await;
        alice
            .wait_event("switched", |e| e["event"] == "switched")
            .await;
        alice.send_line("/switch nowhere").await;
        alice.wait_event("error", |e| e["event"] == "error").await;

        // EOF right after a message: it is still delivered, then the process exits with 0.
        alice.send_line("/switch room1").await;
        alice.send_line("last words").await;
        assert_eq!(alice.close_stdin().await.code(), Some(0));
        let message = bob.wait_event("message", |e| e["event"] == "message").await;
        assert_eq!(message["text"], "last words");
        assert_eq!(message["group_id"], room1.as_str());
        assert!(
            alice.messages(&room2).is_empty(),
            "nothing was sent to room2 by others"
        );
        assert!(
            alice
                .log
                .iter()
                .any(|e| e["event"] == "sent" && e["group_id"] == room1.as_str()),
            "alice saw her last message sent"
        );

        // A script on an existing profile writes at once and closes stdin, without waiting for
        // anything: the line goes to the current group, and is delivered before the exit.
        alice.spawn();
        alice.send_line("/switch room1").await;
        alice.send_line("quick hello").await;
        assert_eq!(alice.close_stdin().await.code(), Some(0));
        let message = bob.wait_event("message", |e| e["event"] == "message").await;
        assert_eq!(message["text"], "quick hello");
        assert_eq!(message["group_id"], room1.as_str());
        assert_eq!(alice.errors().len(), 3, "only the three provoked errors");

        // With no other member online, a leave is only requested: `left` waits for one of
        // them to commit it.
        bob.send_line("/leave").await;
        let requested = bob
            .wait_event("leave_requested", |e| e["event"] == "leave_requested")
            .await;
        assert_eq!(requested["group_id"], room1.as_str());
        assert_eq!(requested["group"], "room1");
        assert!(
            !bob.log.iter().any(|e| e["event"] == "left"),
            "bob left alone"
        );
        assert_eq!(bob.close_stdin().await.code(), Some(0));
        assert_eq!(bob.errors(), Vec::<Value>::new());

        // A second "alice" with another key cannot register: an error event, then a failing
        // exit status (not the 0 of a clean quit), with stdin still open.
        let elsewhere = tempfile::tempdir().expect("temporary directory");
        let mut impostor = Headless::new(&ds, "alice", elsewhere.path(), &[]);
        impostor.spawn();
        let error = impostor
            .wait_event("error", |e| e["event"] == "error")
            .await;
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("registered to another key")),
            "{error}"
        );
        let status = impostor.wait_exit().await;
        assert!(!status.success(), "{status:?}");
    })
    .await;
}

/// A script's lines reach the group it meant: the lines after `/create`, written at once, go to
/// the new group (not to the one current before, whose members must not read them), a group
/// someone else adds the script to does not take its next message, and a line that is not
/// UTF-8 is refused on its own without ending the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_reach_the_group_the_script_meant() {
    timed(Duration::from_secs(90), async {
        let ds = Ds::start().await;
        let root = tempfile::tempdir().expect("temporary directory");
        let mut alice = Headless::start(&ds, "alice", root.path(), &[]).await;
        let mut bob = Headless::start(&ds, "bob", root.path(), &[]).await;
        let mut carol = Headless::start(&ds, "carol", root.path(), &[]).await;
        let mut mallory = Headless::start(&ds, "mallory", root.path(), &[]).await;
        alice.send_line("/create public").await;
        let public = alice
            .wait_event("group_created", |e| e["event"] == "group_created")
            .await["group_id"]
            .clone();
        alice.send_line("/invite bob").await;
        alice
            .wait_event("bob added", |e| e["event"] == "member_added")
            .await;
        bob.wait_event("joined", |e| e["event"] == "joined").await;

        alice
            .send_bytes(b"/create private\n/invite carol\nfor carol only\n/switch private\n")
            .await;
        let private = alice
            .wait_event("group_created", |e| e["event"] == "group_created")
            .await["group_id"]
            .clone();
        let added = alice
            .wait_event("carol added", |e| e["event"] == "member_added")
            .await;
        assert_eq!(added["group_id"], private, "{added}");
        let message = carol
            .wait_event("message", |e| e["event"] == "message")
            .await;
        assert_eq!(message["text"], "for carol only");
        assert_eq!(message["group_id"], private);
        let switched = alice
            .wait_event("switched", |e| e["event"] == "switched")
            .await;
        assert_eq!(switched["group_id"], private);

        // Mallory adds bob to her group; bob's next line still goes to public.
        mallory.send_line("/create outsiders").await;
        mallory.send_line("/invite bob").await;
        let outsiders = bob
            .wait_event("joined outsiders", |e| {
                e["event"] == "joined" && e["group_id"] != public
            })
            .await["group_id"]
            .clone();
        bob.send_line("for public").await;
        let sent = bob.wait_event("sent", |e| e["event"] == "sent").await;
        assert_eq!(sent["group_id"], public);
        let message = alice
            .wait_event("message", |e| e["event"] == "message")
            .await;
        assert_eq!(message["text"], "for public");
        // Nor after a restart: the script's current group is recorded in the profile.
        let status = bob.close_stdin().await;
        assert!(status.success(), "{status:?}");
        bob.restart().await;
        bob.send_line("still for public").await;
        let sent = bob.wait_event("sent", |e| e["event"] == "sent").await;
        assert_eq!(sent["group_id"], public, "{sent}");
        let message = alice
            .wait_event("message", |e| e["event"] == "message")
            .await;
        assert_eq!(message["text"], "still for public");
        bob.send_line("/switch outsiders").await;
        bob.wait_event("switched", |e| e["event"] == "switched")
            .await;
        bob.send_line("hello mallory").await;
        let message = mallory
            .wait_event("message", |e| e["event"] == "message")
            .await;
        assert_eq!(message["text"], "hello mallory");
        assert_eq!(message["group_id"], outsiders);

        // Latin-1 "café": refused, and the session goes on.
        bob.send_bytes(b"caf\xe9 in latin-1\n/status\n").await;
        let refused = bob.wait_event("error", |e| e["event"] == "error").await;
        assert!(
            refused["message"]
                .as_str()
                .is_some_and(|m| m.contains("not UTF-8")),
            "{refused}"
        );
        let status = bob.wait_event("status", |e| e["event"] == "status").await;
        assert_eq!(status["group_id"], outsiders);

        assert_eq!(
            bob.messages(public.as_str().expect("id")).len(),
            0,
            "{:?}",
            bob.log
        );
        for peer in [&mut alice, &mut bob, &mut carol, &mut mallory] {
            if peer.name == "bob" {
                assert_eq!(peer.errors().len(), 1, "only the refused line");
            } else {
                assert_eq!(peer.errors(), Vec::<Value>::new(), "{}", peer.name);
            }
            assert_eq!(peer.close_stdin().await.code(), Some(0));
        }
    })
    .await;
}

/// A `--server-cert-sha256` that is not the DS's, on a profile that never met the DS: the
/// client refuses to talk to it, says that the given fingerprint does not match (not that the
/// certificate "changed", with advice about a file that has no such line), and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_on_first_use_is_named_as_such() {
    timed(Duration::from_secs(60), async {
        let ds = Ds::start().await;
        let root = tempfile::tempdir().expect("temporary directory");
        let mut erin = Headless::new(&ds, "erin", root.path(), &[]).pinning(&"ab".repeat(32));
        erin.spawn();
        let error = erin.wait_event("error", |e| e["event"] == "error").await;
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("is not the one given with --server-cert-sha256"),
            "{message}"
        );
        assert!(!message.contains("changed"), "{message}");
        assert!(!erin.wait_exit().await.success());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_the_queue_first_and_a_profile_runs_in_one_process() {
    timed(Duration::from_secs(90), async {
        let ds = Ds::start().await;
        let root = tempfile::tempdir().expect("temporary directory");
        let mut alice = Headless::start(&ds, "alice", root.path(), &[]).await;
        let mut bob = Headless::start(&ds, "bob", root.path(), &[]).await;
        alice.send_line("/create stopping").await;
        let created = alice
            .wait_event("group_created", |e| e["event"] == "group_created")
            .await;
        let group_id = created["group_id"].as_str().expect("group_id").to_string();
        alice.send_line("/invite bob").await;
        bob.wait_event("joined", |e| e["event"] == "joined").await;

        // A second process on alice's profile is refused, and told which process has it;
        // the first carries on.
        let mut twin = Headless::new(&ds, "alice", root.path(), &[]);
        twin.spawn();
        let status = twin.wait_exit().await;
        assert!(
            !status.success(),
            "the second process must fail: {status:?}"
        );
        let expected = format!("is open in another mlschat (process {})", alice.pid());
        assert!(
            twin.stderr().contains(&expected),
            "stderr names the first process: {}",
            twin.stderr()
        );
        assert!(
            !twin.stderr().contains('\x1b'),
            "no colour codes in an error written to a file: {:?}",
            twin.stderr()
        );

        // Lines a bot wrote before a service manager stops it are sent before it exits,
        // with the exit status of a clean quit (not "killed by SIGTERM").
        let texts: Vec<String> = (0..20).map(|n| format!("before the stop {n}")).collect();
        for text in &texts {
            alice.send_line(text).await;
        }
        // Answered in order: every line above has reached the core.
        alice.status().await;
        alice.signal("TERM");
        let status = alice.wait_exit().await;
        assert_eq!(status.code(), Some(0), "{status:?}");
        for text in &texts {
            bob.wait_event(text, |e| {
                e["event"] == "message" && e["text"] == text.as_str()
            })
            .await;
        }
        assert_eq!(bob.messages(&group_id).len(), texts.len());
        assert_eq!(alice.errors(), Vec::<Value>::new());

        // SIGINT quits the same way, then ends the process by SIGINT, so that a shell running
        // it in a script stops too. (Not where SIGINT is ignored, as in a script's background
        // job: the client inherits that and leaves it so.)
        if !mlschat::signals::ignored(2) {
            use std::os::unix::process::ExitStatusExt as _;
            alice.restart().await;
            alice.signal("INT");
            let status = alice.wait_exit().await;
            assert_eq!(status.signal(), Some(2), "{status:?}");
        }

        // A reader that goes away (a closed pipe) makes the client quit the same way: the
        // lines it read afterwards still reach bob, and the exit status says the output failed.
        alice.restart().await;
        alice.close_stdout().await;
        let texts: Vec<String> = (0..20)
            .map(|n| format!("after the reader left {n}"))
            .collect();
        for text in &texts {
            alice.send_line(text).await;
        }
        alice.send_line("/status").await;
        let status = alice.wait_exit().await;
        assert!(!status.success(), "{status:?}");
        for text in &texts {
            bob.wait_event(text, |e| {
                e["event"] == "message" && e["text"] == text.as_str()
            })
            .await;
        }
        assert!(
            alice.stderr().contains("Broken pipe"),
            "stderr says why: {}",
            alice.stderr()
        );
        assert_eq!(bob.close_stdin().await.code(), Some(0));
    })
    .await;
}

/// Every form in which `canary` could appear in a log: as text, as hex, or as a Debug byte
/// list in decimal or hex (openmls traces bytes as `{:x?}`), also inside a longer buffer.
fn forms(canary: &str) -> Vec<String> {
    let bytes = canary.as_bytes();
    vec![
        canary.to_string(),
        hex::encode(bytes),
        format!("{bytes:?}").trim_matches(['[', ']']).to_string(),
        format!("{bytes:x?}").trim_matches(['[', ']']).to_string(),
    ]
}

fn leaked(haystack: &str, canaries: &[String]) -> Vec<String> {
    canaries
        .iter()
        .flat_map(|canary| forms(canary))
        .filter(|form| haystack.contains(form.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_in_the_trace_log() {
    timed(Duration::from_secs(90), async {
        let ds = Ds::start().await;
        let root = tempfile::tempdir().expect("temporary directory");
        let trace = [("MLSCHAT_LOG", "trace")];
        let mut alice = Headless::start(&ds, "alice", root.path(), &trace).await;
        let mut bob = Headless::start(&ds, "bob", root.path(), &trace).await;
        let tag: u64 = rand::random();
        let canaries: Vec<String> = (0..4).map(|n| format!("canary{n}x{tag:016x}")).collect();

        alice.send_line("/create secretroom").await;
        alice
            .wait_event("group_created", |e| e["event"] == "group_created")
            .await;
        alice.send_line("/invite bob").await;
        bob.wait_event("joined", |e| e["event"] == "joined").await;
        alice.send_line(&canaries[0]).await;
        alice
            .send_line(&format!("with spaces {} and more", canaries[1]))
            .await;
        bob.send_line(&canaries[2]).await;
        alice.send_line("/update").await;
        bob.send_line(&canaries[3]).await;
        for text in [&canaries[0], &canaries[2], &canaries[3]] {
            let receiver = if *text == canaries[0] {
                &mut bob
            } else {
                &mut alice
            };
            receiver
                .wait_event("canary", |e| {
                    e["event"] == "message" && e["text"] == text.as_str()
                })
                .await;
        }
        bob.wait_event("canary", |e| {
            e["event"] == "message"
                && e["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(canaries[1].as_str()))
        })
        .await;
        assert_eq!(alice.close_stdin().await.code(), Some(0));
        assert_eq!(bob.close_stdin().await.code(), Some(0));

        // The search finds every form of a canary where there is one.
        let control = root.path().join("control.log");
        let mut planted = String::from("a line\n");
        for form in forms(&canaries[2]) {
            planted.push_str(&format!("something {form} something\n"));
        }
        std::fs::write(&control, &planted).expect("write the control file");
        let control_text = std::fs::read_to_string(&control).expect("read the control file");
        assert_eq!(
            leaked(&control_text, &canaries).len(),
            4,
            "the search works"
        );

        for client in [&alice, &bob] {
            let log = std::fs::read_to_string(&client.log_file).expect("the log file exists");
            assert!(
                log.lines().count() > 50,
                "{}: the trace log is suspiciously short",
                client.name
            );
            let found = leaked(&log, &canaries);
            assert!(
                found.is_empty(),
                "{}'s log contains plaintext: {found:?}",
                client.name
            );
        }
        // Checked, not required: the group name is not logged either.
        for client in [&alice, &bob] {
            let log = std::fs::read_to_string(&client.log_file).expect("the log file exists");
            assert!(
                !log.contains("secretroom"),
                "{}'s log names the group",
                client.name
            );
        }
    })
    .await;
}

/// A profile that cannot be used says which file or directory is the trouble: "file is not a
/// database" or "File exists" alone left the user to guess.
#[test]
fn profile_trouble_names_the_file() {
    let root = tempfile::tempdir().expect("temporary directory");
    let run = |args: &[&std::ffi::OsStr]| -> (bool, String) {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mlschat"))
            .args(["--headless", "--name", "alice", "--server", "127.0.0.1:9"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("the client runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let garbage = root.path().join("garbage");
    std::fs::create_dir_all(&garbage).expect("profile directory");
    let database = garbage.join("mlschat.sqlite3");
    std::fs::write(&database, vec![0x5a; 8192]).expect("not a database");
    let (ok, stderr) = run(&["--data-dir".as_ref(), garbage.as_os_str()]);
    assert!(!ok);
    assert!(
        stderr.contains(&database.display().to_string()) && stderr.contains("not a database"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&database).expect("still there"),
        vec![0x5a; 8192],
        "left as it was"
    );

    let file = root.path().join("a-file");
    std::fs::write(&file, b"").expect("a file");
    let (ok, stderr) = run(&["--data-dir".as_ref(), file.as_os_str()]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("the profile directory {}", file.display())),
        "{stderr}"
    );
    let log = file.join("client.log");
    let elsewhere = root.path().join("elsewhere");
    let (ok, stderr) = run(&[
        "--data-dir".as_ref(),
        elsewhere.as_os_str(),
        "--log-file".as_ref(),
        log.as_os_str(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("the log file's directory {}", file.display())),
        "{stderr}"
    );
}
