//! Stable numeric error codes, used in `Error` frames and as QUIC application close codes.

/// Error codes are part of the protocol: a number never changes meaning, new ones are appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame body could not be decoded. Closes the connection.
    MalformedFrame = 1,
    /// The frame kind is not known. Closes the connection.
    UnknownFrameKind = 2,
    /// The frame is larger than the limit for its kind. Closes the connection.
    FrameTooLarge = 3,
    /// A request other than `Register`/`Authenticate` came before authentication. Closes the connection.
    NotAuthenticated = 4,
    /// `Register` or `Authenticate` on an already authenticated connection.
    AlreadyAuthenticated = 5,
    /// The signature did not verify, or the user is unknown to `Authenticate`. Closes the connection.
    AuthenticationFailed = 6,
    /// The user name is registered to another key.
    NameTaken = 7,
    /// No such user.
    UnknownUser = 8,
    /// The user name or group id does not meet the syntax rules.
    InvalidName = 9,
    /// A KeyPackage is malformed, fails verification, or does not belong to the uploader.
    InvalidKeyPackage = 10,
    /// The user has no KeyPackage left, not even a last-resort one.
    NoKeyPackage = 11,
    /// `CreateGroup` for a group id that already exists.
    GroupExists = 12,
    /// No such group.
    UnknownGroup = 13,
    /// The requester is not a member of the group.
    NotMember = 14,
    /// The message's epoch is not the group's current epoch; `current_epoch` says which is.
    StaleEpoch = 15,
    /// The MLS message is malformed, of the wrong wire format, for another group, or has
    /// routing fields that do not fit its content type.
    InvalidMessage = 16,
    /// Too many requests; retry later.
    RateLimited = 17,
    /// A storage quota (queue length, KeyPackages) is exhausted.
    QuotaExceeded = 18,
    /// The DS failed internally; the request may be retried.
    Internal = 19,
    /// The DS is shutting down. Closes the connection.
    ShuttingDown = 20,
    /// The connection limit for the DS or the client's address is reached. Closes the connection.
    TooManyConnections = 21,
    /// `added` names a member or an unregistered user, or `removed` names a non-member.
    InvalidMembership = 22,
    /// Another connection authenticated as the same user. Closes this connection.
    SessionReplaced = 23,
    /// Authentication did not complete in time. Closes the connection.
    AuthenticationTimeout = 24,
    /// The client sent a frame only the DS may send. Closes the connection.
    UnexpectedFrame = 25,
    /// The message exceeds this DS's configured size limit for `Send`. Closes the connection.
    MessageTooLarge = 26,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 26] = [
        ErrorCode::MalformedFrame,
        ErrorCode::UnknownFrameKind,
        ErrorCode::FrameTooLarge,
        ErrorCode::NotAuthenticated,
        ErrorCode::AlreadyAuthenticated,
        ErrorCode::AuthenticationFailed,
        ErrorCode::NameTaken,
        ErrorCode::UnknownUser,
        ErrorCode::InvalidName,
        ErrorCode::InvalidKeyPackage,
        ErrorCode::NoKeyPackage,
        ErrorCode::GroupExists,
        ErrorCode::UnknownGroup,
        ErrorCode::NotMember,
        ErrorCode::StaleEpoch,
        ErrorCode::InvalidMessage,
        ErrorCode::RateLimited,
        ErrorCode::QuotaExceeded,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::TooManyConnections,
        ErrorCode::InvalidMembership,
        ErrorCode::SessionReplaced,
        ErrorCode::AuthenticationTimeout,
        ErrorCode::UnexpectedFrame,
        ErrorCode::MessageTooLarge,
    ];

    pub fn from_u16(value: u16) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| *code as u16 == value)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{self:?} ({})", *self as u16)
    }
}
