//! Crash and shutdown durability of the real `mlschat-ds` binary.
//!
//! A client pipelines thousands of `Send`s; the DS is killed (SIGKILL) or asked to stop
//! (SIGTERM) part-way through; after a restart on the same data directory every acknowledged
//! message must be there exactly once, in order, and retries must be answered idempotently.

mod support_durability;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use mlschat_ds::protocol::{
    ClientMessageId, CommitRouting, Delivery, DeliveryKind, Epoch, ErrorCode, Frame, GroupId, Send,
    Seq, UserName,
};
use rand::{Rng as _, SeedableRng as _};
use support_durability::{
    Client, ClientReceiver, DsOptions, DsProcess, error_code, fake_welcome, message_id,
    private_message, user, write_unthrottled_config,
};

const TEST_TIMEOUT: Duration = Duration::from_secs(50);
/// Request ids of pipelined sends are this plus the message index.
const PIPELINE_BASE: u32 = 1_000_000;

/// One message the test sends: its idempotency key and its bytes.
struct Outgoing {
    id: ClientMessageId,
    bytes: Vec<u8>,
}

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// Application messages in `epoch`, each with a distinct body of about 200 bytes.
fn outgoing_messages(group_id: &GroupId, epoch: Epoch, tag: u8, count: u64) -> Vec<Outgoing> {
    (0..count)
        .map(|index| Outgoing {
            id: message_id(tag, index),
            bytes: private_message(
                group_id,
                epoch,
                1,
                format!("message {index:05} ").repeat(14).as_bytes(),
            ),
        })
        .collect()
}

/// A pipelined batch of sends: a writer task pushes every frame as fast as the stream takes
/// them while the test reads the answers.
struct Pipeline {
    receiver: ClientReceiver,
    writer: tokio::task::JoinHandle<()>,
    /// Message index to (seq, epoch), for every `Accepted`.
    accepted: BTreeMap<usize, (Seq, Epoch)>,
    /// Request id and code of every `Error`.
    errors: Vec<(u32, Option<ErrorCode>)>,
}

impl Pipeline {
    fn start(client: Client, messages: &[Outgoing]) -> Pipeline {
        let frames: Vec<Vec<u8>> = messages
            .iter()
            .enumerate()
            .map(|(index, message)| {
                Frame::Send(Send {
                    request_id: PIPELINE_BASE + u32::try_from(index).expect("small index"),
                    client_message_id: message.id,
                    message: message.bytes.as_slice().into(),
                    commit: None,
                })
                .encode()
            })
            .collect();
        let (mut send, receiver) = client.into_parts();
        let writer = tokio::spawn(async move {
            for frame in frames {
                if send.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
        Pipeline {
            receiver,
            writer,
            accepted: BTreeMap::new(),
            errors: Vec::new(),
        }
    }

    fn record(&mut self, frame: Frame) {
        match frame {
            Frame::Accepted(accepted) => {
                let index = accepted
                    .request_id
                    .checked_sub(PIPELINE_BASE)
                    .expect("an answer to a pipelined send") as usize;
                let previous = self.accepted.insert(index, (accepted.seq, accepted.epoch));
                assert!(previous.is_none(), "send {index} answered twice");
            }
            Frame::Error(ref error) => self.errors.push((error.request_id, error_code(&frame))),
            other => panic!("unexpected frame during the pipeline: {other:?}"),
        }
    }

    /// Reads answers until `count` sends are accepted.
    async fn wait_accepted(&mut self, count: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.accepted.len() < count {
            let frame = tokio::time::timeout_at(deadline, self.receiver.responses.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {count} sends accepted in time (errors: {:?})",
                        self.accepted.len(),
                        self.errors
                    )
                })
                .unwrap_or_else(|| {
                    panic!(
                        "connection ended after {} of {count} accepted sends (errors: {:?})",
                        self.accepted.len(),
                        self.errors
                    )
                });
            self.record(frame);
        }
    }

    /// Reads answers until the connection ends, nothing arrives for `quiet`, or `limit` passes.
    /// Returns true if the connection ended.
    async fn drain(&mut self, quiet: Duration, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let wait = quiet.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            match tokio::time::timeout(wait, self.receiver.responses.recv()).await {
                Ok(Some(frame)) => self.record(frame),
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    fn abandon(self) -> BTreeMap<usize, (Seq, Epoch)> {
        self.writer.abort();
        self.receiver.abandon();
        self.accepted
    }
}

fn start_ds(dir: &Path) -> DsProcess {
    let config = dir.join("ds.toml");
    if !config.exists() {
        write_unthrottled_config(&config);
    }
    DsProcess::start(DsOptions {
        data_dir: &dir.join("data"),
        database: None,
        config: Some(&config),
        rust_log: "info",
        stderr_log: Some(&dir.join("ds.log")),
    })
}

/// Checks a group log: seqs exactly `1..=len`, every application message one of `messages`
/// and none twice. Returns the message index stored at each seq (`None` for other kinds).
fn index_log(
    log: &[Delivery],
    messages: &[Outgoing],
    sender: &UserName,
    epoch: Epoch,
    first_application_seq: Seq,
) -> BTreeMap<Seq, usize> {
    let by_bytes: HashMap<&[u8], usize> = messages
        .iter()
        .enumerate()
        .map(|(index, message)| (message.bytes.as_slice(), index))
        .collect();
    let mut seen = HashSet::new();
    let mut indexed = BTreeMap::new();
    for (position, delivery) in log.iter().enumerate() {
        assert_eq!(
            delivery.seq,
            position as Seq + 1,
            "the log is gap-free and in order"
        );
        if delivery.seq < first_application_seq {
            continue;
        }
        assert_eq!(delivery.kind, DeliveryKind::Application as u8);
        assert_eq!(&delivery.sender, sender);
        assert_eq!(delivery.epoch, epoch);
        let index = *by_bytes
            .get(delivery.payload.as_slice())
            .unwrap_or_else(|| panic!("seq {} holds bytes nobody sent", delivery.seq));
        assert!(
            seen.insert(index),
            "message {index} stored twice (again at seq {})",
            delivery.seq
        );
        indexed.insert(delivery.seq, index);
    }
    indexed
}

/// Collects pushed deliveries until `last_seq` arrives.
async fn collect_pushes(client: &mut Client, last_seq: Seq, timeout: Duration) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pushed: Vec<Delivery> = Vec::new();
    while pushed.last().is_none_or(|delivery| delivery.seq < last_seq) {
        let delivery = tokio::time::timeout_at(deadline, client.deliveries.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "pushes stopped at seq {:?}, expected up to {last_seq}",
                    pushed.last().map(|delivery| delivery.seq)
                )
            })
            .expect("the connection ended during pushes");
        pushed.push(delivery);
    }
    pushed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_messages_survive_sigkill_exactly_once() {
    tokio::time::timeout(TEST_TIMEOUT, sigkill_scenario())
        .await
        .expect("the SIGKILL scenario timed out");
}

async fn sigkill_scenario() {
    const PIPELINED: u64 = 2000;
    let dir = tempfile::tempdir().expect("temporary directory");
    let alice = user("alice");
    let bob = user("bob");
    let alice_key = signing_key(0xa1);
    let bob_key = signing_key(0xb0);
    let group_id = GroupId::new(b"durability-sigkill".to_vec()).expect("group id");

    let mut ds = start_ds(dir.path());
    let fingerprint = ds.fingerprint;
    assert!(
        ds.startup_lines
            .iter()
            .any(|line| line.starts_with("generated a self-signed certificate")),
        "first start generates the certificate: {:?}",
        ds.startup_lines
    );
    Client::connect(ds.address, fingerprint, &bob, &bob_key, true)
        .await
        .close();
    let mut sender = Client::connect(ds.address, fingerprint, &alice, &alice_key, true).await;
    sender.create_group(&group_id).await;
    let welcome = fake_welcome(b"welcome for bob");
    let added = sender
        .send_message(
            message_id(0xc0, 0),
            &private_message(&group_id, 0, 3, b"commit adding bob"),
            Some(CommitRouting {
                welcome: Some(welcome.as_slice().into()),
                added: vec![bob.clone()],
                removed: Vec::new(),
            }),
        )
        .await;
    assert_eq!(added, (1, 1));

    let messages = outgoing_messages(&group_id, 1, 1, PIPELINED);
    let kill_after = rand::rngs::StdRng::seed_from_u64(0x5eed_0001).gen_range(250..=400);
    let mut pipeline = Pipeline::start(sender, &messages);
    pipeline
        .wait_accepted(kill_after, Duration::from_secs(20))
        .await;
    ds.kill();
    // Answers already on their way were sent before the DS died: they count as acknowledged.
    pipeline
        .drain(Duration::from_millis(300), Duration::from_secs(2))
        .await;
    assert!(
        pipeline.errors.is_empty(),
        "no send was refused: {:?}",
        pipeline.errors
    );
    let acknowledged = pipeline.abandon();
    assert!(
        acknowledged.len() < PIPELINED as usize,
        "the DS must die mid-stream; all {PIPELINED} sends were already acknowledged"
    );
    eprintln!(
        "killed after {kill_after}; {} of {PIPELINED} sends acknowledged",
        acknowledged.len()
    );

    // Restart on the same data directory: same certificate, same data.
    let ds = start_ds(dir.path());
    assert_eq!(ds.fingerprint, fingerprint, "the certificate survives");
    assert!(
        !ds.startup_lines
            .iter()
            .any(|line| line.starts_with("generated")),
        "no new certificate on restart: {:?}",
        ds.startup_lines
    );
    let mut receiver = Client::connect(ds.address, fingerprint, &bob, &bob_key, false).await;
    let log = receiver.fetch_all(&group_id, 0).await;
    assert!(!log.is_empty(), "the log survives");
    let first = &log[0];
    assert_eq!(
        (first.seq, first.kind, first.epoch),
        (1, DeliveryKind::Welcome as u8, 1)
    );
    assert_eq!(first.payload.as_slice(), welcome.as_slice());
    let stored = index_log(&log, &messages, &alice, 1, 2);
    for (index, (seq, epoch)) in &acknowledged {
        assert_eq!(*epoch, 1);
        assert_eq!(
            stored.get(seq),
            Some(index),
            "acknowledged message {index} must be stored at its seq {seq}"
        );
    }
    let stored_count = stored.len();
    eprintln!(
        "after restart: {stored_count} stored, {} acknowledged",
        acknowledged.len()
    );

    // The sender retries every message with its original id, as a client does after a crash.
    let sender = Client::connect(ds.address, fingerprint, &alice, &alice_key, false).await;
    let mut retry = Pipeline::start(sender, &messages);
    retry
        .wait_accepted(PIPELINED as usize, Duration::from_secs(30))
        .await;
    assert!(
        retry.errors.is_empty(),
        "retries refused: {:?}",
        retry.errors
    );
    let retried = retry.abandon();
    let stored_seq: HashMap<usize, Seq> =
        stored.iter().map(|(seq, index)| (*index, *seq)).collect();
    let last_stored = log.last().map_or(0, |delivery| delivery.seq);
    let mut new_seqs = Vec::new();
    for (index, (seq, epoch)) in &retried {
        assert_eq!(*epoch, 1);
        if let Some((acknowledged_seq, _)) = acknowledged.get(index) {
            assert_eq!(
                seq, acknowledged_seq,
                "a retry of acknowledged message {index} gets its original seq"
            );
        }
        match stored_seq.get(index) {
            Some(original) => assert_eq!(seq, original, "retry of stored message {index}"),
            None => {
                assert!(*seq > last_stored);
                new_seqs.push(*seq);
            }
        }
    }
    new_seqs.sort_unstable();
    assert_eq!(
        new_seqs,
        (last_stored + 1..=last_stored + (PIPELINED - stored_count as u64)).collect::<Vec<_>>()
    );

    // Now every message is in the log exactly once.
    let log = receiver.fetch_all(&group_id, 0).await;
    let stored = index_log(&log, &messages, &alice, 1, 2);
    assert_eq!(stored.len(), PIPELINED as usize);
    for (index, (seq, _)) in &retried {
        assert_eq!(stored.get(seq), Some(index));
    }

    // Bob's connection was pushed the same log: every seq once, in order.
    let last = log.last().expect("a non-empty log").seq;
    let pushed = collect_pushes(&mut receiver, last, Duration::from_secs(20)).await;
    assert_eq!(pushed, log, "pushed deliveries equal the stored log");
    receiver.close();
    drop(ds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_sends_and_exits_cleanly() {
    tokio::time::timeout(TEST_TIMEOUT, sigterm_scenario())
        .await
        .expect("the SIGTERM scenario timed out");
}

async fn sigterm_scenario() {
    const PIPELINED: u64 = 1500;
    let dir = tempfile::tempdir().expect("temporary directory");
    let alice = user("alice");
    let alice_key = signing_key(0xa2);
    let group_id = GroupId::new(b"durability-sigterm".to_vec()).expect("group id");

    let mut ds = start_ds(dir.path());
    let fingerprint = ds.fingerprint;
    let mut sender = Client::connect(ds.address, fingerprint, &alice, &alice_key, true).await;
    sender.create_group(&group_id).await;
    let messages = outgoing_messages(&group_id, 0, 2, PIPELINED);
    let stop_after = rand::rngs::StdRng::seed_from_u64(0x5eed_0002).gen_range(150..=300);
    let mut pipeline = Pipeline::start(sender, &messages);
    pipeline
        .wait_accepted(stop_after, Duration::from_secs(20))
        .await;
    let terminated_at = Instant::now();
    ds.terminate();
    let ended = pipeline
        .drain(Duration::from_secs(12), Duration::from_secs(12))
        .await;
    let status = ds
        .wait_exit(Duration::from_secs(12))
        .await
        .expect("mlschat-ds exits after SIGTERM");
    let took = terminated_at.elapsed();
    assert!(
        status.success(),
        "mlschat-ds exits with status 0 after SIGTERM, not {status}"
    );
    assert!(
        took < Duration::from_secs(10),
        "shutdown took {took:?}, more than a few seconds"
    );
    assert!(ended, "the DS closes the connection when it shuts down");
    // Only a ShuttingDown notice may come besides the answers.
    for (request_id, code) in &pipeline.errors {
        assert_eq!(
            (*request_id, *code),
            (0, Some(ErrorCode::ShuttingDown)),
            "unexpected error during shutdown"
        );
    }
    let acknowledged = pipeline.abandon();
    assert!(
        acknowledged.len() < PIPELINED as usize,
        "SIGTERM must arrive while sends are in flight"
    );
    eprintln!(
        "SIGTERM after {stop_after}; {} of {PIPELINED} sends acknowledged; exit took {took:?}",
        acknowledged.len()
    );

    let ds = start_ds(dir.path());
    assert_eq!(ds.fingerprint, fingerprint);
    let mut reader = Client::connect(ds.address, fingerprint, &alice, &alice_key, false).await;
    let log = reader.fetch_all(&group_id, 0).await;
    let stored = index_log(&log, &messages, &alice, 0, 1);
    for (index, (seq, epoch)) in &acknowledged {
        assert_eq!(*epoch, 0);
        assert_eq!(
            stored.get(seq),
            Some(index),
            "acknowledged message {index} must be stored at its seq {seq}"
        );
    }
    // A graceful stop answers every send it stored: nothing is left in doubt.
    assert_eq!(
        stored.len(),
        acknowledged.len(),
        "every message stored before a graceful shutdown was acknowledged"
    );
    reader.close();
    drop(ds);
}
