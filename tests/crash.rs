//! Crash safety: the real `mlschat --headless` binary is killed with SIGKILL in the middle of
//! a commit (right after "/update" or "/invite" reaches its stdin, after various small delays),
//! restarted on the same profile, and must carry on in the same group without forking: its
//! messages arrive exactly once and its epoch authenticator matches the other members'.

mod common;

use std::time::{Duration, Instant};

use common::{Ds, Headless, Peer, STEP, create_group, timed, user};
use mlschat::core::{Command, CoreEvent};
use mlschat_ds::protocol::GroupId;

/// Polls `/status` on both sides until they report the same epoch authenticator.
async fn assert_same_epoch(victim: &mut Headless, peer: &mut Peer, group: &GroupId, round: usize) {
    let deadline = Instant::now() + STEP;
    loop {
        let theirs = victim.status().await;
        assert_eq!(theirs["group_id"], group.to_hex(), "round {round}");
        let (epoch, authenticator, _) = peer.status(group).await;
        if theirs["epoch_authenticator"] == authenticator.as_str() && theirs["epoch"] == epoch {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: the group forked: {} has {theirs}, {} has epoch {epoch} {authenticator}",
            victim.name,
            peer.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_commits_does_not_fork() {
    const DELAYS_MS: [u64; 10] = [0, 1, 2, 4, 7, 10, 15, 25, 40, 60];
    timed(Duration::from_secs(150), async {
        let ds = Ds::start().await;
        let root = tempfile::tempdir().expect("temporary directory");
        let mut alice = Peer::start(&ds, "alice", root.path()).await;
        // Users to invite later: they only need KeyPackages on the DS.
        for name in ["x0", "x1", "x2", "x3"] {
            let mut invitee = Peer::start(&ds, name, root.path()).await;
            invitee.stop().await;
        }
        let mut victim = Headless::start(&ds, "victim", root.path(), &[]).await;
        let group = create_group(&mut alice, "crashes").await;
        let id = group.id.clone();
        alice.command(Command::Invite {
            group: id.clone(),
            users: vec![user("victim")],
        });
        victim
            .wait_event("joined", |event| {
                event["event"] == "joined" && event["group_id"] == id.to_hex()
            })
            .await;
        assert_same_epoch(&mut victim, &mut alice, &id, 0).await;

        let mut invites = 0;
        for (round, delay) in DELAYS_MS.iter().enumerate() {
            let command = if round % 3 == 2 {
                invites += 1;
                format!("/invite x{}", invites - 1)
            } else {
                "/update".to_string()
            };
            if round % 2 == 1 {
                // A commit of the other member races the victim's: one of them wins the epoch,
                // and the victim dies while processing or retrying.
                alice.command(Command::Update { group: id.clone() });
            }
            victim.send_line(&command).await;
            tokio::time::sleep(Duration::from_millis(*delay)).await;
            victim.kill().await;
            victim.restart().await;

            let text = format!("after crash {round}");
            victim.send_line(&text).await;
            let (from, _) = alice.wait_message(&id, &text).await;
            assert_eq!(from, "victim");
            victim
                .wait_event("sent", |event| {
                    event["event"] == "sent" && event["group_id"] == id.to_hex()
                })
                .await;
            assert_same_epoch(&mut victim, &mut alice, &id, round).await;
        }

        // The victim still reads the group, and nothing arrived twice.
        alice.send_text(&id, "still with us?");
        victim
            .wait_event("message", |event| {
                event["event"] == "message" && event["text"] == "still with us?"
            })
            .await;
        for round in 0..DELAYS_MS.len() {
            let text = format!("after crash {round}");
            let copies = alice
                .messages(&id)
                .iter()
                .filter(|(_, t, _)| *t == text)
                .count();
            assert_eq!(copies, 1, "alice got {text:?} {copies} times");
        }
        assert_eq!(victim.errors(), Vec::<serde_json::Value>::new());
        assert_eq!(alice.errors(), Vec::<String>::new());
        let added: Vec<String> = alice
            .log
            .iter()
            .filter_map(|event| match event {
                CoreEvent::MemberAdded { user, .. } if user.starts_with('x') => Some(user.clone()),
                _ => None,
            })
            .collect();
        assert!(
            added.len() <= invites,
            "an invite was committed twice: {added:?}"
        );
        assert_eq!(victim.close_stdin().await.code(), Some(0));
        alice.stop().await;
    })
    .await;
}
