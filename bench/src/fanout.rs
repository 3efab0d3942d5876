//! Figure 2 (DS fan-out throughput vs NATS, Redis, Mosquitto) and figure 6 (DS memory per
//! connected client, idle and under figure 2's load, vs nats-server), measured in the same runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::brokers::{self, Broker, Publisher};
use crate::ds::{self, DsProcess};
use crate::report::{Row, cpu_seconds, median, udp_rcvbuf_errors, vm_rss_kib};
use crate::track::{Outcome, Tracker, index_of, payload};
use crate::{Failures, Settings};

pub const WINDOW: usize = 100;
pub const PAYLOAD: usize = 1024;
/// Subscribers acknowledge every this many deliveries (the DS stores each cursor move).
pub const ACK_EVERY: u64 = 100;
const STALL: Duration = Duration::from_secs(10);

/// What a server process used in one run: its idle and peak resident memory, and the CPU time
/// it spent per delivery while the messages went through.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerUse {
    pub before_kib: u64,
    pub idle_kib: u64,
    pub peak_kib: u64,
    pub cpu_us_per_delivery: Option<f64>,
    /// The same for this harness process, which runs the publisher and every subscriber.
    pub clients_cpu_us_per_delivery: Option<f64>,
}

impl ServerUse {
    pub fn idle_per_client(&self, clients: usize) -> f64 {
        self.idle_kib.saturating_sub(self.before_kib) as f64 / clients as f64
    }

    pub fn load_per_client(&self, clients: usize) -> f64 {
        self.peak_kib.saturating_sub(self.before_kib) as f64 / clients as f64
    }
}

/// CPU time of the server process and of this harness process (the publisher and every
/// subscriber), counted from [`CpuClock::start`].
struct CpuClock {
    server: Option<u32>,
    server_start: Option<f64>,
    clients_start: Option<f64>,
}

impl CpuClock {
    fn start(server: Option<u32>) -> CpuClock {
        CpuClock {
            server,
            server_start: server.and_then(cpu_seconds),
            clients_start: cpu_seconds(std::process::id()),
        }
    }

    /// Microseconds of CPU per delivery since the start: (server, clients).
    fn per_delivery(&self, deliveries: usize) -> (Option<f64>, Option<f64>) {
        let per_delivery = |pid: Option<u32>, start: Option<f64>| {
            let spent = pid.and_then(cpu_seconds)? - start?;
            (deliveries > 0).then(|| spent * 1e6 / deliveries as f64)
        };
        (
            per_delivery(self.server, self.server_start),
            per_delivery(Some(std::process::id()), self.clients_start),
        )
    }
}

struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: Option<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let task = {
            let stop = Arc::clone(&stop);
            let peak = Arc::clone(&peak);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = pid.and_then(vm_rss_kib) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        Sampler { stop, peak, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

fn run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// One DS fan-out run: one publisher pipelining `messages` Sends with at most `WINDOW` not yet
/// delivered everywhere, `subscribers` connections receiving them.
pub async fn run_ds(
    ds: &DsProcess,
    subscribers: usize,
    messages: usize,
) -> Result<(Outcome, ServerUse)> {
    let pid = ds.pid();
    let before_kib = pid.and_then(vm_rss_kib).unwrap_or(0);
    let run = run_id();
    let group = ds::setup_group(ds.target, &run, subscribers).await?;
    let tracker = Tracker::new(messages, subscribers as u32, WINDOW);
    let errors = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::with_capacity(subscribers);
    let mut ready = Vec::with_capacity(subscribers);
    for connection in group.subscribers {
        let (signal, wait) = tokio::sync::oneshot::channel();
        let tracker = Arc::clone(&tracker);
        readers.push(ds::spawn_subscriber(
            connection,
            signal,
            Arc::new(move |seq| {
                // seq 1 is the commit that added the subscribers; messages start at seq 2.
                tracker.delivered(seq.saturating_sub(2) as usize)
            }),
            Arc::clone(&errors),
            ACK_EVERY,
        ));
        ready.push(wait);
    }
    for wait in ready {
        if tokio::time::timeout(STALL, wait).await.is_err() {
            bail!("a subscriber never received the Welcome");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_kib = pid.and_then(vm_rss_kib).unwrap_or(0);
    let mlschat_ds::client::RawConnection {
        endpoint,
        connection,
        mut send,
        recv,
    } = group.publisher;
    let publisher_errors = Arc::new(AtomicU64::new(0));
    let publisher_reader = ds::spawn_publisher_reader(recv, Arc::clone(&publisher_errors));
    let sampler = Sampler::start(pid);
    let cpu = CpuClock::start(pid);
    let group_id = group.group_id.as_bytes().to_vec();
    let publishing = {
        let tracker = Arc::clone(&tracker);
        tokio::spawn(async move {
            for index in 0..messages {
                tracker.before_send(index).await;
                let frame = ds::send_frame(
                    10 + index as u32,
                    ds::fake_application(&group_id, 1, PAYLOAD),
                    None,
                );
                if send.write_all(&frame.encode()).await.is_err() {
                    return send;
                }
            }
            send
        })
    };
    let outcome = tracker.finish(STALL).await;
    let (cpu_us_per_delivery, clients_cpu_us_per_delivery) =
        cpu.per_delivery(messages * subscribers);
    let peak_kib = sampler.finish().await;
    if let Ok(mut send) = publishing.await {
        let _ = send.finish();
    }
    publisher_reader.abort();
    for reader in readers {
        reader.abort();
    }
    connection.close(0u32.into(), b"done");
    drop(endpoint);
    let stream_errors = errors.load(Ordering::Relaxed) + publisher_errors.load(Ordering::Relaxed);
    if stream_errors > 0 && outcome.lost == 0 {
        bail!("{stream_errors} DS protocol errors during the run");
    }
    Ok((
        outcome,
        ServerUse {
            before_kib,
            idle_kib,
            peak_kib,
            cpu_us_per_delivery,
            clients_cpu_us_per_delivery,
        },
    ))
}

/// The same run through a broker.
pub async fn run_broker(
    broker: Broker,
    subscribers: usize,
    messages: usize,
    window: usize,
) -> Result<(Outcome, ServerUse)> {
    let pid = brokers::pid_of(broker.process());
    let before_kib = pid.and_then(vm_rss_kib).unwrap_or(0);
    let topic = format!("bench-{}", run_id());
    let tracker = Tracker::new(messages, subscribers as u32, window);
    let subscribed = {
        let tracker = Arc::clone(&tracker);
        brokers::subscribe(
            broker,
            &topic,
            subscribers,
            Arc::new(move |bytes| {
                if let Some(index) = index_of(bytes) {
                    tracker.delivered(index);
                }
            }),
        )
        .await?
    };
    let mut publisher = Publisher::connect(broker, subscribers).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_kib = pid.and_then(vm_rss_kib).unwrap_or(0);
    let sampler = Sampler::start(pid);
    let cpu = CpuClock::start(pid);
    let publishing = {
        let tracker = Arc::clone(&tracker);
        let topic = topic.clone();
        tokio::spawn(async move {
            for index in 0..messages {
                tracker.before_send(index).await;
                if publisher
                    .publish(&topic, payload(index, PAYLOAD))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            publisher
        })
    };
    let outcome = tracker.finish(STALL).await;
    let (cpu_us_per_delivery, clients_cpu_us_per_delivery) =
        cpu.per_delivery(messages * subscribers);
    let peak_kib = sampler.finish().await;
    if let Ok(publisher) = publishing.await {
        let short = publisher.short_publishes();
        publisher.close().await;
        if short > 0 && outcome.lost == 0 {
            bail!("{short} publishes reached fewer subscribers than subscribed");
        }
    }
    let failed = subscribed.failed();
    drop(subscribed);
    if failed > 0 && outcome.lost == 0 {
        bail!("{failed} subscriber connections failed during the run");
    }
    Ok((
        outcome,
        ServerUse {
            before_kib,
            idle_kib,
            peak_kib,
            cpu_us_per_delivery,
            clients_cpu_us_per_delivery,
        },
    ))
}

fn check_loss(failures: &Failures, what: &str, outcome: &Outcome) {
    if outcome.lost > 0 || outcome.duplicates > 0 {
        failures.lost(format!(
            "{what}: {} of {} deliveries lost, {} duplicates",
            outcome.lost,
            outcome.messages as u64 * u64::from(outcome.subscribers),
            outcome.duplicates
        ));
    }
}

#[derive(Default)]
struct Series {
    rates: Vec<f64>,
    usage: Vec<ServerUse>,
    missing: Option<String>,
}

impl Series {
    /// The medians over rounds of the server's and the clients' CPU time per delivery, as
    /// text for a note.
    fn cpu_per_delivery(&self) -> String {
        let text = |pick: fn(&ServerUse) -> Option<f64>| {
            let values: Vec<f64> = self.usage.iter().filter_map(pick).collect();
            if values.is_empty() {
                "?".to_string()
            } else {
                format!("{:.1}", median(&values))
            }
        };
        format!(
            "{} + {} us",
            text(|usage| usage.cpu_us_per_delivery),
            text(|usage| usage.clients_cpu_us_per_delivery)
        )
    }
}

/// Figures 2 and 6 for the given subscriber counts, A B A B: in each round the DS, then each
/// broker, on the same machine state.
pub async fn figures(
    settings: &Settings,
    sizes: &[usize],
    want_fanout: bool,
    want_memory: bool,
    failures: &Failures,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for &subscribers in sizes {
        let budget = if settings.quick { 20_000 } else { 200_000 };
        let messages = (budget / subscribers).max(100);
        let rounds = settings.rounds;
        let mut series: BTreeMap<&'static str, Series> = BTreeMap::new();
        let ds = match DsProcess::spawn().await {
            Ok(ds) => ds,
            Err(error) => {
                failures.error(format!("fan-out: cannot start the DS: {error:#}"));
                continue;
            }
        };
        let drops_before = udp_rcvbuf_errors();
        for round in 0..rounds {
            eprintln!(
                "  fig 2/6: {subscribers} subscribers, round {}/{rounds}",
                round + 1
            );
            match run_ds(&ds, subscribers, messages).await {
                Ok((outcome, usage)) => {
                    check_loss(failures, &format!("fig 2 DS n={subscribers}"), &outcome);
                    let entry = series.entry("mlschat DS").or_default();
                    entry.rates.push(outcome.deliveries_per_second());
                    entry.usage.push(usage);
                }
                Err(error) => failures.lost(format!("fig 2 DS n={subscribers}: {error:#}")),
            }
            for broker in Broker::ALL {
                let entry = series.entry(broker.name()).or_default();
                if entry.missing.is_some() {
                    continue;
                }
                if let Err(error) = brokers::check(broker).await {
                    entry.missing = Some(format!("{error:#}"));
                    continue;
                }
                match run_broker(broker, subscribers, messages, WINDOW).await {
                    Ok((outcome, usage)) => {
                        check_loss(
                            failures,
                            &format!("fig 2 {} n={subscribers}", broker.name()),
                            &outcome,
                        );
                        entry.rates.push(outcome.deliveries_per_second());
                        entry.usage.push(usage);
                    }
                    Err(error) => entry.missing = Some(format!("{error:#}")),
                }
            }
        }
        let drops_after = udp_rcvbuf_errors();
        let drops = match (drops_before, drops_after) {
            (Some(before), Some(after)) => format!("UDP RcvbufErrors +{}", after - before),
            _ => "UDP RcvbufErrors unreadable".into(),
        };
        ds.stop().await;
        let ours = series.get("mlschat DS").map(|s| median(&s.rates));
        if want_fanout {
            for broker in Broker::ALL {
                let Some(ours) = ours else { break };
                let peer = series.get(broker.name());
                let cpu = |name: &str| {
                    series
                        .get(name)
                        .map_or_else(|| "unreadable".into(), Series::cpu_per_delivery)
                };
                let mut row = Row::new(2, "fan-out deliveries/s", subscribers, "deliveries/s")
                    .ours(ours)
                    .note(format!(
                        "{messages} msgs x {rounds} rounds, window {WINDOW}; CPU per delivery, \
                         server + clients: DS {}, {} {}; {drops}",
                        cpu("mlschat DS"),
                        broker.process(),
                        cpu(broker.name()),
                    ));
                row = match peer {
                    Some(Series {
                        missing: Some(why), ..
                    }) => row.peer_missing(broker.name(), why),
                    Some(series) if !series.rates.is_empty() => {
                        row.peer(broker.name(), Some(median(&series.rates)))
                    }
                    _ => row.peer_missing(broker.name(), "no run completed"),
                };
                row = match (broker, subscribers) {
                    (Broker::Nats, 1000) => row.target(">= 0.5x NATS", 0.5, true),
                    (Broker::Nats, _) => row.target(">= 1.0x NATS", 1.0, true),
                    (Broker::Mqtt, _) => row.target(">= 1.0x Mosquitto", 1.0, true),
                    _ => row,
                };
                rows.push(row);
            }
        }
        if want_memory {
            let ds_memory = series
                .get("mlschat DS")
                .map(|s| s.usage.clone())
                .unwrap_or_default();
            let nats = series.get(Broker::Nats.name());
            for (metric, pick) in [
                (
                    "memory per idle client",
                    ServerUse::idle_per_client as fn(&ServerUse, usize) -> f64,
                ),
                (
                    "memory per client under fig 2 load",
                    ServerUse::load_per_client,
                ),
            ] {
                // The first round only: the DS process is fresh then, and later rounds reuse
                // memory its allocator kept (the deltas would understate the cost).
                let Some(first) = ds_memory.first() else {
                    continue;
                };
                let mut row =
                    Row::new(6, metric, subscribers, "KiB/client").ours(pick(first, subscribers));
                row = match nats {
                    Some(Series {
                        missing: Some(why), ..
                    }) => row.peer_missing("nats-server", why),
                    Some(series) if !series.usage.is_empty() => {
                        row.peer("nats-server", Some(pick(&series.usage[0], subscribers)))
                    }
                    _ => row.peer_missing("nats-server", "no run completed"),
                };
                rows.push(
                    row.note("VmRSS delta of the server process / connections; lower is better"),
                );
            }
        }
    }
    rows
}
