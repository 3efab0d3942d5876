//! End-to-end tests of the client core: real clients (`Client::start`) against a real DS on
//! `127.0.0.1:0`, driven with `Command`s and checked through `CoreEvent`s.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{
    Ds, Peer, STEP, StoppedDs, agreed_status, converge, create_group, invite, kick, raw_login,
    start_peers, stop_clean, timed, user,
};
use mlschat::core::{Command, ConnectionState, CoreEvent, GroupRef};
use mlschat_ds::protocol::{DeliveryKind, ErrorCode, Fetch, Frame, GroupId, Send};

/// Asserts that every text in `texts` (sent by `from`) arrived exactly once at `peer`, with the
/// right sender, and that nothing else from `from` with these texts arrived.
fn assert_exactly_once(peer: &mut Peer, group: &GroupId, from: &str, texts: &[String]) {
    let messages = peer.messages(group);
    for text in texts {
        let copies: Vec<_> = messages.iter().filter(|(_, t, _)| t == text).collect();
        assert_eq!(
            copies.len(),
            1,
            "{} got {text:?} {} times: {copies:?}",
            peer.name,
            copies.len()
        );
        assert_eq!(copies[0].0, from, "{}: wrong sender of {text:?}", peer.name);
    }
}

/// Asserts that the seqs of the messages `peer` received strictly increase.
fn assert_in_order(peer: &mut Peer, group: &GroupId) {
    let seqs: Vec<u64> = peer
        .messages(group)
        .iter()
        .map(|(_, _, seq)| *seq)
        .collect();
    assert!(
        seqs.windows(2).all(|pair| pair[0] < pair[1]),
        "{}: message seqs out of order: {seqs:?}",
        peer.name
    );
}

/// alice, bob and carol on one DS, in a group alice created under `name`.
async fn three_in_a_group(name: &str) -> (Ds, tempfile::TempDir, [Peer; 3], GroupRef) {
    let (ds, root, [mut alice, mut bob, mut carol]) = start_peers(["alice", "bob", "carol"]).await;
    let group = create_group(&mut alice, name).await;
    invite(&mut alice, &group, &mut [&mut bob, &mut carol]).await;
    (ds, root, [alice, bob, carol], group)
}

/// Asserts that a line of `peer`'s stored timeline of `group` contains `text`.
async fn assert_timeline_says(peer: &mut Peer, group: &GroupId, text: &str) {
    let history = peer.history(group).await;
    assert!(
        history.iter().any(|entry| entry.text.contains(text)),
        "{}'s timeline says {text:?}: {history:#?}",
        peer.name
    );
}

/// [`three_in_a_group`], with alice and bob agreeing on it and carol's client stopped.
async fn three_with_carol_away(name: &str) -> (Ds, tempfile::TempDir, [Peer; 3], GroupId) {
    let (ds, root, [mut alice, mut bob, mut carol], group) = three_in_a_group(name).await;
    let id = group.id.clone();
    converge(&mut [&mut alice, &mut bob], &id).await;
    carol.stop().await;
    (ds, root, [alice, bob, carol], id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_users_chat_kick_and_leave() {
    timed(Duration::from_secs(90), async {
        let (ds, _root, [mut alice, mut bob, mut carol]) = start_peers(["alice", "bob", "carol"]).await;

        let group = create_group(&mut alice, "team").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob, &mut carol]).await;
        for peer in [&bob, &carol] {
            assert_eq!(peer.group_name(&id).as_deref(), Some("team"));
        }

        // Everyone chats; every message reaches every other member exactly once.
        let mut sent: HashMap<String, Vec<String>> = HashMap::new();
        for round in 0..3 {
            for peer in [&alice, &bob, &carol] {
                let text = format!("hello from {} #{round}", peer.name);
                peer.send_text(&id, &text);
                sent.entry(peer.name.clone()).or_default().push(text);
            }
        }
        let mut peers = [alice, bob, carol];
        for sender in 0..3 {
            let name = peers[sender].name.clone();
            for text in sent[&name].clone() {
                peers[sender].wait_sent(&id, &text).await;
                for (receiver, peer) in peers.iter_mut().enumerate() {
                    if receiver != sender {
                        let (from, _) = peer.wait_message(&id, &text).await;
                        assert_eq!(from, name);
                    }
                }
            }
        }
        let [mut alice, mut bob, mut carol] = peers;
        converge(&mut [&mut alice, &mut bob, &mut carol], &id).await;
        for peer in [&mut alice, &mut bob, &mut carol] {
            for (from, texts) in &sent {
                if *from != peer.name {
                    assert_exactly_once(peer, &id, from, texts);
                } else {
                    assert!(peer.messages(&id).iter().all(|(_, t, _)| !texts.contains(t)));
                    for text in texts {
                        assert_eq!(peer.sent_count(&id, text), 1, "{}: Sent for {text:?}", peer.name);
                    }
                }
            }
            assert_in_order(peer, &id);
        }

        // Alice kicks Carol.
        kick(&mut alice, &mut carol, &mut [&mut bob], &id).await;
        let (_, _, members) = converge(&mut [&mut alice, &mut bob], &id).await;
        assert_eq!(members, 2);

        // After the removal Carol reads nothing.
        let secrets = ["after the kick from alice", "after the kick from bob"];
        alice.send_text(&id, secrets[0]);
        bob.send_text(&id, secrets[1]);
        let first_secret_seq = alice
            .wait_sent(&id, secrets[0])
            .await
            .min(bob.wait_sent(&id, secrets[1]).await);
        bob.wait_message(&id, secrets[0]).await;
        alice.wait_message(&id, secrets[1]).await;
        carol.idle(Duration::from_millis(500)).await;
        assert!(
            carol
                .messages(&id)
                .iter()
                .all(|(_, text, _)| !secrets.contains(&text.as_str())),
            "carol read a message sent after her removal"
        );
        carol.command(Command::Send {
            group: id.clone(),
            text: "am I still here?".into(),
        });
        carol
            .wait_for("error", |event| matches!(event, CoreEvent::Error { .. }))
            .await;
        // What her client keeps of the group is the epoch that removed her, without its
        // secrets or a tree she is in: no code or member list to show.
        assert_eq!(carol.members(&id).await, Vec::<String>::new());
        carol.command(Command::Status { group: id.clone() });
        carol
            .wait_for("status refused", |event| {
                matches!(event, CoreEvent::Error { message } if message.contains("no longer a member"))
            })
            .await;
        carol.stop().await;

        // The DS agrees: Carol's access ended with the commit that removed her.
        let mut raw = raw_login(&ds, "carol", &carol.dir).await;
        raw.send_frame(&Frame::Fetch(Fetch {
            request_id: 7,
            group_id: id.clone(),
            after_seq: 0,
            limit: 1000,
        }))
        .await
        .expect("send fetch");
        loop {
            match tokio::time::timeout(STEP, raw.next_frame()).await {
                Ok(Ok(Some(Frame::Messages(messages)))) => {
                    assert!(
                        messages.messages.iter().all(|m| m.seq < first_secret_seq),
                        "the DS let carol fetch messages after her removal"
                    );
                    break;
                }
                Ok(Ok(Some(Frame::Error(error)))) if error.request_id == 7 => {
                    assert_eq!(ErrorCode::from_u16(error.code), Some(ErrorCode::NotMember));
                    break;
                }
                Ok(Ok(Some(Frame::Deliver(delivery)))) => {
                    assert!(
                        delivery.group_id != id || delivery.seq < first_secret_seq,
                        "the DS delivered to carol a message after her removal"
                    );
                }
                other => panic!("unexpected answer to carol's fetch: {other:?}"),
            }
        }
        raw.close().await;

        // Bob leaves: Alice's client commits his proposal by itself.
        bob.command(Command::Leave { group: id.clone() });
        bob.wait_for("leave requested", |event| {
            matches!(event, CoreEvent::LeaveRequested { group } if group.id == id)
        })
        .await;
        bob.wait_for("left", |event| {
            matches!(event, CoreEvent::Left { group, .. } if group.id == id)
        })
        .await;
        alice
            .wait_for("bob removed", |event| {
                matches!(event, CoreEvent::MemberRemoved { group, user, .. } if group.id == id && user == "bob")
            })
            .await;
        let (_, _, members) = alice.status(&id).await;
        assert_eq!(members, 1);
        alice.send_text(&id, "alone now");
        alice.wait_sent(&id, "alone now").await;
        bob.idle(Duration::from_millis(300)).await;
        assert!(bob.messages(&id).iter().all(|(_, text, _)| text != "alone now"));

        assert_eq!(alice.errors(), Vec::<String>::new());
        assert_eq!(bob.errors(), Vec::<String>::new());
        alice.stop().await;
        bob.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_member_catches_up() {
    timed(Duration::from_secs(120), async {
        let (_ds, _root, [mut alice, mut bob, mut carol, mut dave]) =
            start_peers(["alice", "bob", "carol", "dave"]).await;
        let group = create_group(&mut alice, "catch-up").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob, &mut carol]).await;
        converge(&mut [&mut alice, &mut bob, &mut carol], &id).await;

        carol.stop().await;
        let texts: Vec<String> = (0..100)
            .map(|n| format!("while carol is away #{n}"))
            .collect();
        for (n, text) in texts.iter().enumerate() {
            let sender = if n % 2 == 0 { &alice } else { &bob };
            sender.send_text(&id, text);
            if n == 30 {
                alice.command(Command::Update { group: id.clone() });
            }
            if n == 60 {
                bob.command(Command::Invite {
                    group: id.clone(),
                    users: vec![user("dave")],
                });
            }
        }
        for (n, text) in texts.iter().enumerate() {
            if n % 2 == 0 {
                alice.wait_sent(&id, text).await;
                bob.wait_message(&id, text).await;
            } else {
                bob.wait_sent(&id, text).await;
                alice.wait_message(&id, text).await;
            }
        }
        dave.wait_for("joined", |event| {
            matches!(event, CoreEvent::Joined { group, by } if group.id == id && by == "bob")
        })
        .await;

        carol.restart().await;
        for text in &texts {
            carol.wait_message(&id, text).await;
        }
        let (epoch, _, members) =
            converge(&mut [&mut alice, &mut bob, &mut carol, &mut dave], &id).await;
        assert_eq!(members, 4);
        assert_eq!(epoch, 3, "add bob and carol, an update, add dave");
        let received = carol.messages(&id);
        assert_eq!(
            received.len(),
            texts.len(),
            "carol got extra or missing messages"
        );
        for (n, text) in texts.iter().enumerate() {
            let from = if n % 2 == 0 { "alice" } else { "bob" };
            assert_exactly_once(&mut carol, &id, from, std::slice::from_ref(text));
        }
        assert_in_order(&mut carol, &id);
        // Sent order equals delivery order: carol saw the messages in the order they were
        // sequenced.
        let seqs: Vec<u64> = received.iter().map(|(_, _, seq)| *seq).collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted);

        stop_clean(&mut [&mut alice, &mut bob, &mut carol, &mut dave]).await;
    })
    .await;
}

/// A member removed and added again while its client was stopped gets, once it starts, what
/// was sent before its removal, the removal, then the Welcome of each re-addition with what
/// followed it, and never what was sent while it was out. Twice over, so that the DS keeps
/// more than one unfinished membership of one user in one group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_and_added_again_while_offline_follows_every_step() {
    timed(Duration::from_secs(120), async {
        let (_ds, _root, [mut alice, mut bob, mut carol], id) =
            three_with_carol_away("in and out").await;

        let mut for_carol = Vec::new();
        let mut not_for_carol = Vec::new();
        for round in 0..2 {
            let before = format!("before carol's removal #{round}");
            alice.send_text(&id, &before);
            alice.wait_sent(&id, &before).await;
            for_carol.push(before);
            kick_offline(&mut alice, &id, "carol").await;
            let out = format!("while carol is out #{round}");
            bob.send_text(&id, &out);
            bob.wait_sent(&id, &out).await;
            not_for_carol.push(out);
            alice.command(Command::Invite {
                group: id.clone(),
                users: vec![user("carol")],
            });
            alice
                .wait_for("carol added", |event| {
                    matches!(event, CoreEvent::MemberAdded { group, user, .. } if group.id == id && user == "carol")
                })
                .await;
        }
        let back = "after carol is back".to_string();
        bob.send_text(&id, &back);
        bob.wait_sent(&id, &back).await;
        for_carol.push(back);

        carol.restart().await;
        for before in &for_carol[..2] {
            carol.wait_message(&id, before).await;
            carol
                .wait_for("removed", |event| {
                    matches!(event, CoreEvent::Left { group, by } if group.id == id && by == "alice")
                })
                .await;
            carol
                .wait_for("joined again", |event| {
                    matches!(event, CoreEvent::Joined { group, by } if group.id == id && by == "alice")
                })
                .await;
        }
        carol.wait_message(&id, &for_carol[2]).await;
        carol.send_text(&id, "hello again");
        carol.wait_sent(&id, "hello again").await;
        alice.wait_message(&id, "hello again").await;
        bob.wait_message(&id, "hello again").await;
        let (_, _, members) = converge(&mut [&mut alice, &mut bob, &mut carol], &id).await;
        assert_eq!(members, 3);
        let received: Vec<String> = carol
            .messages(&id)
            .into_iter()
            .map(|(_, text, _)| text)
            .collect();
        assert_eq!(received, for_carol, "carol's messages");
        assert!(
            received.iter().all(|text| !not_for_carol.contains(text)),
            "carol read what was sent while she was out"
        );
        assert_in_order(&mut carol, &id);
        stop_clean(&mut [&mut alice, &mut bob, &mut carol]).await;
    })
    .await;
}

/// The same while the DS's retention runs out: when the member comes back, the messages up to
/// its removal have expired, and the DS has only the Welcome that added it again. Its client
/// learns its removal from that Welcome and joins again instead of staying in the old epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_removal_expired_joins_again_from_the_next_welcome() {
    timed(Duration::from_secs(120), async {
        let (ds, _root, [mut alice, mut bob, mut carol], id) =
            three_with_carol_away("expired").await;

        alice.send_text(&id, "expires before carol is back");
        alice.wait_sent(&id, "expires before carol is back").await;
        kick_offline(&mut alice, &id, "carol").await;
        bob.send_text(&id, "while carol is out");
        let last_expired = bob.wait_sent(&id, "while carol is out").await;
        alice.command(Command::Invite {
            group: id.clone(),
            users: vec![user("carol")],
        });
        alice
            .wait_for("carol added", |event| {
                matches!(event, CoreEvent::MemberAdded { group, user, .. } if group.id == id && user == "carol")
            })
            .await;

        // Everything up to the message after carol's removal expires.
        let backdated = expire_up_to(ds, &id, last_expired).await;
        assert!(backdated.1 >= 2, "the removal and the message after it are stored");
        let _ds = backdated.0;

        carol.restart().await;
        carol
            .wait_for("joined again", |event| {
                matches!(event, CoreEvent::Joined { group, by } if group.id == id && by == "alice")
            })
            .await;
        alice.send_text(&id, "welcome back");
        carol.wait_message(&id, "welcome back").await;
        carol.send_text(&id, "glad to be back");
        carol.wait_sent(&id, "glad to be back").await;
        alice.wait_message(&id, "glad to be back").await;
        bob.wait_message(&id, "glad to be back").await;
        let (_, _, members) = converge(&mut [&mut alice, &mut bob, &mut carol], &id).await;
        assert_eq!(members, 3);
        let received: Vec<String> = carol
            .messages(&id)
            .into_iter()
            .map(|(_, text, _)| text)
            .collect();
        assert_eq!(received, vec!["welcome back".to_string()]);
        assert_timeline_says(&mut carol, &id, "removed from the group while away").await;
        stop_clean(&mut [&mut alice, &mut bob, &mut carol]).await;
    })
    .await;
}

/// A member removed while away, whose removal expired at the DS before it came back and who was
/// not added again, gets nothing of the group any more. Its first send is refused as not a
/// member; the client then finds that the DS holds nothing of the group for it and closes the
/// group, saying why, instead of keeping it open with every send failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_removal_expired_is_told_when_it_sends() {
    timed(Duration::from_secs(120), async {
        let (ds, _root, [mut alice, mut bob, mut carol], id) =
            three_with_carol_away("removed").await;
        kick_offline(&mut alice, &id, "carol").await;
        bob.send_text(&id, "after carol's removal");
        let last = bob.wait_sent(&id, "after carol's removal").await;
        let (_ds, backdated) = expire_up_to(ds, &id, last).await;
        assert!(backdated >= 2, "the removal and the message after it are stored");

        carol.restart().await;
        assert!(carol.in_group(&id), "nothing has told carol yet");
        carol.send_text(&id, "anyone here?");
        carol
            .wait_for("the send refused", |event| {
                matches!(event, CoreEvent::Failed { group, .. } if group.id == id)
            })
            .await;
        carol
            .wait_for("told", |event| {
                matches!(event, CoreEvent::RemovalExpired { group } if group.id == id)
            })
            .await;
        assert!(!carol.in_group(&id), "the group is closed");
        assert_timeline_says(&mut carol, &id, "removed from the group while away").await;
        // Closed for good: the next send fails here, without the DS.
        carol.send_text(&id, "still here?");
        carol
            .wait_for("refused locally", |event| {
                matches!(event, CoreEvent::Error { message } if message.contains("no longer a member"))
            })
            .await;
        assert!(
            alice.messages(&id).iter().all(|(_, text, _)| !text.contains("here?")),
            "nothing of carol's reached the group"
        );
        assert_eq!(
            carol.errors(),
            vec!["you are no longer a member of removed".to_string()],
            "the one error is the local refusal"
        );
        carol.stop().await;
        stop_clean(&mut [&mut alice, &mut bob]).await;
    })
    .await;
}

/// A member that left and was added again, then restarted, must not bring back what its first
/// membership had queued: its own Remove proposal was still in the stored group state, and its
/// next commit after the restart included it, removing whoever had its old leaf by then (or
/// itself) at the committer only, so that every other member fell out of sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_added_again_after_leaving_commits_nothing_of_its_first_membership() {
    timed(Duration::from_secs(120), async {
        let (_ds, _root, [mut alice, mut bob, mut carol, mut erin]) =
            start_peers(["alice", "bob", "carol", "erin"]).await;
        let group = create_group(&mut alice, "again").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob, &mut carol]).await;
        carol.command(Command::Leave { group: id.clone() });
        carol
            .wait_for("left", |event| {
                matches!(event, CoreEvent::Left { group, .. } if group.id == id)
            })
            .await;
        // Erin takes carol's old leaf; carol comes back in a new one.
        invite(&mut alice, &group, &mut [&mut erin]).await;
        invite(&mut alice, &group, &mut [&mut carol]).await;
        converge(&mut [&mut alice, &mut bob, &mut carol, &mut erin], &id).await;

        let (before, _, _) = alice.status(&id).await;
        carol.stop().await;
        carol.restart().await;
        carol.command(Command::Update { group: id.clone() });
        for peer in [&mut alice, &mut bob, &mut carol, &mut erin] {
            peer.wait_for("carol's update", |event| {
                matches!(event, CoreEvent::EpochChanged { group, epoch, .. } if group.id == id && *epoch == before + 1)
            })
            .await;
        }
        let (_, _, members) = converge(&mut [&mut alice, &mut bob, &mut carol, &mut erin], &id).await;
        assert_eq!(members, 4, "nobody was removed");
        carol.send_text(&id, "from carol");
        carol.wait_sent(&id, "from carol").await;
        erin.send_text(&id, "from erin");
        erin.wait_sent(&id, "from erin").await;
        for peer in [&mut alice, &mut bob, &mut erin] {
            peer.wait_message(&id, "from carol").await;
        }
        for peer in [&mut alice, &mut bob, &mut carol] {
            peer.wait_message(&id, "from erin").await;
        }
        stop_clean(&mut [&mut alice, &mut bob, &mut carol, &mut erin]).await;
    })
    .await;
}

/// The database of a stopped DS, as a backup of it (a cleanly stopped DS keeps it in one file).
fn backup(stopped: &StoppedDs) -> Vec<u8> {
    std::fs::read(stopped.data_dir().join("ds.sqlite3")).expect("the DS's database reads")
}

/// Puts a [`backup`] back in place, as docs/operations.md restores one.
fn restore(stopped: &StoppedDs, backup: &[u8]) {
    let database = stopped.data_dir().join("ds.sqlite3");
    std::fs::write(&database, backup).expect("the backup is restored");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", database.display()));
    }
}

/// A DS restored from a backup taken before a commit has lost it: members who processed it are
/// ahead of the DS for good. A message sent then is refused as `StaleEpoch` with the DS's older
/// epoch, which the client used to take as "wait for that epoch", already past, and so rebuilt
/// and sent it again in a tight loop (hundreds of requests a second, for ever, without a word).
/// It now closes the group, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restored_from_before_a_commit_closes_the_group_instead_of_resending_for_ever() {
    timed(Duration::from_secs(90), async {
        let (ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        let group = create_group(&mut alice, "rewound").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        let (before, _, _) = converge(&mut [&mut alice, &mut bob], &id).await;
        let stopped = ds.stop().await;
        let saved = backup(&stopped);
        let ds = stopped.start().await;

        alice.command(Command::Update { group: id.clone() });
        for peer in [&mut alice, &mut bob] {
            peer.wait_for("the update", |event| {
                matches!(event, CoreEvent::EpochChanged { group, epoch, .. } if group.id == id && *epoch == before + 1)
            })
            .await;
        }
        let stopped = ds.stop().await;
        restore(&stopped, &saved);
        let _ds = stopped.start().await;

        alice.send_text(&id, "after the restore");
        alice
            .wait_for("told", |event| {
                matches!(event, CoreEvent::ServerBehind { group, server_epoch, epoch }
                    if group.id == id && *server_epoch == before && *epoch == before + 1)
            })
            .await;
        alice
            .wait_for("the message failed", |event| {
                matches!(event, CoreEvent::Failed { group, .. } if group.id == id)
            })
            .await;
        assert!(!alice.in_group(&id));
        assert_timeline_says(&mut alice, &id, "restored from an older backup").await;
        assert_eq!(alice.errors(), Vec::<String>::new());
        alice.stop().await;
        bob.stop().await;
    })
    .await;
}

/// `kicker` removes `user`, whose client is not running; waits until the kicker saw it.
async fn kick_offline(kicker: &mut Peer, group: &GroupId, kicked: &str) {
    kicker.command(Command::Kick {
        group: group.clone(),
        user: user(kicked),
    });
    kicker
        .wait_for(&format!("{kicked} removed"), |event| {
            matches!(event, CoreEvent::MemberRemoved { group: g, user, .. } if g.id == *group && user == kicked)
        })
        .await;
}

/// An invite queued behind another invite of the same user finds the user added by then: it
/// says so instead of being dropped without a word (and claims none of the user's
/// KeyPackages). The same for a kick behind a kick. Before, the second command got no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_invite_or_kick_that_became_moot_says_so() {
    timed(Duration::from_secs(60), async {
        let (_ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        let group = create_group(&mut alice, "twice").await;
        let id = group.id.clone();
        for _ in 0..2 {
            alice.command(Command::Invite {
                group: id.clone(),
                users: vec![user("bob")],
            });
        }
        bob.wait_for("joined", |event| {
            matches!(event, CoreEvent::Joined { group, .. } if group.id == id)
        })
        .await;
        let error = alice
            .wait_for("not invited again", |event| {
                matches!(event, CoreEvent::Error { message } if message.contains("bob is already a member of twice"))
            })
            .await;
        assert!(
            matches!(&error, CoreEvent::Error { message } if message.contains("not invited again")),
            "{error:?}"
        );
        alice.idle(Duration::from_millis(300)).await;
        let added = alice
            .log
            .iter()
            .filter(|event| matches!(event, CoreEvent::MemberAdded { user, .. } if user == "bob"))
            .count();
        assert_eq!(added, 1);
        let (_, _, members) = converge(&mut [&mut alice, &mut bob], &id).await;
        assert_eq!(members, 2);
        for _ in 0..2 {
            alice.command(Command::Kick {
                group: id.clone(),
                user: user("bob"),
            });
        }
        alice
            .wait_for("not removed again", |event| {
                matches!(event, CoreEvent::Error { message } if message == "bob is not a member of twice any more: not removed again")
            })
            .await;
        let errors = alice.errors();
        assert_eq!(errors.len(), 2, "{errors:?}");
        bob.stop().await;
        alice.stop().await;
    })
    .await;
}

/// A group whose backlog at the DS is full (a member is away) refuses sends: the sender's
/// client says so once, keeps what was typed, and sends it when the member is back and the DS
/// has purged what everyone acknowledged. Before, the messages waited without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_group_backlog_is_reported_and_its_messages_wait() {
    timed(Duration::from_secs(90), async {
        let ds = Ds::start_with(mlschat_ds::config::Limits {
            max_group_backlog: 8,
            purge_interval_secs: 1,
            ..mlschat_ds::config::Limits::default()
        })
        .await;
        let root = tempfile::tempdir().expect("temporary directory");
        let mut alice = Peer::start(&ds, "alice", root.path()).await;
        let mut bob = Peer::start(&ds, "bob", root.path()).await;
        let group = create_group(&mut alice, "full").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        converge(&mut [&mut alice, &mut bob], &id).await;
        bob.stop().await;
        let texts: Vec<String> = (0..12).map(|n| format!("while bob is away {n}")).collect();
        for text in &texts {
            alice.send_text(&id, text);
        }
        alice
            .wait_for("backlog full", |event| {
                matches!(event, CoreEvent::Error { message } if message.contains("as many undelivered messages"))
            })
            .await;
        bob.restart().await;
        for text in &texts {
            bob.wait_message(&id, text).await;
        }
        for text in &texts {
            alice.wait_sent(&id, text).await;
        }
        let errors = alice.errors();
        assert_eq!(errors.len(), 1, "told once: {errors:?}");
        alice.stop().await;
        stop_clean(&mut [&mut bob]).await;
    })
    .await;
}

/// Makes the messages of `group` up to `seq` expire: backdated while the DS is down, deleted by
/// the purge it runs as it starts again. Returns the restarted DS and how many were backdated.
async fn expire_up_to(ds: Ds, group: &GroupId, seq: u64) -> (Ds, usize) {
    let stopped = ds.stop().await;
    let database = stopped.data_dir().join("ds.sqlite3");
    let connection = rusqlite::Connection::open(&database).expect("the DS's database opens");
    let backdated = connection
        .execute(
            "UPDATE messages SET created_at = 0 WHERE group_id = ?1 AND seq <= ?2",
            rusqlite::params![group.as_bytes(), seq as i64],
        )
        .expect("backdate");
    drop(connection);
    let ds = stopped.start().await;
    let purged = async {
        let connection = rusqlite::Connection::open(&database).expect("the DS's database opens");
        loop {
            let left: i64 = connection
                .query_row(
                    "SELECT COUNT(*) FROM messages WHERE created_at = 0",
                    [],
                    |row| row.get(0),
                )
                .expect("count");
            if left == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(STEP, purged)
        .await
        .expect("the DS purges expired messages as it starts");
    (ds, backdated)
}

/// A user invited while away, whose Welcome expired at the DS before it came back, cannot join:
/// its client says so once when the group's next message arrives, naming who to ask, instead
/// of dropping every message of the group without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invitation_that_expired_before_its_user_came_back_is_reported() {
    timed(Duration::from_secs(90), async {
        let (ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        bob.stop().await;
        let group = create_group(&mut alice, "late").await;
        let id = group.id.clone();
        alice.command(Command::Invite {
            group: id.clone(),
            users: vec![user("bob")],
        });
        alice
            .wait_for("bob added", |event| {
                matches!(event, CoreEvent::MemberAdded { group, user, .. } if group.id == id && user == "bob")
            })
            .await;
        alice.send_text(&id, "first");
        let first = alice.wait_sent(&id, "first").await;
        let (_ds, _) = expire_up_to(ds, &id, first - 1).await;
        alice.send_text(&id, "second");
        alice.wait_sent(&id, "second").await;
        bob.restart().await;
        bob.wait_for("told", |event| {
            matches!(event, CoreEvent::Error { message } if message.contains("invitation expired") && message.contains("a group of alice"))
        })
        .await;
        bob.idle(Duration::from_millis(300)).await;
        assert_eq!(bob.errors().len(), 1, "told once");
        assert!(!bob.in_group(&id));
        alice.stop().await;
        bob.stop().await;
    })
    .await;
}

/// Messages that expired at the DS before a member fetched them leave a gap in its seqs: its
/// timeline says so where they would have been, instead of nothing but a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_expired_unread_are_noted_where_they_were() {
    timed(Duration::from_secs(90), async {
        let (ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        let group = create_group(&mut alice, "gap").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        converge(&mut [&mut alice, &mut bob], &id).await;
        bob.stop().await;
        for text in ["lost 1", "lost 2", "kept"] {
            alice.send_text(&id, text);
        }
        let lost = alice.wait_sent(&id, "lost 2").await;
        alice.wait_sent(&id, "kept").await;
        let (_ds, backdated) = expire_up_to(ds, &id, lost).await;
        assert!(backdated >= 2);
        bob.restart().await;
        bob.wait_message(&id, "kept").await;
        bob.wait_for("told", |event| {
            matches!(event, CoreEvent::Error { message } if message == "gap: up to 2 messages expired at the server before this client fetched them")
        })
        .await;
        let history = bob.history(&id).await;
        let noted = history
            .iter()
            .position(|entry| entry.text.contains("expired at the server"))
            .expect("noted in the timeline");
        let kept = history
            .iter()
            .position(|entry| entry.text == "kept")
            .expect("kept");
        assert!(noted < kept, "the note stands where the messages were");
        assert!(bob.in_group(&id), "still in the group");
        alice.stop().await;
        bob.stop().await;
    })
    .await;
}

/// A member away while a commit expired at the DS can no longer follow the group: its client
/// says so once (not an error per message, with what it types "sending" for ever), and a
/// removal and re-addition by a member brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_missed_commit_expired_is_told_and_can_be_added_again() {
    timed(Duration::from_secs(120), async {
        let (ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        let group = create_group(&mut alice, "expiring").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        converge(&mut [&mut alice, &mut bob], &id).await;
        bob.stop().await;
        alice.command(Command::Update { group: id.clone() });
        alice
            .wait_for("epoch 2", |event| {
                matches!(event, CoreEvent::EpochChanged { group, epoch: 2, .. } if group.id == id)
            })
            .await;
        alice.send_text(&id, "after the update");
        let after_update = alice.wait_sent(&id, "after the update").await;
        let (_ds, backdated) = expire_up_to(ds, &id, after_update - 1).await;
        assert!(backdated >= 1, "the update is stored");

        bob.restart().await;
        bob.wait_for(
            "out of sync",
            |event| matches!(event, CoreEvent::OutOfSync { group } if group.id == id),
        )
        .await;
        bob.command(Command::Send {
            group: id.clone(),
            text: "can anyone hear me?".into(),
        });
        bob.wait_for("refused", |event| {
            matches!(event, CoreEvent::Error { message } if message.contains("no longer a member"))
        })
        .await;
        assert_timeline_says(&mut bob, &id, "can no longer read or send here").await;

        // Bob's client, out of the group, does not follow the removal; alice sees it.
        kick_offline(&mut alice, &id, "bob").await;
        alice.command(Command::Invite {
            group: id.clone(),
            users: vec![user("bob")],
        });
        bob.wait_for("joined again", |event| {
            matches!(event, CoreEvent::Joined { group, by } if group.id == id && by == "alice")
        })
        .await;
        alice.send_text(&id, "welcome back");
        bob.wait_message(&id, "welcome back").await;
        let (_, _, members) = converge(&mut [&mut alice, &mut bob], &id).await;
        assert_eq!(members, 2);
        let errors: Vec<String> = bob
            .errors()
            .into_iter()
            .filter(|error| !error.contains("no longer a member"))
            .collect();
        assert_eq!(
            errors,
            Vec::<String>::new(),
            "one notice, no error per message"
        );
        alice.stop().await;
        bob.stop().await;
    })
    .await;
}

/// A member's client processes deliveries without an fsync each and acknowledges them only once
/// a sync made them durable: with the sync held back for seconds, the DS's cursor for the
/// member stays behind the messages shown, then reaches the last one with no further traffic,
/// and a restart redelivers nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_follow_received_messages_once_durable() {
    const SYNC_DELAY: Duration = Duration::from_secs(3);
    timed(Duration::from_secs(60), async {
        let (ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        bob.stop().await;
        bob.sync_delay = Some(SYNC_DELAY);
        bob.restart().await;
        let group = create_group(&mut alice, "acks").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        let texts: Vec<String> = (0..20).map(|n| format!("burst #{n}")).collect();
        for text in &texts {
            alice.send_text(&id, text);
        }
        let mut last = 0;
        for text in &texts {
            last = bob.wait_message(&id, text).await.1;
        }

        let store = rusqlite::Connection::open(ds.dir.path().join("ds.sqlite3")).expect("opens");
        let cursor = || -> u64 {
            store
                .query_row(
                    "SELECT cursor FROM members WHERE group_id = ?1 AND user = 'bob'",
                    [id.as_bytes()],
                    |row| row.get(0),
                )
                .expect("bob's cursor")
        };
        // An acknowledgement sent right away would have reached the DS well within this.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(cursor() < last, "bob acknowledged {last} before syncing it");
        let deadline = tokio::time::Instant::now() + SYNC_DELAY + Duration::from_secs(5);
        while cursor() < last {
            assert!(
                tokio::time::Instant::now() < deadline,
                "bob's cursor stayed at {} below {last}",
                cursor()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        bob.stop().await;
        bob.restart().await;
        alice.send_text(&id, "after the restart");
        bob.wait_message(&id, "after the restart").await;
        assert_exactly_once(&mut bob, &id, "alice", &texts);
        assert_eq!(bob.errors(), Vec::<String>::new());
        alice.stop().await;
        bob.stop().await;
    })
    .await;
}

/// Takes the write lock of a running client's profile, as another process would.
fn lock_profile(peer: &Peer) -> rusqlite::Connection {
    let connection =
        rusqlite::Connection::open(peer.dir.join("mlschat.sqlite3")).expect("profile opens");
    connection
        .execute_batch("BEGIN IMMEDIATE")
        .expect("the profile's write lock");
    connection
}

/// Waits for the report that a client holds a group's deliveries for its storage.
async fn wait_held(peer: &mut Peer) {
    peer.wait_for(
        "the report of held deliveries",
        |event| matches!(event, CoreEvent::Error { message } if message.contains("cannot record message")),
    )
    .await;
}

/// The DS's acknowledged cursor of `user` in `group`.
fn ds_cursor(ds: &Ds, group: &GroupId, user: &str) -> u64 {
    let store = rusqlite::Connection::open(ds.dir.path().join("ds.sqlite3")).expect("opens");
    store
        .query_row(
            "SELECT cursor FROM members WHERE group_id = ?1 AND user = ?2",
            rusqlite::params![group.as_bytes(), user],
            |row| row.get(0),
        )
        .expect("the member's cursor")
}

/// A member whose profile cannot be written (here another process holds its write lock for
/// longer than the client's busy timeout; a full disk fails writes the same way) neither skips
/// nor acknowledges what it cannot record. Its deliveries wait on the DS, and once the profile
/// can be written again the client fetches them and processes them in order: a message, a
/// commit and a message for a member, a Welcome and a message for a user being added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_wait_while_the_profile_cannot_be_written() {
    timed(Duration::from_secs(120), async {
        let (ds, _root, [mut alice, mut bob, mut carol]) =
            start_peers(["alice", "bob", "carol"]).await;
        let group = create_group(&mut alice, "stuck disk").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        converge(&mut [&mut alice, &mut bob], &id).await;
        // Past bob's sync of what he received, so that the lock stops only new deliveries.
        tokio::time::sleep(Duration::from_millis(500)).await;

        let bob_lock = lock_profile(&bob);
        let carol_lock = lock_profile(&carol);
        let texts = [
            "while the disk is stuck #1".to_string(),
            "while the disk is stuck #2".to_string(),
        ];
        alice.send_text(&id, &texts[0]);
        let first = alice.wait_sent(&id, &texts[0]).await;
        alice.command(Command::Update { group: id.clone() });
        alice.command(Command::Invite {
            group: id.clone(),
            users: vec![user("carol")],
        });
        alice.send_text(&id, &texts[1]);
        alice.wait_sent(&id, &texts[1]).await;
        for peer in [&mut bob, &mut carol] {
            wait_held(peer).await;
        }
        let bob_cursor = ds_cursor(&ds, &id, "bob");
        assert!(
            bob_cursor < first,
            "bob acknowledged up to {bob_cursor}, past message {first} he could not record"
        );
        assert!(bob.messages(&id).is_empty(), "bob recorded a message");

        for lock in [bob_lock, carol_lock] {
            lock.execute_batch("ROLLBACK").expect("lock released");
        }
        for text in &texts {
            bob.wait_message(&id, text).await;
        }
        carol
            .wait_for("joined", |event| {
                matches!(event, CoreEvent::Joined { group, by } if group.id == id && by == "alice")
            })
            .await;
        carol.wait_message(&id, &texts[1]).await;
        let (epoch, _, members) = converge(&mut [&mut alice, &mut bob, &mut carol], &id).await;
        assert_eq!((epoch, members), (3, 3), "add bob, an update, add carol");
        bob.send_text(&id, "the disk is back");
        alice.wait_message(&id, "the disk is back").await;
        carol.wait_message(&id, "the disk is back").await;

        assert_exactly_once(&mut bob, &id, "alice", &texts);
        assert_in_order(&mut bob, &id);
        assert_exactly_once(&mut carol, &id, "alice", &texts[1..]);
        for peer in [&mut bob, &mut carol] {
            let errors = peer.errors();
            assert_eq!(errors.len(), 1, "{}: {errors:?}", peer.name);
        }
        assert_eq!(alice.errors(), Vec::<String>::new());
        // The commits bob processed only once his profile could be written left their lines
        // in his stored timeline once each.
        let entries = bob.history(&id).await;
        for line in ["alice added carol", "new epoch 2 ", "new epoch 3 "] {
            let count = entries
                .iter()
                .filter(|entry| entry.kind == "system" && entry.text.starts_with(line))
                .count();
            assert_eq!(count, 1, "{line:?} in bob's stored timeline");
        }
        for peer in [&mut alice, &mut bob, &mut carol] {
            peer.stop().await;
        }
    })
    .await;
}

/// The DS does not push a sender's own messages back (the sender has their seq from `Accepted`),
/// so the sender's cursor steps past them by itself and acknowledges them, whether the next
/// message is someone else's or its own: the DS can let go of what everyone has, and a restart
/// does not bring them back. Against a client whose cursor moved only with deliveries, alice's
/// cursor stays at bob's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_senders_cursor_passes_its_own_messages() {
    timed(Duration::from_secs(60), async {
        let (ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        let group = create_group(&mut alice, "own messages").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        converge(&mut [&mut alice, &mut bob], &id).await;

        alice.send_text(&id, "before bob");
        alice.wait_sent(&id, "before bob").await;
        bob.wait_message(&id, "before bob").await;
        bob.send_text(&id, "bob in between");
        alice.wait_message(&id, "bob in between").await;
        let texts: Vec<String> = (1..=3).map(|n| format!("after bob #{n}")).collect();
        for text in &texts {
            alice.send_text(&id, text);
        }
        let mut last = 0;
        for text in &texts {
            last = alice.wait_sent(&id, text).await;
        }
        bob.wait_message(&id, &texts[2]).await;
        // Acknowledged after the client's batched sync (within about 100 ms).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ds_cursor(&ds, &id, "alice") < last {
            assert!(
                std::time::Instant::now() < deadline,
                "alice's cursor stayed at {}, below her message {last}",
                ds_cursor(&ds, &id, "alice")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        alice.stop().await;
        alice.restart().await;
        alice.send_text(&id, "after the restart");
        bob.wait_message(&id, "after the restart").await;
        let mut own = texts.clone();
        own.insert(0, "before bob".into());
        own.push("after the restart".into());
        let entries = alice.history(&id).await;
        for text in &own {
            let copies = entries.iter().filter(|entry| entry.text == *text).count();
            assert_eq!(copies, 1, "{text:?} in alice's stored timeline");
        }
        assert_eq!(alice.errors(), Vec::<String>::new());
        alice.stop().await;
        bob.stop().await;
    })
    .await;
}

/// A message sent just as its sender is removed ends "sent" exactly when the others have it,
/// and "failed" when the DS sequenced the removal first. The DS does not push a sender's own
/// message back, so the commit removing her may come before her message's answer; the message
/// must then wait for that answer rather than be failed with the removal. Each round races the
/// two in a group of its own; either order may win a round, the outcome must match it. (Against
/// a client that failed the message with the removal, about one run in four failed: the race
/// is not hit every time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_as_its_sender_is_removed_is_sent_exactly_when_the_others_have_it() {
    timed(Duration::from_secs(120), async {
        let (_ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        let mut outcomes = Vec::new();
        for round in 0..30u64 {
            let group = create_group(&mut bob, &format!("race {round}")).await;
            let id = group.id.clone();
            invite(&mut bob, &group, &mut [&mut alice]).await;
            converge(&mut [&mut alice, &mut bob], &id).await;
            let text = format!("last words {round}");
            // Bob's commit takes a few milliseconds to build; alice's message, sent a little
            // later each round, lands before it, with it (in one store batch) or after it.
            bob.command(Command::Kick {
                group: id.clone(),
                user: user("alice"),
            });
            tokio::time::sleep(Duration::from_micros(100 * round)).await;
            alice.send_text(&id, &text);
            let refused = format!("you are no longer a member of race {round}");
            let outcome = alice
                .wait_for("the message's outcome", |event| match event {
                    CoreEvent::Sent { group, .. } | CoreEvent::Failed { group, .. } => {
                        group.id == id
                    }
                    // Removed before she sent it: it was never queued.
                    CoreEvent::Error { message } => *message == refused,
                    _ => false,
                })
                .await;
            let sent = matches!(outcome, CoreEvent::Sent { .. });
            let queued = !matches!(outcome, CoreEvent::Error { .. });
            alice
                .wait_for("removed", |event| {
                    matches!(event, CoreEvent::Left { group, .. } if group.id == id)
                })
                .await;
            bob.wait_for("alice removed", |event| {
                matches!(event, CoreEvent::MemberRemoved { group, user, .. } if group.id == id && user == "alice")
            })
            .await;
            if sent {
                bob.wait_message(&id, &text).await;
            } else {
                // Bob's client has processed everything up to the removal by now.
                let got = bob.messages(&id).iter().any(|(_, t, _)| *t == text);
                assert!(!got, "round {round}: bob has {text:?}, which alice was told failed");
            }
            let line = alice
                .history(&id)
                .await
                .into_iter()
                .find(|entry| entry.text == text);
            if queued {
                let line = line.expect("alice's line for her message");
                assert_eq!(
                    line.state.as_deref().map(|state| state == "sent"),
                    Some(sent),
                    "round {round}: {line:?}"
                );
            } else {
                assert_eq!(line, None, "round {round}: a line for a message never queued");
            }
            outcomes.push(if sent { "sent" } else if queued { "failed" } else { "refused" });
        }
        eprintln!("outcomes by round: {outcomes:?}");
        let errors = alice.errors();
        assert!(
            errors
                .iter()
                .all(|error| error.starts_with("you are no longer a member of race ")),
            "{errors:?}"
        );
        alice.stop().await;
        bob.stop().await;
    })
    .await;
}

/// A Welcome held for the profile's storage that then turns out unopenable (its KeyPackage is
/// gone) is reported once and passed over like any unopenable Welcome: the hold ends, and the
/// user's deliveries are acknowledged again, instead of the same page being fetched forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_welcome_that_cannot_be_opened_is_passed_over() {
    timed(Duration::from_secs(90), async {
        let (ds, _root, [mut alice, mut carol]) = start_peers(["alice", "carol"]).await;
        let group = create_group(&mut alice, "lost key").await;
        let id = group.id.clone();

        let carol_lock = lock_profile(&carol);
        alice.command(Command::Invite {
            group: id.clone(),
            users: vec![user("carol")],
        });
        wait_held(&mut carol).await;
        carol_lock
            .execute_batch("DELETE FROM openmls_key_packages; COMMIT")
            .expect("KeyPackages deleted, lock released");
        carol
            .wait_for("the Welcome's failure", |event| {
                matches!(event, CoreEvent::Error { message } if message.contains("could not join"))
            })
            .await;
        alice.send_text(&id, "carol cannot read this");
        let last = alice.wait_sent(&id, "carol cannot read this").await;
        // Well past the first retries' back-off.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let errors = carol.errors();
        assert_eq!(errors.len(), 2, "carol: {errors:?}");
        assert!(!carol.in_group(&id));
        assert!(
            ds_cursor(&ds, &id, "carol") >= last,
            "carol's deliveries are no longer acknowledged"
        );
        assert_eq!(alice.errors(), Vec::<String>::new());
        alice.stop().await;
        carol.stop().await;
    })
    .await;
}

/// A message queued while the DS was unreachable, whose building then fails on the profile's
/// storage (locked by another process when the DS comes back), is built and sent once the
/// profile can be written again instead of being given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_building_fails_on_storage_is_sent_later() {
    timed(Duration::from_secs(90), async {
        let (ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        let group = create_group(&mut alice, "offline queue").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        converge(&mut [&mut alice, &mut bob], &id).await;

        let stopped = ds.stop().await;
        alice
            .wait_for("the connection lost", |event| {
                matches!(event, CoreEvent::Connection { state: ConnectionState::Reconnecting, .. })
            })
            .await;
        let text = "queued while the DS was away";
        alice.send_text(&id, text);
        alice
            .wait_for("queued", |event| {
                matches!(event, CoreEvent::Queued { text: queued, .. } if queued == text)
            })
            .await;
        // Past the sync of the queueing, so that the lock stops only the building.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let lock = lock_profile(&alice);
        let _ds = stopped.start().await;
        alice
            .wait_for("the report of a postponed message", |event| {
                matches!(event, CoreEvent::Error { message } if message.contains("cannot save the next message to send"))
            })
            .await;
        lock.execute_batch("ROLLBACK").expect("lock released");
        alice.wait_sent(&id, text).await;
        bob.wait_message(&id, text).await;
        assert_exactly_once(&mut bob, &id, "alice", &[text.to_string()]);
        let errors = alice.errors();
        assert_eq!(errors.len(), 1, "alice: {errors:?}");
        assert_eq!(bob.errors(), Vec::<String>::new());
        alice.stop().await;
        bob.stop().await;
    })
    .await;
}

/// Sends `payload` into `group` as the raw connection's user and waits for the DS to accept it.
async fn raw_send(raw: &mut mlschat_ds::client::RawConnection, request_id: u32, payload: &[u8]) {
    raw.send_frame(&Frame::Send(Send {
        request_id,
        client_message_id: [request_id as u8; 16],
        message: payload.to_vec().into(),
        commit: None,
    }))
    .await
    .expect("send");
    loop {
        match tokio::time::timeout(STEP, raw.next_frame()).await {
            Ok(Ok(Some(Frame::Accepted(accepted)))) if accepted.request_id == request_id => return,
            Ok(Ok(Some(Frame::Deliver(_)))) => continue,
            other => panic!("the DS did not accept request {request_id}: {other:?}"),
        }
    }
}

/// A member replays another member's message and sends a tampered copy of it. Every other
/// client records each as a message it could not process and skips it, with its state intact:
/// whether it meets them live or, after its profile was locked, among the deliveries it fetches
/// again while catching up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_tampered_messages_are_skipped_live_and_while_held() {
    timed(Duration::from_secs(120), async {
        let (ds, _root, [mut alice, mut carol, mut mallory]) =
            start_peers(["alice", "carol", "mallory"]).await;
        let group = create_group(&mut alice, "forgeries").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut carol, &mut mallory]).await;
        converge(&mut [&mut alice, &mut carol, &mut mallory], &id).await;
        alice.send_text(&id, "genuine #1");
        let original_seq = alice.wait_sent(&id, "genuine #1").await;
        carol.wait_message(&id, "genuine #1").await;

        // Mallory's client goes; mallory keeps her DS account and speaks the protocol herself.
        mallory.stop().await;
        let mut raw = raw_login(&ds, "mallory", &mallory.dir).await;
        raw.send_frame(&Frame::Fetch(Fetch {
            request_id: 2,
            group_id: id.clone(),
            after_seq: original_seq - 1,
            limit: 1,
        }))
        .await
        .expect("fetch");
        let original = loop {
            match tokio::time::timeout(STEP, raw.next_frame()).await {
                Ok(Ok(Some(Frame::Messages(page)))) => break page.messages[0].clone(),
                Ok(Ok(Some(Frame::Deliver(_)))) => continue,
                other => panic!("no answer to the fetch: {other:?}"),
            }
        };
        assert_eq!(
            (original.seq, original.kind),
            (original_seq, DeliveryKind::Application as u8)
        );
        let replayed = original.payload.as_slice().to_vec();
        // A byte in the middle lies in the encrypted part (the header is about 50 bytes of
        // this message's 200 or so), so no key of the group opens the result.
        let mut tampered = replayed.clone();
        let middle = tampered.len() / 2;
        tampered[middle] ^= 0x01;

        // Live.
        raw_send(&mut raw, 10, &replayed).await;
        raw_send(&mut raw, 11, &tampered).await;
        alice.send_text(&id, "genuine #2");
        carol.wait_message(&id, "genuine #2").await;
        let skipped = |peer: &mut Peer| {
            peer.errors()
                .iter()
                .filter(|error| error.contains("could not process message"))
                .count()
        };
        assert_eq!(skipped(&mut carol), 2, "carol: {:?}", carol.errors());

        // While held: the same forgeries come back in the page fetched after the lock.
        let lock = lock_profile(&carol);
        raw_send(&mut raw, 12, &replayed).await;
        raw_send(&mut raw, 13, &tampered).await;
        alice.send_text(&id, "genuine #3");
        alice.wait_sent(&id, "genuine #3").await;
        wait_held(&mut carol).await;
        lock.execute_batch("ROLLBACK").expect("lock released");
        carol.wait_message(&id, "genuine #3").await;
        assert_eq!(skipped(&mut carol), 4, "carol: {:?}", carol.errors());
        assert_eq!(carol.errors().len(), 5, "carol: {:?}", carol.errors());

        let texts: Vec<String> = (1..=3).map(|n| format!("genuine #{n}")).collect();
        assert_exactly_once(&mut carol, &id, "alice", &texts);
        assert_in_order(&mut carol, &id);
        carol.send_text(&id, "carol is unharmed");
        alice.wait_message(&id, "carol is unharmed").await;
        converge(&mut [&mut alice, &mut carol], &id).await;
        assert_exactly_once(&mut alice, &id, "carol", &["carol is unharmed".to_string()]);
        alice.stop().await;
        carol.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_way_update_races_converge() {
    const ROUNDS: usize = 20;
    timed(Duration::from_secs(150), async {
        let ds = Ds::start().await;
        let root = tempfile::tempdir().expect("temporary directory");
        let names = ["p0", "p1", "p2", "p3", "p4"];
        let mut peers = Vec::new();
        for name in names {
            peers.push(Peer::start(&ds, name, root.path()).await);
        }
        let group = create_group(&mut peers[0], "race").await;
        let id = group.id.clone();
        {
            let (creator, rest) = peers.split_at_mut(1);
            let mut invitees: Vec<&mut Peer> = rest.iter_mut().collect();
            invite(&mut creator[0], &group, &mut invitees).await;
        }
        let (start_epoch, _, _) = {
            let mut all: Vec<&mut Peer> = peers.iter_mut().collect();
            converge(&mut all, &id).await
        };

        for round in 0..ROUNDS {
            // Everyone updates and talks at the same moment.
            for peer in &peers {
                peer.command(Command::Update { group: id.clone() });
            }
            for peer in &peers {
                peer.send_text(&id, &format!("{} in round {round}", peer.name));
            }
            for sender in 0..peers.len() {
                let text = format!("{} in round {round}", peers[sender].name);
                peers[sender].wait_sent(&id, &text).await;
                for (receiver, peer) in peers.iter_mut().enumerate() {
                    if receiver != sender {
                        peer.wait_message(&id, &text).await;
                    }
                }
            }
        }

        let (epoch, _, members) = {
            let mut all: Vec<&mut Peer> = peers.iter_mut().collect();
            converge(&mut all, &id).await
        };
        assert_eq!(members, 5);
        assert_eq!(
            epoch,
            start_epoch + (ROUNDS * names.len()) as u64,
            "every update must be committed exactly once"
        );
        for peer in peers.iter_mut() {
            for sender in names {
                if sender == peer.name {
                    continue;
                }
                let texts: Vec<String> = (0..ROUNDS)
                    .map(|round| format!("{sender} in round {round}"))
                    .collect();
                assert_exactly_once(peer, &id, sender, &texts);
            }
            assert_in_order(peer, &id);
            let name = peer.name.clone();
            assert_eq!(peer.errors(), Vec::<String>::new(), "{name}");
        }
        for peer in &mut peers {
            peer.stop().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_every_step() {
    timed(Duration::from_secs(150), async {
        let (_ds, _root, [mut alice, mut bob, mut carol]) = start_peers(["alice", "bob", "carol"]).await;
        carol.stop().await;

        let group = create_group(&mut alice, "restarts").await;
        let id = group.id.clone();
        alice.stop().await;
        alice.restart().await;

        // Invite, and stop right away: /quit flushes the outbox first.
        alice.command(Command::Invite {
            group: id.clone(),
            users: vec![user("bob")],
        });
        alice.stop().await;
        bob.wait_for("joined", |event| {
            matches!(event, CoreEvent::Joined { group, .. } if group.id == id)
        })
        .await;
        bob.stop().await;
        alice.restart().await;
        bob.restart().await;
        bob.wait_for("group name", |event| {
            matches!(event, CoreEvent::GroupRenamed { group, by: None } if group.id == id && group.name == "restarts")
        })
        .await;
        converge(&mut [&mut alice, &mut bob], &id).await;

        let mut expected_at_bob = Vec::new();
        let mut expected_at_alice = Vec::new();
        // Each step: one side acts and stops at once; the other is restarted too.
        let steps: Vec<(&str, Command)> = vec![
            ("alice", Command::Send { group: id.clone(), text: "a1".into() }),
            ("bob", Command::Send { group: id.clone(), text: "b1".into() }),
            ("alice", Command::Update { group: id.clone() }),
            ("alice", Command::Send { group: id.clone(), text: "a2".into() }),
            ("bob", Command::Update { group: id.clone() }),
            ("bob", Command::Send { group: id.clone(), text: "b2".into() }),
            ("alice", Command::Invite { group: id.clone(), users: vec![user("carol")] }),
            ("bob", Command::Send { group: id.clone(), text: "b3".into() }),
            ("alice", Command::Kick { group: id.clone(), user: user("carol") }),
            ("alice", Command::Send { group: id.clone(), text: "a3".into() }),
            ("bob", Command::Send { group: id.clone(), text: "b4".into() }),
        ];
        for (actor, command) in steps {
            let (actor, other) = if actor == "alice" {
                (&mut alice, &mut bob)
            } else {
                (&mut bob, &mut alice)
            };
            if let Command::Send { text, .. } = &command {
                if actor.name == "alice" {
                    expected_at_bob.push(text.clone());
                } else {
                    expected_at_alice.push(text.clone());
                }
            }
            other.stop().await;
            actor.command(command.clone());
            actor.stop().await;
            actor.restart().await;
            other.restart().await;
            if let Command::Send { text, .. } = &command {
                actor.wait_sent(&id, text).await;
                other.wait_message(&id, text).await;
            }
            if let Command::Invite { .. } = &command {
                carol.restart().await;
                carol
                    .wait_for("joined", |event| {
                        matches!(event, CoreEvent::Joined { group, .. } if group.id == id)
                    })
                    .await;
                converge(&mut [&mut alice, &mut bob, &mut carol], &id).await;
                carol.stop().await;
            }
            if let Command::Kick { .. } = &command {
                for peer in [&mut alice, &mut bob] {
                    peer.wait_for("carol removed", |event| {
                        matches!(event, CoreEvent::MemberRemoved { group, user, .. } if group.id == id && user == "carol")
                    })
                    .await;
                }
            }
            converge(&mut [&mut alice, &mut bob], &id).await;
        }
        carol.restart().await;
        carol
            .wait_for("left", |event| {
                matches!(event, CoreEvent::Left { group, .. } if group.id == id)
            })
            .await;
        assert!(
            carol.messages(&id).iter().all(|(_, text, _)| text != "a3" && text != "b4"),
            "carol read messages after her removal"
        );

        let (epoch, _, members) = converge(&mut [&mut alice, &mut bob], &id).await;
        assert_eq!(members, 2);
        assert_eq!(epoch, 5, "add bob, two updates, add carol, remove carol");
        assert_exactly_once(&mut bob, &id, "alice", &expected_at_bob);
        assert_exactly_once(&mut alice, &id, "bob", &expected_at_alice);
        assert_eq!(alice.messages(&id).len(), expected_at_alice.len());
        assert_eq!(bob.messages(&id).len(), expected_at_bob.len());
        assert_in_order(&mut alice, &id);
        assert_in_order(&mut bob, &id);
        stop_clean(&mut [&mut alice, &mut bob, &mut carol]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_races_with_commits() {
    const ROUNDS: usize = 6;
    timed(Duration::from_secs(120), async {
        let (_ds, _root, [mut alice, mut bob, mut carol, mut dave]) = start_peers(["alice", "bob", "carol", "dave"]).await;
        let group = create_group(&mut alice, "leavers").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut carol, &mut dave]).await;
        for round in 0..ROUNDS {
            invite(&mut alice, &group, &mut [&mut bob]).await;
            converge(&mut [&mut alice, &mut bob, &mut carol, &mut dave], &id).await;
            // Bob's Remove proposal races with three commits (and a message) made at the same
            // moment; whoever wins, Bob must end up removed and the rest must agree.
            bob.command(Command::Leave { group: id.clone() });
            for peer in [&alice, &carol, &dave] {
                peer.command(Command::Update { group: id.clone() });
            }
            let text = format!("carol in round {round}");
            carol.send_text(&id, &text);
            bob.wait_for("left", |event| {
                matches!(event, CoreEvent::Left { group, .. } if group.id == id)
            })
            .await;
            for peer in [&mut alice, &mut carol, &mut dave] {
                peer.wait_for("bob removed", |event| {
                    matches!(event, CoreEvent::MemberRemoved { group, user, .. } if group.id == id && user == "bob")
                })
                .await;
            }
            carol.wait_sent(&id, &text).await;
            alice.wait_message(&id, &text).await;
            dave.wait_message(&id, &text).await;
            let (_, _, members) = converge(&mut [&mut alice, &mut carol, &mut dave], &id).await;
            assert_eq!(members, 3);
        }
        for peer in [&mut alice, &mut bob, &mut carol, &mut dave] {
            assert_eq!(peer.errors(), Vec::<String>::new(), "{}", peer.name);
        }
        for peer in [&mut alice, &mut bob, &mut carol, &mut dave] {
            peer.stop().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_replaced_mid_traffic() {
    const ROUNDS: usize = 5;
    timed(Duration::from_secs(120), async {
        let (ds, _root, [mut alice, mut bob, mut carol], group) = three_in_a_group("flaky").await;
        let id = group.id.clone();

        let mut texts: Vec<(String, String)> = Vec::new();
        for round in 0..ROUNDS {
            for n in 0..10 {
                let text = format!("alice {round}.{n}");
                alice.send_text(&id, &text);
                texts.push(("alice".into(), text));
                let text = format!("bob {round}.{n}");
                bob.send_text(&id, &text);
                texts.push(("bob".into(), text));
                if n == 4 {
                    alice.command(Command::Update { group: id.clone() });
                    bob.command(Command::Update { group: id.clone() });
                }
            }
            // Another connection authenticating as the same user replaces the client's
            // (SessionReplaced) while its messages and commits are in flight.
            let victim = if round % 2 == 0 { &bob } else { &alice };
            let raw = raw_login(&ds, &victim.name, &victim.dir).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            raw.close().await;
        }
        for (from, text) in &texts {
            let (sender, others): (&mut Peer, [&mut Peer; 2]) = if from == "alice" {
                (&mut alice, [&mut bob, &mut carol])
            } else {
                (&mut bob, [&mut alice, &mut carol])
            };
            sender.wait_sent(&id, text).await;
            for other in others {
                other.wait_message(&id, text).await;
            }
        }
        let (epoch, _, _) = converge(&mut [&mut alice, &mut bob, &mut carol], &id).await;
        assert_eq!(epoch, 1 + 2 * ROUNDS as u64, "every update committed once");
        carol.idle(Duration::from_millis(300)).await;
        for peer in [&mut alice, &mut bob, &mut carol] {
            for from in ["alice", "bob"] {
                if from == peer.name {
                    continue;
                }
                let sent: Vec<String> = texts
                    .iter()
                    .filter(|(f, _)| f == from)
                    .map(|(_, t)| t.clone())
                    .collect();
                assert_exactly_once(peer, &id, from, &sent);
            }
            assert_in_order(peer, &id);
            for (from, text) in &texts {
                if *from == peer.name {
                    assert_eq!(
                        peer.sent_count(&id, text),
                        1,
                        "{}: Sent for {text:?}",
                        peer.name
                    );
                }
            }
        }
        stop_clean(&mut [&mut alice, &mut bob, &mut carol]).await;
    })
    .await;
}

/// Errors a user can provoke by racing other members (inviting someone just added, kicking
/// someone just removed, leaving twice). Anything else means the client broke.
fn benign(error: &str) -> bool {
    [
        "is already a member",
        "not a member",
        "you are leaving",
        "already leaving",
        "no longer a member",
        "no such group",
    ]
    .iter()
    .any(|pattern| error.contains(pattern))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_concurrent_operations_converge() {
    use rand::{Rng as _, SeedableRng as _};
    // CHAOS_STEPS makes a longer run (for hunting rare interleavings by hand).
    let steps: usize = std::env::var("CHAOS_STEPS")
        .ok()
        .and_then(|steps| steps.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chaos seed {seed} (rerun with CHAOS_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    timed(Duration::from_secs(150 + steps as u64), async {
        let ds = Ds::start().await;
        let root = tempfile::tempdir().expect("temporary directory");
        let mut core = Vec::new();
        for name in ["m0", "m1", "m2", "m3"] {
            core.push(Peer::start(&ds, name, root.path()).await);
        }
        let mut floaters = Vec::new();
        for name in ["f0", "f1", "f2"] {
            floaters.push(Peer::start(&ds, name, root.path()).await);
        }
        let group = create_group(&mut core[0], "chaos").await;
        let id = group.id.clone();
        {
            let (creator, rest) = core.split_at_mut(1);
            let mut invitees: Vec<&mut Peer> = rest.iter_mut().collect();
            invite(&mut creator[0], &group, &mut invitees).await;
        }

        let mut texts: Vec<(usize, String)> = Vec::new();
        for step in 0..steps {
            let sender = rng.gen_range(0..core.len());
            let text = format!("chaos {step} from {}", core[sender].name);
            core[sender].send_text(&id, &text);
            texts.push((sender, text));
            let actor = rng.gen_range(0..core.len());
            let floater = rng.gen_range(0..floaters.len());
            match rng.gen_range(0..8) {
                0 => core[actor].command(Command::Update { group: id.clone() }),
                1 => core[actor].command(Command::Invite {
                    group: id.clone(),
                    users: vec![user(&floaters[floater].name)],
                }),
                2 => core[actor].command(Command::Kick {
                    group: id.clone(),
                    user: user(&floaters[floater].name),
                }),
                3 => floaters[floater].command(Command::Leave { group: id.clone() }),
                4 => {
                    let raw = raw_login(&ds, &core[actor].name, &core[actor].dir).await;
                    raw.close().await;
                }
                5 => {
                    core[actor].stop().await;
                    core[actor].restart().await;
                }
                6 if floaters[floater].in_group(&id) => {
                    // It may be removed meanwhile: then the message fails, visibly.
                    floaters[floater].send_text(&id, &format!("floater {step}"));
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..40))).await;
        }

        // Core members never leave: each of their messages reaches the others exactly once.
        for (sender, text) in &texts {
            core[*sender].wait_sent(&id, text).await;
            for (receiver, peer) in core.iter_mut().enumerate() {
                if receiver != *sender {
                    peer.wait_message(&id, text).await;
                }
            }
        }
        for (receiver, peer) in core.iter_mut().enumerate() {
            for (sender, name) in ["m0", "m1", "m2", "m3"].iter().enumerate() {
                if sender != receiver {
                    let sent: Vec<String> = texts
                        .iter()
                        .filter(|(s, _)| *s == sender)
                        .map(|(_, t)| t.clone())
                        .collect();
                    assert_exactly_once(peer, &id, name, &sent);
                }
            }
            assert_in_order(peer, &id);
        }

        // Everyone the group lists agrees with the core, floaters included.
        let (_, _, _) = {
            let mut all: Vec<&mut Peer> = core.iter_mut().collect();
            converge(&mut all, &id).await
        };
        // The membership can still change while it is checked: a floater's Leave proposal is
        // committed by whichever core member gets to it, possibly after the member list was
        // taken, and a removed member cannot derive the new epoch's authenticator. So take
        // the list, check that everyone on it agrees, and start over if it changed meanwhile.
        let deadline = std::time::Instant::now() + STEP;
        'settled: loop {
            let members = core[0].members(&id).await;
            for floater in floaters.iter_mut() {
                let listed = members.contains(&floater.name);
                while floater.in_group(&id) != listed {
                    if core[0].members(&id).await != members {
                        continue 'settled;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{}: listed {listed}, but its events say otherwise",
                        floater.name
                    );
                    floater.idle(Duration::from_millis(50)).await;
                }
            }
            loop {
                let statuses = {
                    let mut listed: Vec<&mut Peer> = core.iter_mut().collect();
                    listed.extend(floaters.iter_mut().filter(|f| members.contains(&f.name)));
                    match agreed_status(&mut listed, &id).await {
                        Ok((_, _, count)) if count == members.len() => break 'settled,
                        Ok(status) => vec![("all".to_string(), status)],
                        Err(statuses) => statuses,
                    }
                };
                if core[0].members(&id).await != members {
                    continue 'settled;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the group did not converge on {members:?}: {statuses:#?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for peer in core.iter_mut().chain(floaters.iter_mut()) {
            let name = peer.name.clone();
            let errors: Vec<String> = peer
                .errors()
                .into_iter()
                .filter(|error| !benign(error))
                .collect();
            assert_eq!(errors, Vec::<String>::new(), "{name} (seed {seed})");
        }
        for peer in core.iter_mut().chain(floaters.iter_mut()) {
            peer.stop().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_updates_while_chatting() {
    timed(Duration::from_secs(90), async {
        let ds = Ds::start().await;
        let root = tempfile::tempdir().expect("temporary directory");
        let every = Some(Duration::from_secs(1));
        let mut alice = Peer::start_with_auto_update(&ds, "alice", root.path(), every).await;
        let mut bob = Peer::start_with_auto_update(&ds, "bob", root.path(), every).await;
        let group = create_group(&mut alice, "auto").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        let (first_epoch, _, _) = converge(&mut [&mut alice, &mut bob], &id).await;
        let mut texts = Vec::new();
        let started = std::time::Instant::now();
        let mut n = 0;
        while started.elapsed() < Duration::from_secs(5) {
            let (sender, receiver) = if n % 2 == 0 {
                (&mut alice, &mut bob)
            } else {
                (&mut bob, &mut alice)
            };
            let text = format!("auto {n}");
            sender.send_text(&id, &text);
            receiver.wait_message(&id, &text).await;
            texts.push(text);
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Restart without automatic updates, so the group can come to rest.
        for peer in [&mut alice, &mut bob] {
            peer.stop().await;
            peer.auto_update = None;
            peer.restart().await;
        }
        let (epoch, _, _) = converge(&mut [&mut alice, &mut bob], &id).await;
        assert!(
            epoch >= first_epoch + 2,
            "self-updates happened: epoch {first_epoch} -> {epoch}"
        );
        for (sender, receiver) in [(&mut alice, "bob"), (&mut bob, "alice")] {
            let name = sender.name.clone();
            let from_other: Vec<String> = texts
                .iter()
                .enumerate()
                .filter(|(n, _)| (n % 2 == 0) == (name == "bob"))
                .map(|(_, t)| t.clone())
                .collect();
            assert_exactly_once(sender, &id, receiver, &from_other);
            assert_eq!(sender.errors(), Vec::<String>::new(), "{name}");
        }
        alice.stop().await;
        bob.stop().await;
    })
    .await;
}

/// Everyone in a new group of `peers` leaves at the same moment; everyone must get `Left`.
async fn all_leave(peers: &mut [&mut Peer]) {
    let (creator, rest) = peers.split_at_mut(1);
    let group = create_group(creator[0], "exodus").await;
    let id = group.id.clone();
    invite(creator[0], &group, rest).await;
    for peer in peers.iter() {
        peer.command(Command::Leave { group: id.clone() });
    }
    for peer in peers.iter_mut() {
        peer.wait_for(
            "left",
            |event| matches!(event, CoreEvent::Left { group, .. } if group.id == id),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everyone_leaves_at_once() {
    timed(Duration::from_secs(60), async {
        let (_ds, _root, [mut alice, mut bob, mut carol]) =
            start_peers(["alice", "bob", "carol"]).await;
        // Nobody is left to commit the others' Remove proposals unless a leaver does it.
        all_leave(&mut [&mut alice, &mut bob]).await;
        all_leave(&mut [&mut alice, &mut bob, &mut carol]).await;
        stop_clean(&mut [&mut alice, &mut bob, &mut carol]).await;
    })
    .await;
}

/// The epochs (with their verification codes) that `peer` was told of live, for `group`.
fn live_epoch_codes(peer: &mut Peer, group: &GroupId) -> HashMap<u64, String> {
    peer.drain();
    peer.log
        .iter()
        .filter_map(|event| match event {
            CoreEvent::EpochChanged {
                group: g,
                epoch,
                code,
            } if g.id == *group => Some((*epoch, code.clone())),
            _ => None,
        })
        .collect()
}

/// Timeline notes with the lines of each commit sorted: a commit lists its additions in the
/// order the inviter's KeyPackage claims were answered.
fn by_commit(notes: &[String]) -> Vec<String> {
    let mut sorted = Vec::new();
    let mut commit = Vec::new();
    for note in notes {
        commit.push(note.clone());
        if note.starts_with("new epoch ") {
            commit.sort();
            sorted.append(&mut commit);
        }
    }
    sorted.append(&mut commit);
    sorted
}

/// The timeline keeps who joined, who was removed and who left, and the verification code of
/// every epoch, for the committer and for the other members alike: after a restart the stored
/// history says what the live view said, and the group is listed with its current epoch and
/// code (before, only messages and a few of the client's own notes were stored, and the
/// epoch showed only after the next commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_and_epoch_codes_survive_a_restart() {
    timed(Duration::from_secs(60), async {
        let (_ds, _root, [mut alice, mut bob, mut carol, mut dave]) = start_peers(["alice", "bob", "carol", "dave"]).await;
        let group = create_group(&mut alice, "kept").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        invite(&mut alice, &group, &mut [&mut carol, &mut dave]).await;
        converge(&mut [&mut alice, &mut bob, &mut carol, &mut dave], &id).await;
        kick(&mut alice, &mut carol, &mut [&mut bob, &mut dave], &id).await;
        converge(&mut [&mut alice, &mut bob, &mut dave], &id).await;
        // Dave proposes his own removal and whoever commits it first, his leaving is his.
        dave.command(Command::Leave { group: id.clone() });
        dave.wait_for("left by himself", |event| {
            matches!(event, CoreEvent::Left { group, by } if group.id == id && by == "dave")
        })
        .await;
        for peer in [&mut alice, &mut bob] {
            peer.wait_for("dave left", |event| {
                matches!(event, CoreEvent::MemberRemoved { group, user, by } if group.id == id && user == "dave" && by == "dave")
            })
            .await;
        }
        let (epoch, authenticator, members) = converge(&mut [&mut alice, &mut bob], &id).await;
        assert_eq!(
            (epoch, members),
            (4, 2),
            "add bob, add carol and dave, remove carol, dave leaves"
        );
        let authenticator = hex::decode(authenticator).expect("hex");
        let current_code = mlschat::core::trust::verification_code(&authenticator);

        let codes = live_epoch_codes(&mut alice, &id);
        let code = |epoch: u64| codes.get(&epoch).cloned().expect("alice saw every epoch");
        assert_eq!(code(4), current_code);
        for (epoch, seen) in live_epoch_codes(&mut bob, &id) {
            assert_eq!(seen, code(epoch), "bob and alice saw different codes");
        }
        let new_epoch = |epoch: u64| format!("new epoch {epoch} · verification code {}", code(epoch));
        let added_and_removed = [
            "alice added carol".to_string(),
            "alice added dave".to_string(),
            new_epoch(2),
            "alice removed carol".to_string(),
            new_epoch(3),
            "dave left".to_string(),
            new_epoch(4),
        ];
        let mut expected_alice = vec![
            "you created kept".to_string(),
            "alice added bob".to_string(),
            new_epoch(1),
        ];
        expected_alice.extend(added_and_removed.iter().cloned());
        let mut expected_bob = vec!["alice added you to the group".to_string(), new_epoch(1)];
        expected_bob.extend(added_and_removed.iter().cloned());

        for (peer, expected) in [(&mut alice, expected_alice), (&mut bob, expected_bob)] {
            peer.stop().await;
            peer.restart().await;
            let listed = peer.listing();
            let kept = listed
                .iter()
                .find(|listed| listed.group.id == id)
                .expect("the group is listed");
            assert_eq!(kept.epoch, Some((4, current_code.clone())), "{}", peer.name);

            let entries = peer.history(&id).await;
            let notes: Vec<String> = entries
                .iter()
                .filter(|entry| entry.kind == "system")
                .map(|entry| entry.text.clone())
                .collect();
            assert_eq!(
                by_commit(&notes),
                by_commit(&expected),
                "{}'s stored timeline",
                peer.name
            );
            assert_eq!(peer.errors(), Vec::<String>::new(), "{}", peer.name);
            peer.stop().await;
        }
        // The removed and the leaving user have their own departure stored, once, with the
        // commit that ended their membership.
        for (peer, departure) in [
            (&mut carol, "alice removed you"),
            (&mut dave, "you left the group"),
        ] {
            peer.stop().await;
            peer.restart().await;
            let entries = peer.history(&id).await;
            let last = entries.last().expect("a stored timeline");
            assert_eq!(
                (last.kind.as_str(), last.text.as_str()),
                ("warning", departure),
                "{}",
                peer.name
            );
            assert!(last.seq.is_some(), "stored with the commit's seq");
            let mentions = entries
                .iter()
                .filter(|entry| entry.text.contains(&format!("removed {}", peer.name)))
                .count();
            assert_eq!(mentions, 0, "{} sees no line naming itself", peer.name);
            assert_eq!(peer.errors(), Vec::<String>::new(), "{}", peer.name);
            peer.stop().await;
        }
    })
    .await;
}

/// What the user has read survives a restart: the start-up listing counts only the messages
/// from others after what was marked read (mentions flagged), and says which group was looked
/// at last; a mark never moves back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_and_the_last_viewed_group_survive_a_restart() {
    timed(Duration::from_secs(60), async {
        let (_ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        let team = create_group(&mut alice, "team").await;
        let other = create_group(&mut alice, "other").await;
        invite(&mut alice, &team, &mut [&mut bob]).await;
        invite(&mut alice, &other, &mut [&mut bob]).await;
        let mut seqs = Vec::new();
        for text in ["one", "look here @bob", "three"] {
            alice.send_text(&team.id, text);
            seqs.push(bob.wait_message(&team.id, text).await.1);
        }
        alice.send_text(&other.id, "elsewhere");
        bob.wait_message(&other.id, "elsewhere").await;
        bob.send_text(&other.id, "my own");
        bob.wait_sent(&other.id, "my own").await;

        let unread = |listing: &[mlschat::core::ListedGroup], id: &GroupId| {
            let listed = listing
                .iter()
                .find(|listed| listed.group.id == *id)
                .expect("the group is listed");
            (listed.unread, listed.mentioned, listed.viewed_at > 0)
        };
        bob.stop().await;
        bob.restart().await;
        let listing = bob.listing();
        assert_eq!(unread(&listing, &team.id), (3, true, false));
        assert_eq!(
            unread(&listing, &other.id),
            (1, false, false),
            "our own message is not unread"
        );

        // Bob reads the team's first message only, then all of it; a later, lower mark
        // changes nothing.
        let mark_read = |bob: &Peer, seq: u64| {
            bob.command(Command::MarkRead {
                group: team.id.clone(),
                seq,
            })
        };
        mark_read(&bob, seqs[0]);
        bob.stop().await;
        bob.restart().await;
        assert_eq!(unread(&bob.listing(), &team.id), (2, true, true));
        mark_read(&bob, seqs[2]);
        mark_read(&bob, 1);
        bob.stop().await;
        bob.restart().await;
        let listing = bob.listing();
        assert_eq!(unread(&listing, &team.id), (0, false, true));
        assert_eq!(unread(&listing, &other.id), (1, false, false));

        alice.send_text(&team.id, "four");
        bob.wait_message(&team.id, "four").await;
        bob.stop().await;
        bob.restart().await;
        assert_eq!(unread(&bob.listing(), &team.id), (1, false, true));
        stop_clean(&mut [&mut alice, &mut bob]).await;
    })
    .await;
}

/// `/rename`: every member sees the new name and who chose it, in the live view and in the
/// stored timeline; a member added afterwards learns the new name; renaming to the same name
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_renames_the_group_for_everyone() {
    timed(Duration::from_secs(60), async {
        let (_ds, _root, [mut alice, mut bob, mut carol]) = start_peers(["alice", "bob", "carol"]).await;
        let group = create_group(&mut alice, "team").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;

        bob.command(Command::Rename {
            group: id.clone(),
            name: "  crew ".into(),
        });
        for (peer, by) in [(&mut bob, "bob"), (&mut alice, "bob")] {
            peer.wait_for("renamed by bob", |event| {
                matches!(event, CoreEvent::GroupRenamed { group, by: Some(b) } if group.id == id && group.name == "crew" && b == by)
            })
            .await;
        }
        // The message goes out like any other: alice has it once bob's client got it sequenced.
        alice.send_text(&id, "after the rename");
        bob.wait_message(&id, "after the rename").await;

        let renamed = GroupRef {
            id: id.clone(),
            name: "crew".into(),
        };
        invite(&mut alice, &renamed, &mut [&mut carol]).await;
        assert_eq!(carol.group_name(&id).as_deref(), Some("crew"));

        bob.command(Command::Rename {
            group: id.clone(),
            name: "crew".into(),
        });
        let refused = bob
            .wait_for("refused", |event| matches!(event, CoreEvent::Error { .. }))
            .await;
        assert!(
            matches!(&refused, CoreEvent::Error { message } if message.contains("already called crew")),
            "{refused:?}"
        );
        // Back to the name it has now, behind a rename still queued: that is a change.
        for name in ["interim", "crew"] {
            bob.command(Command::Rename {
                group: id.clone(),
                name: name.into(),
            });
        }
        for name in ["interim", "crew"] {
            alice
                .wait_for(&format!("renamed to {name}"), |event| {
                    matches!(event, CoreEvent::GroupRenamed { group, by: Some(_) } if group.id == id && group.name == name)
                })
                .await;
        }

        for (peer, by) in [(&mut alice, "bob"), (&mut bob, "you")] {
            let lines = ["crew", "interim", "crew"]
                .map(|name| format!("{by} renamed the group to {name}"));
            peer.stop().await;
            peer.restart().await;
            let listing = peer.listing();
            let listed = listing
                .iter()
                .find(|listed| listed.group.id == id)
                .expect("listed");
            assert_eq!(listed.group.name, "crew", "{}", peer.name);
            let stored: Vec<String> = peer
                .history(&id)
                .await
                .into_iter()
                .filter(|entry| entry.text.contains("renamed"))
                .map(|entry| entry.text)
                .collect();
            assert_eq!(stored, lines, "{}'s stored timeline", peer.name);
        }
        let renames = carol
            .log
            .iter()
            .filter(|event| matches!(event, CoreEvent::GroupRenamed { by: Some(_), .. }))
            .count();
        assert_eq!(renames, 0, "carol only learned the name");
        stop_clean(&mut [&mut alice, &mut carol]).await;
        bob.stop().await;
    })
    .await;
}

/// A message that waited on the DS while its reader was offline shows when it was written
/// (the sender's time, carried inside the encrypted message), live and in the stored timeline,
/// not when it arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_waited_shows_when_it_was_written() {
    timed(Duration::from_secs(60), async {
        let (_ds, _root, [mut alice, mut bob]) = start_peers(["alice", "bob"]).await;
        let group = create_group(&mut alice, "team").await;
        let id = group.id.clone();
        invite(&mut alice, &group, &mut [&mut bob]).await;
        bob.stop().await;

        let now = mlschat::core::db::now_unix_secs;
        let before = now();
        alice.send_text(&id, "written while bob was away");
        alice.wait_sent(&id, "written while bob was away").await;
        let after = now();
        // Seconds are what is stored: make the arrival a later second than the writing.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let arrival = now();
        bob.restart().await;
        bob.wait_message(&id, "written while bob was away").await;
        let live = bob
            .log
            .iter()
            .find_map(|event| match event {
                CoreEvent::Message { text, at, .. } if text == "written while bob was away" => {
                    Some(*at)
                }
                _ => None,
            })
            .expect("the message event");
        assert!(
            (before..=after).contains(&live),
            "shown at {live}, written in {before}..={after}, arrived after {arrival}"
        );
        let stored = bob
            .history(&id)
            .await
            .into_iter()
            .find(|entry| entry.text == "written while bob was away")
            .expect("stored");
        assert_eq!(stored.at, live);
        stop_clean(&mut [&mut alice, &mut bob]).await;
    })
    .await;
}

/// Two members rename the group at the same moment: whatever order the DS puts the renames
/// in, every member ends with the same name, the one sequenced last (each renamer applies its
/// own rename only when the DS has sequenced it, in its place among the others'). Every member's
/// timeline has a line for every rename, and each renamer hears back about its own: a renamer
/// whose `Accepted` comes before the other's earlier rename gets that one late, and says it was
/// overtaken instead of dropping it. Which rounds hit that order is up to the race; against the
/// client before, which dropped an overtaken rename, all five runs of eight rounds failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_renames_leave_every_member_with_the_same_name() {
    timed(Duration::from_secs(90), async {
        let (_ds, _root, [mut alice, mut bob, mut carol], group) = three_in_a_group("team").await;
        let id = group.id.clone();

        const ROUNDS: usize = 8;
        for round in 0..ROUNDS {
            for (peer, name) in [(&alice, "alpha"), (&bob, "bravo")] {
                peer.command(Command::Rename {
                    group: id.clone(),
                    name: format!("{name}{round}"),
                });
            }
            // Each renamer's next message is sequenced after its rename: once every member has
            // both, every rename has been processed everywhere.
            let (alice_done, bob_done) = (format!("alice {round}"), format!("bob {round}"));
            alice.send_text(&id, &alice_done);
            bob.send_text(&id, &bob_done);
            alice.wait_sent(&id, &alice_done).await;
            bob.wait_sent(&id, &bob_done).await;
            alice.wait_message(&id, &bob_done).await;
            bob.wait_message(&id, &alice_done).await;
            carol.wait_message(&id, &alice_done).await;
            carol.wait_message(&id, &bob_done).await;
        }
        for (peer, name) in [(&alice, "alpha"), (&bob, "bravo")] {
            let answers: Vec<String> = peer
                .log
                .iter()
                .filter_map(|event| match event {
                    CoreEvent::GroupRenamed {
                        group,
                        by: Some(by),
                    } if group.id == id && *by == peer.name => Some(group.name.clone()),
                    CoreEvent::RenameOvertaken { group, by, name }
                        if group.id == id && *by == peer.name =>
                    {
                        Some(name.clone())
                    }
                    _ => None,
                })
                .collect();
            let wanted: Vec<String> = (0..ROUNDS).map(|round| format!("{name}{round}")).collect();
            assert_eq!(
                answers, wanted,
                "{} hears back about each rename",
                peer.name
            );
        }
        for peer in [&mut alice, &mut bob, &mut carol] {
            let mut lines: Vec<String> = peer
                .history(&id)
                .await
                .into_iter()
                .filter(|entry| entry.text.contains(" renamed the group to "))
                .map(|entry| {
                    // "X renamed the group to NAME" or "..., before the rename to OTHER".
                    let text = entry
                        .text
                        .replace("you renamed", &format!("{} renamed", peer.name));
                    text.split(", before the rename to ")
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .collect();
            lines.sort();
            let mut wanted: Vec<String> = (0..ROUNDS)
                .flat_map(|round| {
                    [
                        format!("alice renamed the group to alpha{round}"),
                        format!("bob renamed the group to bravo{round}"),
                    ]
                })
                .collect();
            wanted.sort();
            assert_eq!(lines, wanted, "{}'s timeline has every rename", peer.name);
        }

        let names: Vec<Option<String>> = [&alice, &bob, &carol]
            .iter()
            .map(|peer| peer.group_name(&id))
            .collect();
        let last = [
            format!("alpha{}", ROUNDS - 1),
            format!("bravo{}", ROUNDS - 1),
        ];
        assert!(
            names[0].as_ref().is_some_and(|name| last.contains(name)),
            "{names:?}"
        );
        assert!(
            names.iter().all(|name| *name == names[0]),
            "members disagree on the name: {names:?}"
        );
        for peer in [&mut alice, &mut bob, &mut carol] {
            assert_eq!(peer.errors(), Vec::<String>::new(), "{}", peer.name);
            peer.stop().await;
            peer.restart().await;
            let listing = peer.listing();
            let listed = listing
                .iter()
                .find(|listed| listed.group.id == id)
                .expect("listed");
            assert_eq!(Some(&listed.group.name), names[0].as_ref(), "{}", peer.name);
            peer.stop().await;
        }
    })
    .await;
}
