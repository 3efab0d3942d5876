//! Framing: the 6-byte frame header, per-kind size limits, and body encoding with `tls_codec`.

use tls_codec::{DeserializeBytes, Serialize, Size};

use super::FrameKind;

/// Bytes in a frame header: `u16` kind then `u32` body length, big-endian.
pub const FRAME_HEADER_LEN: usize = 6;

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;

/// The largest body the protocol allows for each frame kind. A receiver checks the header
/// against this before it allocates anything for the body. A DS may enforce a lower limit on
/// `Send` through its configuration.
pub fn max_body_len(kind: FrameKind) -> u32 {
    match kind {
        FrameKind::Register | FrameKind::Authenticate => 512,
        FrameKind::UploadKeyPackages => MIB,
        FrameKind::ClaimKeyPackage => 128,
        FrameKind::CountKeyPackages | FrameKind::Ping | FrameKind::Pong => 16,
        FrameKind::CreateGroup | FrameKind::Fetch | FrameKind::Ack => 512,
        FrameKind::Send => 16 * MIB,
        FrameKind::Error => 64 * KIB,
        FrameKind::Authenticated => 128,
        FrameKind::KeyPackagesStored | FrameKind::KeyPackageCount => 16,
        FrameKind::KeyPackage => 64 * KIB,
        FrameKind::GroupCreated => 512,
        FrameKind::Accepted => 32,
        FrameKind::Messages => 32 * MIB,
        FrameKind::Deliver => 16 * MIB + KIB,
    }
}

/// The largest KeyPackage (the whole MLSMessage) the DS stores: the most that fits a
/// `KeyPackage` response body of [`max_body_len`]`(KeyPackage)` = 64 KiB, less its `request_id`
/// (4 bytes), the 4-byte length prefix of `key_package` and `last_resort` (1 byte). A larger
/// upload could be stored but never handed out.
pub const MAX_KEY_PACKAGE_LEN: usize = 64 * KIB as usize - 9;

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame header is truncated")]
    TruncatedHeader,
    #[error("unknown frame kind {0:#06x}")]
    UnknownKind(u16),
    #[error("{kind:?} frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        kind: FrameKind,
        len: u32,
        limit: u32,
    },
    #[error("malformed frame body: {0}")]
    Malformed(String),
}

/// A parsed and checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub body_len: u32,
}

impl FrameHeader {
    /// Parses the first [`FRAME_HEADER_LEN`] bytes of `bytes` and checks the kind and the
    /// protocol size limit.
    pub fn parse(bytes: &[u8]) -> Result<FrameHeader, FrameError> {
        let header: &[u8; FRAME_HEADER_LEN] = bytes
            .get(..FRAME_HEADER_LEN)
            .and_then(|slice| slice.try_into().ok())
            .ok_or(FrameError::TruncatedHeader)?;
        let raw_kind = u16::from_be_bytes([header[0], header[1]]);
        let body_len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        let kind = FrameKind::from_u16(raw_kind).ok_or(FrameError::UnknownKind(raw_kind))?;
        let limit = max_body_len(kind);
        if body_len > limit {
            return Err(FrameError::TooLarge {
                kind,
                len: body_len,
                limit,
            });
        }
        Ok(FrameHeader { kind, body_len })
    }

    pub fn to_bytes(self) -> [u8; FRAME_HEADER_LEN] {
        let kind = (self.kind as u16).to_be_bytes();
        let len = self.body_len.to_be_bytes();
        [kind[0], kind[1], len[0], len[1], len[2], len[3]]
    }
}

/// Encodes `body` behind a header of the given kind.
///
/// The header's length is taken from the bytes actually written, so a frame can never claim a
/// body it does not carry. Serialising into a `Vec` only fails for a vector over the varint
/// limit (2^30 bytes), far beyond every frame limit; such a body is replaced by an empty one,
/// which the receiver rejects as malformed instead of losing track of frame boundaries.
pub fn encode_frame<T: Serialize + Size>(kind: FrameKind, body: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.tls_serialized_len());
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    if body.tls_serialize(&mut out).is_err() {
        out.truncate(FRAME_HEADER_LEN);
    }
    let body_len = u32::try_from(out.len() - FRAME_HEADER_LEN).unwrap_or(0);
    if body_len == 0 {
        out.truncate(FRAME_HEADER_LEN);
    }
    let header = FrameHeader { kind, body_len };
    out[..FRAME_HEADER_LEN].copy_from_slice(&header.to_bytes());
    out
}

/// Decodes a body that must consume every byte given.
pub fn decode_body<T: DeserializeBytes>(body: &[u8]) -> Result<T, FrameError> {
    T::tls_deserialize_exact_bytes(body).map_err(|error| FrameError::Malformed(error.to_string()))
}
