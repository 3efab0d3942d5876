//! The DS never sees plaintext: two real openmls clients (alice and bob) talk through the real
//! `mlschat-ds` binary running with `RUST_LOG=trace`; afterwards no message plaintext (raw,
//! hex, base64 or as a Rust byte-list) may appear in any file of the DS's data directory or in
//! its logs. A control proves the search finds each of those encodings.

mod support_durability;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use mlschat_ds::client::ChallengeSigner;
use mlschat_ds::protocol::{
    ClaimKeyPackage, CommitRouting, Delivery, DeliveryKind, Frame, GroupId, UploadKeyPackages,
    UserName,
};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, Ciphersuite, CredentialWithKey, KeyPackage, MlsGroup, MlsGroupJoinConfig,
    MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, ProcessedMessageContent, ProtocolVersion,
    StagedWelcome,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider as _;
use openmls_traits::signatures::Signer as _;
use openmls_traits::types::SignatureScheme;
use support_durability::{Client, DsOptions, DsProcess, message_id, user};

const TEST_TIMEOUT: Duration = Duration::from_secs(50);
const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// Application messages sent in each direction.
const MESSAGES_EACH_WAY: usize = 20;

fn canary(n: usize) -> String {
    format!("PLAINTEXT-CANARY-{n:02}-zebra-ocelot")
}

/// An MLS signature key pair doubling as the DS login key (the DS requires them to match).
struct MlsSigner(SignatureKeyPair);

impl ChallengeSigner for MlsSigner {
    fn public_key(&self) -> Vec<u8> {
        self.0.public().to_vec()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).expect("Ed25519 signing")
    }
}

/// One openmls client with its DS connection.
struct Member {
    name: UserName,
    provider: OpenMlsRustCrypto,
    signer: MlsSigner,
    credential: CredentialWithKey,
    client: Client,
    group: Option<MlsGroup>,
}

impl Member {
    async fn register(ds: &DsProcess, name: &str) -> Member {
        let name = user(name);
        let provider = OpenMlsRustCrypto::default();
        let keys = SignatureKeyPair::new(SignatureScheme::ED25519).expect("signature keys");
        keys.store(provider.storage())
            .expect("store signature keys");
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_str().as_bytes().to_vec()).into(),
            signature_key: keys.public().into(),
        };
        let signer = MlsSigner(keys);
        let client = Client::connect(ds.address, ds.fingerprint, &name, &signer, true).await;
        Member {
            name,
            provider,
            signer,
            credential,
            client,
            group: None,
        }
    }

    fn group(&mut self) -> &mut MlsGroup {
        self.group.as_mut().expect("member of the group")
    }

    /// Sends one application message and returns its seq.
    async fn send_text(&mut self, n: u64, text: &str) -> u64 {
        let provider = &self.provider;
        let signer = &self.signer.0;
        let message = self
            .group
            .as_mut()
            .expect("member of the group")
            .create_message(provider, signer, text.as_bytes())
            .expect("encrypt an application message");
        let bytes = message.to_bytes().expect("serialise");
        assert!(
            !contains(&bytes, text.as_bytes()),
            "openmls output must not contain the plaintext"
        );
        let (seq, _) = self
            .client
            .send_message(message_id(0x70, n), &bytes, None)
            .await;
        seq
    }

    async fn next_delivery(&mut self) -> Delivery {
        tokio::time::timeout(Duration::from_secs(15), self.client.deliveries.recv())
            .await
            .expect("a delivery in time")
            .expect("the connection is open")
    }

    /// Reads pushed deliveries up to `seq`; decrypts the others' application messages.
    async fn receive_until(&mut self, seq: u64) -> Vec<Vec<u8>> {
        let mut plaintexts = Vec::new();
        loop {
            let delivery = self.next_delivery().await;
            let done = delivery.seq >= seq;
            if delivery.sender != self.name {
                assert_eq!(delivery.kind, DeliveryKind::Application as u8);
                let message = MlsMessageIn::tls_deserialize_exact(delivery.payload.as_slice())
                    .expect("an MLSMessage");
                let protocol = message
                    .try_into_protocol_message()
                    .expect("a protocol message");
                let provider = &self.provider;
                let processed = self
                    .group
                    .as_mut()
                    .expect("member of the group")
                    .process_message(provider, protocol)
                    .expect("decrypt");
                match processed.into_content() {
                    ProcessedMessageContent::ApplicationMessage(application) => {
                        plaintexts.push(application.into_bytes());
                    }
                    other => panic!("expected an application message, got {other:?}"),
                }
            }
            if done {
                let ack = Frame::Ack(mlschat_ds::protocol::Ack {
                    group_id: delivery.group_id,
                    seq: delivery.seq,
                });
                self.client.send_frame(&ack).await;
                return plaintexts;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ds_never_stores_or_logs_plaintext() {
    tokio::time::timeout(TEST_TIMEOUT, scenario())
        .await
        .expect("the no-plaintext scenario timed out");
}

async fn scenario() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let data_dir = dir.path().join("data");
    let log_file = dir.path().join("ds-trace.log");
    let mut ds = DsProcess::start(DsOptions {
        data_dir: &data_dir,
        database: None,
        config: None,
        rust_log: "trace",
        stderr_log: Some(&log_file),
    });
    std::fs::write(
        dir.path().join("ds-stdout.log"),
        ds.startup_lines.join("\n"),
    )
    .expect("keep the DS stdout");

    let mut alice = Member::register(&ds, "alice").await;
    let mut bob = Member::register(&ds, "bob").await;

    // Bob publishes a real KeyPackage; alice claims it through the DS.
    let bundle = KeyPackage::builder()
        .build(
            CIPHERSUITE,
            &bob.provider,
            &bob.signer.0,
            bob.credential.clone(),
        )
        .expect("bob's KeyPackage");
    let key_package_bytes = MlsMessageOut::from(bundle.key_package().clone())
        .to_bytes()
        .expect("serialise the KeyPackage");
    let stored = bob
        .client
        .request(|request_id| {
            Frame::UploadKeyPackages(UploadKeyPackages {
                request_id,
                key_packages: vec![key_package_bytes.as_slice().into()],
                last_resort: None,
            })
        })
        .await;
    assert!(
        matches!(stored, Frame::KeyPackagesStored(ref s) if s.remaining == 1),
        "{stored:?}"
    );
    let claimed = alice
        .client
        .request(|request_id| {
            Frame::ClaimKeyPackage(ClaimKeyPackage {
                request_id,
                user_name: bob.name.clone(),
            })
        })
        .await;
    let Frame::KeyPackage(claimed) = claimed else {
        panic!("claim failed: {claimed:?}");
    };
    assert_eq!(claimed.last_resort, 0);
    let MlsMessageBodyIn::KeyPackage(key_package) =
        MlsMessageIn::tls_deserialize_exact(claimed.key_package.as_slice())
            .expect("an MLSMessage")
            .extract()
    else {
        panic!("the claimed bytes are not a KeyPackage");
    };
    let key_package = key_package
        .validate(alice.provider.crypto(), ProtocolVersion::Mls10)
        .expect("bob's KeyPackage verifies");

    // Alice creates the group on both sides and adds bob; the Welcome travels through the DS.
    let group_id = GroupId::new(b"no-plaintext-group".to_vec()).expect("group id");
    let mut group = MlsGroup::builder()
        .with_group_id(openmls::group::GroupId::from_slice(group_id.as_bytes()))
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .build(&alice.provider, &alice.signer.0, alice.credential.clone())
        .expect("alice's group");
    alice.client.create_group(&group_id).await;
    let (commit, welcome, _group_info) = group
        .add_members(&alice.provider, &alice.signer.0, &[key_package])
        .expect("add bob");
    let accepted = alice
        .client
        .send_message(
            message_id(0x71, 0),
            &commit.to_bytes().expect("serialise the commit"),
            Some(CommitRouting {
                welcome: Some(welcome.to_bytes().expect("serialise the Welcome").into()),
                added: vec![bob.name.clone()],
                removed: Vec::new(),
            }),
        )
        .await;
    assert_eq!(accepted, (1, 1));
    group
        .merge_pending_commit(&alice.provider)
        .expect("merge the add");
    alice.group = Some(group);
    let own_commit = alice.next_delivery().await;
    assert_eq!(
        (own_commit.seq, own_commit.kind),
        (1, DeliveryKind::Commit as u8)
    );

    let welcome = bob.next_delivery().await;
    assert_eq!(
        (welcome.seq, welcome.kind),
        (1, DeliveryKind::Welcome as u8)
    );
    let MlsMessageBodyIn::Welcome(welcome) =
        MlsMessageIn::tls_deserialize_exact(welcome.payload.as_slice())
            .expect("an MLSMessage")
            .extract()
    else {
        panic!("bob's first delivery is not a Welcome");
    };
    let join_config = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .build();
    let bobs_group = StagedWelcome::new_from_welcome(&bob.provider, &join_config, welcome, None)
        .expect("stage the Welcome")
        .into_group(&bob.provider)
        .expect("join from the Welcome");
    assert_eq!(bobs_group.epoch(), alice.group().epoch());
    bob.group = Some(bobs_group);

    // Messages both ways, each decrypted by the other side.
    let mut sent = Vec::new();
    for round in 0..MESSAGES_EACH_WAY {
        for from_alice in [true, false] {
            let n = sent.len();
            let text = canary(n);
            let (from, to) = if from_alice {
                (&mut alice, &mut bob)
            } else {
                (&mut bob, &mut alice)
            };
            let seq = from.send_text(n as u64, &text).await;
            let received = to.receive_until(seq).await;
            assert_eq!(
                received,
                vec![text.clone().into_bytes()],
                "round {round}: the plaintext arrives intact"
            );
            sent.push(text);
        }
    }
    assert_eq!(sent.len(), 2 * MESSAGES_EACH_WAY);

    // A ciphertext the DS certainly stored, to prove the scan reads the stored messages.
    let stored_ciphertext = alice
        .client
        .fetch_all(&group_id, 1)
        .await
        .last()
        .expect("stored messages")
        .payload
        .as_slice()
        .to_vec();

    alice.client.close();
    bob.client.close();
    ds.terminate();
    let status = ds
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the DS stops");
    assert!(status.success(), "the DS exits cleanly: {status}");

    let mut scanned = files_under(&data_dir);
    scanned.push(log_file.clone());
    scanned.push(dir.path().join("ds-stdout.log"));
    let mut contents = Vec::new();
    for path in &scanned {
        contents.push((
            path.clone(),
            std::fs::read(path).unwrap_or_else(|error| panic!("read {}: {error}", path.display())),
        ));
    }
    let names: Vec<String> = scanned
        .iter()
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        names.iter().any(|name| name.ends_with("ds.sqlite3")),
        "the database is scanned: {names:?}"
    );
    let log_len = contents
        .iter()
        .find(|(path, _)| path == &log_file)
        .map_or(0, |(_, bytes)| bytes.len());
    assert!(
        log_len > 10_000,
        "the trace log is verbose ({log_len} bytes)"
    );
    assert!(
        contents
            .iter()
            .any(|(_, bytes)| contains(bytes, &stored_ciphertext)),
        "the stored ciphertext is found in the data directory {names:?}, so the scan reads it"
    );

    let patterns = Patterns::new(&sent);
    for (path, bytes) in &contents {
        let findings = patterns.find(bytes);
        assert!(
            findings.is_empty(),
            "plaintext found in {}: {findings:?}",
            path.display()
        );
    }
    eprintln!(
        "scanned {names:?} ({log_len} bytes of trace log) for {} patterns: clean",
        patterns.patterns.len()
    );
}

/// The search must find every encoding of a canary, wherever it sits in a file.
#[test]
fn the_plaintext_search_finds_every_encoding() {
    let canaries: Vec<String> = (0..3).map(canary).collect();
    let patterns = Patterns::new(&canaries);
    let secret = canaries[1].as_bytes();
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
    ];
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut controls: Vec<(&str, Vec<u8>)> = vec![
        ("raw", secret.to_vec()),
        ("hex", hex::encode(secret).into_bytes()),
        ("HEX", hex::encode_upper(secret).into_bytes()),
        ("debug", format!("{:?}", secret).into_bytes()),
    ];
    for prefix in 0..3 {
        for engine in &engines {
            let mut shifted = vec![0xfe_u8; prefix];
            shifted.extend_from_slice(secret);
            shifted.extend_from_slice(b"\x01trailing bytes");
            controls.push(("base64", engine.encode(&shifted).into_bytes()));
        }
    }
    for (index, (form, encoded)) in controls.iter().enumerate() {
        // Binary noise around the encoded canary, as in a database page or a log line.
        let mut file = vec![0x00, 0xff, 0xc3, 0x28, b'x'];
        file.extend_from_slice(encoded);
        file.extend_from_slice(&[0xe2, 0x82, 0x00, b'\n']);
        let path = dir.path().join(format!("control-{index}"));
        std::fs::write(&path, &file).expect("write a control file");
        let read = std::fs::read(&path).expect("read the control file");
        let findings = patterns.find(&read);
        assert!(
            findings
                .iter()
                .any(|finding| finding.starts_with(&canaries[1])),
            "the {form} control {index} is found: {findings:?}"
        );
        assert!(
            findings
                .iter()
                .all(|finding| finding.starts_with(&canaries[1])),
            "only the planted canary is found: {findings:?}"
        );
    }
    assert!(patterns.find(b"nothing to see here").is_empty());
    assert!(patterns.find(&[0u8; 4096]).is_empty());
}

/// Every searchable form of every canary. All forms are ASCII, so a lossy UTF-8 view of a file
/// keeps them intact and the (optimised) standard-library substring search can be used.
struct Patterns {
    /// (description, pattern)
    patterns: Vec<(String, String)>,
}

impl Patterns {
    fn new(canaries: &[String]) -> Patterns {
        let mut patterns = Vec::new();
        let engines = [
            ("base64", base64::engine::general_purpose::STANDARD),
            ("base64url", base64::engine::general_purpose::URL_SAFE),
        ];
        for canary in canaries {
            let bytes = canary.as_bytes();
            patterns.push((format!("{canary} raw"), canary.clone()));
            patterns.push((format!("{canary} hex"), hex::encode(bytes)));
            patterns.push((format!("{canary} HEX"), hex::encode_upper(bytes)));
            // `{:?}` of a byte slice, as a careless `tracing` field would print it.
            let debug = format!("{bytes:?}");
            patterns.push((
                format!("{canary} debug bytes"),
                debug
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            ));
            // Base64 depends on where the canary starts relative to 3-byte groups: for each of
            // the three alignments keep only the characters that depend on canary bytes alone.
            for offset in 0..3 {
                for (name, engine) in &engines {
                    let mut shifted = vec![0u8; offset];
                    shifted.extend_from_slice(bytes);
                    let encoded = engine.encode(&shifted);
                    let skip = if offset == 0 { 0 } else { 4 };
                    let end = shifted.len() / 3 * 4;
                    patterns.push((
                        format!("{canary} {name} at offset {offset}"),
                        encoded[skip..end].to_string(),
                    ));
                }
            }
        }
        Patterns { patterns }
    }

    /// Descriptions of the patterns found in `bytes`.
    fn find(&self, bytes: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(bytes);
        self.patterns
            .iter()
            .filter(|(_, pattern)| text.contains(pattern.as_str()))
            .map(|(description, _)| description.clone())
            .collect()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the data directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}
