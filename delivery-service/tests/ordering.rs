//! Ordering and delivery: one commit per epoch, gap-free per-group sequence numbers, identical
//! fan-out order for every member, Welcome routing, offline catch-up from the acknowledged
//! cursor, own messages answered but not pushed back, idempotent retries, Fetch paging, removal
//! cut-off and the `Send` error cases.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{
    Client, TestServer, expect_accepted, expect_error, expect_messages, fake_welcome, group,
    private_message, public_message, random_message_id, routing, send_frame, setup_group, timed,
    user,
};
use mlschat_ds::protocol::mls::ContentType;
use mlschat_ds::protocol::{
    CommitRouting, Delivery, DeliveryKind, ErrorCode, Frame, GroupId, Seq, UserName,
};

const APPLICATION: u8 = DeliveryKind::Application as u8;
const COMMIT: u8 = DeliveryKind::Commit as u8;
const WELCOME: u8 = DeliveryKind::Welcome as u8;

/// Asserts `deliveries` have the consecutive seqs `first..`.
#[track_caller]
fn assert_gap_free(deliveries: &[Delivery], first: Seq) {
    let seqs: Vec<Seq> = deliveries.iter().map(|delivery| delivery.seq).collect();
    let expected: Vec<Seq> = (first..first + deliveries.len() as u64).collect();
    assert_eq!(seqs, expected, "deliveries are not gap-free and in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_member_gets_the_welcome_at_the_commit_seq() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let group_id = group("welcome");
        alice.create_group(&group_id).await;

        // Before bob is a member.
        let before = alice.send_application(&group_id, 0, b"before bob").await;
        assert_eq!((before.seq, before.epoch), (1, 0));

        let welcome = fake_welcome(b"the welcome for bob");
        let commit = private_message(&group_id, 0, ContentType::Commit, b"commit adding bob");
        let accepted = expect_accepted(
            alice
                .send_message(
                    commit.clone(),
                    Some(CommitRouting {
                        welcome: Some(welcome.clone().into()),
                        added: vec![user("bob")],
                        removed: Vec::new(),
                    }),
                )
                .await,
        );
        assert_eq!((accepted.seq, accepted.epoch), (2, 1));

        let bob_welcome = bob.next_delivery().await;
        assert_eq!(bob_welcome.group_id, group_id);
        assert_eq!(
            (bob_welcome.seq, bob_welcome.epoch, bob_welcome.kind),
            (2, 1, WELCOME)
        );
        assert_eq!(bob_welcome.sender, user("alice"));
        assert_eq!(bob_welcome.payload.as_slice(), welcome.as_slice());

        // Alice sees the commit itself, in the epoch it was sent in; not her application message,
        // whose seq she has from `Accepted`.
        let alice_seen = alice.next_delivery().await;
        assert_eq!(
            (alice_seen.seq, alice_seen.kind, alice_seen.epoch),
            (2, COMMIT, 0)
        );
        assert_eq!(alice_seen.payload.as_slice(), commit.as_slice());

        // Later messages reach bob, from both sides.
        let after = alice.send_application(&group_id, 1, b"hello bob").await;
        assert_eq!(after.seq, 3);
        let reply = bob.send_application(&group_id, 1, b"hello alice").await;
        assert_eq!(reply.seq, 4);
        let bob_seen = bob.next_delivery().await;
        assert_eq!(bob_seen.seq, 3);
        assert_eq!(
            bob_seen.payload.as_slice(),
            private_message(&group_id, 1, ContentType::Application, b"hello bob").as_slice()
        );

        // What bob can fetch is what he was pushed, nothing before his Welcome, and his own
        // message: a fetch returns everything.
        let fetched = bob.fetch_all(&group_id, 0).await;
        assert_eq!(fetched[..2], [bob_welcome, bob_seen]);
        assert_eq!(fetched.len(), 3);
        assert_eq!((fetched[2].seq, &fetched[2].sender), (4, &user("bob")));

        // The epoch moved: another commit for epoch 0 loses.
        let stale = alice.send_commit(&group_id, 0, b"late commit", None).await;
        let error = expect_error(stale, ErrorCode::StaleEpoch);
        assert_eq!(error.current_epoch, Some(1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_commits_exactly_one_wins_each_epoch() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let group_id = group("race");
        setup_group(&mut [&mut alice, &mut bob], &group_id).await;

        const ROUNDS: u64 = 100;
        let start_epoch = 1;
        let mut winners: Vec<Vec<u8>> = Vec::new();
        let mut wins = HashMap::from([("alice", 0), ("bob", 0)]);
        for round in 0..ROUNDS {
            let epoch = start_epoch + round;
            let alice_commit = private_message(
                &group_id,
                epoch,
                ContentType::Commit,
                format!("alice {round}").as_bytes(),
            );
            let bob_commit = private_message(
                &group_id,
                epoch,
                ContentType::Commit,
                format!("bob {round}").as_bytes(),
            );
            let (from_alice, from_bob) = tokio::join!(
                alice.send_message(alice_commit.clone(), None),
                bob.send_message(bob_commit.clone(), None)
            );
            let (winner, winning_commit, accepted, loser) = match (from_alice, from_bob) {
                (Frame::Accepted(accepted), loser) => ("alice", alice_commit, accepted, loser),
                (loser, Frame::Accepted(accepted)) => ("bob", bob_commit, accepted, loser),
                (a, b) => panic!("round {round}: no commit accepted: {a:?} / {b:?}"),
            };
            assert_eq!(accepted.epoch, epoch + 1, "round {round}");
            assert_eq!(accepted.seq, 2 + round, "round {round}");
            let error = expect_error(loser, ErrorCode::StaleEpoch);
            assert_eq!(error.current_epoch, Some(epoch + 1), "round {round}");
            *wins.get_mut(winner).expect("known") += 1;
            winners.push(winning_commit);
        }
        tracing_free_note(&wins);

        // Both members saw exactly the winning commits, in order, each once.
        for member in [&mut alice, &mut bob] {
            let seen = member.deliveries(ROUNDS as usize).await;
            assert_gap_free(&seen, 2);
            for (round, (delivery, winner)) in seen.iter().zip(&winners).enumerate() {
                assert_eq!(delivery.kind, COMMIT);
                assert_eq!(delivery.epoch, start_epoch + round as u64);
                assert_eq!(delivery.payload.as_slice(), winner.as_slice());
            }
        }
        // The group is at epoch 1 + 100: only a message for that epoch is accepted.
        let final_epoch = start_epoch + ROUNDS;
        let stale = alice
            .send_message(
                private_message(&group_id, final_epoch - 1, ContentType::Application, b"x"),
                None,
            )
            .await;
        assert_eq!(
            expect_error(stale, ErrorCode::StaleEpoch).current_epoch,
            Some(final_epoch)
        );
        alice
            .send_application(&group_id, final_epoch, b"current")
            .await;
    })
    .await;
}

/// Keeps the win counts visible in the test output without a logging dependency.
fn tracing_free_note(wins: &HashMap<&str, u32>) {
    println!("commit race wins: {wins:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_and_future_application_messages_are_rejected() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let group_id = group("stale");
        setup_group(&mut [&mut alice, &mut bob], &group_id).await;
        // Advance to epoch 2.
        expect_accepted(alice.send_commit(&group_id, 1, b"update", None).await);

        for epoch in [0, 1, 3, 1000] {
            let message = private_message(&group_id, epoch, ContentType::Application, b"late");
            let error = expect_error(bob.send_message(message, None).await, ErrorCode::StaleEpoch);
            assert_eq!(error.current_epoch, Some(2), "epoch {epoch}");
        }
        // A proposal for an old epoch too.
        let proposal = private_message(&group_id, 1, ContentType::Proposal, b"proposal");
        let error = expect_error(
            bob.send_message(proposal, None).await,
            ErrorCode::StaleEpoch,
        );
        assert_eq!(error.current_epoch, Some(2));

        // Nothing was sequenced by the rejected messages.
        let accepted = bob.send_application(&group_id, 2, b"on time").await;
        assert_eq!(accepted.seq, 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_order_is_identical_for_every_member() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let mut carol = server.register("carol").await;
        let group_id = group("fan-out");
        setup_group(&mut [&mut alice, &mut bob, &mut carol], &group_id).await;

        const PER_MEMBER: usize = 50;
        const TOTAL: usize = 3 * PER_MEMBER;
        let run = |mut member: Client, group_id: GroupId| async move {
            // Pipelined: every Send is written before any response is read.
            let mut ids = Vec::new();
            for index in 0..PER_MEMBER {
                let id = member.next_request_id();
                let body = format!("{} message {index}", member.name);
                let message =
                    private_message(&group_id, 1, ContentType::Application, body.as_bytes());
                member
                    .send_frame(&send_frame(id, random_message_id(), message, None))
                    .await;
                ids.push(id);
            }
            let mut accepted = Vec::new();
            for id in ids {
                accepted.push(expect_accepted(member.response(id).await).seq);
            }
            // Everyone else's messages: a member's own come back only as their seqs.
            let seen = member.deliveries(TOTAL - PER_MEMBER).await;
            (member, accepted, seen)
        };
        let (a, b, c) = tokio::join!(
            tokio::spawn(run(alice, group_id.clone())),
            tokio::spawn(run(bob, group_id.clone())),
            tokio::spawn(run(carol, group_id.clone()))
        );
        let results = [a.expect("alice"), b.expect("bob"), c.expect("carol")];

        // The order: every seq from 2 on, each message where every member who got it saw it.
        let mut order: std::collections::BTreeMap<Seq, &Delivery> = Default::default();
        for (member, _, seen) in &results {
            for delivery in seen {
                assert_ne!(delivery.sender, member.name, "its own message was pushed");
                if let Some(earlier) = order.insert(delivery.seq, delivery) {
                    assert_eq!(
                        earlier, delivery,
                        "seq {} differs between members",
                        delivery.seq
                    );
                }
            }
        }
        let reference: Vec<Delivery> = order.into_values().cloned().collect();
        assert_gap_free(&reference, 2);
        assert_eq!(reference.len(), TOTAL);
        for (member, accepted, seen) in &results {
            let others: Vec<&Delivery> = reference
                .iter()
                .filter(|delivery| delivery.sender != member.name)
                .collect();
            let seen: Vec<&Delivery> = seen.iter().collect();
            assert_eq!(seen, others, "{} saw a different order", member.name);
            // The seqs a sender was given are where its messages are.
            let mine: Vec<Seq> = reference
                .iter()
                .filter(|delivery| delivery.sender == member.name)
                .map(|delivery| delivery.seq)
                .collect();
            let mut sorted = accepted.clone();
            sorted.sort_unstable();
            assert_eq!(mine, sorted, "{}", member.name);
            // And one sender's pipelined messages keep the order they were sent in: MLS
            // receivers tolerate only a few out-of-order generations per sender.
            let order: Vec<usize> = reference
                .iter()
                .filter(|delivery| delivery.sender == member.name)
                .map(|delivery| {
                    (0..PER_MEMBER)
                        .find(|index| {
                            let body = format!("{} message {index}", member.name);
                            delivery.payload.as_slice()
                                == private_message(
                                    &group_id,
                                    1,
                                    ContentType::Application,
                                    body.as_bytes(),
                                )
                                .as_slice()
                        })
                        .expect("a payload this member sent")
                })
                .collect();
            let expected: Vec<usize> = (0..PER_MEMBER).collect();
            assert_eq!(order, expected, "{}'s messages were reordered", member.name);
            assert_eq!(
                accepted, &sorted,
                "{}'s Accepted seqs are not increasing",
                member.name
            );
        }
    })
    .await;
}

/// A member's own application messages are answered with their seq and never pushed back within
/// its session; its own commits are (it merges one when it arrives in order). After a
/// reconnect, the backlog after its cursor has everything, its own messages included: one sent
/// on the old connection may never have had its answer read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_application_messages_are_answered_not_pushed_and_are_in_the_backlog() {
    timed(async {
        let server = TestServer::start().await;
        let alices_key = common::Signer::ed25519();
        let mut alice = server.register_with("alice", alices_key.clone()).await;
        let mut bob = server.register("bob").await;
        let group_id = group("own");
        setup_group(&mut [&mut alice, &mut bob], &group_id).await;

        let mine = alice.send_application(&group_id, 1, b"from alice").await;
        let theirs = bob.send_application(&group_id, 1, b"from bob").await;
        let commit = expect_accepted(alice.send_commit(&group_id, 1, b"update", None).await);
        assert_eq!((mine.seq, theirs.seq, commit.seq), (2, 3, 4));

        let seqs_and_kinds = |seen: Vec<Delivery>| -> Vec<(Seq, u8)> {
            seen.iter()
                .map(|delivery| (delivery.seq, delivery.kind))
                .collect()
        };
        assert_eq!(
            seqs_and_kinds(alice.deliveries(2).await),
            [(3, APPLICATION), (4, COMMIT)]
        );
        assert_eq!(
            seqs_and_kinds(bob.deliveries(2).await),
            [(2, APPLICATION), (4, COMMIT)]
        );
        assert!(
            alice
                .delivery_within(Duration::from_millis(300))
                .await
                .is_none(),
            "nothing more for alice"
        );

        // Alice acknowledged nothing: her next session's backlog starts after seq 0.
        alice.close().await;
        let mut alice = server.login(&user("alice"), &alices_key).await;
        let backlog = alice.deliveries(4).await;
        assert_gap_free(&backlog, 1);
        assert_eq!(
            (backlog[1].sender.as_str(), backlog[1].kind),
            ("alice", APPLICATION)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_member_catches_up_after_its_last_ack() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let carol_signer = common::Signer::ed25519();
        let mut carol = server.register_with("carol", carol_signer.clone()).await;
        let group_id = group("catch-up");
        setup_group(&mut [&mut alice, &mut bob, &mut carol], &group_id).await;

        // Carol processes and acknowledges the first five messages, then sees two more that
        // she does not acknowledge.
        for index in 0..7 {
            alice
                .send_application(&group_id, 1, format!("early {index}").as_bytes())
                .await;
        }
        let early = carol.deliveries(7).await;
        assert_gap_free(&early, 2);
        let acked = early[4].seq;
        carol.ack(&group_id, early[2].seq).await;
        carol.ack(&group_id, acked).await;
        carol.disconnect().await;

        // While carol is away: 100 messages and 2 commits.
        let mut epoch = 1;
        for index in 0..100 {
            if index == 40 || index == 80 {
                let commit = alice
                    .send_commit(
                        &group_id,
                        epoch,
                        format!("commit at {index}").as_bytes(),
                        None,
                    )
                    .await;
                epoch = expect_accepted(commit).epoch;
            }
            alice
                .send_application(&group_id, epoch, format!("while away {index}").as_bytes())
                .await;
        }
        assert_eq!(epoch, 3);
        let total_after_setup = 7 + 100 + 2;
        let everything = bob.deliveries(total_after_setup).await;
        assert_gap_free(&everything, 2);

        let mut carol = server.login(&user("carol"), &carol_signer).await;
        let expected: Vec<Delivery> = everything
            .iter()
            .filter(|delivery| delivery.seq > acked)
            .cloned()
            .collect();
        let caught_up = carol.deliveries(expected.len()).await;
        assert_eq!(
            caught_up.first().map(|delivery| delivery.seq),
            Some(acked + 1)
        );
        assert_eq!(caught_up, expected);
        let kinds: Vec<u8> = caught_up.iter().map(|delivery| delivery.kind).collect();
        assert_eq!(kinds.iter().filter(|kind| **kind == COMMIT).count(), 2);

        // Live delivery resumes after the backlog, without duplicates.
        let live = alice
            .send_application(&group_id, epoch, b"welcome back")
            .await;
        let next = carol.next_delivery().await;
        assert_eq!(next.seq, live.seq);
        assert_eq!(
            live.seq,
            everything.last().map(|delivery| delivery.seq).unwrap_or(0) + 1
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_send_is_sequenced_once() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let group_id = group("retry");
        setup_group(&mut [&mut alice, &mut bob], &group_id).await;

        let client_message_id = random_message_id();
        let message = private_message(&group_id, 1, ContentType::Application, b"only once");
        let first = expect_accepted(
            alice
                .send_message_with_id(client_message_id, message.clone(), None)
                .await,
        );
        let second = expect_accepted(
            alice
                .send_message_with_id(client_message_id, message.clone(), None)
                .await,
        );
        assert_eq!((first.seq, first.epoch), (2, 1));
        assert_eq!((second.seq, second.epoch), (first.seq, first.epoch));

        // A retried commit keeps its answer even after the epoch moved on.
        let commit_id = random_message_id();
        let commit = private_message(&group_id, 1, ContentType::Commit, b"commit once");
        let committed = expect_accepted(
            alice
                .send_message_with_id(commit_id, commit.clone(), None)
                .await,
        );
        assert_eq!((committed.seq, committed.epoch), (3, 2));
        let again = expect_accepted(alice.send_message_with_id(commit_id, commit, None).await);
        assert_eq!((again.seq, again.epoch), (3, 2));

        // The same id with other bytes is not a retry: refused, not answered with seq 2.
        let reused = alice
            .send_message_with_id(
                client_message_id,
                private_message(&group_id, 2, ContentType::Application, b"other bytes"),
                None,
            )
            .await;
        expect_error(reused, ErrorCode::InvalidMessage);

        let next = alice.send_application(&group_id, 2, b"after").await;
        assert_eq!(next.seq, 4);

        let seen = bob.deliveries(3).await;
        assert_gap_free(&seen, 2);
        assert_eq!(seen[0].payload.as_slice(), message.as_slice());
        assert!(
            bob.delivery_within(Duration::from_millis(200))
                .await
                .is_none(),
            "a retry was delivered twice"
        );
        assert_eq!(bob.fetch_all(&group_id, 1).await, seen);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_pages_match_pushed_deliveries() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let group_id = group("paging");
        setup_group(&mut [&mut alice, &mut bob], &group_id).await;
        for index in 0..25 {
            alice
                .send_application(&group_id, 1, format!("page me {index}").as_bytes())
                .await;
        }
        let pushed = bob.deliveries(25).await;
        assert_gap_free(&pushed, 2);

        // From after the Welcome (seq 1): pages of 10, 10 and 5.
        let mut fetched = Vec::new();
        let mut after = 1;
        let mut pages = Vec::new();
        loop {
            let page = expect_messages(bob.fetch(&group_id, after, 10).await);
            pages.push((page.messages.len(), page.more));
            let Some(last) = page.messages.last() else {
                break;
            };
            after = last.seq;
            fetched.extend(page.messages.iter().cloned());
            if page.more == 0 {
                break;
            }
        }
        assert_eq!(pages, vec![(10, 1), (10, 1), (5, 0)]);
        assert_eq!(fetched, pushed);

        // Exactly at the end: an empty page without `more`.
        let page = expect_messages(bob.fetch(&group_id, 26, 10).await);
        assert!(page.messages.is_empty());
        assert_eq!(page.more, 0);
        // A page that ends exactly at the last message says there is no more.
        let page = expect_messages(bob.fetch(&group_id, 16, 10).await);
        assert_eq!((page.messages.len(), page.more), (10, 0));
        // Fetch does not move the delivery cursor or push anything.
        assert!(
            bob.delivery_within(Duration::from_millis(100))
                .await
                .is_none()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_member_gets_the_removal_and_nothing_after() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let mut carol = server.register("carol").await;
        let group_id = group("removal");
        setup_group(&mut [&mut alice, &mut bob, &mut carol], &group_id).await;

        alice
            .send_application(&group_id, 1, b"before removal")
            .await;
        let removal = expect_accepted(
            alice
                .send_commit(
                    &group_id,
                    1,
                    b"remove carol",
                    Some(routing(&[], &[&user("carol")])),
                )
                .await,
        );
        assert_eq!((removal.seq, removal.epoch), (3, 2));
        for index in 0..5 {
            alice
                .send_application(&group_id, 2, format!("after removal {index}").as_bytes())
                .await;
        }
        let bob_seen = bob.deliveries(7).await;
        assert_gap_free(&bob_seen, 2);

        let carol_seen = carol.deliveries(2).await;
        assert_gap_free(&carol_seen, 2);
        assert_eq!(
            (carol_seen[1].seq, carol_seen[1].kind),
            (removal.seq, COMMIT)
        );
        assert!(
            carol
                .delivery_within(Duration::from_millis(300))
                .await
                .is_none(),
            "a removed member received a message sent after its removal"
        );

        // Fetch stops at the removal too.
        let fetched = carol.fetch_all(&group_id, 0).await;
        let seqs: Vec<Seq> = fetched.iter().map(|delivery| delivery.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(fetched[0].kind, WELCOME);
        let page = expect_messages(carol.fetch(&group_id, removal.seq, 100).await);
        assert!(page.messages.is_empty(), "{:?}", page.messages);
        assert_eq!(page.more, 0);

        // And carol can no longer send.
        let message = private_message(&group_id, 2, ContentType::Application, b"still here?");
        expect_error(
            carol.send_message(message, None).await,
            ErrorCode::NotMember,
        );

        // A reconnect does not bring later messages back either.
        let carol_name = carol.name.clone();
        let carol_signer = carol.signer.clone();
        carol.disconnect().await;
        let mut carol = server.login(&carol_name, &carol_signer).await;
        let replay = carol.deliveries(3).await;
        assert_eq!(replay, fetched);
        assert!(
            carol
                .delivery_within(Duration::from_millis(300))
                .await
                .is_none()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_errors() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let mut dave = server.register("dave").await;
        let group_id = group("errors");
        setup_group(&mut [&mut alice, &mut bob], &group_id).await;

        // Not a member.
        let message = private_message(&group_id, 1, ContentType::Application, b"let me in");
        expect_error(dave.send_message(message, None).await, ErrorCode::NotMember);
        // Unknown group.
        let message = private_message(&group("nowhere"), 0, ContentType::Application, b"hello?");
        expect_error(
            alice.send_message(message, None).await,
            ErrorCode::UnknownGroup,
        );
        // Application data as a PublicMessage.
        let message = public_message(&group_id, 1, ContentType::Application, b"plaintext");
        expect_error(
            alice.send_message(message, None).await,
            ErrorCode::InvalidMessage,
        );
        // Commit routing on an application message.
        let message = private_message(&group_id, 1, ContentType::Application, b"sneaky");
        expect_error(
            alice
                .send_message(message, Some(routing(&[&user("dave")], &[])))
                .await,
            ErrorCode::InvalidMessage,
        );
        // Adding an existing member.
        expect_error(
            alice
                .send_commit(
                    &group_id,
                    1,
                    b"add bob again",
                    Some(routing(&[&user("bob")], &[])),
                )
                .await,
            ErrorCode::InvalidMembership,
        );
        // Adding an unregistered user.
        expect_error(
            alice
                .send_commit(
                    &group_id,
                    1,
                    b"add ghost",
                    Some(routing(&[&user("ghost")], &[])),
                )
                .await,
            ErrorCode::UnknownUser,
        );
        // Removing a non-member.
        expect_error(
            alice
                .send_commit(
                    &group_id,
                    1,
                    b"remove dave",
                    Some(routing(&[], &[&user("dave")])),
                )
                .await,
            ErrorCode::InvalidMembership,
        );
        // Routing that does not add up: a Welcome without added users, added users without a
        // Welcome, a "Welcome" that is not one, and a commit removing its own sender.
        let welcome_only = CommitRouting {
            welcome: Some(fake_welcome(b"for nobody").into()),
            added: Vec::new(),
            removed: Vec::new(),
        };
        let added_only = CommitRouting {
            welcome: None,
            added: vec![user("dave")],
            removed: Vec::new(),
        };
        for (routing, code) in [
            (welcome_only, ErrorCode::InvalidMembership),
            (added_only, ErrorCode::InvalidMembership),
            (
                CommitRouting {
                    welcome: Some(
                        private_message(&group_id, 1, ContentType::Commit, b"not a welcome").into(),
                    ),
                    added: vec![user("dave")],
                    removed: Vec::new(),
                },
                ErrorCode::InvalidMessage,
            ),
            (
                routing(&[], &[&user("alice")]),
                ErrorCode::InvalidMembership,
            ),
            (
                routing(&[&user("dave")], &[&user("bob"), &user("bob")]),
                ErrorCode::InvalidMembership,
            ),
        ] {
            expect_error(
                alice
                    .send_commit(&group_id, 1, b"bad routing", Some(routing))
                    .await,
                code,
            );
        }
        // Not an MLS group message at all, and a Welcome where a group message belongs.
        expect_error(
            alice.send_message(b"garbage".to_vec(), None).await,
            ErrorCode::InvalidMessage,
        );
        expect_error(
            alice.send_message(fake_welcome(b"welcome"), None).await,
            ErrorCode::InvalidMessage,
        );

        // None of that changed the group: the next message is seq 2 at epoch 1, and a
        // PublicMessage commit is fine.
        let next = alice
            .send_application(&group_id, 1, b"still consistent")
            .await;
        assert_eq!(next.seq, 2);
        let commit = public_message(&group_id, 1, ContentType::Commit, b"public commit");
        let committed = expect_accepted(alice.send_message(commit, None).await);
        assert_eq!((committed.seq, committed.epoch), (3, 2));
        let seen = bob.deliveries(2).await;
        assert_gap_free(&seen, 2);
        // Dave was never added, so he got nothing.
        assert!(
            dave.delivery_within(Duration::from_millis(100))
                .await
                .is_none()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_of_one_connection_take_effect_in_order() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let group_id = group("pipelined");

        // One write: create the group, talk in it, add bob, talk in the new epoch. Each request
        // depends on the one before it having taken effect.
        let create = alice.next_request_id();
        let mut bytes = Frame::CreateGroup(mlschat_ds::protocol::CreateGroup {
            request_id: create,
            group_id: group_id.clone(),
        })
        .encode();
        let mut sends = Vec::new();
        let messages = [
            (
                private_message(&group_id, 0, ContentType::Application, b"first"),
                None,
            ),
            (
                private_message(&group_id, 0, ContentType::Commit, b"add bob"),
                Some(routing(&[&user("bob")], &[])),
            ),
            (
                private_message(&group_id, 1, ContentType::Application, b"hi bob"),
                None,
            ),
        ];
        for (message, commit) in messages {
            let id = alice.next_request_id();
            bytes.extend(send_frame(id, random_message_id(), message, commit).encode());
            sends.push(id);
        }
        alice.send_raw(&bytes).await;

        assert!(matches!(
            alice.response(create).await,
            Frame::GroupCreated(_)
        ));
        let mut results = Vec::new();
        for id in sends {
            let accepted = expect_accepted(alice.response(id).await);
            results.push((accepted.seq, accepted.epoch));
        }
        assert_eq!(results, vec![(1, 0), (2, 1), (3, 1)]);
        let seen = bob.deliveries(2).await;
        assert_eq!((seen[0].seq, seen[0].kind), (2, WELCOME));
        assert_eq!((seen[1].seq, seen[1].kind), (3, APPLICATION));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_added_while_offline_gets_the_welcome_on_login() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let dave_signer = common::Signer::ed25519();
        let dave = server.register_with("dave", dave_signer.clone()).await;
        dave.disconnect().await;

        let group_id = group("offline-add");
        alice.create_group(&group_id).await;
        alice.send_application(&group_id, 0, b"before dave").await;
        let added = expect_accepted(
            alice
                .send_commit(
                    &group_id,
                    0,
                    b"add dave",
                    Some(routing(&[&user("dave")], &[])),
                )
                .await,
        );
        alice.send_application(&group_id, 1, b"for dave").await;

        let mut dave = server.login(&user("dave"), &dave_signer).await;
        let seen = dave.deliveries(2).await;
        assert_eq!(
            (seen[0].seq, seen[0].epoch, seen[0].kind),
            (added.seq, 1, WELCOME)
        );
        assert_eq!(
            seen[0].payload.as_slice(),
            fake_welcome(b"welcome for the added members").as_slice()
        );
        assert_eq!((seen[1].seq, seen[1].kind), (added.seq + 1, APPLICATION));
        assert!(
            dave.delivery_within(Duration::from_millis(100))
                .await
                .is_none()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_resyncs_every_group_after_lagging() {
    timed(async {
        // Thousands of pipelined requests: lift the per-connection rate limit.
        let limits = mlschat_ds::config::Limits {
            requests_per_second: 1_000_000,
            request_burst: 1_000_000,
            ..mlschat_ds::config::Limits::default()
        };
        let server = TestServer::start_with(limits).await;
        let alice = server.register("alice").await;

        // Bob authenticates and then stops reading. His tiny receive window makes the DS's
        // writer block almost at once, then its outbox and his session's wake-up queue fill,
        // and the hub starts dropping wake-ups for him (the session "lags").
        let bob_signer = common::Signer::ed25519();
        let mut bob_raw = server.raw_with_window(16 * 1024).await;
        let register = bob_raw
            .register_frame(1, &user("bob"), &bob_signer)
            .expect("sign");
        bob_raw.send_frame(&register).await.expect("send Register");
        assert!(matches!(
            bob_raw.next_frame().await.expect("read"),
            Some(Frame::Authenticated(_))
        ));

        // Several senders, so that their messages are group-committed together.
        const SENDERS: usize = 6;
        const PER_SENDER: usize = 1000;
        const MESSAGES: usize = SENDERS * PER_SENDER;
        let mut senders = vec![alice];
        for index in 1..SENDERS {
            senders.push(server.register(&format!("sender{index}")).await);
        }
        let mut added: Vec<UserName> = vec![user("bob")];
        added.extend(senders[1..].iter().map(|sender| sender.name.clone()));
        let busy = group("busy");
        senders[0].create_group(&busy).await;
        expect_accepted(
            senders[0]
                .send_commit(
                    &busy,
                    0,
                    b"add everyone",
                    Some(routing(&added.iter().collect::<Vec<_>>(), &[])),
                )
                .await,
        );
        // More messages than the writer's batch, the outbox and the wake-up queue together.
        let mut tasks = tokio::task::JoinSet::new();
        for (sender_index, mut sender) in senders.into_iter().enumerate() {
            let busy = busy.clone();
            tasks.spawn(async move {
                let mut ids = Vec::with_capacity(PER_SENDER);
                let mut batch = Vec::new();
                for index in 0..PER_SENDER {
                    let id = sender.next_request_id();
                    let mut payload = vec![0x42; 512];
                    payload.extend_from_slice(&(index as u64).to_be_bytes());
                    let message = private_message(&busy, 1, ContentType::Application, &payload);
                    batch.extend(send_frame(id, random_message_id(), message, None).encode());
                    ids.push(id);
                    if batch.len() > 64 * 1024 {
                        sender.send_raw(&batch).await;
                        batch.clear();
                    }
                }
                sender.send_raw(&batch).await;
                for id in ids {
                    expect_accepted(sender.response(id).await);
                }
                (sender_index, sender)
            });
        }
        let mut senders: Vec<(usize, Client)> = Vec::new();
        while let Some(done) = tasks.join_next().await {
            senders.push(done.expect("sender task"));
        }
        senders.sort_by_key(|(index, _)| *index);
        let (_, alice) = &mut senders[0];

        // While bob lags, he is added to a second, quiet group: its Welcome's wake-up is
        // dropped, and no later message in that group would repair it.
        let quiet = group("quiet");
        alice.create_group(&quiet).await;
        let added = expect_accepted(
            alice
                .send_commit(&quiet, 0, b"add bob", Some(routing(&[&user("bob")], &[])))
                .await,
        );

        // Bob reads again: everything in both groups arrives, per group in order, gap-free.
        let mut bob = Client::new(bob_raw, user("bob"), bob_signer);
        let mut busy_seqs = Vec::new();
        let mut quiet_seen = Vec::new();
        while busy_seqs.len() < MESSAGES + 1 || quiet_seen.is_empty() {
            let Some(delivery) = bob.delivery_within(Duration::from_secs(10)).await else {
                panic!(
                    "bob stalled with {} of {} busy deliveries and {} quiet ones",
                    busy_seqs.len(),
                    MESSAGES + 1,
                    quiet_seen.len()
                );
            };
            if delivery.group_id == busy {
                busy_seqs.push(delivery.seq);
            } else {
                quiet_seen.push(delivery);
            }
        }
        let expected: Vec<Seq> = (1..=MESSAGES as u64 + 1).collect();
        assert!(
            busy_seqs == expected,
            "busy group out of order or with gaps"
        );
        assert_eq!(quiet_seen.len(), 1);
        assert_eq!(
            (quiet_seen[0].seq, quiet_seen[0].kind),
            (added.seq, WELCOME)
        );
        assert!(
            bob.delivery_within(Duration::from_millis(200))
                .await
                .is_none()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_member_can_be_added_again() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let mut carol = server.register("carol").await;
        let group_id = group("re-add");
        setup_group(&mut [&mut alice, &mut carol], &group_id).await;

        let removal = expect_accepted(
            alice
                .send_commit(
                    &group_id,
                    1,
                    b"remove carol",
                    Some(routing(&[], &[&user("carol")])),
                )
                .await,
        );
        alice.send_application(&group_id, 2, b"carol is away").await;
        let readd = expect_accepted(
            alice
                .send_commit(
                    &group_id,
                    2,
                    b"add carol",
                    Some(routing(&[&user("carol")], &[])),
                )
                .await,
        );
        assert_eq!((removal.seq, readd.seq, readd.epoch), (2, 4, 3));
        let back = alice.send_application(&group_id, 3, b"welcome back").await;

        // Carol gets her removal, not the message sent while she was out, then the Welcome of
        // her re-addition and what follows it.
        let seen = carol.deliveries(3).await;
        let summary: Vec<(Seq, u8)> = seen.iter().map(|d| (d.seq, d.kind)).collect();
        assert_eq!(
            summary,
            vec![
                (removal.seq, COMMIT),
                (readd.seq, WELCOME),
                (back.seq, APPLICATION)
            ]
        );
        assert_eq!(seen[1].epoch, 3);
        assert!(
            carol
                .delivery_within(Duration::from_millis(200))
                .await
                .is_none()
        );
        // She can send again, in the new epoch.
        carol.send_application(&group_id, 3, b"thanks").await;
    })
    .await;
}
