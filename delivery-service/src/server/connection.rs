//! One task per QUIC connection: frame reading on the connection's single stream, the
//! authentication phase, dispatch of requests to handlers, the writer that batches answers, and
//! the delivery task that writes each group's messages in order without gaps into the same stream.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::ReadExactError;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument as _;

use super::handlers::{self, RequestContext, store_error};
use super::hub::{Hub, Notification, Push, SESSION_QUEUE, SessionHandle};
use crate::config::Limits;
use crate::protocol::{
    AUTHENTICATE_LABEL, Authenticated, AuthenticationTbs, Delivery, DeliveryKind, EXPORTER_LABEL,
    EXPORTER_LEN, ErrorCode, FRAME_HEADER_LEN, Frame, FrameError, FrameHeader, FrameKind, GroupId,
    Pong, REGISTER_LABEL, SIGNATURE_KEY_LEN, Seq, UserName,
};
use crate::store::{Membership, PendingAppend, Store, StoreError};

/// Frames queued for the writer before producers wait.
const OUTBOX: usize = 1024;
/// Live deliveries gathered into one write at most.
const DELIVERY_BATCH: usize = 256;
/// Deliveries read from the store per page during catch-up.
const CATCH_UP_PAGE: u32 = 256;
/// `Register` attempts that may fail on one connection before it is closed. Without a bound a
/// connection could probe which names are taken until its authentication deadline.
const MAX_FAILED_REGISTRATIONS: u32 = 5;
/// How long a closing connection's delivery task may take to finish the frames it is writing.
const DELIVERY_STOP: Duration = Duration::from_secs(1);

/// State shared by every connection of one server.
pub struct Shared<S> {
    pub store: Arc<S>,
    pub hub: Arc<Hub>,
    pub limits: Arc<Limits>,
    pub next_session_id: AtomicU64,
}

enum Outgoing {
    Frame(Bytes),
    /// Finish the stream, wait (briefly) until the peer has it all, then answer.
    Finish(oneshot::Sender<()>),
}

#[derive(Clone)]
struct Outbox(mpsc::Sender<Outgoing>);

impl Outbox {
    async fn send(&self, frame: Frame) -> bool {
        self.send_bytes(Bytes::from(frame.encode())).await
    }

    async fn send_bytes(&self, frame: Bytes) -> bool {
        self.0.send(Outgoing::Frame(frame)).await.is_ok()
    }

    async fn finish(&self) {
        let (done, finished) = oneshot::channel();
        if self.0.send(Outgoing::Finish(done)).await.is_ok() {
            let _ = finished.await;
        }
    }
}

/// The connection's one send stream, shared by the writer task (answers to requests) and the
/// delivery task (deliveries), so that a delivery goes from the hub to the stream through one
/// task instead of two. Each holder writes whole frames while it holds the lock, so frames never
/// interleave.
type SharedSend = Arc<tokio::sync::Mutex<quinn::SendStream>>;

/// Writes outgoing frames, coalescing whatever is queued into one write.
async fn write_frames(send: SharedSend, mut queue: mpsc::Receiver<Outgoing>) {
    // Grows with the first batches it carries, not up front: most connections are idle most of
    // the time, and 64 slots would cost each of them 2 KiB.
    let mut batch: Vec<Bytes> = Vec::new();
    while let Some(first) = queue.recv().await {
        let mut finish = None;
        match first {
            Outgoing::Frame(frame) => batch.push(frame),
            Outgoing::Finish(done) => finish = Some(done),
        }
        while finish.is_none() && batch.len() < 256 {
            match queue.try_recv() {
                Ok(Outgoing::Frame(frame)) => batch.push(frame),
                Ok(Outgoing::Finish(done)) => finish = Some(done),
                Err(_) => break,
            }
        }
        let mut send = send.lock().await;
        if !batch.is_empty() && send.write_all_chunks(&mut batch).await.is_err() {
            return;
        }
        batch.clear();
        if let Some(done) = finish {
            let _ = send.finish();
            let stopped = send.stopped();
            drop(send);
            let _ = tokio::time::timeout(Duration::from_millis(500), stopped).await;
            let _ = done.send(());
            return;
        }
    }
}

/// The delivery task's side of the send stream: frames gathered, then written together.
struct Deliveries {
    send: SharedSend,
    pending: Vec<Bytes>,
}

impl Deliveries {
    fn push(&mut self, frame: Bytes) {
        self.pending.push(frame);
    }

    /// Writes what was gathered. Returns false when the stream is gone.
    async fn flush(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let written = self
            .send
            .lock()
            .await
            .write_all_chunks(&mut self.pending)
            .await
            .is_ok();
        self.pending.clear();
        written
    }
}

/// Why reading stopped.
enum ReadFailure {
    /// The peer broke a protocol rule: answer with this code and close.
    Fatal(ErrorCode, String),
    /// The stream or connection went away.
    Gone,
}

struct FrameReader {
    recv: quinn::RecvStream,
    max_send_bytes: u32,
}

impl FrameReader {
    /// The next frame, or `None` at a clean end of stream.
    async fn next(&mut self) -> Result<Option<Frame>, ReadFailure> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        match self.recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(ReadExactError::FinishedEarly(_)) => {
                return Err(ReadFailure::Fatal(
                    ErrorCode::MalformedFrame,
                    "stream ended inside a frame header".into(),
                ));
            }
            Err(ReadExactError::ReadError(_)) => return Err(ReadFailure::Gone),
        }
        // The header is checked before anything is allocated for the body.
        let header = FrameHeader::parse(&header).map_err(|error| {
            let code = match error {
                FrameError::UnknownKind(_) => ErrorCode::UnknownFrameKind,
                FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                FrameError::TruncatedHeader | FrameError::Malformed(_) => ErrorCode::MalformedFrame,
            };
            ReadFailure::Fatal(code, error.to_string())
        })?;
        if header.kind as u16 & 0x8000 != 0 {
            return Err(ReadFailure::Fatal(
                ErrorCode::UnexpectedFrame,
                format!("{:?} frames are sent by the DS, not to it", header.kind),
            ));
        }
        if header.kind == FrameKind::Send && header.body_len > self.max_send_bytes {
            return Err(ReadFailure::Fatal(
                ErrorCode::MessageTooLarge,
                format!(
                    "Send of {} bytes exceeds this DS's limit of {} bytes",
                    header.body_len, self.max_send_bytes
                ),
            ));
        }
        let mut body = vec![0u8; header.body_len as usize];
        match self.recv.read_exact(&mut body).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(_)) => {
                return Err(ReadFailure::Fatal(
                    ErrorCode::MalformedFrame,
                    "stream ended inside a frame body".into(),
                ));
            }
            Err(ReadExactError::ReadError(_)) => return Err(ReadFailure::Gone),
        }
        Frame::decode(header.kind, &body)
            .map(Some)
            .map_err(|error| ReadFailure::Fatal(ErrorCode::MalformedFrame, error.to_string()))
    }
}

/// Token bucket for the per-connection request rate.
struct RateLimiter {
    tokens: f64,
    burst: f64,
    per_second: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    fn new(per_second: f64, burst: u32) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            tokens: burst,
            burst,
            per_second,
            refilled_at: Instant::now(),
        }
    }

    /// Every request of a connection.
    fn requests(limits: &Limits) -> RateLimiter {
        RateLimiter::new(f64::from(limits.requests_per_second), limits.request_burst)
    }

    /// `ClaimKeyPackage` requests of a connection: a burst of a minute's worth, then the rate.
    fn key_package_claims(limits: &Limits) -> RateLimiter {
        let per_minute = limits.key_package_claims_per_minute;
        RateLimiter::new(f64::from(per_minute) / 60.0, per_minute)
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.refilled_at = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn verify_signature(signature_key: &[u8], signed: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = <[u8; SIGNATURE_KEY_LEN]>::try_from(signature_key) else {
        return false;
    };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&key) else {
        return false;
    };
    let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    key.verify_strict(signed, &signature).is_ok()
}

/// The end of a connection.
struct Closing {
    request_id: u32,
    code: ErrorCode,
    message: String,
}

impl Closing {
    fn new(request_id: u32, code: ErrorCode, message: impl Into<String>) -> Closing {
        Closing {
            request_id,
            code,
            message: message.into(),
        }
    }
}

/// Sends the closing error as a frame (best effort) and as the QUIC close reason (authoritative).
async fn close_with(connection: &quinn::Connection, outbox: &Outbox, closing: Closing) {
    tracing::debug!(code = %closing.code, reason = %closing.message, "closing connection");
    outbox
        .send(Frame::error(
            closing.request_id,
            closing.code,
            None,
            &closing.message,
        ))
        .await;
    outbox.finish().await;
    connection.close((closing.code as u16).into(), closing.message.as_bytes());
}

enum AuthOutcome {
    Authenticated(UserName),
    Closed(Closing),
    Gone,
}

async fn authenticate<S: Store>(
    connection: &quinn::Connection,
    reader: &mut FrameReader,
    outbox: &Outbox,
    shared: &Shared<S>,
) -> AuthOutcome {
    let mut exporter = [0u8; EXPORTER_LEN];
    if connection
        .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .is_err()
    {
        return AuthOutcome::Closed(Closing::new(
            0,
            ErrorCode::Internal,
            "cannot derive the authentication challenge",
        ));
    }
    let mut failed_registrations = 0;
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(ReadFailure::Gone) => return AuthOutcome::Gone,
            Err(ReadFailure::Fatal(code, message)) => {
                return AuthOutcome::Closed(Closing::new(0, code, message));
            }
        };
        match frame {
            Frame::Register(register) => {
                let id = register.request_id;
                let key = register.signature_key.as_slice();
                let signed = AuthenticationTbs::to_signed_bytes(
                    REGISTER_LABEL,
                    &exporter,
                    &register.user_name,
                    key,
                );
                // SECURITY: the signature covers this connection's exporter value, so it proves
                // possession of the key now and cannot be replayed on another connection.
                if !verify_signature(key, &signed, register.signature.as_slice()) {
                    return AuthOutcome::Closed(Closing::new(
                        id,
                        ErrorCode::AuthenticationFailed,
                        "the signature does not verify",
                    ));
                }
                match shared.store.register_user(&register.user_name, key).await {
                    Ok(_) => {
                        let name = register.user_name;
                        outbox
                            .send(Frame::Authenticated(Authenticated {
                                request_id: id,
                                user_name: name.clone(),
                            }))
                            .await;
                        return AuthOutcome::Authenticated(name);
                    }
                    Err(failure) => {
                        failed_registrations += 1;
                        if failed_registrations >= MAX_FAILED_REGISTRATIONS {
                            tracing::debug!(%failure, "too many failed registrations");
                            return AuthOutcome::Closed(Closing::new(
                                id,
                                ErrorCode::AuthenticationFailed,
                                "too many failed registrations on this connection",
                            ));
                        }
                        outbox.send(store_error(id, failure)).await;
                    }
                }
            }
            Frame::Authenticate(authenticate) => {
                let id = authenticate.request_id;
                let key = match shared.store.user_key(&authenticate.user_name).await {
                    Ok(Some(key)) => key,
                    Ok(None) => {
                        return AuthOutcome::Closed(Closing::new(
                            id,
                            ErrorCode::AuthenticationFailed,
                            "unknown user",
                        ));
                    }
                    Err(failure) => {
                        tracing::error!(%failure, "store failure during authentication");
                        return AuthOutcome::Closed(Closing::new(
                            id,
                            ErrorCode::Internal,
                            "internal storage error",
                        ));
                    }
                };
                let signed = AuthenticationTbs::to_signed_bytes(
                    AUTHENTICATE_LABEL,
                    &exporter,
                    &authenticate.user_name,
                    &key,
                );
                if !verify_signature(&key, &signed, authenticate.signature.as_slice()) {
                    return AuthOutcome::Closed(Closing::new(
                        id,
                        ErrorCode::AuthenticationFailed,
                        "the signature does not verify",
                    ));
                }
                let name = authenticate.user_name;
                outbox
                    .send(Frame::Authenticated(Authenticated {
                        request_id: id,
                        user_name: name.clone(),
                    }))
                    .await;
                return AuthOutcome::Authenticated(name);
            }
            other => {
                let id = other.request_id().unwrap_or(0);
                return AuthOutcome::Closed(Closing::new(
                    id,
                    ErrorCode::NotAuthenticated,
                    "authenticate first",
                ));
            }
        }
    }
}

/// Serves one connection until it ends, the peer breaks the protocol, or the server shuts down.
pub async fn serve<S: Store>(
    connection: quinn::Connection,
    shared: Arc<Shared<S>>,
    shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("connection", id = connection.stable_id(), remote = %connection.remote_address());
    serve_inner(connection, shared, shutdown)
        .instrument(span)
        .await;
}

async fn serve_inner<S: Store>(
    connection: quinn::Connection,
    shared: Arc<Shared<S>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let deadline = tokio::time::Instant::now() + shared.limits.auth_timeout();
    let (send, recv) = match tokio::time::timeout_at(deadline, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(_)) => return,
        Err(_) => {
            connection.close(
                (ErrorCode::AuthenticationTimeout as u16).into(),
                b"no stream opened in time",
            );
            return;
        }
    };
    let (queue, queued) = mpsc::channel(OUTBOX);
    let outbox = Outbox(queue);
    let send: SharedSend = Arc::new(tokio::sync::Mutex::new(send));
    let writer = tokio::spawn(write_frames(Arc::clone(&send), queued));
    let mut reader = FrameReader {
        recv,
        max_send_bytes: shared.limits.max_send_bytes,
    };

    let outcome = tokio::select! {
        outcome = tokio::time::timeout_at(deadline, authenticate(&connection, &mut reader, &outbox, &shared)) => {
            outcome.unwrap_or_else(|_| AuthOutcome::Closed(Closing::new(0, ErrorCode::AuthenticationTimeout, "authentication took too long")))
        }
        _ = shutdown.changed() => AuthOutcome::Closed(Closing::new(0, ErrorCode::ShuttingDown, "the DS is shutting down")),
    };
    let user = match outcome {
        AuthOutcome::Authenticated(user) => user,
        AuthOutcome::Closed(closing) => {
            close_with(&connection, &outbox, closing).await;
            return;
        }
        AuthOutcome::Gone => return,
    };
    tracing::info!(%user, "authenticated");

    let session_id = shared.next_session_id.fetch_add(1, Ordering::Relaxed);
    let (notifications, notified) = mpsc::channel(SESSION_QUEUE);
    let lagged = Arc::new(Notify::new());
    let handle = SessionHandle {
        id: session_id,
        notifications,
        lagged: Arc::clone(&lagged),
        connection: connection.clone(),
    };
    if let Some(replaced) = shared.hub.attach(&user, handle) {
        replaced.close(
            (ErrorCode::SessionReplaced as u16).into(),
            b"another connection authenticated as this user",
        );
    }
    let (stop_delivery, delivery_stopped) = oneshot::channel();
    let mut delivery = tokio::spawn(
        deliver(
            user.clone(),
            session_id,
            Arc::clone(&shared.store),
            Arc::clone(&shared.hub),
            Wakeups {
                notifications: notified,
                lagged,
                stop: delivery_stopped,
            },
            Deliveries {
                send,
                // Grows with use, as the writer's batch does.
                pending: Vec::new(),
            },
        )
        .in_current_span(),
    );

    let context = Arc::new(RequestContext {
        user: user.clone(),
        store: Arc::clone(&shared.store),
        hub: Arc::clone(&shared.hub),
        limits: Arc::clone(&shared.limits),
    });
    let max_in_flight = shared.limits.max_in_flight_requests.max(1);
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let mut handlers = JoinSet::new();
    // Requests that change group state run one at a time, in the order they arrived; see
    // `run_in_order`. Started at the first such request: most of a chat's connections only
    // receive, and an idle one need not hold two more tasks and their channels.
    let mut ordered: Option<OrderedRequests> = None;
    let mut rate = RateLimiter::requests(&shared.limits);
    // SECURITY: each claim consumes one of another user's KeyPackages; a client that claims
    // them in bulk would exhaust them and force everyone onto the last-resort package
    // (RFC 9420 §16.8).
    let mut claims = RateLimiter::key_package_claims(&shared.limits);
    let closing = loop {
        while handlers.try_join_next().is_some() {}
        let next = tokio::select! {
            biased;
            _ = shutdown.changed() => break Some(Closing::new(0, ErrorCode::ShuttingDown, "the DS is shutting down")),
            next = reader.next() => next,
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(ReadFailure::Gone) => break None,
            Err(ReadFailure::Fatal(code, message)) => break Some(Closing::new(0, code, message)),
        };
        if !rate.allow() {
            if let Some(id) = frame.request_id() {
                outbox
                    .send(Frame::error(
                        id,
                        ErrorCode::RateLimited,
                        None,
                        "too many requests; slow down",
                    ))
                    .await;
            }
            continue;
        }
        let request_id = frame.request_id().unwrap_or(0);
        match frame {
            Frame::Register(_) | Frame::Authenticate(_) => {
                outbox
                    .send(Frame::error(
                        request_id,
                        ErrorCode::AlreadyAuthenticated,
                        None,
                        "this connection is already authenticated",
                    ))
                    .await;
            }
            Frame::ClaimKeyPackage(claim) if !claims.allow() => {
                outbox
                    .send(Frame::error(
                        claim.request_id,
                        ErrorCode::RateLimited,
                        None,
                        "too many KeyPackage claims; slow down",
                    ))
                    .await;
            }
            Frame::Ping(ping) => {
                outbox
                    .send(Frame::Pong(Pong {
                        request_id: ping.request_id,
                    }))
                    .await;
            }
            request @ (Frame::Send(_) | Frame::CreateGroup(_)) => {
                let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                    break None;
                };
                let ordered = ordered.get_or_insert_with(|| {
                    OrderedRequests::start(Arc::clone(&context), max_in_flight, outbox.clone())
                });
                if ordered
                    .queue
                    .send((Box::new(request), permit))
                    .await
                    .is_err()
                {
                    break None;
                }
            }
            request => {
                let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                    break None;
                };
                let context = Arc::clone(&context);
                let outbox = outbox.clone();
                handlers.spawn(
                    async move {
                        if let Some(response) = dispatch(&context, request).await {
                            outbox.send(response).await;
                        }
                        drop(permit);
                    }
                    .in_current_span(),
                );
            }
        }
    };
    // Let in-flight requests finish: their writes are durable and their answers get sent.
    if let Some(OrderedRequests { queue, task }) = ordered {
        drop(queue);
        let _ = task.await;
    }
    while handlers.join_next().await.is_some() {}
    shared.hub.detach(&user, session_id);
    // Stopped between writes, so that the stream never ends inside a frame; a peer that stopped
    // reading gets the rest cut off.
    let _ = stop_delivery.send(());
    if tokio::time::timeout(DELIVERY_STOP, &mut delivery)
        .await
        .is_err()
    {
        delivery.abort();
    }
    match closing {
        Some(closing) => close_with(&connection, &outbox, closing).await,
        None => outbox.finish().await,
    }
    drop(outbox);
    let _ = writer.await;
    tracing::info!(%user, "connection ended");
}

/// A connection's queue of `Send` and `CreateGroup` requests, and the task that runs them.
struct OrderedRequests {
    /// Never fills: each queued request holds one of the connection's in-flight permits. Its
    /// requests are boxed: a channel allocates its first block of 32 slots when it is made, and
    /// a whole request frame in each slot would be about 4 KiB.
    queue: mpsc::Sender<(Box<Frame>, OwnedSemaphorePermit)>,
    task: JoinHandle<()>,
}

impl OrderedRequests {
    fn start<S: Store>(
        context: Arc<RequestContext<S>>,
        max_in_flight: usize,
        outbox: Outbox,
    ) -> OrderedRequests {
        let (queue, queued) = mpsc::channel(max_in_flight);
        let task = tokio::spawn(run_in_order(context, queued, outbox).in_current_span());
        OrderedRequests { queue, task }
    }
}

/// Runs a connection's `Send` and `CreateGroup` requests in arrival order.
///
/// Run concurrently, a client's pipelined messages could be sequenced in any order: MLS
/// receivers then see one sender's generations out of order (openmls tolerates only a few by
/// default) and a `Send` could overtake the `CreateGroup` of its group. So each `Send` is
/// checked and queued with the store here, one after the other, and a second task awaits the
/// store's answers in the same order, publishing and answering each. Queued appends are
/// group-committed together, so a pipelining client still gets many messages per fsync.
async fn run_in_order<S: Store>(
    context: Arc<RequestContext<S>>,
    mut queue: mpsc::Receiver<(Box<Frame>, OwnedSemaphorePermit)>,
    outbox: Outbox,
) {
    // Unbounded in type only: each item holds one of the connection's in-flight permits. Boxed
    // for the reason the requests are (5.5 KiB per connection unboxed).
    let (completions, completing) = mpsc::unbounded_channel::<Box<Completion>>();
    let completer = tokio::spawn(
        complete_in_order(Arc::clone(&context), completing, outbox.clone()).in_current_span(),
    );
    while let Some((request, permit)) = queue.recv().await {
        let completion = match *request {
            Frame::Send(send) => match handlers::prepare_send(&context, send) {
                Err(response) => Completion::Answer(response, permit),
                Ok(handlers::PreparedSend { append, routing }) => Completion::Send {
                    routing,
                    pending: context.store.submit_append(append).await,
                    permit,
                },
            },
            other => {
                // A CreateGroup runs once everything sent before it is stored.
                let (done, drained) = oneshot::channel();
                if completions
                    .send(Box::new(Completion::Barrier(done)))
                    .is_err()
                {
                    break;
                }
                let _ = drained.await;
                if let Some(response) = dispatch(&context, other).await {
                    outbox.send(response).await;
                }
                drop(permit);
                continue;
            }
        };
        if completions.send(Box::new(completion)).is_err() {
            break;
        }
    }
    drop(completions);
    let _ = completer.await;
}

/// One ordered request waiting for its answer.
enum Completion {
    Send {
        routing: handlers::SendRouting,
        pending: PendingAppend,
        permit: OwnedSemaphorePermit,
    },
    Answer(Frame, OwnedSemaphorePermit),
    Barrier(oneshot::Sender<()>),
}

async fn complete_in_order<S: Store>(
    context: Arc<RequestContext<S>>,
    mut completing: mpsc::UnboundedReceiver<Box<Completion>>,
    outbox: Outbox,
) {
    while let Some(completion) = completing.recv().await {
        match *completion {
            Completion::Send {
                routing,
                pending,
                permit,
            } => {
                let outcome = pending.outcome().await;
                outbox
                    .send(handlers::complete_send(&context, routing, outcome))
                    .await;
                drop(permit);
            }
            Completion::Answer(response, permit) => {
                outbox.send(response).await;
                drop(permit);
            }
            Completion::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Runs one authenticated request; `None` for requests without a reply (`Ack`).
async fn dispatch<S: Store>(context: &RequestContext<S>, request: Frame) -> Option<Frame> {
    let response = match request {
        Frame::UploadKeyPackages(request) => handlers::upload_key_packages(context, request).await,
        Frame::ClaimKeyPackage(request) => handlers::claim_key_package(context, request).await,
        Frame::CountKeyPackages(request) => handlers::count_key_packages(context, request).await,
        Frame::CreateGroup(request) => handlers::create_group(context, request).await,
        Frame::Send(request) => handlers::send(context, request).await,
        Frame::Fetch(request) => handlers::fetch(context, request).await,
        Frame::Ack(ack) => {
            if let Err(failure) = context
                .store
                .ack(&context.user, &ack.group_id, ack.seq)
                .await
            {
                tracing::warn!(%failure, "ack not stored");
            }
            return None;
        }
        other => {
            // Responses were rejected when their header was read; the rest are handled inline.
            let id = other.request_id().unwrap_or(0);
            Frame::error(id, ErrorCode::UnexpectedFrame, None, "unexpected frame")
        }
    };
    Some(response)
}

/// What wakes a session's delivery task.
struct Wakeups {
    /// Messages accepted since, from the hub.
    notifications: mpsc::Receiver<Notification>,
    /// Signalled when the hub could not queue a notification.
    lagged: Arc<Notify>,
    /// The connection is closing: stop between two writes.
    stop: oneshot::Receiver<()>,
}

/// Pushes every group's messages to one session: first the backlog after the user's cursor,
/// then live messages. Per group, frames go out in seq order without gaps; a wake-up that
/// arrives ahead of a missing seq, or a lost wake-up, is repaired from the store.
async fn deliver<S: Store>(
    user: UserName,
    session_id: u64,
    store: Arc<S>,
    hub: Arc<Hub>,
    wakeups: Wakeups,
    mut out: Deliveries,
) {
    let Wakeups {
        mut notifications,
        lagged,
        mut stop,
    } = wakeups;
    let memberships = match store.memberships(&user).await {
        Ok(memberships) => memberships,
        Err(failure) => {
            tracing::error!(%failure, "cannot load memberships");
            return;
        }
    };
    // Follow first, then read the backlog: a message accepted in between is then either in the
    // backlog or announced, never neither.
    hub.follow(
        &user,
        session_id,
        memberships
            .iter()
            .map(|membership| membership.group_id.clone()),
    );
    let mut progress = Progress::default();
    for Membership { group_id, cursor } in memberships {
        // The backlog has the user's own messages too: one sent on an earlier connection may
        // never have had its `Accepted` read.
        progress.backlog_end.insert(group_id.clone(), Seq::MAX);
        if !catch_up(&user, &*store, &mut out, &group_id, cursor, &mut progress).await {
            return;
        }
        let end = progress.delivered.get(&group_id).copied().unwrap_or(cursor);
        progress.backlog_end.insert(group_id, end);
    }
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return,
            notification = notifications.recv() => {
                let Some(mut notification) = notification else { return };
                // Everything already queued goes out in one write.
                loop {
                    if !on_notification(&user, &*store, &mut out, notification, &mut progress).await {
                        return;
                    }
                    if out.pending.len() >= DELIVERY_BATCH && !out.flush().await {
                        return;
                    }
                    match notifications.try_recv() {
                        Ok(next) => notification = next,
                        Err(_) => break,
                    }
                }
                if !out.flush().await {
                    return;
                }
            }
            _ = lagged.notified() => {
                tracing::debug!("session lagged; resyncing from the store");
                if !resync(&user, &*store, &mut out, &mut progress).await {
                    return;
                }
            }
        }
    }
}

/// How far a session has sent each group, and which of the user's own application messages it
/// sends: within a session they are answered (`Accepted`), not pushed (docs/protocol.md,
/// section 8.2), but the backlog at its start has them.
#[derive(Debug, Default)]
struct Progress {
    /// The last seq sent (or passed over) per group.
    delivered: HashMap<GroupId, Seq>,
    /// The last seq of each group that the backlog at the start of the session covered (the
    /// acknowledged cursor if it could not be read). Own messages above it are passed over by
    /// catch-ups too: they came after the session began, and their wake-up may still be on
    /// its way behind someone else's. (Strictly, one that a replaced connection sent just
    /// before this session began may be among them; its sender learns its seq by sending it
    /// again, which the DS answers with the seq it has.)
    backlog_end: HashMap<GroupId, Seq>,
    /// Own messages whose wake-up ([`Push::Nothing`]) came ahead of `delivered` (wake-ups of two
    /// senders may arrive out of order): passed over when the session gets there, without a
    /// read.
    own_ahead: HashMap<GroupId, BTreeSet<Seq>>,
}

impl Progress {
    /// Records that everything up to `seq` was sent, and passes over the own messages that
    /// follow it.
    fn reached(&mut self, group_id: &GroupId, mut seq: Seq) {
        if let Some(own) = self.own_ahead.get_mut(group_id) {
            while own.remove(&(seq + 1)) {
                seq += 1;
            }
            own.retain(|own_seq| *own_seq > seq);
            if own.is_empty() {
                self.own_ahead.remove(group_id);
            }
        }
        self.delivered.insert(group_id.clone(), seq);
    }

    /// Whether a catch-up passes over this stored message instead of sending it.
    fn passes_over(&self, user: &UserName, delivery: &Delivery) -> bool {
        delivery.kind == DeliveryKind::Application as u8
            && delivery.sender == *user
            && delivery.seq
                > self
                    .backlog_end
                    .get(&delivery.group_id)
                    .copied()
                    .unwrap_or(0)
    }

    fn forget(&mut self, group_id: &GroupId) {
        self.delivered.remove(group_id);
        self.own_ahead.remove(group_id);
    }
}

/// Catches up every group of the user after wake-ups were dropped. Returns false when the
/// connection is gone.
///
/// Every membership is read again, not only the groups something was delivered in: the dropped
/// wake-up may have been the first of a group (the Welcome of a group the user was just added
/// to, or the first message of a group it created), and a quiet group would otherwise stay
/// behind until its next message.
async fn resync<S: Store>(
    user: &UserName,
    store: &S,
    out: &mut Deliveries,
    progress: &mut Progress,
) -> bool {
    let mut groups: HashMap<GroupId, Seq> = match store.memberships(user).await {
        Ok(memberships) => memberships
            .into_iter()
            .map(|membership| (membership.group_id, membership.cursor))
            .collect(),
        Err(failure) => {
            // Still catch up what is known; the next dropped wake-up retries the rest.
            tracing::error!(%failure, "cannot load memberships to resync");
            HashMap::new()
        }
    };
    // Within this session, what was delivered is further along than the acknowledged cursor.
    for (group_id, seq) in progress.delivered.iter() {
        groups.insert(group_id.clone(), *seq);
    }
    for (group_id, seq) in groups {
        if !catch_up(user, store, out, &group_id, seq, progress).await {
            return false;
        }
    }
    true
}

/// Returns false when the connection is gone.
async fn on_notification<S: Store>(
    user: &UserName,
    store: &S,
    out: &mut Deliveries,
    notification: Notification,
    progress: &mut Progress,
) -> bool {
    let group_id = &notification.group_id;
    let last = match progress.delivered.get(group_id) {
        Some(last) => *last,
        None => match store.cursor(user, group_id).await {
            Ok(Some(cursor)) => cursor,
            Ok(None) => return true,
            Err(failure) => {
                tracing::error!(%failure, "cannot read a delivery cursor");
                return true;
            }
        },
    };
    let seq = notification.seq;
    if seq <= last {
        return true;
    }
    match notification.push {
        Push::Frame(frame) if seq == last + 1 => {
            out.push(frame);
            progress.reached(group_id, seq);
            true
        }
        Push::Nothing if seq == last + 1 => {
            progress.reached(group_id, seq);
            true
        }
        Push::Nothing => {
            // Ahead of a wake-up still to come, or of a lost one: passed over when the session
            // gets there.
            progress
                .own_ahead
                .entry(group_id.clone())
                .or_default()
                .insert(seq);
            true
        }
        Push::Frame(_) | Push::FromStore => {
            catch_up(user, store, out, group_id, last, progress).await
        }
    }
}

/// Sends everything stored after `after` in one group, but for the user's own messages that
/// this session passes over (see [`Progress`]). Returns false when the connection is gone.
async fn catch_up<S: Store>(
    user: &UserName,
    store: &S,
    out: &mut Deliveries,
    group_id: &GroupId,
    mut after: Seq,
    progress: &mut Progress,
) -> bool {
    loop {
        let page = match store.fetch(user, group_id, after, CATCH_UP_PAGE).await {
            Ok(page) => page,
            Err(StoreError::NotMember) => {
                progress.forget(group_id);
                return true;
            }
            Err(failure) => {
                tracing::error!(%failure, "cannot read the backlog");
                return true;
            }
        };
        for delivery in page.deliveries {
            after = delivery.seq;
            if progress.passes_over(user, &delivery) {
                continue;
            }
            out.push(Bytes::from(Frame::Deliver(delivery).encode()));
        }
        if !out.flush().await {
            return false;
        }
        progress.reached(group_id, after);
        if !page.more {
            return true;
        }
        // Past the own messages that followed the page, if any.
        after = progress.delivered.get(group_id).copied().unwrap_or(after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_passes_over_its_own_messages_when_it_gets_there() {
        let group = GroupId::new(b"group".to_vec()).expect("a group id");
        let mut progress = Progress::default();
        progress.reached(&group, 3);
        // Own messages 5 and 6 were answered before the wake-up for 4 came.
        for seq in [5, 6, 9] {
            progress
                .own_ahead
                .entry(group.clone())
                .or_default()
                .insert(seq);
        }
        progress.reached(&group, 4);
        assert_eq!(progress.delivered.get(&group), Some(&6), "past 5 and 6");
        progress.reached(&group, 8);
        assert_eq!(progress.delivered.get(&group), Some(&9));
        assert!(progress.own_ahead.is_empty());
    }
}
