//! KeyPackages: upload, count, claim order, last resort, validation against the uploader's
//! identity, quota and concurrent claims, with real KeyPackages made by openmls. The key that
//! signs the KeyPackages is the key the user registered with at the DS.

mod common;

use std::collections::HashSet;

use common::{Client, MlsIdentity, TestServer, expect_error, timed, user};
use mlschat_ds::config::Limits;
use mlschat_ds::protocol::{
    ClaimKeyPackage, CountKeyPackages, ErrorCode, Frame, KeyPackageResponse, MAX_KEY_PACKAGE_LEN,
    UploadKeyPackages, UserName,
};

async fn upload(
    client: &mut Client,
    key_packages: Vec<Vec<u8>>,
    last_resort: Option<Vec<u8>>,
) -> Frame {
    client
        .request(|id| {
            Frame::UploadKeyPackages(UploadKeyPackages {
                request_id: id,
                key_packages: key_packages.into_iter().map(Into::into).collect(),
                last_resort: last_resort.map(Into::into),
            })
        })
        .await
}

async fn expect_stored(
    client: &mut Client,
    key_packages: Vec<Vec<u8>>,
    last_resort: Option<Vec<u8>>,
) -> u32 {
    match upload(client, key_packages, last_resort).await {
        Frame::KeyPackagesStored(stored) => stored.remaining,
        other => panic!("expected KeyPackagesStored, got {other:?}"),
    }
}

async fn count(client: &mut Client) -> (u32, bool) {
    match client
        .request(|id| Frame::CountKeyPackages(CountKeyPackages { request_id: id }))
        .await
    {
        Frame::KeyPackageCount(count) => (count.remaining, count.has_last_resort == 1),
        other => panic!("expected KeyPackageCount, got {other:?}"),
    }
}

async fn claim(client: &mut Client, name: &UserName) -> Frame {
    let name = name.clone();
    client
        .request(|id| {
            Frame::ClaimKeyPackage(ClaimKeyPackage {
                request_id: id,
                user_name: name,
            })
        })
        .await
}

async fn expect_claimed(client: &mut Client, name: &UserName) -> KeyPackageResponse {
    match claim(client, name).await {
        Frame::KeyPackage(key_package) => key_package,
        other => panic!("expected a KeyPackage of {name}, got {other:?}"),
    }
}

/// Registers `identity`'s user with the same key that signs its KeyPackages.
async fn register(server: &TestServer, identity: &MlsIdentity) -> Client {
    server
        .register_with(identity.name.as_str(), identity.signer())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_count_claim_in_order_then_last_resort() {
    timed(async {
        let server = TestServer::start().await;
        let alice_id = MlsIdentity::new("alice");
        let mut alice = register(&server, &alice_id).await;
        let mut bob = server.register("bob").await;

        let key_packages = alice_id.key_packages(3);
        let last_resort = alice_id.key_package(true);
        let remaining =
            expect_stored(&mut alice, key_packages.clone(), Some(last_resort.clone())).await;
        assert_eq!(remaining, 3);
        assert_eq!(count(&mut alice).await, (3, true));

        for expected in &key_packages {
            let claimed = expect_claimed(&mut bob, &alice_id.name).await;
            assert_eq!(claimed.last_resort, 0);
            assert_eq!(claimed.key_package.as_slice(), expected.as_slice());
        }
        for _ in 0..2 {
            let claimed = expect_claimed(&mut bob, &alice_id.name).await;
            assert_eq!(claimed.last_resort, 1);
            assert_eq!(claimed.key_package.as_slice(), last_resort.as_slice());
        }
        // Handing out the last-resort KeyPackage does not consume it.
        assert_eq!(count(&mut alice).await, (0, true));

        // A new last-resort KeyPackage replaces the old one.
        let newer = alice_id.key_package(true);
        assert_eq!(
            expect_stored(&mut alice, Vec::new(), Some(newer.clone())).await,
            0
        );
        let claimed = expect_claimed(&mut bob, &alice_id.name).await;
        assert_eq!(
            (claimed.last_resort, claimed.key_package.as_slice()),
            (1, newer.as_slice())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_of_another_user_are_rejected_atomically() {
    timed(async {
        let server = TestServer::start().await;
        let alice_id = MlsIdentity::new("alice");
        let bob_id = MlsIdentity::new("bob");
        let mut alice = register(&server, &alice_id).await;
        let mut bob = register(&server, &bob_id).await;

        // Bob's KeyPackage uploaded by alice.
        let response = upload(&mut alice, vec![bob_id.key_package(false)], None).await;
        expect_error(response, ErrorCode::InvalidKeyPackage);
        assert_eq!(count(&mut alice).await, (0, false));

        // A good one next to a bad one: neither is stored.
        let response = upload(
            &mut alice,
            vec![alice_id.key_package(false), bob_id.key_package(false)],
            None,
        )
        .await;
        expect_error(response, ErrorCode::InvalidKeyPackage);
        assert_eq!(count(&mut alice).await, (0, false));

        // A good batch with someone else's last-resort KeyPackage: nothing stored either.
        let response = upload(
            &mut alice,
            vec![alice_id.key_package(false)],
            Some(bob_id.key_package(true)),
        )
        .await;
        expect_error(response, ErrorCode::InvalidKeyPackage);
        assert_eq!(count(&mut alice).await, (0, false));

        // A KeyPackage naming alice but signed with a key she did not register.
        let twin = MlsIdentity::new("alice");
        let response = upload(&mut alice, vec![twin.key_package(false)], None).await;
        expect_error(response, ErrorCode::InvalidKeyPackage);

        // Nothing of that reached the store: claims for alice find nothing.
        expect_error(
            claim(&mut bob, &alice_id.name).await,
            ErrorCode::NoKeyPackage,
        );
        assert_eq!(count(&mut bob).await, (0, false));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_tampered_key_packages_are_rejected() {
    timed(async {
        let server = TestServer::start().await;
        let alice_id = MlsIdentity::new("alice");
        let mut alice = register(&server, &alice_id).await;

        let response = upload(
            &mut alice,
            vec![b"definitely not a KeyPackage".to_vec()],
            None,
        )
        .await;
        expect_error(response, ErrorCode::InvalidKeyPackage);

        // The right MLSMessage header (mls10, mls_key_package) on garbage.
        let mut framed_garbage = vec![0x00, 0x01, 0x00, 0x05];
        framed_garbage.extend_from_slice(&[0xab; 200]);
        let response = upload(&mut alice, vec![framed_garbage], None).await;
        expect_error(response, ErrorCode::InvalidKeyPackage);

        // A real KeyPackage with one byte of its HPKE init key flipped: it still parses, but
        // its signature no longer verifies. Layout: MLSMessage version (2) and wire format (2),
        // KeyPackage version (2), cipher suite (2), init_key length (1), then the key.
        let mut tampered = alice_id.key_package(false);
        assert_eq!(tampered[9 - 1], 32, "the init key is a 32-byte X25519 key");
        tampered[12] ^= 0x40;
        let response = upload(&mut alice, vec![tampered], None).await;
        expect_error(response, ErrorCode::InvalidKeyPackage);

        // A flipped signature byte (the last byte of the message) is refused as well.
        let mut bad_signature = alice_id.key_package(false);
        let last = bad_signature.len() - 1;
        bad_signature[last] ^= 0x01;
        let response = upload(&mut alice, vec![bad_signature], None).await;
        expect_error(response, ErrorCode::InvalidKeyPackage);

        assert_eq!(count(&mut alice).await, (0, false));
        // The connection survives rejected uploads.
        assert_eq!(
            expect_stored(&mut alice, alice_id.key_packages(1), None).await,
            1
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_for_unknown_users_and_empty_users() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;
        let _bob = server.register("bob").await;

        expect_error(
            claim(&mut alice, &user("nobody")).await,
            ErrorCode::UnknownUser,
        );
        expect_error(
            claim(&mut alice, &user("bob")).await,
            ErrorCode::NoKeyPackage,
        );
        // Unknown users do not turn into known ones by being asked for.
        expect_error(
            claim(&mut alice, &user("nobody")).await,
            ErrorCode::UnknownUser,
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_package_quota() {
    timed(async {
        let limits = Limits {
            max_key_packages_per_user: 2,
            ..Limits::default()
        };
        let server = TestServer::start_with(limits).await;
        let alice_id = MlsIdentity::new("alice");
        let mut alice = register(&server, &alice_id).await;
        let mut bob = server.register("bob").await;

        let response = upload(&mut alice, alice_id.key_packages(3), None).await;
        expect_error(response, ErrorCode::QuotaExceeded);
        assert_eq!(count(&mut alice).await, (0, false));

        // Up to the quota is fine; one more is not; the last resort does not count.
        assert_eq!(
            expect_stored(&mut alice, alice_id.key_packages(1), None).await,
            1
        );
        assert_eq!(
            expect_stored(
                &mut alice,
                alice_id.key_packages(1),
                Some(alice_id.key_package(true))
            )
            .await,
            2
        );
        let response = upload(&mut alice, alice_id.key_packages(1), None).await;
        expect_error(response, ErrorCode::QuotaExceeded);
        assert_eq!(count(&mut alice).await, (2, true));

        // A claim frees a slot.
        assert_eq!(
            expect_claimed(&mut bob, &alice_id.name).await.last_resort,
            0
        );
        assert_eq!(
            expect_stored(&mut alice, alice_id.key_packages(1), None).await,
            2
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_hand_out_each_key_package_once() {
    timed(async {
        let server = TestServer::start().await;
        let alice_id = MlsIdentity::new("alice");
        let mut alice = register(&server, &alice_id).await;
        let uploaded = alice_id.key_packages(20);
        assert_eq!(expect_stored(&mut alice, uploaded.clone(), None).await, 20);

        let mut claimers = Vec::new();
        for index in 0..5 {
            claimers.push(server.register(&format!("claimer{index}")).await);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for mut claimer in claimers {
            let name = alice_id.name.clone();
            tasks.spawn(async move {
                // Pipelined: all four claims are in flight at once.
                let ids: Vec<u32> = (0..4).map(|_| claimer.next_request_id()).collect();
                for id in &ids {
                    claimer
                        .send_frame(&Frame::ClaimKeyPackage(ClaimKeyPackage {
                            request_id: *id,
                            user_name: name.clone(),
                        }))
                        .await;
                }
                let mut claimed = Vec::new();
                for id in ids {
                    match claimer.response(id).await {
                        Frame::KeyPackage(key_package) => {
                            assert_eq!(key_package.last_resort, 0);
                            claimed.push(key_package.key_package.as_slice().to_vec());
                        }
                        other => panic!("expected a KeyPackage, got {other:?}"),
                    }
                }
                claimed
            });
        }
        let mut all = Vec::new();
        while let Some(claimed) = tasks.join_next().await {
            all.extend(claimed.expect("claimer task"));
        }
        assert_eq!(all.len(), 20);
        let distinct: HashSet<Vec<u8>> = all.into_iter().collect();
        assert_eq!(distinct.len(), 20, "a KeyPackage was handed out twice");
        let expected: HashSet<Vec<u8>> = uploaded.into_iter().collect();
        assert_eq!(distinct, expected);
        assert_eq!(count(&mut alice).await, (0, false));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_package_claims_are_rate_limited_per_connection() {
    timed(async {
        let limits = Limits {
            key_package_claims_per_minute: 3,
            ..Limits::default()
        };
        let server = TestServer::start_with(limits).await;
        let alice_id = MlsIdentity::new("alice");
        let mut alice = register(&server, &alice_id).await;
        assert_eq!(
            expect_stored(&mut alice, alice_id.key_packages(10), None).await,
            10
        );
        let mut bob = server.register("bob").await;
        for _ in 0..3 {
            expect_claimed(&mut bob, &alice_id.name).await;
        }
        expect_error(
            claim(&mut bob, &alice_id.name).await,
            ErrorCode::RateLimited,
        );
        // The refused claim used up nothing, other requests still pass, and the limit is per
        // connection.
        assert_eq!(count(&mut alice).await, (7, false));
        bob.ping().await;
        let mut carol = server.register("carol").await;
        expect_claimed(&mut carol, &alice_id.name).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_too_large_to_hand_out_are_rejected() {
    timed(async {
        let server = TestServer::start().await;
        let alice_id = MlsIdentity::new("alice");
        let mut alice = register(&server, &alice_id).await;
        let too_large = alice_id.padded_key_package(MAX_KEY_PACKAGE_LEN, false);
        assert!(too_large.len() > MAX_KEY_PACKAGE_LEN);
        let response = upload(&mut alice, vec![too_large.clone()], None).await;
        expect_error(response, ErrorCode::InvalidKeyPackage);
        let response = upload(&mut alice, Vec::new(), Some(too_large)).await;
        expect_error(response, ErrorCode::InvalidKeyPackage);
        assert_eq!(count(&mut alice).await, (0, false));

        // A large one that still fits a KeyPackage frame is stored and handed out whole.
        let large = alice_id.padded_key_package(MAX_KEY_PACKAGE_LEN - 1024, false);
        assert!(large.len() <= MAX_KEY_PACKAGE_LEN);
        assert_eq!(
            expect_stored(&mut alice, vec![large.clone()], None).await,
            1
        );
        let mut bob = server.register("bob").await;
        let claimed = expect_claimed(&mut bob, &alice_id.name).await;
        assert_eq!(claimed.key_package.as_slice(), large.as_slice());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_resort_upload_must_carry_the_last_resort_extension() {
    timed(async {
        let server = TestServer::start().await;
        let alice_id = MlsIdentity::new("alice");
        let mut alice = register(&server, &alice_id).await;
        let response = upload(&mut alice, Vec::new(), Some(alice_id.key_package(false))).await;
        let error = expect_error(response, ErrorCode::InvalidKeyPackage);
        assert!(
            String::from_utf8_lossy(error.message.as_slice()).contains("last_resort"),
            "{error:?}"
        );
        assert_eq!(count(&mut alice).await, (0, false));
        assert_eq!(
            expect_stored(&mut alice, Vec::new(), Some(alice_id.key_package(true))).await,
            0
        );
        assert_eq!(count(&mut alice).await, (0, true));
    })
    .await;
}
