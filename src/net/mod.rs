//! The only place quinn is called on the client: connect to the DS with a pinned (or
//! first-use) certificate, reconnect with backoff, and shuttle frames between the connection's
//! stream and the core. It knows nothing of MLS; authentication is the core's business.

pub mod known_servers;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use mlschat_ds::client::read_frame;
use mlschat_ds::protocol::{EXPORTER_LABEL, EXPORTER_LEN, Frame};
use mlschat_ds::tls::{self, CertFingerprint};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::core::{CoreInput, CoreSender};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the network tells the core. `generation` numbers connections so the core can ignore
/// frames of a connection that has since been replaced.
#[derive(Debug)]
pub enum NetEvent {
    Connected {
        generation: u64,
        exporter: [u8; EXPORTER_LEN],
        server: String,
    },
    Frame {
        generation: u64,
        frame: Frame,
    },
    Disconnected {
        generation: u64,
        reason: String,
    },
    /// The server cannot be trusted (its certificate changed); no more attempts are made.
    Fatal {
        reason: String,
    },
}

/// What the core asks of the network.
#[derive(Debug)]
pub enum NetCommand {
    /// Write an encoded frame if connection `generation` is still the current one.
    Send {
        generation: u64,
        frame: Bytes,
    },
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// `host:port` of the DS.
    pub server: String,
    /// A fingerprint given on the command line; otherwise the known-servers file decides.
    pub pinned: Option<CertFingerprint>,
    /// The trust-on-first-use record (`known_servers` in the profile directory).
    pub known_servers: PathBuf,
}

/// Runs the connection loop until the core asks it to stop or the server is untrustworthy.
pub async fn run(config: NetConfig, core: CoreSender, mut commands: UnboundedReceiver<NetCommand>) {
    let mut backoff = FIRST_BACKOFF;
    let mut generation = 0u64;
    loop {
        generation += 1;
        let outcome = connect(&config).await;
        let (endpoint, connection) = match outcome {
            Ok(connected) => connected,
            Err(ConnectFailure::Untrusted(reason)) => {
                let _ = core.send(CoreInput::Net(NetEvent::Fatal { reason }));
                return;
            }
            Err(ConnectFailure::Unreachable(reason)) => {
                if core
                    .send(CoreInput::Net(NetEvent::Disconnected {
                        generation,
                        reason,
                    }))
                    .is_err()
                {
                    return;
                }
                // Keep draining commands while waiting so the core is never blocked.
                let wait = tokio::time::sleep(jittered(backoff));
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        () = &mut wait => break,
                        command = commands.recv() => match command {
                            None | Some(NetCommand::Shutdown) => return,
                            Some(NetCommand::Send { .. }) => {}
                        },
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = FIRST_BACKOFF;
        let stop = serve(generation, &config, &connection, &core, &mut commands).await;
        connection.close(0u32.into(), b"bye");
        // Give the close frame a moment to leave, without waiting on an unreachable peer.
        let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
        if stop {
            return;
        }
    }
}

fn jittered(base: Duration) -> Duration {
    let jitter = rand::random::<u64>() % (base.as_millis() as u64 / 2 + 1);
    base + Duration::from_millis(jitter)
}

enum ConnectFailure {
    Unreachable(String),
    Untrusted(String),
}

async fn connect(
    config: &NetConfig,
) -> Result<(quinn::Endpoint, quinn::Connection), ConnectFailure> {
    let address = tokio::net::lookup_host(&config.server)
        .await
        .map_err(|error| {
            ConnectFailure::Unreachable(format!("cannot resolve {}: {error}", config.server))
        })?
        .next()
        .ok_or_else(|| {
            ConnectFailure::Unreachable(format!("{} resolves to no address", config.server))
        })?;
    let known = known_servers::lookup(&config.known_servers, &config.server)
        .map_err(|error| ConnectFailure::Untrusted(error.to_string()))?;
    let expected = config.pinned.or(known);
    let (client_config, presented) = tls::client_config_first_use(expected)
        .map_err(|error| ConnectFailure::Unreachable(error.to_string()))?;
    let bind = if address.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let bind = bind
        .parse()
        .map_err(|_| ConnectFailure::Unreachable("bad bind address".into()))?;
    let mut endpoint = tls::bind_endpoint(bind, None, 4 * 1024 * 1024)
        .map_err(|error| ConnectFailure::Unreachable(error.to_string()))?;
    endpoint.set_default_client_config(client_config);
    let connecting = endpoint
        .connect(address, "mlschat-ds")
        .map_err(|error| ConnectFailure::Unreachable(error.to_string()))?;
    let result = tokio::time::timeout(CONNECT_TIMEOUT, connecting).await;
    let presented = presented.lock().ok().and_then(|slot| *slot);
    match result {
        Ok(Ok(connection)) => {
            if expected.is_none()
                && let Some(fingerprint) = presented
            {
                known_servers::pin(&config.known_servers, &config.server, fingerprint)
                    .map_err(|error| ConnectFailure::Untrusted(error.to_string()))?;
                tracing::info!(server = %config.server, %fingerprint, "pinned the server certificate on first use");
            }
            Ok((endpoint, connection))
        }
        Ok(Err(error)) => match (expected, presented) {
            // Pinned on the command line, never seen before: nothing "changed", the pin is
            // not the server's (or this is not the server meant).
            (Some(expected), Some(presented)) if expected != presented && known.is_none() => {
                Err(ConnectFailure::Untrusted(format!(
                    "the certificate of {} is not the one given with --server-cert-sha256: \
                     expected SHA-256 {expected}, presented {presented}. Check the fingerprint \
                     with the operator of {}",
                    config.server, config.server
                )))
            }
            (Some(expected), Some(presented)) if expected != presented => {
                Err(ConnectFailure::Untrusted(format!(
                    "the certificate of {} changed: pinned SHA-256 {expected}, presented {presented}. \
                 If the operator really replaced it, remove the line for {} from {} (or pass \
                 --server-cert-sha256 {presented}) and start again",
                    config.server,
                    config.server,
                    config.known_servers.display()
                )))
            }
            _ => Err(ConnectFailure::Unreachable(format!(
                "cannot connect to {}: {error}",
                config.server
            ))),
        },
        Err(_) => Err(ConnectFailure::Unreachable(format!(
            "no answer from {}",
            config.server
        ))),
    }
}

/// Serves one connection. Returns true when the client is shutting down.
async fn serve(
    generation: u64,
    config: &NetConfig,
    connection: &quinn::Connection,
    core: &CoreSender,
    commands: &mut UnboundedReceiver<NetCommand>,
) -> bool {
    let (mut send, mut recv) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(error) => {
            let _ = core.send(CoreInput::Net(NetEvent::Disconnected {
                generation,
                reason: error.to_string(),
            }));
            return false;
        }
    };
    let mut exporter = [0u8; EXPORTER_LEN];
    if connection
        .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .is_err()
    {
        let _ = core.send(CoreInput::Net(NetEvent::Disconnected {
            generation,
            reason: "no TLS exporter".into(),
        }));
        return false;
    }
    if core
        .send(CoreInput::Net(NetEvent::Connected {
            generation,
            exporter,
            server: config.server.clone(),
        }))
        .is_err()
    {
        return true;
    }
    // Reading is not cancel-safe, so it runs in its own task and forwards frames to the core.
    let reader_core = core.clone();
    let mut reader = tokio::spawn(async move {
        loop {
            match read_frame(&mut recv).await {
                Ok(Some(frame)) => {
                    if reader_core
                        .send(CoreInput::Net(NetEvent::Frame { generation, frame }))
                        .is_err()
                    {
                        return "client stopped".to_string();
                    }
                }
                Ok(None) => return "the DS closed the stream".to_string(),
                Err(error) => return error.to_string(),
            }
        }
    });
    let reason = loop {
        tokio::select! {
            ended = &mut reader => {
                let reason = ended.unwrap_or_else(|error| error.to_string());
                // Prefer the DS's own close reason when it gave one.
                break match connection.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(close)) => {
                        format!("the DS closed the connection: {} (code {})", String::from_utf8_lossy(&close.reason), close.error_code)
                    }
                    Some(other) => other.to_string(),
                    None => reason,
                };
            }
            command = commands.recv() => match command {
                None | Some(NetCommand::Shutdown) => {
                    let _ = send.finish();
                    reader.abort();
                    return true;
                }
                Some(NetCommand::Send { generation: wanted, frame }) => {
                    if wanted == generation && send.write_all(&frame).await.is_err() {
                        // The reader notices the broken connection and reports it.
                        continue;
                    }
                }
            },
        }
    };
    let _ = core.send(CoreInput::Net(NetEvent::Disconnected {
        generation,
        reason,
    }));
    false
}
