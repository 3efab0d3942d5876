//! Figures 3, 4 and 7: MLS costs. openmls with the storage the client uses (openmls_sqlite_storage
//! with the client's CBOR codec, `mlschat::core::provider`, one IMMEDIATE transaction per step,
//! WAL, synchronous=FULL) against mls-rs (RustCrypto, its default in-memory storage, state
//! written with `write_to_storage` after each step), in the same run, interleaved.

use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use mlschat::core::provider::{ClientProvider, migrate_openmls_tables};
use mlschat::core::{CIPHERSUITE, CoreError, db};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, CredentialWithKey, KeyPackage, LeafNodeParameters,
    MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY, MlsGroup, MlsGroupJoinConfig, MlsMessageBodyIn,
    MlsMessageIn, MlsMessageOut, ProcessedMessageContent, ProtocolMessage, StagedWelcome,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_sqlite_storage::Connection;
use openmls_traits::OpenMlsProvider;

use crate::report::{Row, mean, median};
use crate::{Failures, Settings};

// ---- openmls ----------------------------------------------------------------------------

/// A member: its provider (SQLite or memory), signer and credential.
pub struct Member<P: OpenMlsProvider> {
    pub provider: P,
    pub signer: SignatureKeyPair,
    pub credential: CredentialWithKey,
    /// The SQLite connection of a SQLite-backed member (for transactions and size readings).
    pub connection: Option<Rc<Connection>>,
}

fn new_signer(name: &str) -> Result<(SignatureKeyPair, CredentialWithKey)> {
    let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm())
        .map_err(|error| anyhow!("signature key: {error:?}"))?;
    let credential = CredentialWithKey {
        credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
        signature_key: signer.public().into(),
    };
    Ok((signer, credential))
}

/// A client-like member: the client's provider on a fresh profile database.
pub fn sqlite_member(dir: &Path, name: &str) -> Result<Member<ClientProvider>> {
    let mut connection = mlschat::core::db::open(&dir.join(format!("{name}.sqlite3")))
        .map_err(|error| anyhow!("{error}"))?;
    migrate_openmls_tables(&mut connection).map_err(|error| anyhow!("{error}"))?;
    mlschat::core::db::migrate(&connection).map_err(|error| anyhow!("{error}"))?;
    let connection = Rc::new(connection);
    let (signer, credential) = new_signer(name)?;
    Ok(Member {
        provider: ClientProvider::new(Rc::clone(&connection)),
        signer,
        credential,
        connection: Some(connection),
    })
}

pub fn memory_member(name: &str) -> Result<Member<OpenMlsRustCrypto>> {
    let (signer, credential) = new_signer(name)?;
    Ok(Member {
        provider: OpenMlsRustCrypto::default(),
        signer,
        credential,
        connection: None,
    })
}

impl<P: OpenMlsProvider> Member<P> {
    /// Runs `step` in one fsync'd transaction for a SQLite-backed member, as the client's
    /// engine builds a commit (`db::transaction`). It builds an application message without an
    /// fsync and syncs right after handing it to the network: the same work on its thread,
    /// with the fsync off the message's path.
    pub fn step<T>(&self, step: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        self.step_with(true, step)
    }

    /// Runs `step` in one transaction as the client's engine processes a delivery: committed
    /// without an fsync (`db::transaction_unsynced`), which the engine's periodic sync covers
    /// for a whole burst of deliveries.
    pub fn step_unsynced<T>(&self, step: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        self.step_with(false, step)
    }

    /// Runs `step` in the client's own transaction functions; a step's error comes back as it
    /// was raised.
    fn step_with<T>(&self, fsync: bool, step: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        let Some(connection) = &self.connection else {
            return step(self);
        };
        let mut failure = None;
        let run = || {
            step(self).map_err(|error| {
                let message = format!("{error:#}");
                failure = Some(error);
                CoreError::Invalid(message)
            })
        };
        let outcome = if fsync {
            db::transaction(connection, run)
        } else {
            db::transaction_unsynced(connection, run)
        };
        outcome.map_err(|error| failure.take().unwrap_or_else(|| anyhow!("{error}")))
    }

    pub fn key_package(&self) -> Result<KeyPackage> {
        self.step(|member| {
            Ok(KeyPackage::builder()
                .build(
                    CIPHERSUITE,
                    &member.provider,
                    &member.signer,
                    member.credential.clone(),
                )
                .map_err(|error| anyhow!("key package: {error:?}"))?
                .key_package()
                .clone())
        })
    }

    pub fn create_group(&self) -> Result<MlsGroup> {
        self.step(|member| {
            MlsGroup::builder()
                .ciphersuite(CIPHERSUITE)
                .use_ratchet_tree_extension(true)
                .with_wire_format_policy(MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY)
                .build(&member.provider, &member.signer, member.credential.clone())
                .map_err(|error| anyhow!("create group: {error:?}"))
        })
    }

    /// Commits adding `key_packages` (with a path, as `add_members` does) and merges it.
    /// Returns (commit bytes, welcome bytes).
    pub fn add(
        &self,
        group: &mut MlsGroup,
        key_packages: &[KeyPackage],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        self.step(|member| {
            let (commit, welcome, _) = group
                .add_members(&member.provider, &member.signer, key_packages)
                .map_err(|error| anyhow!("add members: {error:?}"))?;
            group
                .merge_pending_commit(&member.provider)
                .map_err(|error| anyhow!("merge: {error:?}"))?;
            Ok((bytes(&commit)?, bytes(&welcome)?))
        })
    }

    pub fn join(&self, welcome: &[u8]) -> Result<MlsGroup> {
        self.step(|member| {
            let message = MlsMessageIn::tls_deserialize_exact(welcome)?;
            let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
                bail!("not a Welcome");
            };
            let config = MlsGroupJoinConfig::builder()
                .wire_format_policy(MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY)
                .use_ratchet_tree_extension(true)
                .build();
            StagedWelcome::new_from_welcome(&member.provider, &config, welcome, None)
                .map_err(|error| anyhow!("welcome: {error:?}"))?
                .into_group(&member.provider)
                .map_err(|error| anyhow!("join: {error:?}"))
        })
    }

    /// An empty commit with a path (a self-update), merged; returns its bytes.
    pub fn self_update(&self, group: &mut MlsGroup) -> Result<Vec<u8>> {
        self.step(|member| {
            let bundle = group
                .self_update(
                    &member.provider,
                    &member.signer,
                    LeafNodeParameters::default(),
                )
                .map_err(|error| anyhow!("self update: {error:?}"))?;
            let commit = bytes(bundle.commit())?;
            group
                .merge_pending_commit(&member.provider)
                .map_err(|error| anyhow!("merge: {error:?}"))?;
            Ok(commit)
        })
    }

    /// Processes a commit or application message from another member; merges commits.
    pub fn process(&self, group: &mut MlsGroup, message: &[u8]) -> Result<()> {
        self.step_unsynced(|member| {
            let message = MlsMessageIn::tls_deserialize_exact(message)?;
            let protocol: ProtocolMessage = message
                .try_into_protocol_message()
                .map_err(|error| anyhow!("not a protocol message: {error:?}"))?;
            let processed = group
                .process_message(&member.provider, protocol)
                .map_err(|error| anyhow!("process: {error:?}"))?;
            match processed.into_content() {
                ProcessedMessageContent::StagedCommitMessage(staged) => group
                    .merge_staged_commit(&member.provider, *staged)
                    .map_err(|error| anyhow!("merge staged: {error:?}")),
                ProcessedMessageContent::ApplicationMessage(_) => Ok(()),
                _ => Ok(()),
            }
        })
    }

    pub fn encrypt(&self, group: &mut MlsGroup, plaintext: &[u8]) -> Result<Vec<u8>> {
        self.step(|member| {
            let message = group
                .create_message(&member.provider, &member.signer, plaintext)
                .map_err(|error| anyhow!("encrypt: {error:?}"))?;
            bytes(&message)
        })
    }
}

fn bytes(message: &MlsMessageOut) -> Result<Vec<u8>> {
    message
        .to_bytes()
        .map_err(|error| anyhow!("encode: {error:?}"))
}

/// KeyPackages of `count` members that never act (memory providers, dropped right away).
fn bystander_key_packages(count: usize, prefix: &str) -> Result<Vec<KeyPackage>> {
    (0..count)
        .map(|index| memory_member(&format!("{prefix}{index}"))?.key_package())
        .collect()
}

/// Bytes of openmls state stored for groups in a SQLite-backed member's database.
fn stored_group_bytes(connection: &Connection) -> Result<(u64, u64)> {
    let total: i64 = connection.query_row(
        "SELECT COALESCE(SUM(LENGTH(group_data)), 0) FROM openmls_group_data",
        [],
        |row| row.get(0),
    )?;
    let epoch_keys: i64 = connection.query_row(
        "SELECT COALESCE(SUM(LENGTH(key_pairs)), 0) FROM openmls_epoch_keys_pairs",
        [],
        |row| row.get(0),
    )?;
    let leaves: i64 = connection.query_row(
        "SELECT COALESCE(SUM(LENGTH(leaf_node)), 0) FROM openmls_own_leaf_nodes",
        [],
        |row| row.get(0),
    )?;
    let secrets: i64 = connection.query_row(
        "SELECT COALESCE(SUM(LENGTH(group_data)), 0) FROM openmls_group_data WHERE data_type = 'message_secrets'",
        [],
        |row| row.get(0),
    )?;
    Ok(((total + epoch_keys + leaves) as u64, secrets as u64))
}

// ---- mls-rs -------------------------------------------------------------------------------

mod peer {
    use anyhow::{Result, anyhow};
    use mls_rs::client_builder::MlsConfig;
    use mls_rs::identity::SigningIdentity;
    use mls_rs::identity::basic::{BasicCredential, BasicIdentityProvider};
    use mls_rs::mls_rules::{CommitOptions, DefaultMlsRules};
    use mls_rs::{CipherSuite, CipherSuiteProvider, Client, CryptoProvider, MlsMessage};
    use mls_rs_crypto_rustcrypto::RustCryptoProvider;

    pub const SUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

    /// A client with a path in every commit (as openmls's `add_members`) and the ratchet tree
    /// in Welcomes (as mlschat configures openmls).
    pub fn client(name: &str) -> Result<Client<impl MlsConfig + use<>>> {
        let crypto = RustCryptoProvider::default();
        let suite = crypto
            .cipher_suite_provider(SUITE)
            .ok_or_else(|| anyhow!("suite unsupported"))?;
        let (secret, public) = suite
            .signature_key_generate()
            .map_err(|error| anyhow!("{error:?}"))?;
        let identity = SigningIdentity::new(
            BasicCredential::new(name.as_bytes().to_vec()).into_credential(),
            public,
        );
        Ok(Client::builder()
            .identity_provider(BasicIdentityProvider)
            .crypto_provider(crypto)
            .mls_rules(
                DefaultMlsRules::new().with_commit_options(
                    CommitOptions::new()
                        .with_path_required(true)
                        .with_ratchet_tree_extension(true),
                ),
            )
            .signing_identity(identity, secret, SUITE)
            .build())
    }

    pub fn key_package<C: MlsConfig>(client: &Client<C>) -> Result<MlsMessage> {
        client
            .generate_key_package_message(Default::default(), Default::default(), None)
            .map_err(|error| anyhow!("{error:?}"))
    }
}

// ---- figure 3 -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One commit adds everyone: blank parent nodes, commits of θ(n) ciphertexts.
    Sparse,
    /// Each member is added by the previous one with a path: populated parents, θ(log n).
    Full,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Sparse => "sparse (batch-added, blank parents)",
            Shape::Full => "full (chain-added, populated parents)",
        }
    }
}

struct CommitTimes {
    sqlite_us: Vec<f64>,
    memory_us: Vec<f64>,
    mls_rs_us: Vec<f64>,
    commit_bytes: usize,
    mls_rs_commit_bytes: usize,
}

/// Builds the group for openmls and mls-rs, then has the committer send `commits` self-update
/// commits; receivers process them, alternating openmls and mls-rs (A B A B).
fn commit_processing(size: usize, shape: Shape, commits: usize) -> Result<CommitTimes> {
    let dir = tempfile::Builder::new()
        .prefix("mlschat-bench-mls")
        .tempdir()?;
    // openmls: committer C, receivers R (client storage) and M (memory) at the right end.
    let receiver = sqlite_member(dir.path(), "receiver")?;
    let in_memory = memory_member("memreceiver")?;
    let receivers_kp = vec![receiver.key_package()?, in_memory.key_package()?];
    let (committer, mut committer_group) = match shape {
        Shape::Sparse => {
            let committer = memory_member("committer")?;
            let mut group = committer.create_group()?;
            let mut key_packages = bystander_key_packages(size.saturating_sub(3), "b")?;
            key_packages.extend(receivers_kp);
            let (_, welcome) = committer.add(&mut group, &key_packages)?;
            (committer, (group, welcome))
        }
        Shape::Full => {
            let mut current = memory_member("chain0")?;
            let mut group = current.create_group()?;
            for index in 1..size.saturating_sub(2) {
                let next = memory_member(&format!("chain{index}"))?;
                let (_, welcome) = current.add(&mut group, &[next.key_package()?])?;
                group = next.join(&welcome)?;
                current = next;
            }
            let (_, welcome) = current.add(&mut group, &receivers_kp)?;
            (current, (group, welcome))
        }
    };
    let welcome = committer_group.1;
    let mut receiver_group = receiver.join(&welcome)?;
    let mut memory_group = in_memory.join(&welcome)?;
    if receiver_group.members().count() != size {
        bail!(
            "openmls group has {} members, wanted {size}",
            receiver_group.members().count()
        );
    }

    // mls-rs: the same shapes.
    let mls_receiver = peer::client("receiver")?;
    let (mut mls_committer, mut mls_receiver_group) = match shape {
        Shape::Sparse => {
            let creator = peer::client("committer")?;
            let mut group = creator
                .create_group(Default::default(), Default::default(), None)
                .map_err(|e| anyhow!("{e:?}"))?;
            let mut builder = group.commit_builder();
            for index in 0..size.saturating_sub(2) {
                let bystander = peer::client(&format!("b{index}"))?;
                builder = builder
                    .add_member(peer::key_package(&bystander)?)
                    .map_err(|e| anyhow!("{e:?}"))?;
            }
            builder = builder
                .add_member(peer::key_package(&mls_receiver)?)
                .map_err(|e| anyhow!("{e:?}"))?;
            let output = builder.build().map_err(|e| anyhow!("{e:?}"))?;
            group.apply_pending_commit().map_err(|e| anyhow!("{e:?}"))?;
            let (joined, _) = mls_receiver
                .join_group(None, &output.welcome_messages[0], None)
                .map_err(|e| anyhow!("{e:?}"))?;
            (group, joined)
        }
        Shape::Full => {
            let first = peer::client("chain0")?;
            let mut group = first
                .create_group(Default::default(), Default::default(), None)
                .map_err(|e| anyhow!("{e:?}"))?;
            for index in 1..size.saturating_sub(1) {
                let next = peer::client(&format!("chain{index}"))?;
                let output = group
                    .commit_builder()
                    .add_member(peer::key_package(&next)?)
                    .map_err(|e| anyhow!("{e:?}"))?
                    .build()
                    .map_err(|e| anyhow!("{e:?}"))?;
                group.apply_pending_commit().map_err(|e| anyhow!("{e:?}"))?;
                let (joined, _) = next
                    .join_group(None, &output.welcome_messages[0], None)
                    .map_err(|e| anyhow!("{e:?}"))?;
                group = joined;
            }
            let output = group
                .commit_builder()
                .add_member(peer::key_package(&mls_receiver)?)
                .map_err(|e| anyhow!("{e:?}"))?
                .build()
                .map_err(|e| anyhow!("{e:?}"))?;
            group.apply_pending_commit().map_err(|e| anyhow!("{e:?}"))?;
            let (joined, _) = mls_receiver
                .join_group(None, &output.welcome_messages[0], None)
                .map_err(|e| anyhow!("{e:?}"))?;
            (group, joined)
        }
    };
    if mls_receiver_group.roster().members().len() != size {
        bail!(
            "mls-rs group has {} members, wanted {}",
            mls_receiver_group.roster().members().len(),
            size
        );
    }

    let mut times = CommitTimes {
        sqlite_us: Vec::new(),
        memory_us: Vec::new(),
        mls_rs_us: Vec::new(),
        commit_bytes: 0,
        mls_rs_commit_bytes: 0,
    };
    for _ in 0..commits {
        let commit = committer.self_update(&mut committer_group.0)?;
        times.commit_bytes = commit.len();
        let started = Instant::now();
        receiver.process(&mut receiver_group, &commit)?;
        times.sqlite_us.push(started.elapsed().as_secs_f64() * 1e6);
        let started = Instant::now();
        in_memory.process(&mut memory_group, &commit)?;
        times.memory_us.push(started.elapsed().as_secs_f64() * 1e6);

        let output = mls_committer
            .commit(Vec::new())
            .map_err(|e| anyhow!("{e:?}"))?;
        mls_committer
            .apply_pending_commit()
            .map_err(|e| anyhow!("{e:?}"))?;
        let commit = output.commit_message;
        times.mls_rs_commit_bytes = commit.to_bytes().map_err(|e| anyhow!("{e:?}"))?.len();
        let started = Instant::now();
        mls_receiver_group
            .process_incoming_message(commit)
            .map_err(|e| anyhow!("{e:?}"))?;
        mls_receiver_group
            .write_to_storage()
            .map_err(|e| anyhow!("{e:?}"))?;
        times.mls_rs_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(times)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| anyhow!("worker panicked: {error}"))?
}

pub async fn figure3(settings: &Settings, failures: &Failures) -> Vec<Row> {
    let cases: Vec<(usize, Shape)> = if settings.quick {
        vec![
            (10, Shape::Sparse),
            (100, Shape::Sparse),
            (1000, Shape::Sparse),
            (10, Shape::Full),
            (100, Shape::Full),
        ]
    } else {
        vec![
            (10, Shape::Sparse),
            (100, Shape::Sparse),
            (1000, Shape::Sparse),
            (10_000, Shape::Sparse),
            (10, Shape::Full),
            (100, Shape::Full),
            // A chain-built tree costs O(n^2) (each of the n joins verifies the whole tree):
            // 500 members take minutes on 2 cores; 1000 would take several times that.
            (500, Shape::Full),
        ]
    };
    let commits = if settings.quick {
        3
    } else {
        3 * settings.rounds.max(1) + 2
    };
    let mut rows = Vec::new();
    for (size, shape) in cases {
        eprintln!("  fig 3: {size} members, {}", shape.name());
        let started = Instant::now();
        match blocking(move || commit_processing(size, shape, commits)).await {
            Ok(times) => {
                let ours = median(&times.sqlite_us);
                let mut row = Row::new(
                    3,
                    format!("commit processing at receiver, {}", shape.name()),
                    size,
                    "us",
                )
                .ours(ours)
                .peer("mls-rs (memory)", Some(median(&times.mls_rs_us)));
                if size == 1000 {
                    row = row.target("<= 1.5x mls-rs at 1000", 1.5, false);
                }
                rows.push(row.note(format!(
                    "median of {commits}; openmls in memory {:.0} us; commit {} B (mls-rs {} B); build {:.0} s",
                    median(&times.memory_us),
                    times.commit_bytes,
                    times.mls_rs_commit_bytes,
                    started.elapsed().as_secs_f64()
                )));
            }
            Err(error) => failures.error(format!("fig 3 n={size} {shape:?}: {error:#}")),
        }
    }
    rows
}

// ---- figure 4 -------------------------------------------------------------------------------

struct AddTimes {
    committer_us: Vec<f64>,
    joiner_us: Vec<f64>,
    commit_bytes: usize,
    welcome_bytes: usize,
    mls_rs_committer_us: Vec<f64>,
    mls_rs_joiner_us: Vec<f64>,
    mls_rs_commit_bytes: usize,
    mls_rs_welcome_bytes: usize,
}

fn add_one(size: usize, repeats: usize) -> Result<AddTimes> {
    let dir = tempfile::Builder::new()
        .prefix("mlschat-bench-add")
        .tempdir()?;
    let committer = sqlite_member(dir.path(), "committer")?;
    let mut group = committer.create_group()?;
    committer.add(&mut group, &bystander_key_packages(size - 1, "b")?)?;
    let mls_committer_client = peer::client("committer")?;
    let mut mls_group = mls_committer_client
        .create_group(Default::default(), Default::default(), None)
        .map_err(|e| anyhow!("{e:?}"))?;
    let mut builder = mls_group.commit_builder();
    for index in 0..size - 1 {
        builder = builder
            .add_member(peer::key_package(&peer::client(&format!("b{index}"))?)?)
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    builder.build().map_err(|e| anyhow!("{e:?}"))?;
    mls_group
        .apply_pending_commit()
        .map_err(|e| anyhow!("{e:?}"))?;
    mls_group.write_to_storage().map_err(|e| anyhow!("{e:?}"))?;

    let mut times = AddTimes {
        committer_us: Vec::new(),
        joiner_us: Vec::new(),
        commit_bytes: 0,
        welcome_bytes: 0,
        mls_rs_committer_us: Vec::new(),
        mls_rs_joiner_us: Vec::new(),
        mls_rs_commit_bytes: 0,
        mls_rs_welcome_bytes: 0,
    };
    for repeat in 0..repeats {
        let joiner = sqlite_member(dir.path(), &format!("joiner{repeat}"))?;
        let key_package = joiner.key_package()?;
        let started = Instant::now();
        let (commit, welcome) = committer.add(&mut group, &[key_package])?;
        times
            .committer_us
            .push(started.elapsed().as_secs_f64() * 1e6);
        times.commit_bytes = commit.len();
        times.welcome_bytes = welcome.len();
        let started = Instant::now();
        let joined = joiner.join(&welcome)?;
        times.joiner_us.push(started.elapsed().as_secs_f64() * 1e6);
        if joined.members().count() != size + repeat + 1 {
            bail!("the joiner sees {} members", joined.members().count());
        }

        let mls_joiner = peer::client(&format!("joiner{repeat}"))?;
        let key_package = peer::key_package(&mls_joiner)?;
        let started = Instant::now();
        let output = mls_group
            .commit_builder()
            .add_member(key_package)
            .map_err(|e| anyhow!("{e:?}"))?
            .build()
            .map_err(|e| anyhow!("{e:?}"))?;
        mls_group
            .apply_pending_commit()
            .map_err(|e| anyhow!("{e:?}"))?;
        mls_group.write_to_storage().map_err(|e| anyhow!("{e:?}"))?;
        times
            .mls_rs_committer_us
            .push(started.elapsed().as_secs_f64() * 1e6);
        times.mls_rs_commit_bytes = output
            .commit_message
            .to_bytes()
            .map_err(|e| anyhow!("{e:?}"))?
            .len();
        let welcome = output.welcome_messages.first().context("no welcome")?;
        times.mls_rs_welcome_bytes = welcome.to_bytes().map_err(|e| anyhow!("{e:?}"))?.len();
        let started = Instant::now();
        let (mut joined, _) = mls_joiner
            .join_group(None, welcome, None)
            .map_err(|e| anyhow!("{e:?}"))?;
        joined.write_to_storage().map_err(|e| anyhow!("{e:?}"))?;
        times
            .mls_rs_joiner_us
            .push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(times)
}

pub async fn figure4(settings: &Settings, failures: &Failures) -> Vec<Row> {
    let size = 1000;
    let repeats = if settings.quick {
        2
    } else {
        3 * settings.rounds.max(1)
    };
    eprintln!("  fig 4: add one member to {size}");
    let times = match blocking(move || add_one(size, repeats)).await {
        Ok(times) => times,
        Err(error) => {
            failures.error(format!("fig 4: {error:#}"));
            return Vec::new();
        }
    };
    let note = format!(
        "median of {repeats}; openmls: client SQLite storage; mls-rs: memory + write_to_storage"
    );
    vec![
        Row::new(4, "add 1 member: committer time", size, "us")
            .ours(median(&times.committer_us))
            .peer("mls-rs", Some(median(&times.mls_rs_committer_us)))
            .note(&note),
        Row::new(4, "add 1 member: joiner time", size, "us")
            .ours(median(&times.joiner_us))
            .peer("mls-rs", Some(median(&times.mls_rs_joiner_us)))
            .note(&note),
        Row::new(4, "add 1 member: Welcome bytes", size, "bytes")
            .ours(times.welcome_bytes as f64)
            .peer("mls-rs", Some(times.mls_rs_welcome_bytes as f64))
            .note("both with the ratchet tree in the Welcome"),
        Row::new(4, "add 1 member: commit bytes", size, "bytes")
            .ours(times.commit_bytes as f64)
            .peer("mls-rs", Some(times.mls_rs_commit_bytes as f64))
            .note("both with a path"),
    ]
}

// ---- figure 7 -------------------------------------------------------------------------------

#[derive(Default)]
struct MessageCost {
    send_us: Vec<f64>,
    receive_us: Vec<f64>,
    stored_bytes: u64,
    message_secrets_bytes: u64,
    tree_bytes: usize,
}

/// A sender and a receiver, both with client storage, in a group of `size` members.
struct MessagePair {
    _dir: tempfile::TempDir,
    sender: Member<ClientProvider>,
    receiver: Member<ClientProvider>,
    sender_group: MlsGroup,
    receiver_group: MlsGroup,
}

fn message_pair(size: usize) -> Result<MessagePair> {
    let dir = tempfile::Builder::new()
        .prefix("mlschat-bench-client")
        .tempdir()?;
    let sender = sqlite_member(dir.path(), "sender")?;
    let receiver = sqlite_member(dir.path(), "receiver")?;
    let mut sender_group = sender.create_group()?;
    let mut key_packages = bystander_key_packages(size - 2, "b")?;
    key_packages.push(receiver.key_package()?);
    let (_, welcome) = sender.add(&mut sender_group, &key_packages)?;
    let receiver_group = receiver.join(&welcome)?;
    Ok(MessagePair {
        _dir: dir,
        sender,
        receiver,
        sender_group,
        receiver_group,
    })
}

/// Builds one group per size first, then sends the messages interleaved across the sizes
/// (10, 1000, 10, 1000, ...), so that a slow stretch of the machine hits every size alike.
fn message_costs(sizes: &[usize], messages: usize) -> Result<Vec<(usize, MessageCost)>> {
    let mut pairs = Vec::new();
    for &size in sizes {
        eprintln!("  fig 7: building a group of {size}");
        pairs.push(message_pair(size).with_context(|| format!("group of {size}"))?);
    }
    let mut costs: Vec<MessageCost> = sizes.iter().map(|_| MessageCost::default()).collect();
    let plaintext = vec![b'x'; 1024];
    for _ in 0..messages {
        for (pair, cost) in pairs.iter_mut().zip(costs.iter_mut()) {
            let started = Instant::now();
            let message = pair.sender.encrypt(&mut pair.sender_group, &plaintext)?;
            cost.send_us.push(started.elapsed().as_secs_f64() * 1e6);
            let started = Instant::now();
            pair.receiver.process(&mut pair.receiver_group, &message)?;
            cost.receive_us.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    for (pair, cost) in pairs.iter().zip(costs.iter_mut()) {
        let connection = pair.receiver.connection.as_ref().context("sqlite member")?;
        (cost.stored_bytes, cost.message_secrets_bytes) = stored_group_bytes(connection)?;
        cost.tree_bytes = pair
            .receiver_group
            .export_ratchet_tree()
            .tls_serialize_detached()?
            .len();
    }
    Ok(sizes.iter().copied().zip(costs).collect())
}

pub async fn figure7(settings: &Settings, failures: &Failures) -> Vec<Row> {
    let sizes: &[usize] = if settings.quick {
        &[10, 1000]
    } else {
        &[10, 1000, 10_000]
    };
    let messages = if settings.quick { 30 } else { 200 };
    let results = match blocking(move || message_costs(sizes, messages)).await {
        Ok(results) => results,
        Err(error) => {
            failures.error(format!("fig 7: {error:#}"));
            Vec::new()
        }
    };
    let mut rows = Vec::new();
    let Some((_, base)) = results.first() else {
        return rows;
    };
    let base_send = median(&base.send_us);
    let base_receive = median(&base.receive_us);
    for (size, cost) in &results {
        let flat = |row: Row| {
            if *size == 10 {
                row
            } else {
                row.target("<= 1.2x of 10 members", 1.2, false)
            }
        };
        rows.push(
            flat(
                Row::new(
                    7,
                    "client send cost per message (encrypt + store)",
                    size,
                    "us",
                )
                .ours(median(&cost.send_us))
                .peer("same client, 10 members", Some(base_send)),
            )
            .note(format!(
                "median of {messages}, mean {:.0} us",
                mean(&cost.send_us)
            )),
        );
        rows.push(
            flat(
                Row::new(
                    7,
                    "client receive cost per message (decrypt + store)",
                    size,
                    "us",
                )
                .ours(median(&cost.receive_us))
                .peer("same client, 10 members", Some(base_receive)),
            )
            .note(format!(
                "median of {messages}, mean {:.0} us",
                mean(&cost.receive_us)
            )),
        );
        rows.push(
            Row::new(7, "client storage per group", size, "bytes")
                .ours(cost.stored_bytes as f64)
                .peer("exported ratchet tree", Some(cost.tree_bytes as f64))
                .note(format!(
                    "openmls blobs in the profile DB; message_secrets (rewritten per message) {} B",
                    cost.message_secrets_bytes
                )),
        );
    }
    rows
}
