//! A minimal protocol client: connect with a pinned certificate, authenticate, and exchange
//! frames on the connection's stream. The mlschat client, the interop peer and the tests build
//! on it; it holds no MLS state.

use std::net::SocketAddr;

use quinn::ReadExactError;

use crate::protocol::{
    AUTHENTICATE_LABEL, Authenticate, AuthenticationTbs, EXPORTER_LABEL, EXPORTER_LEN,
    FRAME_HEADER_LEN, Frame, FrameError, FrameHeader, REGISTER_LABEL, Register, UserName,
};
use crate::tls::{self, CertFingerprint};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("the DS sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("the DS ended the stream inside a frame")]
    Truncated,
    #[error("cannot derive the authentication challenge")]
    Exporter,
}

/// Something that can sign authentication challenges with the user's Ed25519 key.
pub trait ChallengeSigner {
    /// The 32-byte Ed25519 public key.
    fn public_key(&self) -> Vec<u8>;
    /// An Ed25519 signature over `message`.
    fn sign(&self, message: &[u8]) -> Vec<u8>;
}

impl ChallengeSigner for ed25519_dalek::SigningKey {
    fn public_key(&self) -> Vec<u8> {
        self.verifying_key().to_bytes().to_vec()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        ed25519_dalek::Signer::sign(self, message)
            .to_bytes()
            .to_vec()
    }
}

/// One connection to a DS, with its single bidirectional stream.
pub struct RawConnection {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl RawConnection {
    /// Connects to `server`, accepting only the certificate with the pinned fingerprint.
    pub async fn connect(
        server: SocketAddr,
        pinned: CertFingerprint,
    ) -> Result<RawConnection, ClientError> {
        let bind: SocketAddr = if server.is_ipv6() {
            "[::]:0".parse().unwrap_or(server)
        } else {
            "0.0.0.0:0".parse().unwrap_or(server)
        };
        let mut endpoint = tls::bind_endpoint(bind, None, 4 * 1024 * 1024)?;
        endpoint.set_default_client_config(tls::client_config(pinned)?);
        let connection = endpoint.connect(server, "mlschat-ds")?.await?;
        let (send, recv) = connection.open_bi().await?;
        Ok(RawConnection {
            endpoint,
            connection,
            send,
            recv,
        })
    }

    /// The TLS exporter value that authentication signs.
    pub fn exporter(&self) -> Result<[u8; EXPORTER_LEN], ClientError> {
        let mut exporter = [0u8; EXPORTER_LEN];
        self.connection
            .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
            .map_err(|_| ClientError::Exporter)?;
        Ok(exporter)
    }

    /// A `Register` frame for this connection.
    pub fn register_frame(
        &self,
        request_id: u32,
        user_name: &UserName,
        signer: &impl ChallengeSigner,
    ) -> Result<Frame, ClientError> {
        let key = signer.public_key();
        let signed =
            AuthenticationTbs::to_signed_bytes(REGISTER_LABEL, &self.exporter()?, user_name, &key);
        Ok(Frame::Register(Register {
            request_id,
            user_name: user_name.clone(),
            signature_key: key.into(),
            signature: signer.sign(&signed).into(),
        }))
    }

    /// An `Authenticate` frame for this connection.
    pub fn authenticate_frame(
        &self,
        request_id: u32,
        user_name: &UserName,
        signer: &impl ChallengeSigner,
    ) -> Result<Frame, ClientError> {
        let key = signer.public_key();
        let signed = AuthenticationTbs::to_signed_bytes(
            AUTHENTICATE_LABEL,
            &self.exporter()?,
            user_name,
            &key,
        );
        Ok(Frame::Authenticate(Authenticate {
            request_id,
            user_name: user_name.clone(),
            signature: signer.sign(&signed).into(),
        }))
    }

    pub async fn send_frame(&mut self, frame: &Frame) -> Result<(), ClientError> {
        self.send_raw(&frame.encode()).await
    }

    /// Writes bytes as they are (for tests of malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// The next frame from the DS, or `None` when it finished the stream.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        read_frame(&mut self.recv).await
    }

    /// Closes the connection and waits until the DS has been told.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

/// Reads one frame from a DS stream, checking the header before allocating the body.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Frame>, ClientError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(_)) => return Err(ClientError::Truncated),
        Err(ReadExactError::ReadError(error)) => return Err(error.into()),
    }
    let header = FrameHeader::parse(&header)?;
    let mut body = vec![0u8; header.body_len as usize];
    match recv.read_exact(&mut body).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(_)) => return Err(ClientError::Truncated),
        Err(ReadExactError::ReadError(error)) => return Err(error.into()),
    }
    Ok(Some(Frame::decode(header.kind, &body)?))
}
