//! Codec tests for the wire protocol: a round trip for every frame kind, fixed hex test vectors
//! (the same strings appear in `docs/protocol.md`), rejection of truncated, oversized and
//! malformed input, a deterministic mutation fuzz, and the numeric tables of kinds and codes.

use std::panic::{AssertUnwindSafe, catch_unwind};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use super::mls::{ContentType, WireFormat, expect_wire_format, peek_message_header};
use super::*;

// ---------------------------------------------------------------------------------------------
// Fixed values the test vectors are built from.
// ---------------------------------------------------------------------------------------------

/// Ed25519 private key seed of "alice" in the vectors.
const ALICE_SEED: [u8; 32] = [0x01; 32];
/// Stands in for the 32-byte TLS exporter value of one connection.
const EXPORTER: [u8; 32] = [0x5e; 32];

/// Concatenates hex pieces into bytes.
fn hx(pieces: &[&str]) -> Vec<u8> {
    hex::decode(pieces.concat()).expect("valid hex")
}

fn user(name: &str) -> UserName {
    UserName::new(name).expect("valid user name")
}

/// The 16-byte group id used throughout: bytes 0x00 to 0x0f.
fn group_id() -> GroupId {
    GroupId::new((0u8..16).collect::<Vec<u8>>()).expect("valid group id")
}

/// A PublicMessage commit in epoch 0, sent by leaf 0 with empty authenticated data; the last
/// 8 bytes stand in for the commit content and its authentication data.
fn commit_message() -> Vec<u8> {
    hx(&[
        "0001",                             // version mls10
        "0001",                             // wire_format mls_public_message
        "10",                               // group_id<V>: 16 bytes
        "000102030405060708090a0b0c0d0e0f", //
        "0000000000000000",                 // epoch 0
        "01",                               // sender_type member
        "00000000",                         // leaf_index 0
        "00",                               // authenticated_data<V>: empty
        "03",                               // content_type commit
        "a1a2a3a4a5a6a7a8",                 // stand-in for the rest
    ])
}

/// A PrivateMessage carrying application data in epoch 1.
fn private_message() -> Vec<u8> {
    hx(&[
        "0001",                             // version mls10
        "0002",                             // wire_format mls_private_message
        "10",                               // group_id<V>: 16 bytes
        "000102030405060708090a0b0c0d0e0f", //
        "0000000000000001",                 // epoch 1
        "01",                               // content_type application
        "00",                               // authenticated_data<V>: empty
        "04e1e2e3e4",                       // encrypted_sender_data<V>
        "08c1c2c3c4c5c6c7c8",               // ciphertext<V>
    ])
}

/// A Welcome for cipher suite 1; the last 4 bytes stand in for its secrets and GroupInfo.
fn welcome_message() -> Vec<u8> {
    hx(&["0001", "0003", "0001", "b1b2b3b4"])
}

/// An MLSMessage-framed KeyPackage (version 1, cipher suite 1) whose body is 4 `fill` bytes.
fn key_package(fill: &str) -> Vec<u8> {
    hx(&["0001", "0005", "0001", "0001", &fill.repeat(4)])
}

fn alice_key() -> SigningKey {
    SigningKey::from_bytes(&ALICE_SEED)
}

fn alice_public_key() -> Vec<u8> {
    alice_key().verifying_key().to_bytes().to_vec()
}

fn signed_bytes(label: &[u8]) -> Vec<u8> {
    AuthenticationTbs::to_signed_bytes(label, &EXPORTER, &user("alice"), &alice_public_key())
}

fn alice_signature(label: &[u8]) -> Vec<u8> {
    alice_key().sign(&signed_bytes(label)).to_bytes().to_vec()
}

// ---------------------------------------------------------------------------------------------
// The test vectors: one frame per kind, built from the values above.
// ---------------------------------------------------------------------------------------------

const PUBLIC_KEY_HEX: &str = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
const REGISTER_TBS_HEX: &str = "126d6c73636861742f31207265676973746572205e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e05616c696365208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
const AUTHENTICATE_TBS_HEX: &str = "166d6c73636861742f312061757468656e746963617465205e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e05616c696365208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";

const REGISTER_HEX: &str = "00010000006d0000000105616c696365208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c4040b4785cf8322bddb51ec4c94562e0cc91edf047a8469781ee703033ee2696eaf0fc759958239f76319bfc8d2871e0df13f8ffb795c46f7750a4122d79ad64d204";
const AUTHENTICATE_HEX: &str = "00020000004c0000000205616c6963654040b3837eb47d9a4217d682d69040a2608eae9688bb3f2f6708c5a1db5b0be5e09b4b0ad9adcf4fd2ecb9506827d3716010f905dbdee309bf190579750ef8d85e0e";
const UPLOAD_KEY_PACKAGES_HEX: &str = "00100000002d000000031a0c0001000500010001010101010c000100050001000102020202010c0001000500010001ffffffff";
const CLAIM_KEY_PACKAGE_HEX: &str = "0011000000080000000403626f62";
const COUNT_KEY_PACKAGES_HEX: &str = "00120000000400000005";
const CREATE_GROUP_HEX: &str = "0020000000150000000610000102030405060708090a0b0c0d0e0f";
const SEND_HEX: &str = "00210000005400000007c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c02c0001000110000102030405060708090a0b0c0d0e0f000000000000000001000000000003a1a2a3a4a5a6a7a801010a000100030001b1b2b3b40403626f6200";
const FETCH_HEX: &str =
    "0022000000210000000810000102030405060708090a0b0c0d0e0f000000000000000100000064";
const ACK_HEX: &str = "00230000001910000102030405060708090a0b0c0d0e0f0000000000000002";
const PING_HEX: &str = "00300000000400000009";
const ERROR_HEX: &str = "80000000001b0000000b000f0100000000000000010b7374616c652065706f6368";
const AUTHENTICATED_HEX: &str = "80010000000a0000000105616c696365";
const KEY_PACKAGES_STORED_HEX: &str = "8010000000080000000300000002";
const KEY_PACKAGE_HEX: &str = "801100000012000000040c00010005000100010b0b0b0b00";
const KEY_PACKAGE_COUNT_HEX: &str = "801200000009000000050000000201";
const GROUP_CREATED_HEX: &str =
    "80200000001d0000000610000102030405060708090a0b0c0d0e0f0000000000000000";
const ACCEPTED_HEX: &str = "8021000000140000000700000000000000010000000000000001";
const MESSAGES_HEX: &str = "80220000005b00000008405410000102030405060708090a0b0c0d0e0f000000000000000200000000000000010103626f622d0001000210000102030405060708090a0b0c0d0e0f0000000000000001010004e1e2e3e408c1c2c3c4c5c6c7c800";
const PONG_HEX: &str = "80300000000400000009";
const DELIVER_HEX: &str = "80400000003310000102030405060708090a0b0c0d0e0f000000000000000100000000000000010405616c6963650a000100030001b1b2b3b4";

/// The vectors as (frame, expected hex), in [`FrameKind::ALL`] order.
fn vectors() -> Vec<(Frame, &'static str)> {
    vec![
        (
            Frame::Register(Register {
                request_id: 1,
                user_name: user("alice"),
                signature_key: alice_public_key().into(),
                signature: alice_signature(REGISTER_LABEL).into(),
            }),
            REGISTER_HEX,
        ),
        (
            Frame::Authenticate(Authenticate {
                request_id: 2,
                user_name: user("alice"),
                signature: alice_signature(AUTHENTICATE_LABEL).into(),
            }),
            AUTHENTICATE_HEX,
        ),
        (
            Frame::UploadKeyPackages(UploadKeyPackages {
                request_id: 3,
                key_packages: vec![key_package("01").into(), key_package("02").into()],
                last_resort: Some(key_package("ff").into()),
            }),
            UPLOAD_KEY_PACKAGES_HEX,
        ),
        (
            Frame::ClaimKeyPackage(ClaimKeyPackage {
                request_id: 4,
                user_name: user("bob"),
            }),
            CLAIM_KEY_PACKAGE_HEX,
        ),
        (
            Frame::CountKeyPackages(CountKeyPackages { request_id: 5 }),
            COUNT_KEY_PACKAGES_HEX,
        ),
        (
            Frame::CreateGroup(CreateGroup {
                request_id: 6,
                group_id: group_id(),
            }),
            CREATE_GROUP_HEX,
        ),
        (
            Frame::Send(Send {
                request_id: 7,
                client_message_id: [0xc0; 16],
                message: commit_message().into(),
                commit: Some(CommitRouting {
                    welcome: Some(welcome_message().into()),
                    added: vec![user("bob")],
                    removed: Vec::new(),
                }),
            }),
            SEND_HEX,
        ),
        (
            Frame::Fetch(Fetch {
                request_id: 8,
                group_id: group_id(),
                after_seq: 1,
                limit: 100,
            }),
            FETCH_HEX,
        ),
        (
            Frame::Ack(Ack {
                group_id: group_id(),
                seq: 2,
            }),
            ACK_HEX,
        ),
        (Frame::Ping(Ping { request_id: 9 }), PING_HEX),
        (
            Frame::error(11, ErrorCode::StaleEpoch, Some(1), "stale epoch"),
            ERROR_HEX,
        ),
        (
            Frame::Authenticated(Authenticated {
                request_id: 1,
                user_name: user("alice"),
            }),
            AUTHENTICATED_HEX,
        ),
        (
            Frame::KeyPackagesStored(KeyPackagesStored {
                request_id: 3,
                remaining: 2,
            }),
            KEY_PACKAGES_STORED_HEX,
        ),
        (
            Frame::KeyPackage(KeyPackageResponse {
                request_id: 4,
                key_package: key_package("0b").into(),
                last_resort: 0,
            }),
            KEY_PACKAGE_HEX,
        ),
        (
            Frame::KeyPackageCount(KeyPackageCount {
                request_id: 5,
                remaining: 2,
                has_last_resort: 1,
            }),
            KEY_PACKAGE_COUNT_HEX,
        ),
        (
            Frame::GroupCreated(GroupCreated {
                request_id: 6,
                group_id: group_id(),
                epoch: 0,
            }),
            GROUP_CREATED_HEX,
        ),
        (
            Frame::Accepted(Accepted {
                request_id: 7,
                seq: 1,
                epoch: 1,
            }),
            ACCEPTED_HEX,
        ),
        (
            Frame::Messages(Messages {
                request_id: 8,
                messages: vec![Delivery {
                    group_id: group_id(),
                    seq: 2,
                    epoch: 1,
                    kind: DeliveryKind::Application as u8,
                    sender: user("bob"),
                    payload: private_message().into(),
                }],
                more: 0,
            }),
            MESSAGES_HEX,
        ),
        (Frame::Pong(Pong { request_id: 9 }), PONG_HEX),
        (
            Frame::Deliver(Delivery {
                group_id: group_id(),
                seq: 1,
                epoch: 1,
                kind: DeliveryKind::Welcome as u8,
                sender: user("alice"),
                payload: welcome_message().into(),
            }),
            DELIVER_HEX,
        ),
    ]
}

/// More values of every kind: empty and `None` fields, the largest names and group ids, and
/// payloads at the boundaries of the 1-, 2- and 4-byte length prefixes.
fn edge_frames() -> Vec<Frame> {
    let longest_user = user(&"z".repeat(names::MAX_USER_NAME_LEN));
    let longest_group = GroupId::new(vec![0xee; names::MAX_GROUP_ID_LEN]).expect("valid group id");
    let mut frames = vec![
        Frame::Register(Register {
            request_id: u32::MAX,
            user_name: longest_user.clone(),
            signature_key: vec![0x11; SIGNATURE_KEY_LEN].into(),
            signature: vec![0x22; SIGNATURE_LEN].into(),
        }),
        Frame::Register(Register {
            request_id: 0,
            user_name: user("0day"),
            signature_key: Vec::new().into(),
            signature: Vec::new().into(),
        }),
        Frame::Authenticate(Authenticate {
            request_id: 12,
            user_name: user("x.y_z-9"),
            signature: vec![0x33; SIGNATURE_LEN].into(),
        }),
        Frame::UploadKeyPackages(UploadKeyPackages {
            request_id: 13,
            key_packages: Vec::new(),
            last_resort: None,
        }),
        Frame::UploadKeyPackages(UploadKeyPackages {
            request_id: 14,
            key_packages: (0u8..50).map(|i| vec![i; 300].into()).collect(),
            last_resort: None,
        }),
        Frame::ClaimKeyPackage(ClaimKeyPackage {
            request_id: 15,
            user_name: longest_user.clone(),
        }),
        Frame::CountKeyPackages(CountKeyPackages { request_id: 0 }),
        Frame::CreateGroup(CreateGroup {
            request_id: 16,
            group_id: longest_group.clone(),
        }),
        Frame::CreateGroup(CreateGroup {
            request_id: 17,
            group_id: GroupId::new(vec![0x00]).expect("valid group id"),
        }),
        Frame::Send(Send {
            request_id: 18,
            client_message_id: [0x00; 16],
            message: private_message().into(),
            commit: None,
        }),
        Frame::Send(Send {
            request_id: 19,
            client_message_id: [0xff; 16],
            message: commit_message().into(),
            commit: Some(CommitRouting {
                welcome: None,
                added: Vec::new(),
                removed: vec![user("carol"), user("dave")],
            }),
        }),
        Frame::Fetch(Fetch {
            request_id: 20,
            group_id: longest_group.clone(),
            after_seq: u64::MAX,
            limit: u32::MAX,
        }),
        Frame::Ack(Ack {
            group_id: longest_group.clone(),
            seq: u64::MAX,
        }),
        Frame::Ping(Ping { request_id: 0 }),
        Frame::error(0, ErrorCode::SessionReplaced, None, ""),
        Frame::error(
            21,
            ErrorCode::InvalidKeyPackage,
            None,
            "entry 3: bad signature",
        ),
        Frame::Authenticated(Authenticated {
            request_id: 2,
            user_name: longest_user.clone(),
        }),
        Frame::KeyPackagesStored(KeyPackagesStored {
            request_id: 14,
            remaining: u32::MAX,
        }),
        Frame::KeyPackage(KeyPackageResponse {
            request_id: 15,
            key_package: key_package("ff").into(),
            last_resort: 1,
        }),
        Frame::KeyPackageCount(KeyPackageCount {
            request_id: 0,
            remaining: 0,
            has_last_resort: 0,
        }),
        Frame::GroupCreated(GroupCreated {
            request_id: 16,
            group_id: longest_group.clone(),
            epoch: 0,
        }),
        Frame::Accepted(Accepted {
            request_id: u32::MAX,
            seq: u64::MAX,
            epoch: u64::MAX,
        }),
        Frame::Messages(Messages {
            request_id: 20,
            messages: Vec::new(),
            more: 0,
        }),
        Frame::Messages(Messages {
            request_id: 22,
            messages: (1u64..=3)
                .map(|seq| Delivery {
                    group_id: group_id(),
                    seq,
                    epoch: seq - 1,
                    kind: DeliveryKind::Proposal as u8,
                    sender: user("carol"),
                    payload: vec![0xab; 70].into(),
                })
                .collect(),
            more: 1,
        }),
        Frame::Pong(Pong { request_id: 0 }),
        Frame::Deliver(Delivery {
            group_id: longest_group,
            seq: u64::MAX,
            epoch: 7,
            kind: DeliveryKind::Commit as u8,
            sender: longest_user,
            payload: commit_message().into(),
        }),
    ];
    // Payload sizes at the boundaries of the varint length forms.
    for len in [0usize, 63, 64, 16_383, 16_384, 70_000] {
        frames.push(Frame::Deliver(Delivery {
            group_id: group_id(),
            seq: 5,
            epoch: 1,
            kind: DeliveryKind::Application as u8,
            sender: user("bob"),
            payload: vec![0x5a; len].into(),
        }));
    }
    frames
}

fn hex_bytes(hex_string: &str) -> Vec<u8> {
    hex::decode(hex_string).expect("valid hex")
}

/// Rewrites the header's length field to match the bytes that follow it.
fn fix_length(bytes: &mut [u8]) {
    if bytes.len() >= FRAME_HEADER_LEN {
        let body_len = u32::try_from(bytes.len() - FRAME_HEADER_LEN).expect("small body");
        bytes[2..FRAME_HEADER_LEN].copy_from_slice(&body_len.to_be_bytes());
    }
}

/// A frame made of `kind` and `body` with a correct length field.
fn frame_bytes(kind: FrameKind, body: &[u8]) -> Vec<u8> {
    let mut bytes = (kind as u16).to_be_bytes().to_vec();
    bytes.extend_from_slice(&u32::try_from(body.len()).expect("small body").to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// Decodes `bytes`, failing the test with the input in hex if decoding panics, and checks that
/// whatever decodes re-encodes to exactly the same bytes (the encoding is canonical).
///
/// tls_codec 0.5.0 has a `debug_assert_eq!` in `VLBytes::tls_deserialize_bytes` that fires when a
/// length prefix claims more bytes than remain (RustCrypto/formats#2414). Where tls_codec is
/// built with debug assertions, the tests that feed such input fail here until that is fixed.
fn decode_without_panic(bytes: &[u8]) -> Result<Frame, FrameError> {
    let result = catch_unwind(AssertUnwindSafe(|| Frame::decode_exact(bytes)))
        .unwrap_or_else(|_| panic!("decoding panicked on {}", hex::encode(bytes)));
    if let Ok(frame) = &result {
        assert_eq!(
            frame.encode(),
            bytes,
            "{:?} decoded from {} re-encodes differently",
            frame.kind(),
            hex::encode(bytes)
        );
    }
    result
}

fn assert_malformed(bytes: &[u8], what: &str) {
    match decode_without_panic(bytes) {
        Err(FrameError::Malformed(_)) => {}
        other => panic!("{what}: expected Malformed, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips and test vectors.
// ---------------------------------------------------------------------------------------------

#[test]
fn vectors_cover_every_kind_in_order() {
    let kinds: Vec<FrameKind> = vectors().iter().map(|(frame, _)| frame.kind()).collect();
    assert_eq!(kinds, FrameKind::ALL.to_vec());
}

#[test]
fn vectors_encode_to_the_fixed_hex_and_back() {
    for (frame, expected) in vectors() {
        let kind = frame.kind();
        assert_eq!(hex::encode(frame.encode()), expected, "{kind:?} encoding");
        let bytes = hex_bytes(expected);
        assert_eq!(
            Frame::decode_exact(&bytes).expect("vector decodes"),
            frame,
            "{kind:?} decoding"
        );
        let header = FrameHeader::parse(&bytes).expect("vector header parses");
        assert_eq!(header.kind, kind);
        assert_eq!(header.body_len as usize, bytes.len() - FRAME_HEADER_LEN);
        assert_eq!(header.to_bytes(), bytes[..FRAME_HEADER_LEN]);
    }
}

#[test]
fn round_trip_every_kind() {
    let frames: Vec<Frame> = vectors()
        .into_iter()
        .map(|(frame, _)| frame)
        .chain(edge_frames())
        .collect();
    for kind in FrameKind::ALL {
        assert!(
            frames.iter().any(|frame| frame.kind() == kind),
            "no frame of kind {kind:?}"
        );
    }
    for frame in frames {
        let bytes = frame.encode();
        let decoded = Frame::decode_exact(&bytes).expect("encoded frame decodes");
        assert_eq!(decoded, frame);
        assert_eq!(decoded.kind(), frame.kind());
        assert_eq!(
            FrameKind::from_u16(u16::from_be_bytes([bytes[0], bytes[1]])),
            Some(frame.kind())
        );
        let header = FrameHeader::parse(&bytes).expect("header parses");
        assert!(header.body_len <= max_body_len(frame.kind()));
        let (_, body) = bytes.split_at(FRAME_HEADER_LEN);
        assert_eq!(
            Frame::decode(frame.kind(), body).expect("body decodes"),
            frame
        );
    }
}

#[test]
fn request_ids() {
    for (frame, _) in vectors() {
        let expected = match frame.kind() {
            FrameKind::Ack | FrameKind::Deliver => None,
            _ => Some(u32::from_be_bytes(
                frame.encode()[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4]
                    .try_into()
                    .expect("4 bytes"),
            )),
        };
        assert_eq!(frame.request_id(), expected, "{:?}", frame.kind());
    }
}

#[test]
fn authentication_vectors() {
    assert_eq!(hex::encode(alice_public_key()), PUBLIC_KEY_HEX);
    assert_eq!(hex::encode(signed_bytes(REGISTER_LABEL)), REGISTER_TBS_HEX);
    assert_eq!(
        hex::encode(signed_bytes(AUTHENTICATE_LABEL)),
        AUTHENTICATE_TBS_HEX
    );
    let key_bytes: [u8; 32] = hex_bytes(PUBLIC_KEY_HEX).try_into().expect("32 bytes");
    let public_key = VerifyingKey::from_bytes(&key_bytes).expect("valid public key");

    let Ok(Frame::Register(register)) = Frame::decode_exact(&hex_bytes(REGISTER_HEX)) else {
        panic!("Register vector does not decode");
    };
    assert_eq!(register.signature_key.as_slice(), key_bytes);
    let register_signature =
        Signature::from_slice(register.signature.as_slice()).expect("64-byte signature");
    public_key
        .verify_strict(&hex_bytes(REGISTER_TBS_HEX), &register_signature)
        .expect("Register signature verifies");

    let Ok(Frame::Authenticate(authenticate)) = Frame::decode_exact(&hex_bytes(AUTHENTICATE_HEX))
    else {
        panic!("Authenticate vector does not decode");
    };
    let authenticate_signature =
        Signature::from_slice(authenticate.signature.as_slice()).expect("64-byte signature");
    public_key
        .verify_strict(&hex_bytes(AUTHENTICATE_TBS_HEX), &authenticate_signature)
        .expect("Authenticate signature verifies");

    // The labels keep the two signatures apart, and the exporter binds them to one session.
    assert!(
        public_key
            .verify_strict(&hex_bytes(AUTHENTICATE_TBS_HEX), &register_signature)
            .is_err()
    );
    let other_session = AuthenticationTbs::to_signed_bytes(
        AUTHENTICATE_LABEL,
        &[0x5f; EXPORTER_LEN],
        &user("alice"),
        &alice_public_key(),
    );
    assert!(
        public_key
            .verify_strict(&other_session, &authenticate_signature)
            .is_err()
    );
}

#[test]
fn embedded_mls_messages_peek_as_described() {
    let commit = peek_message_header(&commit_message()).expect("commit header");
    assert_eq!(commit.wire_format, WireFormat::PublicMessage);
    assert_eq!(commit.group_id, group_id().as_bytes());
    assert_eq!(commit.epoch, 0);
    assert_eq!(commit.content_type, ContentType::Commit);

    let application = peek_message_header(&private_message()).expect("private header");
    assert_eq!(application.wire_format, WireFormat::PrivateMessage);
    assert_eq!(application.group_id, group_id().as_bytes());
    assert_eq!(application.epoch, 1);
    assert_eq!(application.content_type, ContentType::Application);

    expect_wire_format(&welcome_message(), WireFormat::Welcome).expect("a Welcome");
    expect_wire_format(&key_package("01"), WireFormat::KeyPackage).expect("a KeyPackage");
    assert!(peek_message_header(&welcome_message()).is_err());
}

#[test]
fn varint_length_prefix_forms() {
    // RFC 9420 §2.1.2: 1 byte up to 63, 2 bytes (top bits 01) up to 16383, 4 bytes (top bits 10)
    // up to 2^30 - 1, always the shortest form.
    for (len, prefix) in [
        (0usize, "00"),
        (5, "05"),
        (63, "3f"),
        (64, "4040"),
        (16_383, "7fff"),
        (16_384, "80004000"),
        (70_000, "80011170"),
    ] {
        let payload = VLBytes::from(vec![0x5a; len]);
        let encoded = payload.tls_serialize_detached().expect("serialises");
        assert_eq!(
            hex::encode(&encoded[..prefix.len() / 2]),
            prefix,
            "length {len}"
        );
        assert_eq!(encoded.len(), prefix.len() / 2 + len);
    }
}

// ---------------------------------------------------------------------------------------------
// Rejection of bad input.
// ---------------------------------------------------------------------------------------------

#[test]
fn every_truncation_fails() {
    for (_, hex_string) in vectors() {
        let bytes = hex_bytes(hex_string);
        for cut in 0..bytes.len() {
            let result = decode_without_panic(&bytes[..cut]);
            if cut < FRAME_HEADER_LEN {
                assert_eq!(result, Err(FrameError::TruncatedHeader), "cut at {cut}");
            } else {
                assert!(
                    matches!(result, Err(FrameError::Malformed(_))),
                    "{hex_string} cut at {cut}: {result:?}"
                );
            }
        }
    }
}

#[test]
fn every_truncated_body_fails() {
    // The header is rewritten to match, so the body decoder itself must notice.
    for (_, hex_string) in vectors() {
        let bytes = hex_bytes(hex_string);
        for cut in FRAME_HEADER_LEN..bytes.len() {
            let mut truncated = bytes[..cut].to_vec();
            fix_length(&mut truncated);
            assert_malformed(&truncated, &format!("{hex_string} body cut at {cut}"));
        }
    }
}

#[test]
fn trailing_bytes_fail() {
    for (_, hex_string) in vectors() {
        let mut bytes = hex_bytes(hex_string);
        bytes.push(0);
        assert_malformed(&bytes, "trailing byte after the declared body");
        fix_length(&mut bytes);
        assert_malformed(&bytes, "trailing byte inside the declared body");
    }
}

#[test]
fn truncated_header_fails() {
    for len in 0..FRAME_HEADER_LEN {
        assert_eq!(
            FrameHeader::parse(&[0; FRAME_HEADER_LEN][..len]),
            Err(FrameError::TruncatedHeader)
        );
    }
}

#[test]
fn unknown_kinds_fail() {
    for raw in 0..=u16::MAX {
        let mut header = raw.to_be_bytes().to_vec();
        header.extend_from_slice(&[0, 0, 0, 0]);
        match FrameKind::from_u16(raw) {
            Some(kind) => {
                assert_eq!(kind as u16, raw);
                assert_eq!(
                    FrameHeader::parse(&header),
                    Ok(FrameHeader { kind, body_len: 0 })
                );
            }
            None => {
                assert_eq!(
                    FrameHeader::parse(&header),
                    Err(FrameError::UnknownKind(raw))
                );
                assert_eq!(
                    Frame::decode_exact(&header),
                    Err(FrameError::UnknownKind(raw))
                );
            }
        }
    }
}

#[test]
fn oversized_headers_fail_without_a_body() {
    for kind in FrameKind::ALL {
        let limit = max_body_len(kind);
        for len in [limit + 1, u32::MAX] {
            let header = FrameHeader {
                kind,
                body_len: len,
            }
            .to_bytes();
            let expected = FrameError::TooLarge { kind, len, limit };
            assert_eq!(
                FrameHeader::parse(&header),
                Err(expected.clone()),
                "{kind:?}"
            );
            assert_eq!(Frame::decode_exact(&header), Err(expected), "{kind:?}");
        }
        let at_limit = FrameHeader {
            kind,
            body_len: limit,
        };
        assert_eq!(FrameHeader::parse(&at_limit.to_bytes()), Ok(at_limit));
    }
}

#[test]
fn invalid_user_names_fail_to_decode() {
    let bad_names: [&[u8]; 8] = [
        b"",
        b"Alice",
        b"-bob",
        b".bob",
        b"al ice",
        b"a/b",
        b"\xc3\xa9",
        b"\xff",
    ];
    let too_long = vec![b'a'; names::MAX_USER_NAME_LEN + 1];
    for name in bad_names.into_iter().chain([too_long.as_slice()]) {
        let mut name_field = vec![u8::try_from(name.len()).expect("short name")];
        name_field.extend_from_slice(name);

        // Authenticated { request_id = 1, user_name }
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&name_field);
        assert_malformed(
            &frame_bytes(FrameKind::Authenticated, &body),
            "Authenticated",
        );

        // ClaimKeyPackage { request_id = 4, user_name }
        let mut body = 4u32.to_be_bytes().to_vec();
        body.extend_from_slice(&name_field);
        assert_malformed(
            &frame_bytes(FrameKind::ClaimKeyPackage, &body),
            "ClaimKeyPackage",
        );

        // A name nested in Send.commit.added.
        let mut body = 7u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0xc0; 16]);
        body.extend_from_slice(&[0x02, 0xaa, 0xbb]); // message
        body.extend_from_slice(&[0x01, 0x00]); // commit present, no welcome
        body.push(u8::try_from(name_field.len()).expect("short")); // added<V>
        body.extend_from_slice(&name_field);
        body.push(0x00); // removed<V>: empty
        assert_malformed(&frame_bytes(FrameKind::Send, &body), "Send added");
    }
    // The same bytes with a valid name decode, so the name is what fails above.
    let mut body = 4u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"\x05alice");
    assert!(Frame::decode_exact(&frame_bytes(FrameKind::ClaimKeyPackage, &body)).is_ok());
    let mut upper = hex_bytes(AUTHENTICATED_HEX);
    let position = upper.len() - 5;
    upper[position] = b'A';
    assert_malformed(&upper, "Authenticated vector with \"Alice\"");
}

#[test]
fn invalid_group_ids_fail_to_decode() {
    // CreateGroup { request_id = 6, group_id = <empty> }
    assert_malformed(
        &frame_bytes(FrameKind::CreateGroup, &hx(&["00000006", "00"])),
        "empty group id",
    );
    // A 256-byte group id (2-byte length prefix 0x4100).
    let mut body = hx(&["00000006", "4100"]);
    body.extend_from_slice(&[0x01; 256]);
    assert_malformed(
        &frame_bytes(FrameKind::CreateGroup, &body),
        "256-byte group id",
    );
    let mut body = hx(&["00000006", "40ff"]);
    body.extend_from_slice(&[0x01; 255]);
    assert!(Frame::decode_exact(&frame_bytes(FrameKind::CreateGroup, &body)).is_ok());
}

#[test]
fn lengths_beyond_the_body_fail() {
    let group = "000102030405060708090a0b0c0d0e0f";
    for prefix in ["11", "3f", "4011", "7fff", "80004000", "bfffffff"] {
        let body = hx(&["00000006", prefix, group]);
        assert_malformed(
            &frame_bytes(FrameKind::CreateGroup, &body),
            &format!("group id length prefix {prefix}"),
        );
    }
    // 8-byte prefixes: either not minimal or far beyond any frame.
    for prefix in ["c000000000000010", "c000000040000000", "ffffffffffffffff"] {
        let body = hx(&["00000006", prefix, group]);
        assert_malformed(&frame_bytes(FrameKind::CreateGroup, &body), prefix);
    }
    // A vector of opaque elements whose outer length claims more than is present.
    let body = hx(&["00000003", "20", "0c000100050001000101010101", "00"]);
    assert_malformed(
        &frame_bytes(FrameKind::UploadKeyPackages, &body),
        "outer length",
    );
    // An element that claims more than its vector holds.
    let body = hx(&["00000003", "0d", "0d000100050001000101010101", "00"]);
    assert_malformed(
        &frame_bytes(FrameKind::UploadKeyPackages, &body),
        "inner length",
    );
    // A name list whose length cuts an element in two.
    let body = hx(&[
        "00000007",
        "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0",
        "02aabb",
        "0100",
        "03",
        "03626f62",
        "00",
    ]);
    assert_malformed(&frame_bytes(FrameKind::Send, &body), "added cut in two");
}

#[test]
fn non_minimal_lengths_fail() {
    // RFC 9420 §2.1.2 requires the shortest length form; "alice" with a 2-byte prefix is invalid.
    let mut body = 1u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"\x40\x05alice");
    assert_malformed(
        &frame_bytes(FrameKind::Authenticated, &body),
        "2-byte prefix for 5",
    );
    let mut body = 1u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"\x80\x00\x00\x05alice");
    assert_malformed(
        &frame_bytes(FrameKind::Authenticated, &body),
        "4-byte prefix for 5",
    );
}

#[test]
fn optional_flags_other_than_zero_and_one_fail() {
    let mut bytes = hex_bytes(ERROR_HEX);
    // request_id (4) + code (2), then the optional<uint64> flag.
    let flag = FRAME_HEADER_LEN + 6;
    assert_eq!(bytes[flag], 1);
    for value in [2u8, 0x80, 0xff] {
        bytes[flag] = value;
        assert_malformed(&bytes, &format!("optional flag {value}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Mutation fuzzing with a fixed seed.
// ---------------------------------------------------------------------------------------------

/// xorshift64 (Marsaglia 2003): deterministic, no dependencies.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(bound).expect("small bound"))
            .expect("below bound")
    }

    fn byte(&mut self) -> u8 {
        self.next().to_be_bytes()[0]
    }
}

fn mutate(bytes: &mut Vec<u8>, rng: &mut XorShift) {
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !bytes.is_empty() => {
                let position = rng.below(bytes.len());
                bytes[position] ^= 1 << rng.below(8);
            }
            1 if !bytes.is_empty() => {
                let position = rng.below(bytes.len());
                bytes[position] = rng.byte();
            }
            2 => {
                let position = rng.below(bytes.len() + 1);
                let value = rng.byte();
                bytes.insert(position, value);
            }
            3 if !bytes.is_empty() => {
                let position = rng.below(bytes.len());
                bytes.remove(position);
            }
            _ => {
                // Length-prefix-shaped bytes: the values most likely to reach odd paths.
                if !bytes.is_empty() {
                    let position = rng.below(bytes.len());
                    bytes[position] =
                        [0x00, 0x3f, 0x40, 0x7f, 0x80, 0xbf, 0xc0, 0xff][rng.below(8)];
                }
            }
        }
    }
}

#[test]
fn mutated_vectors_never_panic() {
    let originals: Vec<Vec<u8>> = vectors()
        .iter()
        .map(|(_, hex_string)| hex_bytes(hex_string))
        .collect();
    let mut rng = XorShift(0x6d6c_7363_6861_7431);
    let mut decoded = 0usize;
    for _ in 0..5_000 {
        let mut bytes = originals[rng.below(originals.len())].clone();
        mutate(&mut bytes, &mut rng);
        // As received, with whatever the header now says...
        decode_without_panic(&bytes).ok();
        // ...and with the header's length made to match, so that the body decoder sees it.
        fix_length(&mut bytes);
        if decode_without_panic(&bytes).is_ok() {
            decoded += 1;
        }
    }
    // Some mutations only touch values (ids, seqs, payload bytes) and still decode.
    assert!(decoded > 0);
}

#[test]
fn random_bodies_never_panic() {
    let mut rng = XorShift(0x0123_4567_89ab_cdef);
    for _ in 0..5_000 {
        let kind = FrameKind::ALL[rng.below(FrameKind::ALL.len())];
        let len = rng.below(48);
        let body: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        decode_without_panic(&frame_bytes(kind, &body)).ok();
    }
}

// ---------------------------------------------------------------------------------------------
// Numeric tables. These numbers are part of the protocol and are listed in docs/protocol.md.
// ---------------------------------------------------------------------------------------------

#[test]
fn frame_kind_numbers_and_limits() {
    const TABLE: [(FrameKind, u16, u32); 20] = [
        (FrameKind::Register, 0x0001, 512),
        (FrameKind::Authenticate, 0x0002, 512),
        (FrameKind::UploadKeyPackages, 0x0010, 1_048_576),
        (FrameKind::ClaimKeyPackage, 0x0011, 128),
        (FrameKind::CountKeyPackages, 0x0012, 16),
        (FrameKind::CreateGroup, 0x0020, 512),
        (FrameKind::Send, 0x0021, 16_777_216),
        (FrameKind::Fetch, 0x0022, 512),
        (FrameKind::Ack, 0x0023, 512),
        (FrameKind::Ping, 0x0030, 16),
        (FrameKind::Error, 0x8000, 65_536),
        (FrameKind::Authenticated, 0x8001, 128),
        (FrameKind::KeyPackagesStored, 0x8010, 16),
        (FrameKind::KeyPackage, 0x8011, 65_536),
        (FrameKind::KeyPackageCount, 0x8012, 16),
        (FrameKind::GroupCreated, 0x8020, 512),
        (FrameKind::Accepted, 0x8021, 32),
        (FrameKind::Messages, 0x8022, 33_554_432),
        (FrameKind::Pong, 0x8030, 16),
        (FrameKind::Deliver, 0x8040, 16_778_240),
    ];
    assert_eq!(TABLE.map(|(kind, _, _)| kind), FrameKind::ALL);
    for (kind, number, limit) in TABLE {
        assert_eq!(kind as u16, number, "{kind:?}");
        assert_eq!(FrameKind::from_u16(number), Some(kind));
        assert_eq!(max_body_len(kind), limit, "{kind:?}");
    }
    for unknown in [
        0x0000, 0x0003, 0x0013, 0x0024, 0x0031, 0x7fff, 0x8002, 0x8041, 0xffff,
    ] {
        assert_eq!(FrameKind::from_u16(unknown), None);
    }
}

#[test]
fn error_code_numbers() {
    const TABLE: [(ErrorCode, u16); 26] = [
        (ErrorCode::MalformedFrame, 1),
        (ErrorCode::UnknownFrameKind, 2),
        (ErrorCode::FrameTooLarge, 3),
        (ErrorCode::NotAuthenticated, 4),
        (ErrorCode::AlreadyAuthenticated, 5),
        (ErrorCode::AuthenticationFailed, 6),
        (ErrorCode::NameTaken, 7),
        (ErrorCode::UnknownUser, 8),
        (ErrorCode::InvalidName, 9),
        (ErrorCode::InvalidKeyPackage, 10),
        (ErrorCode::NoKeyPackage, 11),
        (ErrorCode::GroupExists, 12),
        (ErrorCode::UnknownGroup, 13),
        (ErrorCode::NotMember, 14),
        (ErrorCode::StaleEpoch, 15),
        (ErrorCode::InvalidMessage, 16),
        (ErrorCode::RateLimited, 17),
        (ErrorCode::QuotaExceeded, 18),
        (ErrorCode::Internal, 19),
        (ErrorCode::ShuttingDown, 20),
        (ErrorCode::TooManyConnections, 21),
        (ErrorCode::InvalidMembership, 22),
        (ErrorCode::SessionReplaced, 23),
        (ErrorCode::AuthenticationTimeout, 24),
        (ErrorCode::UnexpectedFrame, 25),
        (ErrorCode::MessageTooLarge, 26),
    ];
    assert_eq!(TABLE.map(|(code, _)| code), ErrorCode::ALL);
    for (code, number) in TABLE {
        assert_eq!(code as u16, number, "{code:?}");
        assert_eq!(ErrorCode::from_u16(number), Some(code));
        assert_eq!(code.to_string(), format!("{code:?} ({number})"));
    }
    for unknown in [0, 27, 0x00ff, 0x8000, u16::MAX] {
        assert_eq!(ErrorCode::from_u16(unknown), None);
    }
}

#[test]
fn delivery_kind_numbers() {
    for (kind, number) in [
        (DeliveryKind::Application, 1),
        (DeliveryKind::Proposal, 2),
        (DeliveryKind::Commit, 3),
        (DeliveryKind::Welcome, 4),
    ] {
        assert_eq!(kind as u8, number);
        assert_eq!(DeliveryKind::from_u8(number), Some(kind));
    }
    for unknown in [0, 5, 0xff] {
        assert_eq!(DeliveryKind::from_u8(unknown), None);
    }
}

#[test]
fn largest_small_frames_fit_their_limits() {
    // The fixed-shape frames with their longest names and group ids must fit the per-kind limit.
    for frame in edge_frames() {
        let body_len = frame.encode().len() - FRAME_HEADER_LEN;
        assert!(
            body_len <= max_body_len(frame.kind()) as usize,
            "{:?} body of {body_len} bytes",
            frame.kind()
        );
    }
}

#[test]
fn docs_contain_the_test_vectors() {
    let docs = include_str!("../../../docs/protocol.md");
    let extra = [PUBLIC_KEY_HEX, REGISTER_TBS_HEX, AUTHENTICATE_TBS_HEX];
    for hex_string in vectors()
        .iter()
        .map(|(_, hex_string)| *hex_string)
        .chain(extra)
    {
        assert!(
            docs.contains(hex_string),
            "docs/protocol.md lacks {hex_string}"
        );
    }
}

#[test]
fn the_largest_storable_key_package_fits_a_key_package_frame() {
    let response = |len: usize| {
        Frame::KeyPackage(KeyPackageResponse {
            request_id: u32::MAX,
            key_package: vec![0xab; len].into(),
            last_resort: 1,
        })
    };
    let limit = max_body_len(FrameKind::KeyPackage) as usize;
    let largest = response(MAX_KEY_PACKAGE_LEN).encode();
    assert_eq!(largest.len() - FRAME_HEADER_LEN, limit, "exactly the limit");
    FrameHeader::parse(&largest).expect("the largest KeyPackage frame is valid");
    let over = response(MAX_KEY_PACKAGE_LEN + 1).encode();
    assert!(FrameHeader::parse(&over).is_err(), "one byte more is not");
}

#[test]
fn client_message_ids_grow_with_time_and_differ() {
    let now_millis = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis()
    };
    let before = now_millis();
    let ids: Vec<ClientMessageId> = (0..1000).map(|_| new_client_message_id()).collect();
    let after = now_millis();
    let millis = |id: &ClientMessageId| u64::from_be_bytes(id[..8].try_into().expect("8 bytes"));
    assert!(
        (before..=after).contains(&u128::from(millis(&ids[0]))),
        "the prefix is the time in milliseconds"
    );
    assert!(
        ids.windows(2)
            .all(|pair| millis(&pair[0]) <= millis(&pair[1]))
    );
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "ids made in the same millisecond still differ"
    );
}
