//! The DS under test: a child process that runs `mlschat_ds::run` with a `SqliteStore` exactly as
//! the `mlschat-ds` binary's main does (so its memory and CPU are its own, like nats-server's),
//! and raw protocol sessions that drive it with opaque ciphertext.

use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use ed25519_dalek::SigningKey;
use mlschat_ds::client::{RawConnection, read_frame};
use mlschat_ds::config::Limits;
use mlschat_ds::protocol::{
    Ack, CommitRouting, CreateGroup, DeliveryKind, Frame, GroupId, Send as SendRequest, UserName,
};
use mlschat_ds::store::SqliteStore;
use mlschat_ds::tls::{self, CertFingerprint, ServerIdentity};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
use tokio::process::{Child, Command};

/// The limits of the DS under test: the defaults, except the ones that would throttle a
/// benchmark driven from one address (per-connection request rate, KeyPackage claims,
/// connections per IP, group backlog). Everything else (durability, buffers) is the default.
pub fn bench_limits() -> Limits {
    Limits {
        requests_per_second: 10_000_000,
        request_burst: 10_000_000,
        key_package_claims_per_minute: 10_000_000,
        max_connections_per_ip: 10_000,
        retry_above_connections: 10_000,
        max_group_backlog: 100_000_000,
        ..Limits::default()
    }
}

/// `mlschat-bench __ds-server DIR`: what `mlschat-ds --data-dir DIR` does, on a free port, with
/// [`bench_limits`]; prints `READY <address> <fingerprint>` and stops when stdin closes.
pub fn serve_child(data_dir: &Path) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let limits = bench_limits();
        limits.validate()?;
        mlschat_ds::config::create_data_dir(data_dir)?;
        let (identity, _) = ServerIdentity::load_or_generate(data_dir)?;
        let fingerprint = identity.fingerprint();
        let store = SqliteStore::open(data_dir.join("ds.sqlite3"), limits.store_limits())?;
        let listen: SocketAddr = "127.0.0.1:0".parse()?;
        let reset_key = tls::StatelessResetKey::load_or_generate(data_dir)?;
        let endpoint = tls::bind_server_endpoint(
            listen,
            tls::server_config(identity, &limits)?,
            &reset_key,
            limits.udp_buffer_bytes,
        )?;
        println!("READY {} {}", endpoint.local_addr()?, fingerprint.to_hex());
        mlschat_ds::run(endpoint, store, limits, async {
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        })
        .await;
        Ok(())
    })
}

/// Where a DS listens and the certificate to pin.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub address: SocketAddr,
    pub fingerprint: CertFingerprint,
}

/// A DS child process with its own data directory.
pub struct DsProcess {
    child: Child,
    pub target: Target,
    _dir: tempfile::TempDir,
}

/// A copy of this binary made at first use, to run as the DS child. Figure 8 builds the
/// `mlschat` binary, and that build may relink this very binary; a child started from
/// `current_exe()` afterwards would find its file gone.
fn ds_child_binary() -> Result<PathBuf> {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(path) = COPY.get() {
        return Ok(path.clone());
    }
    let original = std::env::current_exe()?;
    let copy = original.with_file_name(format!("mlschat-bench-ds-child-{}", std::process::id()));
    std::fs::copy(&original, &copy).context("cannot copy the bench binary for the DS child")?;
    Ok(COPY.get_or_init(|| copy).clone())
}

/// Makes the DS child's copy of this binary now, before anything can relink the original.
pub fn prepare_ds_child_binary() -> Result<()> {
    ds_child_binary().map(|_| ())
}

/// Removes the DS child's copy of this binary (call once, at exit).
pub fn remove_ds_child_binary() {
    let Ok(original) = std::env::current_exe() else {
        return;
    };
    let copy = original.with_file_name(format!("mlschat-bench-ds-child-{}", std::process::id()));
    let _ = std::fs::remove_file(copy);
}

impl DsProcess {
    pub async fn spawn() -> Result<DsProcess> {
        let dir = tempfile::Builder::new()
            .prefix("mlschat-bench-ds")
            .tempdir()?;
        let mut child = Command::new(ds_child_binary()?)
            .arg("__ds-server")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the DS child process")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| anyhow!("the DS did not start within 30 s"))??
            .context("the DS exited before it was ready")?;
        let mut words = line.split_whitespace();
        if words.next() != Some("READY") {
            bail!("unexpected DS output: {line}");
        }
        let address: SocketAddr = words.next().context("no address")?.parse()?;
        let fingerprint = CertFingerprint::from_hex(words.next().context("no fingerprint")?)?;
        Ok(DsProcess {
            child,
            target: Target {
                address,
                fingerprint,
            },
            _dir: dir,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Closes stdin (the DS shuts down gracefully) and waits, killing it after 15 s.
    pub async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A user with its signing key.
pub struct User {
    pub name: UserName,
    key: SigningKey,
}

impl User {
    pub fn new(name: &str) -> Result<User> {
        Ok(User {
            name: UserName::new(name).map_err(|error| anyhow!("{name}: {error}"))?,
            key: SigningKey::from_bytes(&rand::random()),
        })
    }
}

/// Connects and registers `user`; returns once the DS said `Authenticated`.
pub async fn connect(target: Target, user: &User) -> Result<RawConnection> {
    let mut connection = RawConnection::connect(target.address, target.fingerprint).await?;
    let register = connection.register_frame(1, &user.name, &user.key)?;
    connection.send_frame(&register).await?;
    loop {
        match connection.next_frame().await? {
            Some(Frame::Authenticated(_)) => return Ok(connection),
            Some(Frame::Error(error)) => bail!(
                "register {} failed: {}",
                user.name,
                String::from_utf8_lossy(error.message.as_slice())
            ),
            Some(_) => {}
            None => bail!("the DS closed the stream during registration"),
        }
    }
}

/// Waits for the response to `request_id`, skipping pushes.
pub async fn response(connection: &mut RawConnection, request_id: u32) -> Result<Frame> {
    loop {
        match connection.next_frame().await? {
            Some(frame) if frame.request_id() == Some(request_id) => return Ok(frame),
            Some(_) => {}
            None => bail!("the DS closed the stream"),
        }
    }
}

fn vl(bytes: &[u8], out: &mut Vec<u8>) {
    assert!(bytes.len() < 64, "short vectors only");
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

/// A PublicMessage commit header (RFC 9420 §6) followed by opaque bytes: what the DS peeks at.
pub fn fake_commit(group_id: &[u8], epoch: u64) -> Vec<u8> {
    let mut out = vec![0, 1, 0, 1];
    vl(group_id, &mut out);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.push(1); // sender: member
    out.extend_from_slice(&0u32.to_be_bytes());
    out.push(0); // empty authenticated_data
    out.push(3); // commit
    out.extend_from_slice(&[0xc0; 64]);
    out
}

/// A Welcome's first bytes (version, wire format, cipher suite) and opaque rest.
pub fn fake_welcome() -> Vec<u8> {
    let mut out = vec![0, 1, 0, 3, 0, 1];
    out.extend_from_slice(&[0x77; 64]);
    out
}

/// A PrivateMessage application message of `len` bytes in all: the clear header, then opaque
/// bytes standing in for the ciphertext.
pub fn fake_application(group_id: &[u8], epoch: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0, 1, 0, 2];
    vl(group_id, &mut out);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.push(1); // application
    out.resize(len.max(out.len()), 0xa5);
    out
}

pub fn send_frame(request_id: u32, message: Vec<u8>, commit: Option<CommitRouting>) -> Frame {
    Frame::Send(SendRequest {
        request_id,
        // Made as the client makes them.
        client_message_id: mlschat_ds::protocol::new_client_message_id(),
        message: message.into(),
        commit,
    })
}

/// A group on the DS with one publisher and `subscribers` members besides it, built with one
/// commit that adds them all. The group is at epoch 1 afterwards; seq 1 is that commit.
pub struct DsGroup {
    pub group_id: GroupId,
    pub publisher: RawConnection,
    pub subscribers: Vec<RawConnection>,
}

/// Registers a publisher and `subscribers` users (connected, so they receive the Welcome live).
pub async fn setup_group(target: Target, run: &str, subscribers: usize) -> Result<DsGroup> {
    let publisher_user = User::new(&format!("p{run}"))?;
    let mut publisher = connect(target, &publisher_user).await?;
    let raw_id: [u8; 16] = rand::random();
    let group_id = GroupId::new(raw_id.to_vec()).map_err(|error| anyhow!("{error}"))?;
    publisher
        .send_frame(&Frame::CreateGroup(CreateGroup {
            request_id: 2,
            group_id: group_id.clone(),
        }))
        .await?;
    match response(&mut publisher, 2).await? {
        Frame::GroupCreated(_) => {}
        other => bail!("CreateGroup failed: {other:?}"),
    }
    let users: Vec<User> = (0..subscribers)
        .map(|index| User::new(&format!("s{run}-{index}")))
        .collect::<Result<_>>()?;
    let mut connections = Vec::with_capacity(subscribers);
    for chunk in users.chunks(50) {
        let connected =
            futures::future::join_all(chunk.iter().map(|user| connect(target, user))).await;
        for connection in connected {
            connections.push(connection?);
        }
    }
    let routing = CommitRouting {
        welcome: Some(fake_welcome().into()),
        added: users.iter().map(|user| user.name.clone()).collect(),
        removed: Vec::new(),
    };
    publisher
        .send_frame(&send_frame(3, fake_commit(&raw_id, 0), Some(routing)))
        .await?;
    match response(&mut publisher, 3).await? {
        Frame::Accepted(accepted) if accepted.seq == 1 && accepted.epoch == 1 => {}
        other => bail!("the commit adding the subscribers failed: {other:?}"),
    }
    Ok(DsGroup {
        group_id,
        publisher,
        subscribers: connections,
    })
}

/// Reads a subscriber's stream: the Welcome (seq 1) signals `ready`, every later delivery is
/// passed to `on_delivery(seq)`. Acknowledges every `ack_every` deliveries, as a client that
/// batches its acknowledgements would. Errors and a closed stream are counted.
pub fn spawn_subscriber(
    connection: RawConnection,
    ready: tokio::sync::oneshot::Sender<()>,
    on_delivery: Arc<dyn Fn(u64) + Send + Sync>,
    errors: Arc<AtomicU64>,
    ack_every: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let RawConnection {
            endpoint,
            connection,
            mut send,
            mut recv,
        } = connection;
        let _keep = (endpoint, connection);
        let mut ready = Some(ready);
        let mut received = 0u64;
        loop {
            match read_frame(&mut recv).await {
                Ok(Some(Frame::Deliver(delivery))) => {
                    if delivery.kind == DeliveryKind::Welcome as u8 {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                        continue;
                    }
                    on_delivery(delivery.seq);
                    received += 1;
                    if received.is_multiple_of(ack_every) {
                        let ack = Frame::Ack(Ack {
                            group_id: delivery.group_id,
                            seq: delivery.seq,
                        });
                        if send.write_all(&ack.encode()).await.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
                Ok(Some(Frame::Error(_))) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    })
}

/// Drains the publisher's stream (Accepted answers; the DS pushes it no copy of its own
/// messages), counting errors.
pub fn spawn_publisher_reader(
    mut recv: quinn::RecvStream,
    errors: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match read_frame(&mut recv).await {
                Ok(Some(Frame::Error(_))) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlschat_ds::protocol::mls::{ContentType, WireFormat, peek_message_header};

    #[test]
    fn fake_messages_pass_the_header_peek() {
        let group = [7u8; 16];
        let commit = peek_message_header(&fake_commit(&group, 3)).expect("commit header");
        assert_eq!(commit.wire_format, WireFormat::PublicMessage);
        assert_eq!(commit.content_type, ContentType::Commit);
        assert_eq!(commit.epoch, 3);
        let application = fake_application(&group, 1, 1024);
        assert_eq!(application.len(), 1024);
        let header = peek_message_header(&application).expect("application header");
        assert_eq!(header.wire_format, WireFormat::PrivateMessage);
        assert_eq!(header.group_id, group);
        assert_eq!(header.content_type, ContentType::Application);
    }
}
