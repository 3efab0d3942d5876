//! The mlschat wire protocol: frames, messages, error codes and the MLS header peek.
//!
//! Everything on a connection is a frame: a 6-byte header (`u16` kind, `u32` body length, both
//! big-endian) followed by a body in the TLS presentation language (RFC 8446 §3), encoded with
//! `tls_codec` exactly as MLS encodes its own structures (variable-length vectors use the
//! QUIC-style varint prefix of RFC 9420 §2.1.2). `docs/protocol.md` is the normative description;
//! this module is its implementation, shared by the DS and the client.

mod codec;
mod error_code;
pub mod mls;
mod names;

#[cfg(test)]
mod tests;

pub use codec::{
    FRAME_HEADER_LEN, FrameError, FrameHeader, MAX_KEY_PACKAGE_LEN, decode_body, encode_frame,
    max_body_len,
};
pub use error_code::ErrorCode;
pub use names::{GroupId, NameError, UserName};

use tls_codec::{Serialize as _, TlsDeserializeBytes, TlsSerialize, TlsSize, VLBytes};

/// The ALPN protocol identifier every mlschat connection must negotiate.
pub const ALPN: &[u8] = b"mlschat/1";

/// TLS exporter label for the authentication challenge (RFC 8446 §7.5, RFC 9001 §4.1).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-mlschat-auth";
/// Length in bytes of the exported authentication challenge.
pub const EXPORTER_LEN: usize = 32;
/// Length in bytes of an Ed25519 public key, the only signature scheme the DS accepts.
pub const SIGNATURE_KEY_LEN: usize = 32;
/// Length in bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Label signed by `Register`.
pub const REGISTER_LABEL: &[u8] = b"mlschat/1 register";
/// Label signed by `Authenticate`.
pub const AUTHENTICATE_LABEL: &[u8] = b"mlschat/1 authenticate";

/// A client-chosen identifier that makes `Send` idempotent.
pub type ClientMessageId = [u8; 16];

/// A new [`ClientMessageId`]: the current time in milliseconds since the Unix epoch (8 bytes,
/// big-endian), then 8 random bytes.
///
/// Any 16 bytes unique per sender and group are valid. The SQLite store indexes ids by value,
/// and ids that grow with time all land in the same few pages of that index, which a whole
/// group commit then shares; random ids land on a different page each (docs/benchmarks.md,
/// figure 5). Make the id when the message is first built to be sent, not when it was written,
/// so that the time in it is normally about when the DS receives it anyway. Milliseconds, not
/// finer: the index needs no more, and a finer clock would tell the DS more about the device's
/// clock (docs/threat-model.md).
pub fn new_client_message_id() -> ClientMessageId {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&millis.to_be_bytes());
    id[8..].copy_from_slice(&rand::random::<[u8; 8]>());
    id
}

/// Per-group sequence number assigned by the DS; the first message of a group has seq 1.
pub type Seq = u64;

/// An MLS epoch as carried in the clear MLS message header.
pub type Epoch = u64;

/// Frame kinds. Requests (client to DS) are below 0x8000; responses and pushes have the top bit set.
///
/// The numbers are part of the protocol and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    Register = 0x0001,
    Authenticate = 0x0002,
    UploadKeyPackages = 0x0010,
    ClaimKeyPackage = 0x0011,
    CountKeyPackages = 0x0012,
    CreateGroup = 0x0020,
    Send = 0x0021,
    Fetch = 0x0022,
    Ack = 0x0023,
    Ping = 0x0030,
    Error = 0x8000,
    Authenticated = 0x8001,
    KeyPackagesStored = 0x8010,
    KeyPackage = 0x8011,
    KeyPackageCount = 0x8012,
    GroupCreated = 0x8020,
    Accepted = 0x8021,
    Messages = 0x8022,
    Pong = 0x8030,
    Deliver = 0x8040,
}

impl FrameKind {
    /// Every kind, for exhaustive tests and documentation.
    pub const ALL: [FrameKind; 20] = [
        FrameKind::Register,
        FrameKind::Authenticate,
        FrameKind::UploadKeyPackages,
        FrameKind::ClaimKeyPackage,
        FrameKind::CountKeyPackages,
        FrameKind::CreateGroup,
        FrameKind::Send,
        FrameKind::Fetch,
        FrameKind::Ack,
        FrameKind::Ping,
        FrameKind::Error,
        FrameKind::Authenticated,
        FrameKind::KeyPackagesStored,
        FrameKind::KeyPackage,
        FrameKind::KeyPackageCount,
        FrameKind::GroupCreated,
        FrameKind::Accepted,
        FrameKind::Messages,
        FrameKind::Pong,
        FrameKind::Deliver,
    ];

    pub fn from_u16(value: u16) -> Option<FrameKind> {
        FrameKind::ALL
            .into_iter()
            .find(|kind| *kind as u16 == value)
    }
}

/// `Register`: bind a new user name to an Ed25519 key and authenticate this connection.
///
/// `signature` signs the TLS encoding of [`AuthenticationTbs`] with label [`REGISTER_LABEL`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Register {
    pub request_id: u32,
    pub user_name: UserName,
    pub signature_key: VLBytes,
    pub signature: VLBytes,
}

/// `Authenticate`: prove possession of a registered user's key on this connection.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Authenticate {
    pub request_id: u32,
    pub user_name: UserName,
    pub signature: VLBytes,
}

/// What `Register` and `Authenticate` sign. `exporter` is the 32-byte TLS exporter value of this
/// connection, which binds the signature to the session so that it cannot be replayed elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct AuthenticationTbs {
    pub label: VLBytes,
    pub exporter: VLBytes,
    pub user_name: UserName,
    pub signature_key: VLBytes,
}

impl AuthenticationTbs {
    /// The exact bytes to sign or verify.
    pub fn to_signed_bytes(
        label: &[u8],
        exporter: &[u8],
        user_name: &UserName,
        signature_key: &[u8],
    ) -> Vec<u8> {
        let tbs = AuthenticationTbs {
            label: label.into(),
            exporter: exporter.into(),
            user_name: user_name.clone(),
            signature_key: signature_key.into(),
        };
        // Serialising into a Vec only fails if a vector exceeds 2^62 bytes, which these cannot.
        tbs.tls_serialize_detached().unwrap_or_default()
    }
}

/// `UploadKeyPackages`: MLSMessage-framed KeyPackages (wire format `mls_key_package`).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct UploadKeyPackages {
    pub request_id: u32,
    pub key_packages: Vec<VLBytes>,
    /// Replaces the stored last-resort KeyPackage when present.
    pub last_resort: Option<VLBytes>,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct ClaimKeyPackage {
    pub request_id: u32,
    pub user_name: UserName,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct CountKeyPackages {
    pub request_id: u32,
}

/// `CreateGroup`: register a new MLS group (at epoch 0) with the sender as its only member.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct CreateGroup {
    pub request_id: u32,
    pub group_id: GroupId,
}

/// Routing information that travels beside a commit. The DS cannot read the commit, so the
/// committer states whom it adds and removes; the Welcome reaches the added users only if the
/// commit wins its epoch.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct CommitRouting {
    pub welcome: Option<VLBytes>,
    pub added: Vec<UserName>,
    pub removed: Vec<UserName>,
}

/// `Send`: one MLSMessage (PublicMessage or PrivateMessage) to a group.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Send {
    pub request_id: u32,
    pub client_message_id: ClientMessageId,
    pub message: VLBytes,
    /// Present only for commits.
    pub commit: Option<CommitRouting>,
}

/// `Fetch`: read a group's stored messages after `after_seq`, as delivered to the requester.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Fetch {
    pub request_id: u32,
    pub group_id: GroupId,
    pub after_seq: Seq,
    pub limit: u32,
}

/// `Ack`: everything up to `seq` in `group_id` has been durably processed by the client. No reply.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Ack {
    pub group_id: GroupId,
    pub seq: Seq,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Ping {
    pub request_id: u32,
}

/// `Error`: the request `request_id` failed (0 when the error concerns the connection itself).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct ErrorResponse {
    pub request_id: u32,
    pub code: u16,
    /// The group's current epoch, for `StaleEpoch`.
    pub current_epoch: Option<Epoch>,
    /// Human-readable detail, UTF-8. Never contains message content.
    pub message: VLBytes,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Authenticated {
    pub request_id: u32,
    pub user_name: UserName,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct KeyPackagesStored {
    pub request_id: u32,
    /// Unclaimed non-last-resort KeyPackages now held for the uploader.
    pub remaining: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct KeyPackageResponse {
    pub request_id: u32,
    pub key_package: VLBytes,
    /// 1 if this is the user's last-resort KeyPackage (handed out again until replaced), else 0.
    pub last_resort: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct KeyPackageCount {
    pub request_id: u32,
    pub remaining: u32,
    pub has_last_resort: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct GroupCreated {
    pub request_id: u32,
    pub group_id: GroupId,
    pub epoch: Epoch,
}

/// `Accepted`: the message is durably stored as `seq`; `epoch` is the group's epoch afterwards.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Accepted {
    pub request_id: u32,
    pub seq: Seq,
    pub epoch: Epoch,
}

/// What a delivery carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DeliveryKind {
    Application = 1,
    Proposal = 2,
    Commit = 3,
    /// The Welcome of the commit at `seq`, sent to a member added by it instead of the commit.
    Welcome = 4,
}

impl DeliveryKind {
    pub fn from_u8(value: u8) -> Option<DeliveryKind> {
        match value {
            1 => Some(DeliveryKind::Application),
            2 => Some(DeliveryKind::Proposal),
            3 => Some(DeliveryKind::Commit),
            4 => Some(DeliveryKind::Welcome),
            _ => None,
        }
    }
}

/// One stored message as delivered to one member.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Delivery {
    pub group_id: GroupId,
    pub seq: Seq,
    /// The epoch the message was sent in (for a Welcome: the epoch it creates).
    pub epoch: Epoch,
    /// A [`DeliveryKind`] value.
    pub kind: u8,
    pub sender: UserName,
    pub payload: VLBytes,
}

/// `Messages`: the answer to `Fetch`; `more` is 1 if messages beyond `limit` remain.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Messages {
    pub request_id: u32,
    pub messages: Vec<Delivery>,
    pub more: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserializeBytes, TlsSize)]
pub struct Pong {
    pub request_id: u32,
}

/// Any frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Register(Register),
    Authenticate(Authenticate),
    UploadKeyPackages(UploadKeyPackages),
    ClaimKeyPackage(ClaimKeyPackage),
    CountKeyPackages(CountKeyPackages),
    CreateGroup(CreateGroup),
    Send(Send),
    Fetch(Fetch),
    Ack(Ack),
    Ping(Ping),
    Error(ErrorResponse),
    Authenticated(Authenticated),
    KeyPackagesStored(KeyPackagesStored),
    KeyPackage(KeyPackageResponse),
    KeyPackageCount(KeyPackageCount),
    GroupCreated(GroupCreated),
    Accepted(Accepted),
    Messages(Messages),
    Pong(Pong),
    Deliver(Delivery),
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Register(_) => FrameKind::Register,
            Frame::Authenticate(_) => FrameKind::Authenticate,
            Frame::UploadKeyPackages(_) => FrameKind::UploadKeyPackages,
            Frame::ClaimKeyPackage(_) => FrameKind::ClaimKeyPackage,
            Frame::CountKeyPackages(_) => FrameKind::CountKeyPackages,
            Frame::CreateGroup(_) => FrameKind::CreateGroup,
            Frame::Send(_) => FrameKind::Send,
            Frame::Fetch(_) => FrameKind::Fetch,
            Frame::Ack(_) => FrameKind::Ack,
            Frame::Ping(_) => FrameKind::Ping,
            Frame::Error(_) => FrameKind::Error,
            Frame::Authenticated(_) => FrameKind::Authenticated,
            Frame::KeyPackagesStored(_) => FrameKind::KeyPackagesStored,
            Frame::KeyPackage(_) => FrameKind::KeyPackage,
            Frame::KeyPackageCount(_) => FrameKind::KeyPackageCount,
            Frame::GroupCreated(_) => FrameKind::GroupCreated,
            Frame::Accepted(_) => FrameKind::Accepted,
            Frame::Messages(_) => FrameKind::Messages,
            Frame::Pong(_) => FrameKind::Pong,
            Frame::Deliver(_) => FrameKind::Deliver,
        }
    }

    /// The request id a response answers, or a request carries; `None` for `Ack` and `Deliver`.
    pub fn request_id(&self) -> Option<u32> {
        match self {
            Frame::Register(m) => Some(m.request_id),
            Frame::Authenticate(m) => Some(m.request_id),
            Frame::UploadKeyPackages(m) => Some(m.request_id),
            Frame::ClaimKeyPackage(m) => Some(m.request_id),
            Frame::CountKeyPackages(m) => Some(m.request_id),
            Frame::CreateGroup(m) => Some(m.request_id),
            Frame::Send(m) => Some(m.request_id),
            Frame::Fetch(m) => Some(m.request_id),
            Frame::Ping(m) => Some(m.request_id),
            Frame::Error(m) => Some(m.request_id),
            Frame::Authenticated(m) => Some(m.request_id),
            Frame::KeyPackagesStored(m) => Some(m.request_id),
            Frame::KeyPackage(m) => Some(m.request_id),
            Frame::KeyPackageCount(m) => Some(m.request_id),
            Frame::GroupCreated(m) => Some(m.request_id),
            Frame::Accepted(m) => Some(m.request_id),
            Frame::Messages(m) => Some(m.request_id),
            Frame::Pong(m) => Some(m.request_id),
            Frame::Ack(_) | Frame::Deliver(_) => None,
        }
    }

    /// Encodes header and body into one buffer.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Frame::Register(m) => encode_frame(FrameKind::Register, m),
            Frame::Authenticate(m) => encode_frame(FrameKind::Authenticate, m),
            Frame::UploadKeyPackages(m) => encode_frame(FrameKind::UploadKeyPackages, m),
            Frame::ClaimKeyPackage(m) => encode_frame(FrameKind::ClaimKeyPackage, m),
            Frame::CountKeyPackages(m) => encode_frame(FrameKind::CountKeyPackages, m),
            Frame::CreateGroup(m) => encode_frame(FrameKind::CreateGroup, m),
            Frame::Send(m) => encode_frame(FrameKind::Send, m),
            Frame::Fetch(m) => encode_frame(FrameKind::Fetch, m),
            Frame::Ack(m) => encode_frame(FrameKind::Ack, m),
            Frame::Ping(m) => encode_frame(FrameKind::Ping, m),
            Frame::Error(m) => encode_frame(FrameKind::Error, m),
            Frame::Authenticated(m) => encode_frame(FrameKind::Authenticated, m),
            Frame::KeyPackagesStored(m) => encode_frame(FrameKind::KeyPackagesStored, m),
            Frame::KeyPackage(m) => encode_frame(FrameKind::KeyPackage, m),
            Frame::KeyPackageCount(m) => encode_frame(FrameKind::KeyPackageCount, m),
            Frame::GroupCreated(m) => encode_frame(FrameKind::GroupCreated, m),
            Frame::Accepted(m) => encode_frame(FrameKind::Accepted, m),
            Frame::Messages(m) => encode_frame(FrameKind::Messages, m),
            Frame::Pong(m) => encode_frame(FrameKind::Pong, m),
            Frame::Deliver(m) => encode_frame(FrameKind::Deliver, m),
        }
    }

    /// Decodes a body whose header has already been read and checked.
    pub fn decode(kind: FrameKind, body: &[u8]) -> Result<Frame, FrameError> {
        Ok(match kind {
            FrameKind::Register => Frame::Register(decode_body(body)?),
            FrameKind::Authenticate => Frame::Authenticate(decode_body(body)?),
            FrameKind::UploadKeyPackages => Frame::UploadKeyPackages(decode_body(body)?),
            FrameKind::ClaimKeyPackage => Frame::ClaimKeyPackage(decode_body(body)?),
            FrameKind::CountKeyPackages => Frame::CountKeyPackages(decode_body(body)?),
            FrameKind::CreateGroup => Frame::CreateGroup(decode_body(body)?),
            FrameKind::Send => Frame::Send(decode_body(body)?),
            FrameKind::Fetch => Frame::Fetch(decode_body(body)?),
            FrameKind::Ack => Frame::Ack(decode_body(body)?),
            FrameKind::Ping => Frame::Ping(decode_body(body)?),
            FrameKind::Error => Frame::Error(decode_body(body)?),
            FrameKind::Authenticated => Frame::Authenticated(decode_body(body)?),
            FrameKind::KeyPackagesStored => Frame::KeyPackagesStored(decode_body(body)?),
            FrameKind::KeyPackage => Frame::KeyPackage(decode_body(body)?),
            FrameKind::KeyPackageCount => Frame::KeyPackageCount(decode_body(body)?),
            FrameKind::GroupCreated => Frame::GroupCreated(decode_body(body)?),
            FrameKind::Accepted => Frame::Accepted(decode_body(body)?),
            FrameKind::Messages => Frame::Messages(decode_body(body)?),
            FrameKind::Pong => Frame::Pong(decode_body(body)?),
            FrameKind::Deliver => Frame::Deliver(decode_body(body)?),
        })
    }

    /// Decodes one whole frame (header and body) from `bytes`, which must hold exactly one frame.
    pub fn decode_exact(bytes: &[u8]) -> Result<Frame, FrameError> {
        let header = FrameHeader::parse(bytes)?;
        let body = &bytes[FRAME_HEADER_LEN..];
        if body.len() != header.body_len as usize {
            return Err(FrameError::Malformed(format!(
                "frame declares {} body bytes but {} follow",
                header.body_len,
                body.len()
            )));
        }
        Frame::decode(header.kind, body)
    }

    /// A convenience for building `Error` frames.
    pub fn error(
        request_id: u32,
        code: ErrorCode,
        current_epoch: Option<Epoch>,
        message: &str,
    ) -> Frame {
        Frame::Error(ErrorResponse {
            request_id,
            code: code as u16,
            current_epoch,
            message: message.as_bytes().into(),
        })
    }
}
