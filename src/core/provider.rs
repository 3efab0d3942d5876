//! The openmls provider of a client: RustCrypto for cryptography and randomness, and
//! openmls_sqlite_storage on the profile's one SQLite connection, so that MLS state changes
//! commit in the same transactions as history, outbox and cursors.

use std::rc::Rc;

use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, Connection, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use rusqlite::{OptionalExtension, params};

use super::{cbor, pack};

/// CBOR: self-describing (openmls 0.9 requires that of its storage codec) and compact, which
/// matters because openmls rewrites per-group secret state on every message. Written by
/// [`cbor::to_vec`] (byte vectors as byte strings) with long runs of nulls packed by
/// [`pack`], read by ciborium, which also reads the arrays of integers that plain ciborium
/// wrote for byte vectors before.
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
        cbor::to_vec(value)
            .map(pack::pack)
            .map_err(|error| CborError::Encode(error.to_string()))
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, CborError> {
        let cbor = pack::unpack(slice).map_err(|error| CborError::Decode(error.to_string()))?;
        ciborium::from_reader(&*cbor).map_err(|error| CborError::Decode(error.to_string()))
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

/// Creates openmls's tables (its own refinery migrations), then brings the keys of the rows in
/// them to the current codec.
pub fn migrate_openmls_tables(connection: &mut Connection) -> Result<(), String> {
    let mut storage: SqliteStorageProvider<CborCodec, &mut Connection> =
        SqliteStorageProvider::new(connection);
    storage
        .run_migrations()
        .map_err(|error| error.to_string())?;
    recode_storage_keys(connection).map_err(|error| error.to_string())
}

/// The codec version whose key encoding the openmls tables hold: 1 is plain ciborium (byte
/// vectors as arrays of integers), 2 is [`cbor::to_vec`] (byte vectors as byte strings).
const KEY_ENCODING: i64 = 2;

/// Every column of openmls_sqlite_storage 0.3's tables that holds an encoded key
/// (`KeyRefWrapper`): rows are found by comparing these blobs with the encoded key looked for.
/// Value columns need no rewrite, the decoder reads both encodings, and openmls rewrites them
/// as state changes.
const KEY_COLUMNS: &[(&str, &str)] = &[
    ("openmls_encryption_keys", "public_key"),
    ("openmls_epoch_keys_pairs", "group_id"),
    ("openmls_epoch_keys_pairs", "epoch_id"),
    ("openmls_group_data", "group_id"),
    ("openmls_key_packages", "key_package_ref"),
    ("openmls_own_leaf_nodes", "group_id"),
    ("openmls_proposals", "group_id"),
    ("openmls_proposals", "proposal_ref"),
    ("openmls_psks", "psk_id"),
    ("openmls_signature_keys", "public_key"),
    ("vc_emulation_group_secrets", "epoch_id"),
    ("vc_emulation_bindings", "group_id"),
    ("vc_operation_trees", "epoch_id"),
    ("vc_retained_key_package_material", "key_package_ref"),
    ("vc_retained_key_package_material", "epoch_id"),
    ("registered_vc_emulation_epochs", "group_id"),
];

/// Rewrites, once per profile and in one transaction, every stored key from plain ciborium's
/// encoding to the current codec's, so that openmls finds the rows of a profile written before
/// the codec changed.
fn recode_storage_keys(connection: &mut Connection) -> Result<(), rusqlite::Error> {
    let transaction = connection.transaction()?;
    transaction.execute_batch(
        "CREATE TABLE IF NOT EXISTS mlschat_openmls_codec (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            key_encoding INTEGER NOT NULL
        );",
    )?;
    let current: Option<i64> = transaction
        .query_row(
            "SELECT key_encoding FROM mlschat_openmls_codec WHERE id = 1",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if current.is_some_and(|version| version >= KEY_ENCODING) {
        return Ok(());
    }
    for (table, column) in KEY_COLUMNS {
        let rows: Vec<(i64, Vec<u8>)> = {
            let mut statement =
                transaction.prepare(&format!("SELECT rowid, {column} FROM {table}"))?;
            statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        let mut update = transaction.prepare(&format!(
            "UPDATE {table} SET {column} = ?1 WHERE rowid = ?2"
        ))?;
        for (rowid, old) in rows {
            // A key that is not CBOR was never openmls's to find; it stays as it is.
            if let Some(new) = cbor::recode_key(&old)
                && new != old
            {
                update.execute(params![new, rowid])?;
            }
        }
    }
    transaction.execute(
        "INSERT OR REPLACE INTO mlschat_openmls_codec (id, key_encoding) VALUES (1, ?1)",
        params![KEY_ENCODING],
    )?;
    transaction.commit()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::rc::Rc;

    use openmls::prelude::{
        BasicCredential, CredentialWithKey, GroupId, KeyPackage, LeafNodeParameters, MlsGroup,
        MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, ProcessedMessageContent,
        RatchetTreeIn, StagedWelcome, tls_codec::Deserialize as _,
    };
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::RustCrypto;
    use openmls_sqlite_storage::{Codec, Connection, SqliteStorageProvider};
    use openmls_traits::OpenMlsProvider;

    use super::{CborError, ClientProvider, KEY_COLUMNS, migrate_openmls_tables};
    use crate::core::CIPHERSUITE;

    /// The codec profiles were written with before byte vectors became byte strings.
    #[derive(Debug, Default)]
    struct PlainCborCodec;

    impl Codec for PlainCborCodec {
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

    struct PlainProvider {
        crypto: RustCrypto,
        storage: SqliteStorageProvider<PlainCborCodec, Rc<Connection>>,
    }

    impl OpenMlsProvider for PlainProvider {
        type CryptoProvider = RustCrypto;
        type RandProvider = RustCrypto;
        type StorageProvider = SqliteStorageProvider<PlainCborCodec, Rc<Connection>>;

        fn storage(&self) -> &Self::StorageProvider {
            &self.storage
        }

        fn crypto(&self) -> &RustCrypto {
            &self.crypto
        }

        fn rand(&self) -> &RustCrypto {
            &self.crypto
        }
    }

    /// A profile as the previous client version left it: openmls tables, plain ciborium.
    fn old_profile(path: &Path) -> PlainProvider {
        let mut connection = Connection::open(path).expect("opens");
        let mut storage: SqliteStorageProvider<PlainCborCodec, &mut Connection> =
            SqliteStorageProvider::new(&mut connection);
        storage.run_migrations().expect("migrates");
        PlainProvider {
            crypto: RustCrypto::default(),
            storage: SqliteStorageProvider::new(Rc::new(connection)),
        }
    }

    fn new_profile(path: &Path) -> ClientProvider {
        let mut connection = Connection::open(path).expect("opens");
        migrate_openmls_tables(&mut connection).expect("migrates");
        ClientProvider::new(Rc::new(connection))
    }

    fn member(
        name: &str,
        provider: &impl OpenMlsProvider,
    ) -> (SignatureKeyPair, CredentialWithKey) {
        let signer =
            SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).expect("signature key");
        signer.store(provider.storage()).expect("stores the signer");
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        (signer, credential)
    }

    fn received(message: &MlsMessageOut) -> MlsMessageIn {
        let bytes = message.to_bytes().expect("serializes");
        MlsMessageIn::tls_deserialize_exact(bytes.as_slice()).expect("deserializes")
    }

    fn deliver(
        provider: &impl OpenMlsProvider,
        group: &mut MlsGroup,
        message: &MlsMessageOut,
    ) -> ProcessedMessageContent {
        let protocol = received(message)
            .try_into_protocol_message()
            .expect("a protocol message");
        group
            .process_message(provider, protocol)
            .expect("processes")
            .into_content()
    }

    fn application_text(content: ProcessedMessageContent) -> Vec<u8> {
        match content {
            ProcessedMessageContent::ApplicationMessage(message) => message.into_bytes(),
            _ => panic!("expected an application message"),
        }
    }

    /// Sends `text` from one member's group and checks that the other member reads it.
    fn exchange(
        sender: &impl OpenMlsProvider,
        signer: &SignatureKeyPair,
        sender_group: &mut MlsGroup,
        receiver: &impl OpenMlsProvider,
        receiver_group: &mut MlsGroup,
        text: &[u8],
    ) {
        let message = sender_group
            .create_message(sender, signer, text)
            .expect("message");
        assert_eq!(
            application_text(deliver(receiver, receiver_group, &message)),
            text
        );
    }

    /// Joins the group of `welcome` (with the ratchet tree from `tree`, or from the Welcome's
    /// extension).
    fn join(
        provider: &impl OpenMlsProvider,
        welcome: &MlsMessageOut,
        tree: Option<RatchetTreeIn>,
    ) -> MlsGroup {
        let MlsMessageBodyIn::Welcome(welcome) = received(welcome).extract() else {
            panic!("expected a welcome");
        };
        StagedWelcome::new_from_welcome(provider, &MlsGroupJoinConfig::default(), welcome, tree)
            .expect("stages the welcome")
            .into_group(provider)
            .expect("joins")
    }

    /// A member's profile opened again: its signer and its group, read from storage.
    fn reopen(
        path: &Path,
        public: &[u8],
        group_id: &GroupId,
    ) -> (ClientProvider, SignatureKeyPair, MlsGroup) {
        let provider = new_profile(path);
        let signer = SignatureKeyPair::read(
            provider.storage(),
            public,
            CIPHERSUITE.signature_algorithm(),
        )
        .expect("the signer is found");
        let group = MlsGroup::load(provider.storage(), group_id)
            .expect("loads")
            .expect("the group is found");
        (provider, signer, group)
    }

    /// Group state written by the previous codec is found, read and advanced by the new one.
    #[test]
    fn a_group_written_with_the_old_codec_keeps_working_after_the_switch() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let alice_path = directory.path().join("alice.sqlite3");
        let bob_path = directory.path().join("bob.sqlite3");

        let (alice_public, bob_public, group_id) = {
            let alice = old_profile(&alice_path);
            let bob = old_profile(&bob_path);
            let (alice_signer, alice_credential) = member("alice", &alice);
            let (bob_signer, bob_credential) = member("bob", &bob);
            let mut alice_group = MlsGroup::builder()
                .ciphersuite(CIPHERSUITE)
                .build(&alice, &alice_signer, alice_credential)
                .expect("creates the group");
            let bob_key_package = KeyPackage::builder()
                .build(CIPHERSUITE, &bob, &bob_signer, bob_credential)
                .expect("key package");
            let (_commit, welcome, _) = alice_group
                .add_members(
                    &alice,
                    &alice_signer,
                    &[bob_key_package.key_package().clone()],
                )
                .expect("adds bob");
            alice_group.merge_pending_commit(&alice).expect("merges");
            let mut bob_group = join(
                &bob,
                &welcome,
                Some(alice_group.export_ratchet_tree().into()),
            );
            exchange(
                &alice,
                &alice_signer,
                &mut alice_group,
                &bob,
                &mut bob_group,
                b"before",
            );
            (
                alice_signer.to_public_vec(),
                bob_signer.to_public_vec(),
                alice_group.group_id().clone(),
            )
        };

        let (alice, alice_signer, mut alice_group) = reopen(&alice_path, &alice_public, &group_id);
        let (bob, bob_signer, mut bob_group) = reopen(&bob_path, &bob_public, &group_id);

        exchange(
            &alice,
            &alice_signer,
            &mut alice_group,
            &bob,
            &mut bob_group,
            b"after",
        );

        let commit = bob_group
            .self_update(&bob, &bob_signer, LeafNodeParameters::default())
            .expect("self update")
            .into_messages()
            .0;
        bob_group.merge_pending_commit(&bob).expect("merges");
        match deliver(&alice, &mut alice_group, &commit) {
            ProcessedMessageContent::StagedCommitMessage(staged) => alice_group
                .merge_staged_commit(&alice, *staged)
                .expect("merges bob's commit"),
            _ => panic!("expected a commit"),
        }
        assert_eq!(alice_group.epoch(), bob_group.epoch());
        exchange(
            &bob,
            &bob_signer,
            &mut bob_group,
            &alice,
            &mut alice_group,
            b"next epoch",
        );

        // Reopening again (the rewrite is recorded, not repeated) still finds everything.
        drop(alice);
        let alice = new_profile(&alice_path);
        assert!(
            MlsGroup::load(alice.storage(), &GroupId::from_slice(group_id.as_slice()))
                .expect("loads")
                .is_some()
        );
    }

    /// In a group large enough for long runs of empty slots in the secret tree, openmls's
    /// state is stored packed, and a profile reopened from disk reads it and goes on.
    #[test]
    fn packed_group_state_is_read_back_after_reopening_the_profile() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let alice_path = directory.path().join("alice.sqlite3");
        let bob_path = directory.path().join("bob.sqlite3");
        let bystander = new_profile(&directory.path().join("bystanders.sqlite3"));

        let (alice_public, bob_public, group_id) = {
            let alice = new_profile(&alice_path);
            let bob = new_profile(&bob_path);
            let (alice_signer, alice_credential) = member("alice", &alice);
            let (bob_signer, bob_credential) = member("bob", &bob);
            let mut key_packages = vec![
                KeyPackage::builder()
                    .build(CIPHERSUITE, &bob, &bob_signer, bob_credential)
                    .expect("key package")
                    .key_package()
                    .clone(),
            ];
            for index in 0..150 {
                let (signer, credential) = member(&format!("bystander {index}"), &bystander);
                key_packages.push(
                    KeyPackage::builder()
                        .build(CIPHERSUITE, &bystander, &signer, credential)
                        .expect("key package")
                        .key_package()
                        .clone(),
                );
            }
            let mut alice_group = MlsGroup::builder()
                .ciphersuite(CIPHERSUITE)
                .use_ratchet_tree_extension(true)
                .build(&alice, &alice_signer, alice_credential)
                .expect("creates the group");
            let (_commit, welcome, _) = alice_group
                .add_members(&alice, &alice_signer, &key_packages)
                .expect("adds everyone");
            alice_group.merge_pending_commit(&alice).expect("merges");
            let mut bob_group = join(&bob, &welcome, None);
            exchange(
                &alice,
                &alice_signer,
                &mut alice_group,
                &bob,
                &mut bob_group,
                b"before",
            );
            (
                alice_signer.to_public_vec(),
                bob_signer.to_public_vec(),
                alice_group.group_id().clone(),
            )
        };

        for path in [&alice_path, &bob_path] {
            let connection = Connection::open(path).expect("opens");
            let secrets: Vec<u8> = connection
                .query_row(
                    "SELECT group_data FROM openmls_group_data \
                     WHERE data_type = 'message_secrets'",
                    [],
                    |row| row.get(0),
                )
                .expect("message secrets are stored");
            assert_eq!(secrets.first(), Some(&0xff), "stored packed");
            assert!(secrets.len() < 4096, "{} bytes", secrets.len());
        }

        let (alice, alice_signer, mut alice_group) = reopen(&alice_path, &alice_public, &group_id);
        let (bob, bob_signer, mut bob_group) = reopen(&bob_path, &bob_public, &group_id);
        assert_eq!(alice_group.members().count(), 152);
        for (text, from_alice) in [(&b"one"[..], true), (b"two", false), (b"three", true)] {
            let (sender, sender_group, signer, receiver, receiver_group) = if from_alice {
                (
                    &alice,
                    &mut alice_group,
                    &alice_signer,
                    &bob,
                    &mut bob_group,
                )
            } else {
                (&bob, &mut bob_group, &bob_signer, &alice, &mut alice_group)
            };
            exchange(sender, signer, sender_group, receiver, receiver_group, text);
        }
    }

    /// Every blob column of openmls_sqlite_storage's tables is either a key the rewrite covers
    /// or a value column: a new table or column in a later version fails here until sorted.
    #[test]
    fn every_key_column_of_the_openmls_tables_is_recoded() {
        const VALUE_COLUMNS: &[(&str, &str)] = &[
            ("openmls_encryption_keys", "key_pair"),
            ("openmls_epoch_keys_pairs", "key_pairs"),
            ("openmls_group_data", "group_data"),
            ("openmls_key_packages", "key_package"),
            ("openmls_own_leaf_nodes", "leaf_node"),
            ("openmls_proposals", "proposal"),
            ("openmls_psks", "psk_bundle"),
            ("openmls_signature_keys", "signature_key"),
            ("vc_emulation_group_secrets", "vc_secret"),
            ("vc_emulation_bindings", "bindings"),
            ("vc_operation_trees", "operation_tree"),
            ("vc_retained_key_package_material", "record"),
            ("registered_vc_emulation_epochs", "registration"),
        ];
        let mut connection = Connection::open_in_memory().expect("opens");
        migrate_openmls_tables(&mut connection).expect("migrates");
        let tables: Vec<String> = connection
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
            .expect("prepares")
            .query_map([], |row| row.get(0))
            .expect("queries")
            .collect::<Result<_, _>>()
            .expect("reads");
        let mut blob_columns = BTreeSet::new();
        for table in tables {
            let mut statement = connection
                .prepare(&format!(
                    "SELECT name, type FROM pragma_table_info('{table}')"
                ))
                .expect("prepares");
            let columns = statement
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })
                .expect("queries");
            for column in columns {
                let (name, kind) = column.expect("reads");
                if kind.eq_ignore_ascii_case("BLOB") {
                    blob_columns.insert((table.clone(), name));
                }
            }
        }
        let known: BTreeSet<(String, String)> = KEY_COLUMNS
            .iter()
            .chain(VALUE_COLUMNS)
            .map(|(table, column)| (table.to_string(), column.to_string()))
            .collect();
        assert_eq!(blob_columns, known);
    }
}
