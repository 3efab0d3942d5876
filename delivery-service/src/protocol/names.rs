//! Validated identifiers on the wire: user names and group ids.

use tls_codec::{DeserializeBytes, Serialize, Size, VLByteSlice, VLBytes};

/// The longest user name, in bytes.
pub const MAX_USER_NAME_LEN: usize = 32;
/// The longest group id, in bytes (MLS allows more; no implementation we know uses over 32).
pub const MAX_GROUP_ID_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "user names are 1 to {MAX_USER_NAME_LEN} characters: lowercase ASCII letters, digits, '_', '-' and '.', starting with a letter or digit"
    )]
    InvalidUserName,
    #[error("group ids are 1 to {MAX_GROUP_ID_LEN} bytes")]
    InvalidGroupId,
}

/// A registered user's name. Lowercase ASCII only, so that two names never look alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserName(String);

impl UserName {
    pub fn new(name: impl Into<String>) -> Result<UserName, NameError> {
        let name = name.into();
        let valid_first = name
            .bytes()
            .next()
            .is_some_and(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit());
        let valid_rest = name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'_' | b'-' | b'.')
        });
        if valid_first && valid_rest && name.len() <= MAX_USER_NAME_LEN {
            Ok(UserName(name))
        } else {
            Err(NameError::InvalidUserName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UserName {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::str::FromStr for UserName {
    type Err = NameError;
    fn from_str(name: &str) -> Result<UserName, NameError> {
        UserName::new(name)
    }
}

impl Size for UserName {
    fn tls_serialized_len(&self) -> usize {
        VLByteSlice(self.0.as_bytes()).tls_serialized_len()
    }
}

impl Serialize for UserName {
    fn tls_serialize<W: std::io::Write>(&self, writer: &mut W) -> Result<usize, tls_codec::Error> {
        VLByteSlice(self.0.as_bytes()).tls_serialize(writer)
    }
}

impl DeserializeBytes for UserName {
    fn tls_deserialize_bytes(bytes: &[u8]) -> Result<(UserName, &[u8]), tls_codec::Error> {
        let (raw, rest) = VLBytes::tls_deserialize_bytes(bytes)?;
        let name = String::from_utf8(raw.into())
            .map_err(|_| tls_codec::Error::DecodingError("user name is not UTF-8".into()))?;
        let name = UserName::new(name)
            .map_err(|error| tls_codec::Error::DecodingError(error.to_string()))?;
        Ok((name, rest))
    }
}

/// An MLS group id (RFC 9420 §8.1), opaque to the DS.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(Vec<u8>);

impl GroupId {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<GroupId, NameError> {
        let bytes = bytes.into();
        if bytes.is_empty() || bytes.len() > MAX_GROUP_ID_LEN {
            return Err(NameError::InvalidGroupId);
        }
        Ok(GroupId(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl std::fmt::Debug for GroupId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "GroupId({})", self.to_hex())
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.to_hex())
    }
}

impl Size for GroupId {
    fn tls_serialized_len(&self) -> usize {
        VLByteSlice(&self.0).tls_serialized_len()
    }
}

impl Serialize for GroupId {
    fn tls_serialize<W: std::io::Write>(&self, writer: &mut W) -> Result<usize, tls_codec::Error> {
        VLByteSlice(&self.0).tls_serialize(writer)
    }
}

impl DeserializeBytes for GroupId {
    fn tls_deserialize_bytes(bytes: &[u8]) -> Result<(GroupId, &[u8]), tls_codec::Error> {
        let (raw, rest) = VLBytes::tls_deserialize_bytes(bytes)?;
        let group_id = GroupId::new(Vec::from(raw))
            .map_err(|error| tls_codec::Error::DecodingError(error.to_string()))?;
        Ok((group_id, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_name_rules() {
        for good in ["alice", "bob-2", "a", "x.y_z", "0day"] {
            assert!(UserName::new(good).is_ok(), "{good}");
        }
        let too_long = "a".repeat(MAX_USER_NAME_LEN + 1);
        for bad in ["", "Alice", "-bob", "al ice", "é", "a/b", too_long.as_str()] {
            assert!(UserName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn group_id_rules() {
        assert!(GroupId::new(Vec::new()).is_err());
        assert!(GroupId::new(vec![0; MAX_GROUP_ID_LEN + 1]).is_err());
        assert!(GroupId::new(vec![0; MAX_GROUP_ID_LEN]).is_ok());
    }
}
