//! Starting a client: choose the DS (or host one in-process), then start the core thread and
//! the network task and connect them with channels.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mlschat_ds::LocalServer;
use mlschat_ds::config::Limits;
use mlschat_ds::protocol::UserName;
use mlschat_ds::tls::{self, CertFingerprint};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::core::{self, Command, CoreConfig, CoreEvent, CoreInput, CoreSender};
use crate::net::{self, NetConfig};

/// Where a client without `--server` looks for a DS, and hosts one if nobody answers.
pub const DEFAULT_SERVER: &str = "127.0.0.1:4433";
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a client that lost the race to host the local DS waits for the winner's to answer.
const HOSTING_RACE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Core(#[from] core::CoreError),
    #[error("cannot host a local DS: {0}")]
    LocalServer(String),
    #[error("--server-cert-sha256: {0}")]
    Pin(String),
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub name: UserName,
    pub data_dir: PathBuf,
    /// `None`: the default server, hosted in-process if nobody answers.
    pub server: Option<String>,
    pub pinned: Option<String>,
    pub auto_update: Option<Duration>,
    /// See [`CoreConfig::sync_delay`](crate::core::CoreConfig::sync_delay).
    pub sync_delay: Duration,
}

impl ClientOptions {
    pub fn new(name: UserName, data_dir: PathBuf) -> ClientOptions {
        ClientOptions {
            name,
            data_dir,
            server: None,
            pinned: None,
            auto_update: Some(Duration::from_secs(7 * 24 * 3600)),
            sync_delay: crate::core::DEFAULT_SYNC_DELAY,
        }
    }
}

/// The default profile directory of a user.
pub fn default_data_dir(name: &UserName) -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "mlschat")
        .map(|dirs| dirs.data_dir().join(name.as_str()))
}

/// A running client: send commands on `inputs`, read events from `events`.
pub struct Client {
    pub inputs: CoreSender,
    pub events: UnboundedReceiver<CoreEvent>,
    pub fingerprint: String,
    pub server: String,
    /// Set when this client hosts the DS itself; it stops when the client does.
    pub hosted: Option<LocalServer>,
    core_thread: Option<std::thread::JoinHandle<()>>,
    net_task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Starts a client on the current tokio runtime.
    pub async fn start(options: ClientOptions) -> Result<Client, StartError> {
        let mut pinned = match &options.pinned {
            Some(hex) => Some(
                CertFingerprint::from_hex(hex)
                    .map_err(|error| StartError::Pin(error.to_string()))?,
            ),
            None => None,
        };
        let mut hosted = None;
        let server = match &options.server {
            Some(server) => server.clone(),
            None => {
                if !ds_answers(DEFAULT_SERVER, pinned).await {
                    match host_local_ds(&options.data_dir).await {
                        Ok(local) => {
                            tracing::info!(address = %local.address(), "hosting a local DS");
                            pinned = Some(local.fingerprint());
                            hosted = Some(local);
                        }
                        // Another client on this machine may be starting the same local DS at
                        // this moment (it holds `local-ds`, or the port): use that one once it
                        // answers.
                        Err(error) => {
                            if !ds_answers_within(DEFAULT_SERVER, pinned, HOSTING_RACE_WAIT).await {
                                return Err(error);
                            }
                            tracing::info!(%error, "another client hosts the local DS");
                        }
                    }
                }
                DEFAULT_SERVER.to_string()
            }
        };
        let (inputs, core_inputs) = std::sync::mpsc::channel::<CoreInput>();
        let (event_sender, events) = unbounded_channel();
        let (net_commands, net_inbox) = unbounded_channel();
        let mut config = CoreConfig::new(options.data_dir.clone(), options.name.clone());
        config.auto_update = options.auto_update;
        config.sync_delay = options.sync_delay;
        let (fingerprint, core_thread) =
            core::spawn(config, core_inputs, event_sender, net_commands)?;
        let net_config = NetConfig {
            server: server.clone(),
            pinned,
            known_servers: options.data_dir.join("known_servers"),
        };
        let net_task = tokio::spawn(net::run(net_config, inputs.clone(), net_inbox));
        Ok(Client {
            inputs,
            events,
            fingerprint,
            server,
            hosted,
            core_thread: Some(core_thread),
            net_task,
        })
    }

    /// Waits for the core thread (after `Command::Quit`) and the network task to end, then
    /// stops a hosted DS.
    pub async fn finish(mut self) {
        if let Some(thread) = self.core_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.net_task).await;
        if let Some(hosted) = self.hosted.take() {
            hosted.shutdown().await;
        }
    }
}

impl Drop for Client {
    /// A client dropped without [`Client::finish`] stops its core at once (two `Quit`s: no
    /// waiting for the outbox, whose items are stored for the next start). Otherwise the
    /// network task, which holds a sender to the core, would keep the core thread, and with it
    /// the profile's lock, alive until the process ends.
    fn drop(&mut self) {
        for _ in 0..2 {
            let _ = self.inputs.send(CoreInput::Command(Command::Quit));
        }
    }
}

/// Whether a DS answers at `server` within `wait`, probing again until then.
async fn ds_answers_within(server: &str, pinned: Option<CertFingerprint>, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if ds_answers(server, pinned).await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a DS answers at `server` (a QUIC handshake with ALPN `mlschat/1` completes).
async fn ds_answers(server: &str, pinned: Option<CertFingerprint>) -> bool {
    let Ok(Some(address)) = tokio::net::lookup_host(server)
        .await
        .map(|mut addresses| addresses.next())
    else {
        return false;
    };
    let Ok((config, _presented)) = tls::client_config_first_use(pinned) else {
        return false;
    };
    let Ok(bind) = "0.0.0.0:0".parse() else {
        return false;
    };
    let Ok(mut endpoint) = tls::bind_endpoint(bind, None, 256 * 1024) else {
        return false;
    };
    endpoint.set_default_client_config(config);
    let Ok(connecting) = endpoint.connect(address, "mlschat-ds") else {
        return false;
    };
    let answered = matches!(
        tokio::time::timeout(PROBE_TIMEOUT, connecting).await,
        Ok(Ok(_))
    );
    endpoint.close(0u32.into(), b"probe");
    answered
}

/// Hosts a DS on the default address. Its data lives beside the profiles (`local-ds`), so
/// whichever local user hosts it, it has the same certificate and the same queued messages.
async fn host_local_ds(profile_dir: &Path) -> Result<LocalServer, StartError> {
    let ds_dir = profile_dir.parent().unwrap_or(profile_dir).join("local-ds");
    let address = DEFAULT_SERVER
        .parse()
        .map_err(|_| StartError::LocalServer("bad default address".into()))?;
    LocalServer::start(address, &ds_dir, Limits::default())
        .await
        .map_err(|error| StartError::LocalServer(error.to_string()))
}
