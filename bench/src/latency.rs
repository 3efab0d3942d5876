//! Figure 1: end-to-end message latency with one message in flight. mlschat: plaintext in at the
//! sender's client core (`Client::start`) -> MLS encrypt -> QUIC -> DS (durably stored) ->
//! fan-out -> decrypt (and store) at every member; the clock stops at the last member's
//! `Message` event. Peer: the best of NATS, Redis and Mosquitto relaying the same number of
//! bytes to the same number of subscribers, with no encryption and no persistence.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use mlschat::client::{Client, ClientOptions};
use mlschat::core::{Command, CoreEvent, CoreInput};
use mlschat_ds::protocol::{GroupId, UserName};

use crate::brokers::{self, Broker};
use crate::ds::DsProcess;
use crate::fanout;
use crate::report::{Row, percentile, sorted, udp_rcvbuf_errors};
use crate::track::Tracker;
use crate::{Failures, Settings};

const TEXT_LEN: usize = 1024;
const STALL: Duration = Duration::from_secs(20);
const SETUP_TIMEOUT: Duration = Duration::from_secs(300);

type Current = Arc<Mutex<Option<Arc<Tracker>>>>;

struct Members {
    clients: Vec<Client>,
    group: GroupId,
    current: Current,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

fn text(index: usize) -> String {
    let mut text = format!("{index:010} ");
    while text.len() < TEXT_LEN {
        text.push('x');
    }
    text
}

async fn next_event(client: &mut Client) -> Result<CoreEvent> {
    tokio::time::timeout(SETUP_TIMEOUT, client.events.recv())
        .await
        .map_err(|_| anyhow!("a client core was silent for {SETUP_TIMEOUT:?}"))?
        .context("a client core stopped")
}

/// Starts `size` clients against the DS, creates a group and invites everyone with one command.
async fn setup(ds: &DsProcess, size: usize) -> Result<Members> {
    let dir = tempfile::Builder::new()
        .prefix("mlschat-bench-e2e")
        .tempdir()?;
    let run = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut clients = Vec::with_capacity(size);
    let mut names = Vec::with_capacity(size);
    for index in 0..size {
        let name = UserName::new(format!("u{run}-{index}")).map_err(|e| anyhow!("{e}"))?;
        let mut options = ClientOptions::new(name.clone(), dir.path().join(name.as_str()));
        options.server = Some(ds.target.address.to_string());
        options.pinned = Some(ds.target.fingerprint.to_hex());
        options.auto_update = None;
        clients.push(Client::start(options).await?);
        names.push(name);
    }
    // Ready: registered and KeyPackages uploaded.
    for client in &mut clients {
        loop {
            match next_event(client).await? {
                CoreEvent::Ready { .. } => break,
                CoreEvent::Error { message } => bail!("client error during setup: {message}"),
                _ => {}
            }
        }
    }
    let send = |client: &Client, command: Command| {
        client
            .inputs
            .send(CoreInput::Command(command))
            .map_err(|_| anyhow!("a client core stopped"))
    };
    send(
        &clients[0],
        Command::CreateGroup {
            id: None,
            name: "bench".into(),
        },
    )?;
    let group = loop {
        match next_event(&mut clients[0]).await? {
            CoreEvent::GroupCreated { group } => break group.id,
            CoreEvent::Error { message } => bail!("create group: {message}"),
            _ => {}
        }
    };
    send(
        &clients[0],
        Command::Invite {
            group: group.clone(),
            users: names[1..].to_vec(),
        },
    )?;
    for client in clients.iter_mut().skip(1) {
        loop {
            match next_event(client).await? {
                CoreEvent::Joined { .. } => break,
                CoreEvent::Error { message } => bail!("join: {message}"),
                _ => {}
            }
        }
    }
    // Let the group-name message and acknowledgements settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let current: Current = Arc::new(Mutex::new(None));
    let mut forwarders = Vec::new();
    for client in clients.iter_mut().skip(1) {
        let (_, empty) = tokio::sync::mpsc::unbounded_channel();
        let mut events = std::mem::replace(&mut client.events, empty);
        let current = Arc::clone(&current);
        forwarders.push(tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let CoreEvent::Message { text, .. } = event
                    && let Some(index) = text.get(..10).and_then(|i| i.parse::<usize>().ok())
                    && let Ok(current) = current.lock()
                    && let Some(tracker) = current.as_ref()
                {
                    tracker.delivered(index);
                }
            }
        }));
    }
    Ok(Members {
        clients,
        group,
        current,
        forwarders,
        _dir: dir,
    })
}

async fn run_ours(members: &Members, messages: usize) -> Result<crate::track::Outcome> {
    let size = members.clients.len();
    let tracker = Tracker::new(messages, (size - 1) as u32, 1);
    if let Ok(mut current) = members.current.lock() {
        *current = Some(Arc::clone(&tracker));
    }
    for index in 0..messages {
        tracker.before_send(index).await;
        members.clients[0]
            .inputs
            .send(CoreInput::Command(Command::Send {
                group: members.group.clone(),
                text: text(index),
            }))
            .map_err(|_| anyhow!("the sender's core stopped"))?;
    }
    let outcome = tracker.finish(STALL).await;
    // Let the sender settle what the DS answered before the next batch.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(outcome)
}

async fn shutdown(members: Members) {
    for client in &members.clients {
        let _ = client.inputs.send(CoreInput::Command(Command::Quit));
    }
    for forwarder in &members.forwarders {
        forwarder.abort();
    }
    for client in members.clients {
        let _ = tokio::time::timeout(Duration::from_secs(15), client.finish()).await;
    }
}

pub async fn figure(settings: &Settings, failures: &Failures) -> Vec<Row> {
    let sizes: &[usize] = if settings.quick { &[10] } else { &[10, 100] };
    let messages = if settings.quick { 40 } else { 100 };
    let mut rows = Vec::new();
    for &size in sizes {
        match size_rows(settings, size, messages, failures).await {
            Ok(mut new) => rows.append(&mut new),
            Err(error) => failures.error(format!("fig 1 group of {size}: {error:#}")),
        }
    }
    rows
}

async fn size_rows(
    settings: &Settings,
    size: usize,
    messages: usize,
    failures: &Failures,
) -> Result<Vec<Row>> {
    eprintln!("  fig 1: group of {size}: starting {size} clients");
    let ds = DsProcess::spawn().await?;
    let members = setup(&ds, size).await?;
    let drops_before = udp_rcvbuf_errors();
    let mut ours: Vec<f64> = Vec::new();
    let mut peers: Vec<(Broker, Vec<f64>, Option<String>)> =
        Broker::ALL.iter().map(|b| (*b, Vec::new(), None)).collect();
    // Warm-up: connections, caches, the first epoch's ratchets.
    let _ = run_ours(&members, 5).await;
    let per_round = messages.div_ceil(settings.rounds);
    for round in 0..settings.rounds {
        eprintln!(
            "  fig 1: group of {size}, round {}/{}",
            round + 1,
            settings.rounds
        );
        let outcome = run_ours(&members, per_round).await?;
        if outcome.lost > 0 {
            failures.lost(format!(
                "fig 1 mlschat group of {size}: {} deliveries lost",
                outcome.lost
            ));
        }
        ours.extend(outcome.latencies_us());
        for (broker, latencies, missing) in &mut peers {
            if missing.is_some() {
                continue;
            }
            if let Err(error) = brokers::check(*broker).await {
                *missing = Some(format!("{error:#}"));
                continue;
            }
            match fanout::run_broker(*broker, size - 1, per_round, 1).await {
                Ok((outcome, _)) => {
                    if outcome.lost > 0 {
                        failures.lost(format!(
                            "fig 1 {} group of {size}: {} deliveries lost",
                            broker.name(),
                            outcome.lost
                        ));
                    }
                    latencies.extend(outcome.latencies_us());
                }
                Err(error) => *missing = Some(format!("{error:#}")),
            }
        }
    }
    let drops = match (drops_before, udp_rcvbuf_errors()) {
        (Some(before), Some(after)) => format!("UDP RcvbufErrors +{}", after - before),
        _ => "UDP RcvbufErrors unreadable".into(),
    };
    shutdown(members).await;
    ds.stop().await;
    let ours = sorted(ours);
    let mut rows = Vec::new();
    let others: Vec<String> = peers
        .iter()
        .map(|(broker, latencies, missing)| match missing {
            Some(why) => format!("{} MISSING ({why})", broker.name()),
            None => {
                let latencies = sorted(latencies.clone());
                format!(
                    "{} p50/p99 {:.0}/{:.0} us",
                    broker.name(),
                    percentile(&latencies, 50.0),
                    percentile(&latencies, 99.0)
                )
            }
        })
        .collect();
    for (metric, p) in [("e2e latency p50", 50.0), ("e2e latency p99", 99.0)] {
        // The best broker at this percentile (the one with the lowest value).
        let best = peers
            .iter()
            .filter(|(_, latencies, missing)| missing.is_none() && !latencies.is_empty())
            .map(|(broker, latencies, _)| (*broker, percentile(&sorted(latencies.clone()), p)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let mut row = Row::new(1, metric, size, "us").ours(percentile(&ours, p));
        row = match best {
            Some((broker, value)) => row
                .peer(format!("best broker ({})", broker.name()), Some(value))
                .target("<= 1.0x best broker", 1.0, false),
            None => row.peer_missing("every broker", "none reachable"),
        };
        rows.push(row.note(format!(
            "{} msgs, 1 in flight, 1 KiB; {}; {drops}",
            ours.len(),
            others.join(", ")
        )));
    }
    Ok(rows)
}
