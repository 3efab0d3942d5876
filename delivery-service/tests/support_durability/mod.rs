//! Helpers for tests that run the real `mlschat-ds` binary: a process guard that kills the DS
//! on drop, and a small pipelining protocol client on top of `mlschat_ds::client`.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use mlschat_ds::client::{ChallengeSigner, RawConnection, read_frame};
use mlschat_ds::protocol::{
    ClientMessageId, CommitRouting, Delivery, ErrorCode, Fetch, Frame, GroupId, Send, Seq, UserName,
};
use mlschat_ds::tls::CertFingerprint;
use tls_codec::Serialize as _;
use tokio::sync::mpsc;

/// How long the DS may take to print its address and fingerprint.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one request may take to be answered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `mlschat-ds` process. Dropping it kills the process (SIGKILL) and reaps it.
pub struct DsProcess {
    child: Option<Child>,
    pub address: SocketAddr,
    pub fingerprint: CertFingerprint,
    pub data_dir: PathBuf,
    /// Every stdout line the process printed before it reported its fingerprint.
    pub startup_lines: Vec<String>,
}

/// How to start the DS.
pub struct DsOptions<'a> {
    pub data_dir: &'a Path,
    /// A `--database` URL; the default SQLite database in `data_dir` when `None`.
    pub database: Option<&'a str>,
    /// A TOML config file (`--config`).
    pub config: Option<&'a Path>,
    /// The value of RUST_LOG.
    pub rust_log: &'a str,
    /// Where stderr goes (appended); discarded when `None`.
    pub stderr_log: Option<&'a Path>,
}

impl DsProcess {
    pub fn start(options: DsOptions<'_>) -> DsProcess {
        DsProcess::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), options)
    }

    /// [`DsProcess::start`] on `listen`: the address of a DS that ran before, to start it again.
    pub fn start_on(listen: SocketAddr, options: DsOptions<'_>) -> DsProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mlschat-ds"));
        command
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--data-dir")
            .arg(options.data_dir)
            .env("RUST_LOG", options.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if let Some(config) = options.config {
            command.arg("--config").arg(config);
        }
        if let Some(database) = options.database {
            command.arg("--database").arg(database);
        }
        match options.stderr_log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("open the DS log file");
                command.stderr(Stdio::from(file));
            }
            None => {
                command.stderr(Stdio::null());
            }
        }
        let mut child = command.spawn().expect("start mlschat-ds");
        let stdout = child.stdout.take().expect("piped stdout");
        // The guard owns the child from here on, so a failed start still kills it.
        let mut guard = DsProcess {
            child: Some(child),
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            fingerprint: CertFingerprint([0; 32]),
            data_dir: options.data_dir.to_path_buf(),
            startup_lines: Vec::new(),
        };
        let (lines, received) = std_mpsc::channel::<String>();
        // Reads stdout to the end so that the DS never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Once nobody listens any more, keep draining anyway.
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut address = None;
        let mut fingerprint = None;
        while address.is_none() || fingerprint.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match received.recv_timeout(left) {
                Ok(line) => line,
                Err(error) => {
                    let status = guard.try_exit_status();
                    panic!(
                        "mlschat-ds did not report its address and fingerprint ({error}); it printed {:?}; exit status {status:?}",
                        guard.startup_lines
                    )
                }
            };
            if let Some(rest) = line.strip_prefix("mlschat-ds listening on ") {
                address = Some(rest.trim().parse().expect("a socket address"));
            }
            if let Some(rest) = line.strip_prefix("certificate SHA-256: ") {
                fingerprint = Some(CertFingerprint::from_hex(rest.trim()).expect("a fingerprint"));
            }
            guard.startup_lines.push(line);
        }
        guard.address = address.expect("address");
        guard.fingerprint = fingerprint.expect("fingerprint");
        guard
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a child process").id()
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (through `kill(1)`: the crate forbids unsafe code, so no libc).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`TERM`, `HUP`, ...) through `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// Waits for the process to exit on its own, up to `timeout`. `None` if it did not.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for DsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a config file that lifts the per-connection request rate limits, so that a test may
/// pipeline thousands of requests.
pub fn write_unthrottled_config(path: &Path) {
    std::fs::write(
        path,
        "[limits]\nrequests_per_second = 1000000\nrequest_burst = 1000000\n",
    )
    .expect("write the DS config file");
}

/// An authenticated connection whose incoming frames are read by a background task and sorted
/// into responses and pushed deliveries.
pub struct Client {
    pub user: UserName,
    send: quinn::SendStream,
    connection: quinn::Connection,
    endpoint: quinn::Endpoint,
    reader: AbortOnDrop,
    pub responses: mpsc::UnboundedReceiver<Frame>,
    pub deliveries: mpsc::UnboundedReceiver<Delivery>,
    next_request_id: u32,
}

impl Client {
    /// Connects and registers `user` with `signer`'s key (or authenticates if `register` is false).
    pub async fn connect(
        address: SocketAddr,
        fingerprint: CertFingerprint,
        user: &UserName,
        signer: &impl ChallengeSigner,
        register: bool,
    ) -> Client {
        let mut raw = RawConnection::connect(address, fingerprint)
            .await
            .expect("connect to the DS");
        let hello = if register {
            raw.register_frame(1, user, signer)
        } else {
            raw.authenticate_frame(1, user, signer)
        }
        .expect("authentication frame");
        raw.send_frame(&hello).await.expect("send authentication");
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, raw.next_frame())
            .await
            .expect("authentication answered in time")
            .expect("read the authentication answer");
        match answer {
            Some(Frame::Authenticated(authenticated)) => {
                assert_eq!(&authenticated.user_name, user);
            }
            other => panic!("authentication of {user} failed: {other:?}"),
        }
        let RawConnection {
            endpoint,
            connection,
            send,
            mut recv,
        } = raw;
        let (responses_in, responses) = mpsc::unbounded_channel();
        let (deliveries_in, deliveries) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Ok(Some(frame)) = read_frame(&mut recv).await {
                let routed = match frame {
                    Frame::Deliver(delivery) => deliveries_in.send(delivery).is_ok(),
                    other => responses_in.send(other).is_ok(),
                };
                if !routed {
                    break;
                }
            }
        });
        Client {
            user: user.clone(),
            send,
            connection,
            endpoint,
            reader: AbortOnDrop(reader),
            responses,
            deliveries,
            next_request_id: 2,
        }
    }

    pub fn next_request_id(&mut self) -> u32 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    pub async fn send_frame(&mut self, frame: &Frame) {
        self.send
            .write_all(&frame.encode())
            .await
            .expect("write a frame");
    }

    /// The next non-delivery frame, or `None` if the connection ended or nothing came in time.
    pub async fn next_response(&mut self, timeout: Duration) -> Option<Frame> {
        tokio::time::timeout(timeout, self.responses.recv())
            .await
            .ok()
            .flatten()
    }

    /// Sends one request and waits for the answer with the same request id.
    pub async fn request(&mut self, build: impl FnOnce(u32) -> Frame) -> Frame {
        let id = self.next_request_id();
        let frame = build(id);
        self.send_frame(&frame).await;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, self.responses.recv())
            .await
            .unwrap_or_else(|_| panic!("request {id} ({:?}) not answered in time", frame.kind()))
            .unwrap_or_else(|| panic!("the connection ended before request {id} was answered"));
        assert_eq!(
            answer.request_id(),
            Some(id),
            "unexpected frame while waiting for request {id}: {answer:?}"
        );
        answer
    }

    pub async fn create_group(&mut self, group_id: &GroupId) {
        let answer = self
            .request(|request_id| {
                Frame::CreateGroup(mlschat_ds::protocol::CreateGroup {
                    request_id,
                    group_id: group_id.clone(),
                })
            })
            .await;
        assert!(
            matches!(answer, Frame::GroupCreated(_)),
            "CreateGroup failed: {answer:?}"
        );
    }

    /// Sends one MLS message and returns the `Accepted` (seq, epoch).
    pub async fn send_message(
        &mut self,
        client_message_id: ClientMessageId,
        message: &[u8],
        commit: Option<CommitRouting>,
    ) -> (Seq, u64) {
        let answer = self
            .request(|request_id| {
                Frame::Send(Send {
                    request_id,
                    client_message_id,
                    message: message.into(),
                    commit,
                })
            })
            .await;
        match answer {
            Frame::Accepted(accepted) => (accepted.seq, accepted.epoch),
            other => panic!("Send was not accepted: {other:?}"),
        }
    }

    /// Every delivery after `after` in the group, following pages.
    pub async fn fetch_all(&mut self, group_id: &GroupId, after: Seq) -> Vec<Delivery> {
        let mut all: Vec<Delivery> = Vec::new();
        let mut after = after;
        for _ in 0..10_000 {
            let answer = self
                .request(|request_id| {
                    Frame::Fetch(Fetch {
                        request_id,
                        group_id: group_id.clone(),
                        after_seq: after,
                        limit: 1000,
                    })
                })
                .await;
            let Frame::Messages(page) = answer else {
                panic!("Fetch failed: {answer:?}");
            };
            if let Some(last) = page.messages.last() {
                after = last.seq;
            }
            all.extend(page.messages);
            if page.more == 0 {
                return all;
            }
        }
        panic!("Fetch never reported the end of the log");
    }

    /// Splits off the sending half for a pipelining writer task; responses keep arriving on
    /// `responses`.
    pub fn into_parts(self) -> (quinn::SendStream, ClientReceiver) {
        let Client {
            user,
            send,
            connection,
            endpoint,
            reader,
            responses,
            deliveries,
            next_request_id: _,
        } = self;
        (
            send,
            ClientReceiver {
                user,
                connection,
                endpoint,
                reader,
                responses,
                deliveries,
            },
        )
    }

    /// Ends the connection gracefully: finishes our side and waits until the DS has finished
    /// its side, which it does only after every request it read (acks included) completed.
    pub async fn disconnect(mut self) {
        let _ = self.send.finish();
        let drained = tokio::time::timeout(REQUEST_TIMEOUT, async {
            while self.responses.recv().await.is_some() {}
        })
        .await;
        assert!(drained.is_ok(), "the DS did not finish the stream in time");
        self.close();
    }

    pub fn close(self) {
        self.connection.close(0u32.into(), b"bye");
        self.reader.abort();
        drop(self.endpoint);
    }
}

/// Aborts the frame reader task when the connection handle goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    fn abort(&self) {
        self.0.abort();
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The receiving half of a [`Client`] whose send stream went to a writer task.
pub struct ClientReceiver {
    pub user: UserName,
    pub connection: quinn::Connection,
    endpoint: quinn::Endpoint,
    reader: AbortOnDrop,
    pub responses: mpsc::UnboundedReceiver<Frame>,
    pub deliveries: mpsc::UnboundedReceiver<Delivery>,
}

impl ClientReceiver {
    /// Closes the connection locally without waiting for the peer (which may be dead).
    pub fn abandon(self) {
        self.connection.close(0u32.into(), b"abandoned");
        self.reader.abort();
        drop(self.endpoint);
    }
}

/// A fake PrivateMessage: the DS reads only the clear header (version, wire format, group id,
/// epoch, content type); the rest is opaque.
pub fn private_message(group_id: &GroupId, epoch: u64, content_type: u8, body: &[u8]) -> Vec<u8> {
    let mut message = vec![0x00, 0x01, 0x00, 0x02];
    tls_codec::VLBytes::new(group_id.as_bytes().to_vec())
        .tls_serialize(&mut message)
        .expect("encode the group id");
    message.extend_from_slice(&epoch.to_be_bytes());
    message.push(content_type);
    message.extend_from_slice(body);
    message
}

/// A fake Welcome (wire format 3).
pub fn fake_welcome(body: &[u8]) -> Vec<u8> {
    let mut welcome = vec![0x00, 0x01, 0x00, 0x03];
    welcome.extend_from_slice(body);
    welcome
}

/// A distinct client message id per (tag, n).
pub fn message_id(tag: u8, n: u64) -> ClientMessageId {
    let mut id = [0u8; 16];
    id[0] = tag;
    id[8..].copy_from_slice(&n.to_be_bytes());
    id
}

pub fn user(name: &str) -> UserName {
    UserName::new(name).expect("valid user name")
}

/// The error code of an `Error` frame.
pub fn error_code(frame: &Frame) -> Option<ErrorCode> {
    match frame {
        Frame::Error(error) => ErrorCode::from_u16(error.code),
        _ => None,
    }
}
