//! The DS server: [`run`] accepts QUIC connections on an endpoint and serves them until the
//! shutdown future completes, in the manner of mini-redis. [`LocalServer`] wraps it for tests
//! and for a client hosting a DS in-process.

mod connection;
pub mod handlers;
pub mod hub;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::config::Limits;
use crate::protocol::ErrorCode;
use crate::store::{RemoteAppend, SqliteStore, Store};
use crate::tls::{self, CertFingerprint, ServerIdentity};
use connection::Shared;
use hub::{Hub, Publication};

/// How long shutdown waits for connections to finish their in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Counts connections per address and in total; a slot is released when dropped.
#[derive(Default)]
struct ConnectionCounter {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

struct ConnectionSlot {
    counter: Arc<ConnectionCounter>,
    ip: IpAddr,
}

impl ConnectionCounter {
    fn total(&self) -> usize {
        self.per_ip
            .lock()
            .map(|map| map.values().sum())
            .unwrap_or(0)
    }

    fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &Limits,
    ) -> Result<ConnectionSlot, &'static str> {
        let mut per_ip = self
            .per_ip
            .lock()
            .map_err(|_| "connection accounting failed")?;
        let total: usize = per_ip.values().sum();
        if total >= limits.max_connections {
            return Err("the DS is at its connection limit");
        }
        let count = per_ip.entry(ip).or_default();
        if *count >= limits.max_connections_per_ip {
            return Err("too many connections from this address");
        }
        *count += 1;
        Ok(ConnectionSlot {
            counter: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Ok(mut per_ip) = self.counter.per_ip.lock()
            && let Some(count) = per_ip.get_mut(&self.ip)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Serves `endpoint` with `store` until `shutdown` completes, then stops accepting, lets every
/// connection finish its in-flight requests (bounded by a grace period), closes them and
/// closes the store. When `run` returns, every write is finished and on disk.
pub async fn run<S: Store>(
    endpoint: quinn::Endpoint,
    store: S,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let limits = Arc::new(limits);
    let shared = Arc::new(Shared {
        store: Arc::new(store),
        hub: Arc::new(Hub::default()),
        limits: Arc::clone(&limits),
        next_session_id: AtomicU64::new(1),
    });
    let counter = Arc::new(ConnectionCounter::default());
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let purger = tokio::spawn(purge_periodically(
        Arc::clone(&shared.store),
        Arc::clone(&limits),
    ));
    // Messages other DS nodes accepted (shared-database backends only) wake this node's
    // sessions; their delivery tasks read them from the store.
    let remote = shared
        .store
        .remote_appends()
        .map(|remote| tokio::spawn(wake_for_remote_appends(Arc::clone(&shared.hub), remote)));
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = &mut shutdown => break,
        };
        let Some(incoming) = incoming else { break };
        let ip = incoming.remote_address().ip();
        // Address validation costs the client one round trip, so ask for it only under load.
        if counter.total() >= limits.retry_above_connections
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            let _ = incoming.retry();
            continue;
        }
        let slot = match counter.try_acquire(ip, &limits) {
            Ok(slot) => slot,
            Err(reason) => {
                tracing::warn!(%ip, reason, "connection refused");
                incoming.refuse();
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let stopping = stopping.clone();
        connections.spawn(async move {
            let _slot = slot;
            match incoming.await {
                Ok(connection) => connection::serve(connection, shared, stopping).await,
                Err(error) => tracing::debug!(%error, "handshake failed"),
            }
        });
    }
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    endpoint.set_server_config(None);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("grace period over; closing the remaining connections");
        connections.abort_all();
    }
    purger.abort();
    if let Some(remote) = remote {
        remote.abort();
    }
    // The aborted tasks may still have writes queued in the store: `close` finishes them
    // before it releases the database.
    shared.store.close().await;
    endpoint.close(
        (ErrorCode::ShuttingDown as u16).into(),
        b"the DS is shutting down",
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!("shut down");
}

async fn wake_for_remote_appends(
    hub: Arc<Hub>,
    mut remote: tokio::sync::mpsc::Receiver<RemoteAppend>,
) {
    while let Some(append) = remote.recv().await {
        match append {
            RemoteAppend::Appended {
                group_id,
                seq,
                added,
                removed,
            } => hub.publish(Publication {
                group_id: &group_id,
                seq,
                frame: None,
                welcome_frame: None,
                added: &added,
                removed: &removed,
                not_to: None,
            }),
            RemoteAppend::ResyncAll => hub.resync_all(),
        }
    }
}

async fn purge_periodically<S: Store>(store: Arc<S>, limits: Arc<Limits>) {
    let mut interval =
        tokio::time::interval(Duration::from_secs(limits.purge_interval_secs.max(1)));
    loop {
        interval.tick().await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0);
        let expire_before = i64::try_from(now.saturating_sub(limits.retention_secs)).unwrap_or(0);
        match store.purge(expire_before).await {
            Ok(purged) if purged != crate::store::Purged::default() => {
                tracing::info!(
                    messages = purged.messages,
                    memberships = purged.memberships,
                    key_packages = purged.key_packages,
                    idempotency_records = purged.idempotency_records,
                    "purged"
                );
            }
            Ok(_) => {}
            Err(failure) => tracing::error!(%failure, "purge failed"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the bound address: {0}")]
    LocalAddr(std::io::Error),
    /// The data directory or its database is in use by another process.
    #[error("{0}")]
    InUse(#[from] crate::dir_lock::DirLockError),
}

/// A DS running on the current tokio runtime, with its SQLite store and certificate in
/// `data_dir`. Used by tests and by the client when it hosts a DS itself.
pub struct LocalServer {
    address: SocketAddr,
    fingerprint: CertFingerprint,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl LocalServer {
    /// Starts a DS on `listen` (port 0 picks a free port).
    pub async fn start(
        listen: SocketAddr,
        data_dir: &Path,
        limits: Limits,
    ) -> Result<LocalServer, StartError> {
        limits.validate()?;
        crate::config::create_data_dir(data_dir).map_err(|source| StartError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let data_dir_lock = crate::dir_lock::lock(data_dir)?;
        let database = data_dir.join("ds.sqlite3");
        // As `mlschat-ds` does: an `mlschat-ds --database` pointed at this file is refused.
        let database_lock = crate::dir_lock::lock_database(&database)?;
        let (identity, _generated) = ServerIdentity::load_or_generate(data_dir)?;
        let fingerprint = identity.fingerprint();
        let store = SqliteStore::open(&database, limits.store_limits())?;
        let reset_key = tls::StatelessResetKey::load_or_generate(data_dir)?;
        let endpoint = tls::bind_server_endpoint(
            listen,
            tls::server_config(identity, &limits)?,
            &reset_key,
            limits.udp_buffer_bytes,
        )?;
        let address = endpoint.local_addr().map_err(StartError::LocalAddr)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            run(endpoint, store, limits, async move {
                let _ = stopped.await;
            })
            .await;
            // Let go only once the store is closed, even when the LocalServer was dropped
            // without waiting for its shutdown: a DS started next on the directory must not
            // open the database beside this one.
            drop(database_lock);
            drop(data_dir_lock);
        });
        Ok(LocalServer {
            address,
            fingerprint,
            stop: Some(stop),
            task,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn fingerprint(&self) -> CertFingerprint {
        self.fingerprint
    }

    /// Shuts down gracefully and waits until it is done.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
