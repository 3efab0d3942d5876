//! Figure 5: durable appends per second, each acknowledged only after it is committed, and the
//! latency that adds, in two shapes with 100 appends in flight: one group (one publisher
//! pipelining, as a JetStream publisher on one stream) and 100 groups (100 senders, one append
//! in flight each). mlschat: the DS's `SqliteStore::append` (WAL mode, group commit across
//! concurrent writers, the WAL fsync'd before every acknowledgement). Peers: raw SQLite inserts
//! of the same rows, 100 per transaction, synchronous=FULL; NATS JetStream publishes with 100
//! acks outstanding on as many file-backed streams as there are groups.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, anyhow};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use mlschat_ds::protocol::{DeliveryKind, GroupId, UserName};
use mlschat_ds::store::{AppendRequest, SqliteStore, Store, StoreLimits};

use crate::brokers::{self, Broker, NATS_URL};
use crate::report::{Row, median, percentile, sorted};
use crate::track::payload;
use crate::{Failures, Settings};

const IN_FLIGHT: usize = 100;
const PAYLOAD: usize = 1024;

#[derive(Default)]
struct Series {
    rates: Vec<f64>,
    latencies_us: Vec<f64>,
    missing: Option<String>,
}

/// `IN_FLIGHT` concurrent appends spread over `groups` groups: with one group, one sender
/// pipelines (each task is one of its appends in flight); with more, each group has its own
/// sender.
async fn run_store(
    store: &Arc<SqliteStore>,
    appends: usize,
    groups: usize,
) -> Result<(f64, Vec<f64>)> {
    let run = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut senders = Vec::with_capacity(groups);
    for index in 0..groups {
        let user = UserName::new(format!("w{run}-{index}")).map_err(|e| anyhow!("{e}"))?;
        store
            .register_user(&user, &rand::random::<[u8; 32]>())
            .await?;
        let group =
            GroupId::new(rand::random::<[u8; 16]>().to_vec()).map_err(|e| anyhow!("{e}"))?;
        store.create_group(&group, &user).await?;
        senders.push((user, group));
    }
    let per_writer = appends.div_ceil(IN_FLIGHT);
    let started = Instant::now();
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|writer| {
            let (user, group) = senders[writer % groups].clone();
            let store = Arc::clone(store);
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_writer);
                for index in 0..per_writer {
                    let request = AppendRequest {
                        group_id: group.clone(),
                        sender: user.clone(),
                        // Made as the client makes them.
                        client_message_id: mlschat_ds::protocol::new_client_message_id(),
                        epoch: 0,
                        kind: DeliveryKind::Application,
                        payload: payload(index, PAYLOAD),
                        membership: None,
                    };
                    let sent = Instant::now();
                    store.append(request).await?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1e6);
                }
                Ok::<_, mlschat_ds::store::StoreError>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(per_writer * IN_FLIGHT);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, latencies))
}

fn run_sqlite(path: &std::path::Path, appends: usize, groups: usize) -> Result<(f64, Vec<f64>)> {
    let connection = rusqlite::Connection::open(path)?;
    connection.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS messages (
             id INTEGER PRIMARY KEY, group_id BLOB NOT NULL, seq INTEGER NOT NULL,
             payload BLOB NOT NULL);",
    )?;
    let group_ids: Vec<[u8; 16]> = (0..groups).map(|_| rand::random()).collect();
    let batches = appends.div_ceil(IN_FLIGHT);
    let mut latencies = Vec::with_capacity(batches * IN_FLIGHT);
    let started = Instant::now();
    for batch in 0..batches {
        let begun = Instant::now();
        connection.execute_batch("BEGIN IMMEDIATE")?;
        {
            let mut insert = connection.prepare_cached(
                "INSERT INTO messages (group_id, seq, payload) VALUES (?1, ?2, ?3)",
            )?;
            for row in 0..IN_FLIGHT {
                let index = batch * IN_FLIGHT + row;
                insert.execute(rusqlite::params![
                    &group_ids[index % groups][..],
                    index as i64,
                    payload(index, PAYLOAD)
                ])?;
            }
        }
        connection.execute_batch("COMMIT")?;
        // Every row of the batch is acknowledged at the commit.
        let waited = begun.elapsed().as_secs_f64() * 1e6;
        latencies.extend(std::iter::repeat_n(waited, IN_FLIGHT));
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, latencies))
}

async fn run_jetstream(appends: usize, groups: usize) -> Result<(f64, Vec<f64>)> {
    use async_nats::jetstream;
    let client = async_nats::connect(NATS_URL).await?;
    let context = jetstream::new(client);
    let run = format!("{:08x}", rand::random::<u32>());
    let names: Vec<String> = (0..groups)
        .map(|index| format!("BENCH_APPEND_{run}_{index}"))
        .collect();
    let subjects: Vec<String> = names
        .iter()
        .map(|name| format!("bench.append.{name}"))
        .collect();
    for (name, subject) in names.iter().zip(&subjects) {
        context
            .create_stream(jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![subject.clone()],
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|error| anyhow!("create stream: {error}"))?;
    }
    let mut pending = FuturesUnordered::new();
    let mut latencies = Vec::with_capacity(appends);
    let started = Instant::now();
    let mut failure = None;
    for index in 0..appends {
        while pending.len() >= IN_FLIGHT {
            if let Some(result) = pending.next().await {
                match result {
                    Ok(latency) => latencies.push(latency),
                    Err(error) => failure = Some(error),
                }
            }
        }
        let sent = Instant::now();
        let ack = context
            .publish(
                subjects[index % groups].clone(),
                payload(index, PAYLOAD).into(),
            )
            .await
            .map_err(|error| anyhow!("publish: {error}"))?;
        pending.push(async move {
            ack.await
                .map(|_| sent.elapsed().as_secs_f64() * 1e6)
                .map_err(|error| anyhow!("ack: {error}"))
        });
    }
    while let Some(result) = pending.next().await {
        match result {
            Ok(latency) => latencies.push(latency),
            Err(error) => failure = Some(error),
        }
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    for name in &names {
        let _ = context.delete_stream(name).await;
    }
    if let Some(error) = failure {
        return Err(error);
    }
    Ok((rate, latencies))
}

pub async fn figure(settings: &Settings, failures: &Failures) -> Vec<Row> {
    // Long enough in the full run that the store's WAL is checkpointed several times in every
    // run of every shape: a busy DS pays for its checkpoints, and a run that happens to fit
    // between two of them measured up to 1.5x its sustained rate.
    let appends = if settings.quick { 5_000 } else { 100_000 };
    let dir = match tempfile::Builder::new()
        .prefix("mlschat-bench-append")
        .tempdir()
    {
        Ok(dir) => dir,
        Err(error) => {
            failures.error(format!("fig 5: {error}"));
            return Vec::new();
        }
    };
    let store = match SqliteStore::open(
        dir.path().join("ds.sqlite3"),
        StoreLimits {
            max_key_packages_per_user: 1000,
            max_group_backlog: 100_000_000,
        },
    ) {
        Ok(store) => Arc::new(store),
        Err(error) => {
            failures.error(format!("fig 5: cannot open the store: {error}"));
            return Vec::new();
        }
    };
    // Shapes: one group, then 100; each round runs both, every system in turn.
    let shapes = [1usize, IN_FLIGHT];
    let mut series: Vec<[Series; 3]> = shapes.iter().map(|_| Default::default()).collect();
    for round in 0..settings.rounds {
        for (shape, &groups) in shapes.iter().enumerate() {
            eprintln!(
                "  fig 5: round {}/{}, {groups} group(s)",
                round + 1,
                settings.rounds
            );
            let [ours, raw, jetstream] = &mut series[shape];
            match run_store(&store, appends, groups).await {
                Ok((rate, latencies)) => {
                    ours.rates.push(rate);
                    ours.latencies_us.extend(latencies);
                }
                Err(error) => failures.error(format!("fig 5 store appends: {error:#}")),
            }
            let path = dir.path().join(format!("raw-{round}-{groups}.sqlite3"));
            match tokio::task::spawn_blocking(move || run_sqlite(&path, appends, groups)).await {
                Ok(Ok((rate, latencies))) => {
                    raw.rates.push(rate);
                    raw.latencies_us.extend(latencies);
                }
                Ok(Err(error)) => raw.missing = Some(format!("{error:#}")),
                Err(error) => raw.missing = Some(error.to_string()),
            }
            if jetstream.missing.is_none() {
                match brokers::check(Broker::Nats).await {
                    Err(error) => jetstream.missing = Some(format!("{error:#}")),
                    Ok(()) => match run_jetstream(appends, groups).await {
                        Ok((rate, latencies)) => {
                            jetstream.rates.push(rate);
                            jetstream.latencies_us.extend(latencies);
                        }
                        Err(error) => jetstream.missing = Some(format!("{error:#}")),
                    },
                }
            }
        }
    }
    store.close().await;
    let mut rows = Vec::new();
    for (&groups, [ours, raw, jetstream]) in shapes.iter().zip(&series) {
        if ours.rates.is_empty() {
            continue;
        }
        let scale = if groups == 1 {
            format!("{IN_FLIGHT} in flight, 1 group")
        } else {
            format!("{IN_FLIGHT} in flight, {groups} groups")
        };
        let streams = if groups == 1 {
            "1 stream".to_string()
        } else {
            format!("{groups} streams")
        };
        let ours_rate = median(&ours.rates);
        let ours_latency = sorted(ours.latencies_us.clone());
        for (name, series, target) in [
            ("raw SQLite, 100 rows/tx".to_string(), raw, None),
            (
                format!("NATS JetStream acks, {streams}"),
                jetstream,
                Some(">= 1.0x JetStream"),
            ),
        ] {
            let mut row = Row::new(5, "durable appends/s", &scale, "appends/s").ours(ours_rate);
            row = match &series.missing {
                Some(why) => row.peer_missing(&name, why),
                None => row.peer(&name, Some(median(&series.rates))),
            };
            if let Some(words) = target {
                row = row.target(words, 1.0, true);
            }
            rows.push(row.note(format!(
                "{appends} appends x {} rounds; WAL fsync'd before each ack (mlschat), synchronous=FULL (raw SQLite)",
                settings.rounds
            )));
            for (metric, p) in [
                ("append ack latency p50", 50.0),
                ("append ack latency p99", 99.0),
            ] {
                let mut row = Row::new(5, metric, &scale, "us").ours(percentile(&ours_latency, p));
                row = match &series.missing {
                    Some(why) => row.peer_missing(&name, why),
                    None => row.peer(
                        &name,
                        Some(percentile(&sorted(series.latencies_us.clone()), p)),
                    ),
                };
                rows.push(row);
            }
        }
    }
    // Spare the JSON reader a wrong impression: JetStream acknowledges before fsync.
    for row in rows
        .iter_mut()
        .filter(|row| row.peer.starts_with("NATS JetStream") && row.metric == "durable appends/s")
    {
        row.note = format!(
            "{}; nats-server acks after write(2), fsync every 2 min by default (sync_interval): not the same durability",
            row.note
        );
    }
    rows
}
