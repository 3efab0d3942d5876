//! One handler per authenticated request: each takes the decoded request and returns the
//! response frame. Handlers never see plaintext; they check what the DS may check and route.

use std::sync::Arc;

use bytes::Bytes;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{BasicCredential, MlsMessageBodyIn, MlsMessageIn, ProtocolVersion};
use tls_codec::VLBytes;

use super::hub::{Hub, Publication};
use crate::config::Limits;
use crate::protocol::Epoch;
use crate::protocol::mls::{self, ContentType, WireFormat};
use crate::protocol::{
    Accepted, ClaimKeyPackage, CountKeyPackages, CreateGroup, Delivery, DeliveryKind, ErrorCode,
    Fetch, Frame, FrameKind, GroupCreated, GroupId, KeyPackageCount, KeyPackageResponse,
    KeyPackagesStored, MAX_KEY_PACKAGE_LEN, Messages, Send, UploadKeyPackages, UserName,
    encode_frame,
};
use crate::store::{AppendRequest, Appended, MembershipChange, NewKeyPackage, Store, StoreError};

/// The most messages one `Fetch` returns.
pub const MAX_FETCH: u32 = 1000;
/// The most payload bytes one `Messages` response carries (at least one message is always sent).
const MAX_FETCH_BYTES: usize = 16 * 1024 * 1024;

/// What every handler needs.
pub struct RequestContext<S> {
    pub user: UserName,
    pub store: Arc<S>,
    pub hub: Arc<Hub>,
    pub limits: Arc<Limits>,
}

fn error(request_id: u32, code: ErrorCode, message: impl AsRef<str>) -> Frame {
    Frame::error(request_id, code, None, message.as_ref())
}

/// Maps a store failure to the protocol error the client sees.
pub fn store_error(request_id: u32, failure: StoreError) -> Frame {
    let code = match &failure {
        StoreError::NameTaken => ErrorCode::NameTaken,
        StoreError::UnknownUser(_) => ErrorCode::UnknownUser,
        StoreError::GroupExists => ErrorCode::GroupExists,
        StoreError::UnknownGroup => ErrorCode::UnknownGroup,
        StoreError::NotMember => ErrorCode::NotMember,
        StoreError::StaleEpoch { current } => {
            return Frame::error(
                request_id,
                ErrorCode::StaleEpoch,
                Some(*current),
                &failure.to_string(),
            );
        }
        StoreError::InvalidMembership(_) => ErrorCode::InvalidMembership,
        StoreError::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
        StoreError::ReusedMessageId { .. } => ErrorCode::InvalidMessage,
        StoreError::Backend(detail) => {
            // The detail may name tables or paths: log it, tell the client only that it failed.
            tracing::error!(%detail, "store failure");
            return error(
                request_id,
                ErrorCode::Internal,
                "internal storage error; retry later",
            );
        }
    };
    error(request_id, code, failure.to_string())
}

/// Checks one uploaded KeyPackage (RFC 9420 §10.1): a valid, self-signed KeyPackage whose leaf
/// uses the uploader's registered signature key and names the uploader in a Basic credential,
/// small enough to be handed out in a `KeyPackage` frame, and carrying the `last_resort`
/// extension (RFC 9420 §17.3) when it is uploaded as the last-resort one. Returns it with the
/// end of its lifetime.
fn validate_key_package(
    bytes: Vec<u8>,
    user: &UserName,
    registered_key: &[u8],
    as_last_resort: bool,
) -> Result<NewKeyPackage, String> {
    if bytes.len() > MAX_KEY_PACKAGE_LEN {
        return Err(format!(
            "{} bytes is more than the {MAX_KEY_PACKAGE_LEN} bytes a KeyPackage response can carry",
            bytes.len()
        ));
    }
    mls::expect_wire_format(&bytes, WireFormat::KeyPackage).map_err(|error| error.to_string())?;
    let message = MlsMessageIn::tls_deserialize_exact(&bytes)
        .map_err(|error| format!("cannot decode: {error}"))?;
    let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
        return Err("not a KeyPackage".into());
    };
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let key_package = key_package
        .validate(&crypto, ProtocolVersion::Mls10)
        .map_err(|error| format!("does not verify: {error}"))?;
    let leaf = key_package.leaf_node();
    // SECURITY: without this check anyone could upload KeyPackages in another user's name and
    // have themselves invited in that user's place.
    if leaf.signature_key().as_slice() != registered_key {
        return Err("its signature key is not the uploader's registered key".into());
    }
    let credential = BasicCredential::try_from(leaf.credential().clone())
        .map_err(|_| "its credential is not a Basic credential".to_string())?;
    if credential.identity() != user.as_str().as_bytes() {
        return Err("its credential names another user".into());
    }
    // A last-resort KeyPackage is handed out again and again; one without the extension tells
    // its owner's client to delete the private key after the first use, so later joins with it
    // would fail. Checked here because the DS is the one that reuses it.
    if as_last_resort && !key_package.last_resort() {
        return Err("it lacks the last_resort extension".into());
    }
    // `validate` rejected a KeyPackage without a lifetime or outside it.
    let not_after = key_package.life_time().not_after();
    Ok(NewKeyPackage {
        key_package: bytes,
        not_after,
    })
}

pub async fn upload_key_packages<S: Store>(
    context: &RequestContext<S>,
    request: UploadKeyPackages,
) -> Frame {
    let id = request.request_id;
    let registered_key = match context.store.user_key(&context.user).await {
        Ok(Some(key)) => key,
        Ok(None) => return error(id, ErrorCode::UnknownUser, "the uploader is not registered"),
        Err(failure) => return store_error(id, failure),
    };
    let user = context.user.clone();
    let key_packages: Vec<Vec<u8>> = request.key_packages.into_iter().map(Vec::from).collect();
    let last_resort: Option<Vec<u8>> = request.last_resort.map(Vec::from);
    // Signature verification is CPU work: keep it off the async worker threads.
    let checked = tokio::task::spawn_blocking(move || {
        let mut checked = Vec::with_capacity(key_packages.len());
        for (index, key_package) in key_packages.into_iter().enumerate() {
            checked.push(
                validate_key_package(key_package, &user, &registered_key, false)
                    .map_err(|reason| format!("KeyPackage {index} rejected: {reason}"))?,
            );
        }
        let last_resort = match last_resort {
            Some(last_resort) => Some(
                validate_key_package(last_resort, &user, &registered_key, true)
                    .map_err(|reason| format!("last-resort KeyPackage rejected: {reason}"))?,
            ),
            None => None,
        };
        Ok::<_, String>((checked, last_resort))
    })
    .await;
    let (key_packages, last_resort) = match checked {
        Ok(Ok(checked)) => checked,
        Ok(Err(reason)) => return error(id, ErrorCode::InvalidKeyPackage, reason),
        Err(_) => return error(id, ErrorCode::Internal, "KeyPackage validation failed"),
    };
    match context
        .store
        .store_key_packages(&context.user, key_packages, last_resort)
        .await
    {
        Ok(remaining) => Frame::KeyPackagesStored(KeyPackagesStored {
            request_id: id,
            remaining,
        }),
        Err(failure) => store_error(id, failure),
    }
}

pub async fn claim_key_package<S: Store>(
    context: &RequestContext<S>,
    request: ClaimKeyPackage,
) -> Frame {
    let id = request.request_id;
    match context.store.claim_key_package(&request.user_name).await {
        Ok(Some(claimed)) => Frame::KeyPackage(KeyPackageResponse {
            request_id: id,
            key_package: claimed.key_package.into(),
            last_resort: u8::from(claimed.last_resort),
        }),
        Ok(None) => error(
            id,
            ErrorCode::NoKeyPackage,
            format!("{} has no KeyPackage left", request.user_name),
        ),
        Err(failure) => store_error(id, failure),
    }
}

pub async fn count_key_packages<S: Store>(
    context: &RequestContext<S>,
    request: CountKeyPackages,
) -> Frame {
    let id = request.request_id;
    match context.store.count_key_packages(&context.user).await {
        Ok((remaining, has_last_resort)) => Frame::KeyPackageCount(KeyPackageCount {
            request_id: id,
            remaining,
            has_last_resort: u8::from(has_last_resort),
        }),
        Err(failure) => store_error(id, failure),
    }
}

pub async fn create_group<S: Store>(context: &RequestContext<S>, request: CreateGroup) -> Frame {
    let id = request.request_id;
    match context
        .store
        .create_group(&request.group_id, &context.user)
        .await
    {
        Ok(()) => {
            context
                .hub
                .follow_new_group(&context.user, &request.group_id);
            Frame::GroupCreated(GroupCreated {
                request_id: id,
                group_id: request.group_id,
                epoch: 0,
            })
        }
        Err(failure) => store_error(id, failure),
    }
}

/// The encoded `Deliver` frame of one message, built once and shared by every recipient.
fn deliver_frame(delivery: &Delivery) -> Bytes {
    Bytes::from(encode_frame(FrameKind::Deliver, delivery))
}

/// A `Send` that passed the DS's own checks: what to store, and what is needed to route it
/// and answer once it is stored.
pub struct PreparedSend {
    pub append: AppendRequest,
    pub routing: SendRouting,
}

/// What [`complete_send`] needs besides the store's answer.
pub struct SendRouting {
    request_id: u32,
    group_id: GroupId,
    epoch: Epoch,
    kind: DeliveryKind,
    payload: Vec<u8>,
    welcome: Option<Vec<u8>>,
}

/// Checks a `Send` without touching the store: the clear MLS header, the wire format, and the
/// commit routing. `Err` is the error response.
pub fn prepare_send<S: Store>(
    context: &RequestContext<S>,
    request: Send,
) -> Result<PreparedSend, Frame> {
    let id = request.request_id;
    let header = mls::peek_message_header(request.message.as_slice()).map_err(|reason| {
        error(
            id,
            ErrorCode::InvalidMessage,
            format!("not an MLS group message: {reason}"),
        )
    })?;
    // SECURITY: RFC 9420 §6 requires application data to travel as PrivateMessage; refusing
    // PublicMessage application data keeps a buggy client from handing the DS plaintext.
    if header.wire_format == WireFormat::PublicMessage
        && header.content_type == ContentType::Application
    {
        return Err(error(
            id,
            ErrorCode::InvalidMessage,
            "application messages must be PrivateMessages",
        ));
    }
    let group_id = GroupId::new(header.group_id)
        .map_err(|reason| error(id, ErrorCode::InvalidMessage, reason.to_string()))?;
    let kind = match header.content_type {
        ContentType::Application => DeliveryKind::Application,
        ContentType::Proposal => DeliveryKind::Proposal,
        ContentType::Commit => DeliveryKind::Commit,
    };
    let membership = match request.commit {
        None => None,
        Some(_) if kind != DeliveryKind::Commit => {
            return Err(error(
                id,
                ErrorCode::InvalidMessage,
                "commit routing sent with a message that is not a commit",
            ));
        }
        Some(routing) => {
            if let Some(welcome) = &routing.welcome
                && let Err(reason) =
                    mls::expect_wire_format(welcome.as_slice(), WireFormat::Welcome)
            {
                return Err(error(
                    id,
                    ErrorCode::InvalidMessage,
                    format!("the welcome is not a Welcome: {reason}"),
                ));
            }
            Some(MembershipChange {
                welcome: routing.welcome.map(Vec::from),
                added: routing.added,
                removed: routing.removed,
            })
        }
    };
    let payload: Vec<u8> = request.message.into();
    let routing = SendRouting {
        request_id: id,
        group_id: group_id.clone(),
        epoch: header.epoch,
        kind,
        payload: payload.clone(),
        welcome: membership
            .as_ref()
            .and_then(|change| change.welcome.clone()),
    };
    let append = AppendRequest {
        group_id,
        sender: context.user.clone(),
        client_message_id: request.client_message_id,
        epoch: header.epoch,
        kind,
        payload,
        membership,
    };
    Ok(PreparedSend { append, routing })
}

/// Routes a stored message to the group's sessions and builds the answer to its `Send`.
pub fn complete_send<S: Store>(
    context: &RequestContext<S>,
    routing: SendRouting,
    outcome: Result<Appended, StoreError>,
) -> Frame {
    let id = routing.request_id;
    let appended = match outcome {
        Ok(appended) => appended,
        Err(failure) => {
            if let StoreError::QuotaExceeded(detail) = &failure {
                // The group is stuck until its slowest member catches up or its messages
                // expire: the operator may want to raise the limit or to know who is away.
                // Clients wait 10 s between attempts, so this repeats at that pace at most.
                tracing::warn!(group = %routing.group_id.to_hex(), sender = %context.user, %detail, "group backlog full; send refused");
            }
            return store_error(id, failure);
        }
    };
    if !appended.duplicate {
        let delivery = Delivery {
            group_id: routing.group_id.clone(),
            seq: appended.seq,
            epoch: routing.epoch,
            kind: routing.kind as u8,
            sender: context.user.clone(),
            payload: routing.payload.into(),
        };
        let frame = deliver_frame(&delivery);
        let welcome_frame = routing.welcome.map(|welcome| {
            deliver_frame(&Delivery {
                epoch: appended.epoch,
                kind: DeliveryKind::Welcome as u8,
                payload: VLBytes::from(welcome),
                ..delivery
            })
        });
        context.hub.publish(Publication {
            group_id: &routing.group_id,
            seq: appended.seq,
            frame: Some(frame),
            welcome_frame,
            added: &appended.added,
            removed: &appended.removed,
            not_to: (routing.kind == DeliveryKind::Application).then_some(&context.user),
        });
    }
    Frame::Accepted(Accepted {
        request_id: id,
        seq: appended.seq,
        epoch: appended.epoch,
    })
}

/// Handles one `Send` from start to finish.
pub async fn send<S: Store>(context: &RequestContext<S>, request: Send) -> Frame {
    match prepare_send(context, request) {
        Err(response) => response,
        Ok(PreparedSend { append, routing }) => {
            let outcome = context.store.append(append).await;
            complete_send(context, routing, outcome)
        }
    }
}

pub async fn fetch<S: Store>(context: &RequestContext<S>, request: Fetch) -> Frame {
    let id = request.request_id;
    let limit = request.limit.clamp(1, MAX_FETCH);
    let page = match context
        .store
        .fetch(&context.user, &request.group_id, request.after_seq, limit)
        .await
    {
        Ok(page) => page,
        Err(failure) => return store_error(id, failure),
    };
    let mut more = page.more;
    let mut messages = Vec::with_capacity(page.deliveries.len());
    let mut bytes = 0;
    for delivery in page.deliveries {
        bytes += delivery.payload.as_slice().len();
        if bytes > MAX_FETCH_BYTES && !messages.is_empty() {
            more = true;
            break;
        }
        messages.push(delivery);
    }
    Frame::Messages(Messages {
        request_id: id,
        messages,
        more: u8::from(more),
    })
}
