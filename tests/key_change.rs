//! A known name with a new key is never silently accepted: inviting a user whose key changed
//! since we last saw them is refused until we compare fingerprints with /verify.

mod common;

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use common::{Ds, Peer, create_group, invite, timed, user};
use mlschat::core::{Command, CoreEvent};

/// Alice (with her profile under `root`) meets bob on a DS of their own and learns his key.
async fn alice_learns_bobs_key(root: &Path) {
    let first = Ds::start().await;
    let mut alice = Peer::start(&first, "alice", root).await;
    let mut bob = Peer::start(&first, "bob", root).await;
    let team = create_group(&mut alice, "team").await;
    invite(&mut alice, &team, &mut [&mut bob]).await;
    alice.stop().await;
    bob.stop().await;
}

/// After alice learned bob's key: alice's profile directory, another for strangers, and a
/// second DS with alice started on it, where anyone may register as "bob".
async fn alice_on_a_second_ds() -> (TempDir, TempDir, Ds, Peer) {
    let root = tempfile::tempdir().expect("temp dir");
    let elsewhere = tempfile::tempdir().expect("temp dir");
    alice_learns_bobs_key(root.path()).await;
    let second = Ds::start().await;
    let alice = Peer::start(&second, "alice", root.path()).await;
    (root, elsewhere, second, alice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_of_a_changed_key_waits_for_verification() {
    timed(Duration::from_secs(90), async {
        // On another DS, someone registered "bob" with a different key.
        let (_root, elsewhere, second, mut alice) = alice_on_a_second_ds().await;
        let mut impostor = Peer::start(&second, "bob", elsewhere.path()).await;
        let other = create_group(&mut alice, "other").await;
        alice.command(Command::Invite { group: other.id.clone(), users: vec![user("bob")] });
        alice
            .wait_for("key change warning", |event| matches!(event, CoreEvent::KeyChanged { user, .. } if user == "bob"))
            .await;
        alice
            .wait_for("refused invite", |event| {
                matches!(event, CoreEvent::Error { message } if message.contains("bob's key changed") && message.contains("/verify bob"))
            })
            .await;
        assert!(
            !alice.log.iter().any(|event| matches!(event, CoreEvent::MemberAdded { group, .. } if group.id == other.id)),
            "a changed key must not be added without verification"
        );

        // After comparing fingerprints (/verify), the invite goes through.
        alice.command(Command::Verify { user: user("bob") });
        alice.wait_for("verified", |event| matches!(event, CoreEvent::Verified { user } if user == "bob")).await;
        invite(&mut alice, &other, &mut [&mut impostor]).await;
        alice.stop().await;
        impostor.stop().await;
    })
    .await;
}

/// A changed key can also arrive in a commit someone else made: the warning is recorded with
/// the commit, in the same transaction, and stays in that group's timeline after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_key_in_a_commit_is_flagged_and_kept_in_the_timeline() {
    timed(Duration::from_secs(90), async {
        // On another DS, carol (who never met bob) adds an impostor named "bob" to a group
        // alice is in.
        let (_root, elsewhere, second, mut alice) = alice_on_a_second_ds().await;
        let mut carol = Peer::start(&second, "carol", elsewhere.path()).await;
        let mut impostor = Peer::start(&second, "bob", elsewhere.path()).await;
        let group = create_group(&mut carol, "elsewhere").await;
        invite(&mut carol, &group, &mut [&mut alice]).await;
        invite(&mut carol, &group, &mut [&mut impostor]).await;
        alice
            .wait_for(
                "key change warning",
                |event| matches!(event, CoreEvent::KeyChanged { user, .. } if user == "bob"),
            )
            .await;

        alice.stop().await;
        alice.restart().await;
        let entries = alice.history(&group.id).await;
        let warnings: Vec<&str> = entries
            .iter()
            .filter(|entry| entry.kind == "warning")
            .map(|entry| entry.text.as_str())
            .collect();
        assert_eq!(warnings.len(), 1, "one stored warning: {warnings:?}");
        assert!(
            warnings[0].contains("bob's key changed") && warnings[0].contains("/verify bob"),
            "{warnings:?}"
        );
        for peer in [&mut alice, &mut carol, &mut impostor] {
            peer.stop().await;
        }
    })
    .await;
}
