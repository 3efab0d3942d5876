//! The broker peers, driven with their standard client crates: NATS (async-nats), Redis pub/sub
//! (redis with tokio) and Mosquitto (rumqttc). Each gets N subscriber connections and one
//! publisher connection on loopback, relaying opaque bytes with no encryption and no
//! persistence (NATS core, Redis PUBLISH, MQTT QoS 0).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use futures::StreamExt as _;
use tokio::task::JoinHandle;

pub const NATS_URL: &str = "127.0.0.1:4222";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";
pub const MQTT_HOST: &str = "127.0.0.1";
pub const MQTT_PORT: u16 = 1883;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections opened at once while setting up subscribers.
const CONNECT_PARALLELISM: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Nats,
    Redis,
    Mqtt,
}

impl Broker {
    pub const ALL: [Broker; 3] = [Broker::Nats, Broker::Redis, Broker::Mqtt];

    pub fn name(self) -> &'static str {
        match self {
            Broker::Nats => "NATS",
            Broker::Redis => "Redis",
            Broker::Mqtt => "Mosquitto",
        }
    }

    /// The server process's name, for memory readings.
    pub fn process(self) -> &'static str {
        match self {
            Broker::Nats => "nats-server",
            Broker::Redis => "redis-server",
            Broker::Mqtt => "mosquitto",
        }
    }

    /// Whether the broker answers on its port (a plain TCP connect).
    pub async fn reachable(self) -> Result<()> {
        let address = match self {
            Broker::Nats => NATS_URL.to_string(),
            Broker::Redis => "127.0.0.1:6379".to_string(),
            Broker::Mqtt => format!("{MQTT_HOST}:{MQTT_PORT}"),
        };
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&address))
            .await
            .map_err(|_| anyhow!("connect to {address} timed out"))?
            .with_context(|| format!("connect to {address}"))?;
        Ok(())
    }
}

/// The pid of a running process by its name (first match in /proc).
pub fn pid_of(process: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() == process {
            return Some(pid);
        }
    }
    None
}

pub type OnMessage = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Subscriber connections; dropping this closes them.
pub struct Subscribers {
    tasks: Vec<JoinHandle<()>>,
    /// Subscriber connections that ended during the run (their deliveries are then lost, which
    /// the tracker reports).
    errors: Arc<AtomicU64>,
}

impl Subscribers {
    pub fn failed(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Opens `count` subscriber connections to `topic`, each calling `on_message` per message, and
/// returns once every subscription is active on the server.
pub async fn subscribe(
    broker: Broker,
    topic: &str,
    count: usize,
    on_message: OnMessage,
) -> Result<Subscribers> {
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(count);
    let mut started = 0;
    while started < count {
        let chunk = (count - started).min(CONNECT_PARALLELISM);
        let mut pending = Vec::with_capacity(chunk);
        for index in started..started + chunk {
            pending.push(subscribe_one(
                broker,
                topic.to_string(),
                index,
                Arc::clone(&on_message),
                Arc::clone(&errors),
            ));
        }
        for task in futures::future::join_all(pending).await {
            tasks.push(task?);
        }
        started += chunk;
    }
    Ok(Subscribers { tasks, errors })
}

async fn subscribe_one(
    broker: Broker,
    topic: String,
    index: usize,
    on_message: OnMessage,
    errors: Arc<AtomicU64>,
) -> Result<JoinHandle<()>> {
    match broker {
        Broker::Nats => {
            let client = tokio::time::timeout(
                CONNECT_TIMEOUT,
                async_nats::ConnectOptions::new()
                    .subscription_capacity(1 << 16)
                    .connect(NATS_URL),
            )
            .await
            .map_err(|_| anyhow!("NATS connect timed out"))??;
            let mut subscription = client.subscribe(topic).await?;
            // The server has the SUB once a flush round trip completes.
            client.flush().await?;
            Ok(tokio::spawn(async move {
                let _client = client;
                while let Some(message) = subscription.next().await {
                    on_message(&message.payload);
                }
                errors.fetch_add(1, Ordering::Relaxed);
            }))
        }
        Broker::Redis => {
            let client = redis::Client::open(REDIS_URL)?;
            let mut pubsub =
                tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await??;
            pubsub.subscribe(&topic).await?;
            Ok(tokio::spawn(async move {
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    on_message(message.get_payload_bytes());
                }
                errors.fetch_add(1, Ordering::Relaxed);
            }))
        }
        Broker::Mqtt => {
            use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
            let mut options = MqttOptions::new(
                format!("bench-sub-{}-{index}", std::process::id()),
                MQTT_HOST,
                MQTT_PORT,
            );
            options.set_keep_alive(Duration::from_secs(60));
            options.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut eventloop) = AsyncClient::new(options, 64);
            client.subscribe(topic, QoS::AtMostOnce).await?;
            let (ready, subscribed) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(async move {
                let _client = client;
                let mut ready = Some(ready);
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::Publish(publish))) => {
                            on_message(&publish.payload)
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(ready) = ready.take() {
                                let _ = ready.send(());
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            });
            tokio::time::timeout(CONNECT_TIMEOUT, subscribed)
                .await
                .map_err(|_| anyhow!("MQTT subscribe timed out"))?
                .map_err(|_| anyhow!("MQTT subscriber failed before its SUBACK"))?;
            Ok(task)
        }
    }
}

/// One publisher connection.
pub enum Publisher {
    Nats(async_nats::Client),
    Redis {
        connection: redis::aio::MultiplexedConnection,
        expected_receivers: i64,
        short: Arc<AtomicU64>,
    },
    Mqtt {
        client: rumqttc::AsyncClient,
        task: JoinHandle<()>,
    },
}

impl Publisher {
    /// `receivers`: how many subscribers every message must reach (checked where the broker
    /// reports it: Redis answers PUBLISH with the receiver count).
    pub async fn connect(broker: Broker, receivers: usize) -> Result<Publisher> {
        Ok(match broker {
            Broker::Nats => Publisher::Nats(
                tokio::time::timeout(CONNECT_TIMEOUT, async_nats::connect(NATS_URL))
                    .await
                    .map_err(|_| anyhow!("NATS connect timed out"))??,
            ),
            Broker::Redis => {
                let client = redis::Client::open(REDIS_URL)?;
                Publisher::Redis {
                    connection: tokio::time::timeout(
                        CONNECT_TIMEOUT,
                        client.get_multiplexed_async_connection(),
                    )
                    .await??,
                    expected_receivers: receivers as i64,
                    short: Arc::new(AtomicU64::new(0)),
                }
            }
            Broker::Mqtt => {
                use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
                let mut options = MqttOptions::new(
                    format!("bench-pub-{}-{}", std::process::id(), rand::random::<u32>()),
                    MQTT_HOST,
                    MQTT_PORT,
                );
                options.set_keep_alive(Duration::from_secs(60));
                options.set_max_packet_size(1 << 20, 1 << 20);
                let (client, mut eventloop) = AsyncClient::new(options, 1024);
                let (ready, connected) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(async move {
                    let mut ready = Some(ready);
                    loop {
                        match eventloop.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                if let Some(ready) = ready.take() {
                                    let _ = ready.send(());
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                });
                tokio::time::timeout(CONNECT_TIMEOUT, connected)
                    .await
                    .map_err(|_| anyhow!("MQTT connect timed out"))?
                    .map_err(|_| anyhow!("MQTT publisher failed before its CONNACK"))?;
                Publisher::Mqtt { client, task }
            }
        })
    }

    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<()> {
        match self {
            Publisher::Nats(client) => {
                client
                    .publish(topic.to_string(), payload.into())
                    .await
                    .map_err(|error| anyhow!("NATS publish: {error}"))?;
            }
            Publisher::Redis {
                connection,
                expected_receivers,
                short,
            } => {
                // Pipelined: the reply (receiver count) is checked without holding up the
                // next publish, as a NATS or MQTT publish does not wait either.
                let mut connection = connection.clone();
                let expected = *expected_receivers;
                let short = Arc::clone(short);
                let topic = topic.to_string();
                tokio::spawn(async move {
                    let receivers: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                        .arg(topic)
                        .arg(payload)
                        .query_async(&mut connection)
                        .await;
                    if !matches!(receivers, Ok(count) if count >= expected) {
                        short.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            Publisher::Mqtt { client, .. } => {
                client
                    .publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
                    .await?;
            }
        }
        Ok(())
    }

    /// Publishes that a broker reported as reaching fewer subscribers than expected.
    pub fn short_publishes(&self) -> u64 {
        match self {
            Publisher::Redis { short, .. } => short.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    pub async fn close(self) {
        match self {
            Publisher::Nats(client) => {
                let _ = client.flush().await;
            }
            Publisher::Redis { .. } => {}
            Publisher::Mqtt { client, task } => {
                let _ = client.disconnect().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                task.abort();
            }
        }
    }
}

/// Fails unless the broker answers; the caller reports it as missing.
pub async fn check(broker: Broker) -> Result<()> {
    if let Err(error) = broker.reachable().await {
        bail!("{} not reachable: {error:#}", broker.name());
    }
    Ok(())
}
