//! A peek at the clear header of an MLSMessage (RFC 9420 §6): wire format, group id, epoch and
//! content type. This is all the DS may learn of a message; everything after it stays opaque.

use tls_codec::{DeserializeBytes, VLBytes};

/// `ProtocolVersion mls10` (RFC 9420 §6).
pub const MLS_VERSION_10: u16 = 1;

/// `WireFormat` values (RFC 9420 §6, §17.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum WireFormat {
    PublicMessage = 1,
    PrivateMessage = 2,
    Welcome = 3,
    GroupInfo = 4,
    KeyPackage = 5,
}

/// `ContentType` values (RFC 9420 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ContentType {
    Application = 1,
    Proposal = 2,
    Commit = 3,
}

/// The clear fields of a PublicMessage or PrivateMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageHeader {
    pub wire_format: WireFormat,
    pub group_id: Vec<u8>,
    pub epoch: u64,
    pub content_type: ContentType,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeekError {
    #[error("truncated MLS message")]
    Truncated,
    #[error("unsupported MLS protocol version {0}")]
    Version(u16),
    #[error("unknown MLS wire format {0}")]
    UnknownWireFormat(u16),
    #[error("expected a {expected:?}, got a {actual:?}")]
    WrongWireFormat {
        expected: &'static str,
        actual: WireFormat,
    },
    #[error("unknown MLS sender type {0}")]
    UnknownSenderType(u8),
    #[error("unknown MLS content type {0}")]
    UnknownContentType(u8),
}

fn read_u8(bytes: &[u8]) -> Result<(u8, &[u8]), PeekError> {
    u8::tls_deserialize_bytes(bytes).map_err(|_| PeekError::Truncated)
}

fn read_u16(bytes: &[u8]) -> Result<(u16, &[u8]), PeekError> {
    u16::tls_deserialize_bytes(bytes).map_err(|_| PeekError::Truncated)
}

fn read_u32(bytes: &[u8]) -> Result<(u32, &[u8]), PeekError> {
    u32::tls_deserialize_bytes(bytes).map_err(|_| PeekError::Truncated)
}

fn read_u64(bytes: &[u8]) -> Result<(u64, &[u8]), PeekError> {
    u64::tls_deserialize_bytes(bytes).map_err(|_| PeekError::Truncated)
}

fn read_opaque(bytes: &[u8]) -> Result<(VLBytes, &[u8]), PeekError> {
    VLBytes::tls_deserialize_bytes(bytes).map_err(|_| PeekError::Truncated)
}

/// Reads `version` and `wire_format` of an MLSMessage.
pub fn peek_wire_format(bytes: &[u8]) -> Result<(WireFormat, &[u8]), PeekError> {
    let (version, rest) = read_u16(bytes)?;
    if version != MLS_VERSION_10 {
        return Err(PeekError::Version(version));
    }
    let (wire_format, rest) = read_u16(rest)?;
    let wire_format = match wire_format {
        1 => WireFormat::PublicMessage,
        2 => WireFormat::PrivateMessage,
        3 => WireFormat::Welcome,
        4 => WireFormat::GroupInfo,
        5 => WireFormat::KeyPackage,
        other => return Err(PeekError::UnknownWireFormat(other)),
    };
    Ok((wire_format, rest))
}

fn content_type(value: u8) -> Result<ContentType, PeekError> {
    match value {
        1 => Ok(ContentType::Application),
        2 => Ok(ContentType::Proposal),
        3 => Ok(ContentType::Commit),
        other => Err(PeekError::UnknownContentType(other)),
    }
}

/// Reads the clear header of a PublicMessage or PrivateMessage.
pub fn peek_message_header(bytes: &[u8]) -> Result<MessageHeader, PeekError> {
    let (wire_format, rest) = peek_wire_format(bytes)?;
    match wire_format {
        WireFormat::PrivateMessage => {
            // struct { opaque group_id<V>; uint64 epoch; ContentType content_type; ... } (§6.3)
            let (group_id, rest) = read_opaque(rest)?;
            let (epoch, rest) = read_u64(rest)?;
            let (raw_content_type, _) = read_u8(rest)?;
            Ok(MessageHeader {
                wire_format,
                group_id: group_id.into(),
                epoch,
                content_type: content_type(raw_content_type)?,
            })
        }
        WireFormat::PublicMessage => {
            // FramedContent: group_id<V>, epoch, Sender, authenticated_data<V>, content_type (§6)
            let (group_id, rest) = read_opaque(rest)?;
            let (epoch, rest) = read_u64(rest)?;
            let (sender_type, mut rest) = read_u8(rest)?;
            match sender_type {
                // member (leaf_index) and external (sender_index) carry a uint32
                1 | 2 => rest = read_u32(rest)?.1,
                // new_member_proposal and new_member_commit carry nothing
                3 | 4 => {}
                other => return Err(PeekError::UnknownSenderType(other)),
            }
            let (_authenticated_data, rest) = read_opaque(rest)?;
            let (raw_content_type, _) = read_u8(rest)?;
            Ok(MessageHeader {
                wire_format,
                group_id: group_id.into(),
                epoch,
                content_type: content_type(raw_content_type)?,
            })
        }
        other => Err(PeekError::WrongWireFormat {
            expected: "PublicMessage or PrivateMessage",
            actual: other,
        }),
    }
}

/// Checks that `bytes` starts like an MLSMessage of the given wire format.
pub fn expect_wire_format(bytes: &[u8], expected: WireFormat) -> Result<(), PeekError> {
    let (actual, _) = peek_wire_format(bytes)?;
    if actual == expected {
        Ok(())
    } else {
        let expected = match expected {
            WireFormat::PublicMessage => "PublicMessage",
            WireFormat::PrivateMessage => "PrivateMessage",
            WireFormat::Welcome => "Welcome",
            WireFormat::GroupInfo => "GroupInfo",
            WireFormat::KeyPackage => "KeyPackage",
        };
        Err(PeekError::WrongWireFormat { expected, actual })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_message_header() {
        let mut bytes = vec![0, 1, 0, 2, 3, b'g', b'i', b'd'];
        bytes.extend_from_slice(&7u64.to_be_bytes());
        bytes.push(1);
        bytes.extend_from_slice(b"opaque rest");
        let header = peek_message_header(&bytes).expect("valid header");
        assert_eq!(header.wire_format, WireFormat::PrivateMessage);
        assert_eq!(header.group_id, b"gid");
        assert_eq!(header.epoch, 7);
        assert_eq!(header.content_type, ContentType::Application);
        for cut in 0..12 {
            assert!(peek_message_header(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn public_message_header() {
        let mut bytes = vec![0, 1, 0, 1, 1, 9];
        bytes.extend_from_slice(&3u64.to_be_bytes());
        bytes.push(1); // member
        bytes.extend_from_slice(&5u32.to_be_bytes());
        bytes.extend_from_slice(&[2, 0xaa, 0xbb]); // authenticated_data
        bytes.push(3); // commit
        let header = peek_message_header(&bytes).expect("valid header");
        assert_eq!(header.wire_format, WireFormat::PublicMessage);
        assert_eq!(header.epoch, 3);
        assert_eq!(header.content_type, ContentType::Commit);
        assert_eq!(
            peek_message_header(&[0, 2, 0, 1]),
            Err(PeekError::Version(2))
        );
        assert_eq!(
            peek_message_header(&[0, 1, 0, 9]),
            Err(PeekError::UnknownWireFormat(9))
        );
    }
}
