//! Several DS nodes sharing one PostgreSQL database.
//!
//! - Store level: an append through one store wakes the other store's listener promptly.
//! - End to end, with two real `mlschat-ds` processes on different ports: users on different
//!   nodes chat, commit concurrently (one winner per epoch), a user moves to the other node and
//!   loses nothing, and killing a node with SIGKILL loses no acknowledged message.
//!
//! Skipped with a printed reason when PostgreSQL is not reachable, except under `CI=true`.

mod support_durability;
mod support_postgres;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use mlschat_ds::protocol::{
    Ack, ClientMessageId, CommitRouting, Delivery, DeliveryKind, ErrorCode, Frame, GroupId, Send,
    Seq, UserName,
};
use mlschat_ds::store::{
    AppendRequest, PostgresOptions, PostgresStore, RemoteAppend, Store, StoreLimits,
};
use support_durability::{
    Client, DsOptions, DsProcess, error_code, fake_welcome, message_id, private_message, user,
    write_unthrottled_config,
};
use support_postgres::TestDatabase;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// What "promptly" means for a message crossing nodes.
const PROMPTLY: Duration = Duration::from_secs(2);

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn group(name: &str) -> GroupId {
    GroupId::new(name.as_bytes().to_vec()).expect("group id")
}

// ---------------------------------------------------------------------------------------------
// Store level

/// One DS node's store on the shared test database.
async fn open_node(url: &str) -> PostgresStore {
    PostgresStore::connect(url, StoreLimits::default(), PostgresOptions::default())
        .await
        .expect("a DS node connects")
}

/// A node that cannot connect says why, as the server or the network said it: "db error" and
/// "error connecting to server" alone, which is all tokio-postgres and the pool print
/// themselves, left an operator guessing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_failures_say_why() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let missing_database = format!(
        "{}_missing?{}",
        database.base_url().split('?').next().unwrap_or_default(),
        "connect_timeout=5"
    );
    let refused = connect_error(&missing_database).await;
    assert!(refused.contains("does not exist"), "{refused}");

    // A port nobody listens on.
    let unused_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let url = format!("postgres://postgres:s3cret@127.0.0.1:{unused_port}/x");
    let refused = connect_error(&url).await;
    assert!(refused.to_lowercase().contains("refused"), "{refused}");
    assert!(!refused.contains("s3cret"), "{refused}");
}

/// The error of a node that must fail to connect to `url`.
async fn connect_error(url: &str) -> String {
    match PostgresStore::connect(url, StoreLimits::default(), PostgresOptions::default()).await {
        Ok(_) => panic!("connected to {url}"),
        Err(error) => error.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_on_one_node_wakes_the_other() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    tokio::time::timeout(TEST_TIMEOUT, async {
        let first = open_node(&database.url).await;
        let second = open_node(&database.url).await;
        let mut heard_by_first = first.remote_appends().expect("node 1 listens");
        let mut heard_by_second = second.remote_appends().expect("node 2 listens");
        assert!(second.remote_appends().is_none(), "handed out once");

        let (alice, bob) = (user("alice"), user("bob"));
        first.register_user(&alice, &[1; 32]).await.expect("alice");
        first.register_user(&bob, &[2; 32]).await.expect("bob");
        let g = group("wake");
        first.create_group(&g, &alice).await.expect("group");
        let sent = Instant::now();
        let appended = first
            .append(AppendRequest {
                group_id: g.clone(),
                sender: alice.clone(),
                client_message_id: message_id(1, 1),
                epoch: 0,
                kind: DeliveryKind::Commit,
                payload: b"add bob".to_vec(),
                membership: Some(mlschat_ds::store::MembershipChange {
                    welcome: Some(b"welcome".to_vec()),
                    added: vec![bob.clone()],
                    removed: Vec::new(),
                }),
            })
            .await
            .expect("append on node 1");
        let heard = tokio::time::timeout(PROMPTLY, heard_by_second.recv())
            .await
            .expect("node 2 hears it promptly")
            .expect("node 2 still listens");
        eprintln!("cross-node notification after {:?}", sent.elapsed());
        assert_eq!(
            heard,
            RemoteAppend::Appended {
                group_id: g.clone(),
                seq: appended.seq,
                added: vec![bob.clone()],
                removed: Vec::new(),
            }
        );
        // A node does not hear its own appends: its hub already has them.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), heard_by_first.recv())
                .await
                .is_err(),
            "node 1 does not hear its own append"
        );
        first.close().await;
        second.close().await;
    })
    .await
    .expect("timed out");
}

/// What a database failover does to the listening connection, in small: it is cut, the node
/// reconnects, asks every session to resynchronise (notifications sent meanwhile are lost),
/// and hears new appends again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_listening_connection_reconnects_and_resyncs() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    tokio::time::timeout(TEST_TIMEOUT, async {
        let first = open_node(&database.url).await;
        let second = open_node(&database.url).await;
        let mut heard = second.remote_appends().expect("node 2 listens");
        let alice = user("alice");
        first.register_user(&alice, &[1; 32]).await.expect("alice");
        let g = group("cut");
        first.create_group(&g, &alice).await.expect("group");

        let (admin, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
            .await
            .expect("an admin connection");
        tokio::spawn(connection);
        let listen = format!("LISTEN \"mlschat_ds.{}\"", database.schema);
        let cut = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = $1",
                &[&listen],
            )
            .await
            .expect("terminate the listening connections");
        assert_eq!(cut.len(), 2, "both nodes listen");

        let resync = tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .expect("node 2 reconnects in time")
            .expect("node 2 still listens");
        assert_eq!(resync, RemoteAppend::ResyncAll);
        let appended = first
            .append(AppendRequest {
                group_id: g.clone(),
                sender: alice.clone(),
                client_message_id: message_id(1, 1),
                epoch: 0,
                kind: DeliveryKind::Application,
                payload: b"after the cut".to_vec(),
                membership: None,
            })
            .await
            .expect("node 1 still appends");
        let after = tokio::time::timeout(PROMPTLY, heard.recv())
            .await
            .expect("node 2 hears appends again")
            .expect("node 2 still listens");
        assert_eq!(
            after,
            RemoteAppend::Appended {
                group_id: g,
                seq: appended.seq,
                added: Vec::new(),
                removed: Vec::new(),
            }
        );
        first.close().await;
        second.close().await;
    })
    .await
    .expect("timed out");
}

// ---------------------------------------------------------------------------------------------
// Two real DS processes

fn start_node(dir: &Path, name: &str, database: &str) -> DsProcess {
    let config = dir.join("ds.toml");
    if !config.exists() {
        write_unthrottled_config(&config);
    }
    DsProcess::start(DsOptions {
        data_dir: &dir.join(name),
        database: Some(database),
        config: Some(&config),
        rust_log: "info",
        stderr_log: Some(&dir.join(format!("{name}.log"))),
    })
}

/// The next pushed delivery, within `within`.
async fn pushed(client: &mut Client, within: Duration) -> Delivery {
    tokio::time::timeout(within, client.deliveries.recv())
        .await
        .unwrap_or_else(|_| panic!("{}: no delivery within {within:?}", client.user))
        .unwrap_or_else(|| panic!("{}: the connection ended", client.user))
}

/// Asserts nothing more is pushed for a short while.
async fn nothing_more(client: &mut Client) {
    if let Ok(Some(extra)) =
        tokio::time::timeout(Duration::from_millis(300), client.deliveries.recv()).await
    {
        panic!("{}: unexpected extra delivery {extra:?}", client.user);
    }
}

async fn ack(client: &mut Client, group_id: &GroupId, seq: Seq) {
    client
        .send_frame(&Frame::Ack(Ack {
            group_id: group_id.clone(),
            seq,
        }))
        .await;
}

fn send_frame(request_id: u32, id: ClientMessageId, message: Vec<u8>) -> Frame {
    Frame::Send(Send {
        request_id,
        client_message_id: id,
        message: message.into(),
        commit: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_chat_race_commits_move_users_and_survive_sigkill() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    tokio::time::timeout(TEST_TIMEOUT, two_nodes(&database))
        .await
        .expect("the two-node scenario timed out");
}

async fn two_nodes(database: &TestDatabase) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut node1 = start_node(dir.path(), "node1", &database.url);
    let node2 = start_node(dir.path(), "node2", &database.url);
    assert!(
        node1
            .startup_lines
            .iter()
            .any(|line| line == "database: postgres"),
        "{:?}",
        node1.startup_lines
    );
    assert_ne!(node1.address, node2.address);
    let (alice, bob) = (user("alice"), user("bob"));
    let (alice_key, bob_key) = (signing_key(0xa1), signing_key(0xb0));
    let g = group("two-nodes");

    // Bob on node 2, Alice on node 1.
    let mut bob_client =
        Client::connect(node2.address, node2.fingerprint, &bob, &bob_key, true).await;
    let mut alice_client =
        Client::connect(node1.address, node1.fingerprint, &alice, &alice_key, true).await;
    alice_client.create_group(&g).await;
    let welcome = fake_welcome(b"welcome for bob");
    let sent = Instant::now();
    let added = alice_client
        .send_message(
            message_id(1, 0),
            &private_message(&g, 0, 3, b"commit adding bob"),
            Some(CommitRouting {
                welcome: Some(welcome.as_slice().into()),
                added: vec![bob.clone()],
                removed: Vec::new(),
            }),
        )
        .await;
    assert_eq!(added, (1, 1));
    // Bob, added on node 1 while connected to node 2, gets his Welcome pushed there.
    let delivery = pushed(&mut bob_client, PROMPTLY).await;
    eprintln!("Welcome crossed nodes in {:?}", sent.elapsed());
    assert_eq!(
        (delivery.seq, delivery.kind, delivery.payload.as_slice()),
        (1, DeliveryKind::Welcome as u8, welcome.as_slice())
    );
    assert_eq!(pushed(&mut alice_client, PROMPTLY).await.seq, 1);

    // They chat across the nodes.
    let sent = Instant::now();
    let (seq, _) = alice_client
        .send_message(
            message_id(1, 1),
            &private_message(&g, 1, 1, b"hi bob"),
            None,
        )
        .await;
    assert_eq!(seq, 2);
    let delivery = pushed(&mut bob_client, PROMPTLY).await;
    eprintln!("a message crossed nodes in {:?}", sent.elapsed());
    assert_eq!((delivery.seq, delivery.sender.clone()), (2, alice.clone()));
    let (seq, _) = bob_client
        .send_message(
            message_id(2, 1),
            &private_message(&g, 1, 1, b"hi alice"),
            None,
        )
        .await;
    assert_eq!(seq, 3);
    // Each gets the other's message, not its own: its seq came with the answer.
    assert_eq!(pushed(&mut alice_client, PROMPTLY).await.seq, 3);

    // Concurrent commits from the two nodes: one winner per epoch.
    let mut last_seq = 3;
    for epoch in 1..=5u64 {
        let commit = |client: &mut Client, tag: u8| {
            let frame_id = client.next_request_id();
            let message = private_message(&g, epoch, 3, format!("commit {tag} {epoch}").as_bytes());
            (
                frame_id,
                send_frame(frame_id, message_id(tag, 100 + epoch), message),
            )
        };
        let (alice_id, alice_frame) = commit(&mut alice_client, 1);
        let (bob_id, bob_frame) = commit(&mut bob_client, 2);
        tokio::join!(
            alice_client.send_frame(&alice_frame),
            bob_client.send_frame(&bob_frame)
        );
        let (alice_answer, bob_answer) = tokio::join!(
            alice_client.next_response(PROMPTLY),
            bob_client.next_response(PROMPTLY)
        );
        let answers = [
            (alice_id, alice_answer.expect("alice answered")),
            (bob_id, bob_answer.expect("bob answered")),
        ];
        let mut winners = 0;
        for (id, answer) in &answers {
            assert_eq!(answer.request_id(), Some(*id));
            match answer {
                Frame::Accepted(accepted) => {
                    winners += 1;
                    assert_eq!((accepted.seq, accepted.epoch), (last_seq + 1, epoch + 1));
                }
                Frame::Error(error) => {
                    assert_eq!(error_code(answer), Some(ErrorCode::StaleEpoch));
                    assert_eq!(error.current_epoch, Some(epoch + 1));
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(winners, 1, "exactly one commit wins epoch {epoch}");
        last_seq += 1;
        // Both see the winning commit, whichever node accepted it.
        assert_eq!(pushed(&mut alice_client, PROMPTLY).await.seq, last_seq);
        assert_eq!(pushed(&mut bob_client, PROMPTLY).await.seq, last_seq);
    }
    let epoch = 6;

    // Bob acknowledges everything and leaves node 2; Alice keeps writing; Bob comes back on
    // node 1 and gets exactly what he missed, in order.
    ack(&mut bob_client, &g, last_seq).await;
    bob_client.disconnect().await;
    let acked = last_seq;
    for n in 0..10u64 {
        let (seq, _) = alice_client
            .send_message(
                message_id(1, 200 + n),
                &private_message(&g, epoch, 1, format!("while bob moves {n}").as_bytes()),
                None,
            )
            .await;
        last_seq += 1;
        assert_eq!(seq, last_seq);
    }
    let mut bob_client =
        Client::connect(node1.address, node1.fingerprint, &bob, &bob_key, false).await;
    let mut caught_up = Vec::new();
    for _ in acked + 1..=last_seq {
        caught_up.push(pushed(&mut bob_client, PROMPTLY).await.seq);
    }
    assert_eq!(caught_up, (acked + 1..=last_seq).collect::<Vec<_>>());
    nothing_more(&mut bob_client).await;
    bob_client.disconnect().await;
    nothing_more(&mut alice_client).await;
    alice_client.disconnect().await;

    // SIGKILL node 1 while Alice pipelines sends into it; Bob watches from node 2.
    let mut bob_client =
        Client::connect(node2.address, node2.fingerprint, &bob, &bob_key, false).await;
    let alice_client =
        Client::connect(node1.address, node1.fingerprint, &alice, &alice_key, false).await;
    const PIPELINED: u64 = 600;
    let messages: Vec<(ClientMessageId, Vec<u8>)> = (0..PIPELINED)
        .map(|n| {
            (
                message_id(3, n),
                private_message(
                    &g,
                    epoch,
                    1,
                    format!("pipelined {n:04}").repeat(8).as_bytes(),
                ),
            )
        })
        .collect();
    let first_pipelined = last_seq + 1;
    let frames: Vec<Vec<u8>> = messages
        .iter()
        .enumerate()
        .map(|(index, (id, bytes))| {
            send_frame(1_000_000 + index as u32, *id, bytes.clone()).encode()
        })
        .collect();
    let (mut send, mut receiver) = alice_client.into_parts();
    let writer = tokio::spawn(async move {
        for frame in frames {
            if send.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let mut acknowledged: BTreeMap<usize, Seq> = BTreeMap::new();
    let record = |frame: Frame, acknowledged: &mut BTreeMap<usize, Seq>| match frame {
        Frame::Accepted(accepted) => {
            let index = (accepted.request_id - 1_000_000) as usize;
            assert!(acknowledged.insert(index, accepted.seq).is_none());
        }
        other => panic!("unexpected answer during the pipeline: {other:?}"),
    };
    while acknowledged.len() < 150 {
        let frame = tokio::time::timeout(Duration::from_secs(10), receiver.responses.recv())
            .await
            .expect("sends are answered")
            .expect("node 1 is alive");
        record(frame, &mut acknowledged);
    }
    node1.kill();
    // Answers already on their way were sent before the node died: they count.
    while let Ok(Some(frame)) =
        tokio::time::timeout(Duration::from_millis(300), receiver.responses.recv()).await
    {
        record(frame, &mut acknowledged);
    }
    writer.abort();
    receiver.abandon();
    assert!(
        acknowledged.len() < PIPELINED as usize,
        "node 1 must die mid-stream"
    );
    eprintln!(
        "node 1 killed; {} of {PIPELINED} sends acknowledged",
        acknowledged.len()
    );

    // Everything node 1 acknowledged is in the shared log, exactly once, and reached Bob on
    // node 2.
    let by_bytes: HashMap<&[u8], usize> = messages
        .iter()
        .enumerate()
        .map(|(index, (_, bytes))| (bytes.as_slice(), index))
        .collect();
    let log = bob_client.fetch_all(&g, last_seq).await;
    let mut stored: HashMap<usize, Seq> = HashMap::new();
    for (position, delivery) in log.iter().enumerate() {
        assert_eq!(delivery.seq, first_pipelined + position as Seq, "gap-free");
        let index = by_bytes[delivery.payload.as_slice()];
        assert!(stored.insert(index, delivery.seq).is_none(), "stored twice");
    }
    for (index, seq) in &acknowledged {
        assert_eq!(
            stored.get(index),
            Some(seq),
            "acknowledged message {index} is stored"
        );
    }
    let mut seen = HashSet::new();
    for _ in 0..log.len() {
        let delivery = pushed(&mut bob_client, Duration::from_secs(10)).await;
        assert!(seen.insert(delivery.seq), "pushed twice");
    }
    assert_eq!(
        seen.len(),
        log.len(),
        "Bob on node 2 was pushed every stored message"
    );

    // Alice retries everything through node 2: stored messages keep their seq, the rest are
    // appended once.
    let mut alice_client =
        Client::connect(node2.address, node2.fingerprint, &alice, &alice_key, false).await;
    for (index, (id, bytes)) in messages.iter().enumerate() {
        let (seq, _) = alice_client.send_message(*id, bytes, None).await;
        if let Some(original) = stored.get(&index) {
            assert_eq!(seq, *original, "retry of stored message {index}");
        }
    }
    let log = bob_client.fetch_all(&g, last_seq).await;
    assert_eq!(log.len(), PIPELINED as usize, "every message exactly once");
    let distinct: HashSet<&[u8]> = log
        .iter()
        .map(|delivery| delivery.payload.as_slice())
        .collect();
    assert_eq!(distinct.len(), PIPELINED as usize);
    alice_client.close();
    bob_client.close();
    drop(node2);
}

// ---------------------------------------------------------------------------------------------
// Throughput (run by hand: `cargo test -p mlschat-ds --test postgres_nodes -- --ignored`)

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, not a check"]
async fn append_throughput_with_and_without_batching() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    for groups in [1usize, 64] {
        for (label, max_batch) in [("one append per transaction", 1), ("batched", 256)] {
            let options = PostgresOptions {
                max_batch,
                ..PostgresOptions::default()
            };
            let store = PostgresStore::connect(&database.url, StoreLimits::default(), options)
                .await
                .expect("connect");
            let rate = measure_appends(&store, groups, &format!("{groups}-{max_batch}")).await;
            eprintln!(
                "{label}: 1 KiB appends from 64 concurrent senders to {groups} group(s): {rate:.0}/s"
            );
            store.close().await;
        }
    }
}

/// Appends from 64 concurrent senders, spread over `groups` groups; returns appends per second.
async fn measure_appends(store: &PostgresStore, groups: usize, tag: &str) -> f64 {
    const SENDERS: usize = 64;
    const PER_SENDER: u64 = 50;
    let senders: Vec<UserName> = (0..SENDERS).map(|n| user(&format!("s{tag}-{n}"))).collect();
    for sender in &senders {
        store
            .register_user(sender, &[0; 32])
            .await
            .expect("register");
    }
    // Group k is created by sender k, which adds the senders that write to it.
    let mut epochs = Vec::new();
    let group_ids: Vec<GroupId> = (0..groups)
        .map(|k| GroupId::new(format!("g{tag}-{k}").into_bytes()).expect("group"))
        .collect();
    for (k, group_id) in group_ids.iter().enumerate() {
        store
            .create_group(group_id, &senders[k])
            .await
            .expect("group");
        let others: Vec<UserName> = senders
            .iter()
            .enumerate()
            .filter(|(n, _)| n % groups == k && *n != k)
            .map(|(_, sender)| sender.clone())
            .collect();
        let mut epoch = 0;
        for chunk in others.chunks(16) {
            store
                .append(AppendRequest {
                    group_id: group_id.clone(),
                    sender: senders[k].clone(),
                    client_message_id: message_id(9, epoch),
                    epoch,
                    kind: DeliveryKind::Commit,
                    payload: b"add".to_vec(),
                    membership: Some(mlschat_ds::store::MembershipChange {
                        welcome: Some(b"w".to_vec()),
                        added: chunk.to_vec(),
                        removed: Vec::new(),
                    }),
                })
                .await
                .expect("add members");
            epoch += 1;
        }
        epochs.push(epoch);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, sender) in senders.iter().enumerate() {
        let store = store.clone();
        let sender = sender.clone();
        let group_id = group_ids[index % groups].clone();
        let epoch = epochs[index % groups];
        tasks.spawn(async move {
            for n in 0..PER_SENDER {
                store
                    .append(AppendRequest {
                        group_id: group_id.clone(),
                        sender: sender.clone(),
                        client_message_id: message_id(index as u8, 1000 + n),
                        epoch,
                        kind: DeliveryKind::Application,
                        payload: vec![0x5a; 1024],
                        membership: None,
                    })
                    .await
                    .expect("append");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (PER_SENDER * SENDERS as u64) as f64 / started.elapsed().as_secs_f64()
}
