//! The openmls provider of a client: RustCrypto for cryptography and randomness, and
//! openmls_sqlite_storage on the profile's one SQLite connection, so that MLS state changes
//! commit in the same transactions as history, outbox and cursors.

use std::rc::Rc;

use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, Connection, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;

/// CBOR: self-describing (openmls 0.9 requires that of its storage codec) and compact, which
/// matters because openmls rewrites per-group secret state on every message.
#[derive(Debug, Default)]
pub struct CborCodec;

#[derive(Debug, thiserror::Error)]
pub enum CborError {
    #[error("cbor encoding failed: {0}")]
    Encode(String),
    #[error("cbor decoding failed: {0}")]
    Decode(String),
}

impl Codec for CborCodec {
    type Error = CborError;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CborError> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out)
            .map_err(|error| CborError::Encode(error.to_string()))?;
        Ok(out)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, CborError> {
        ciborium::from_reader(slice).map_err(|error| CborError::Decode(error.to_string()))
    }
}

pub type Storage = SqliteStorageProvider<CborCodec, Rc<Connection>>;

/// The provider handed to every openmls call. Not `Send`: it lives on the core thread.
pub struct ClientProvider {
    crypto: RustCrypto,
    storage: Storage,
}

impl ClientProvider {
    pub fn new(connection: Rc<Connection>) -> ClientProvider {
        ClientProvider {
            crypto: RustCrypto::default(),
            storage: SqliteStorageProvider::new(connection),
        }
    }
}

impl OpenMlsProvider for ClientProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = Storage;

    fn storage(&self) -> &Storage {
        &self.storage
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

/// Creates openmls's tables (its own refinery migrations).
pub fn migrate_openmls_tables(connection: &mut Connection) -> Result<(), String> {
    let mut storage: SqliteStorageProvider<CborCodec, &mut Connection> =
        SqliteStorageProvider::new(connection);
    storage.run_migrations().map_err(|error| error.to_string())
}
