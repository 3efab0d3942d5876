//! Authentication: registration, login, replay protection, the pre-authentication rules,
//! session replacement and the authentication deadline, against a real DS.

mod common;

use std::time::{Duration, Instant};

use common::{Signer, TestServer, expect_error, group, timed, user};
use mlschat_ds::config::Limits;
use mlschat_ds::protocol::mls::ContentType;
use mlschat_ds::protocol::{CreateGroup, ErrorCode, Fetch, Frame, Ping};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_then_authenticate_on_a_new_connection() {
    timed(async {
        let server = TestServer::start().await;
        let signer = Signer::ed25519();
        let mut first = server.register_with("alice", signer.clone()).await;
        first.ping().await;
        first.disconnect().await;

        let mut second = server.login(&user("alice"), &signer).await;
        second.ping().await;
        // The session is fully usable, not just answered once.
        second.create_group(&group("after-login")).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_taken_by_another_key_leaves_the_connection_usable() {
    timed(async {
        let server = TestServer::start().await;
        let _alice = server.register("alice").await;

        let mut intruder = server.connect("alice", Signer::ed25519()).await;
        let response = intruder.register().await;
        expect_error(response, ErrorCode::NameTaken);

        // Same connection, another name: registration still works.
        intruder.name = user("mallory");
        intruder.expect_authenticated_by_register().await;
        intruder.ping().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_again_with_the_same_key_is_idempotent() {
    timed(async {
        let server = TestServer::start().await;
        let signer = Signer::ed25519();
        let first = server.register_with("alice", signer.clone()).await;
        first.disconnect().await;
        let mut again = server.register_with("alice", signer.clone()).await;
        again.ping().await;
        // And the key still authenticates.
        again.disconnect().await;
        server.login(&user("alice"), &signer).await.ping().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signature_fails_and_closes() {
    timed(async {
        let server = TestServer::start().await;

        // Register with a corrupted signature.
        let mut client = server.connect("alice", Signer::ed25519()).await;
        let mut frame = client.register_frame(7);
        if let Frame::Register(register) = &mut frame {
            let mut signature = register.signature.as_slice().to_vec();
            signature[0] ^= 0x01;
            register.signature = signature.into();
        }
        client.send_frame(&frame).await;
        client.expect_closed(ErrorCode::AuthenticationFailed).await;

        // The name was not registered by the failed attempt.
        let mut honest = server.register("alice").await;
        honest.ping().await;

        // Authenticate as alice with a key that is not hers.
        let mut impostor = server.connect("alice", Signer::ed25519()).await;
        let frame = impostor.authenticate_frame(3);
        impostor.send_frame(&frame).await;
        impostor
            .expect_closed(ErrorCode::AuthenticationFailed)
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_authentication_from_another_connection_fails() {
    timed(async {
        let server = TestServer::start().await;
        let signer = Signer::ed25519();
        let registration = server.register_with("alice", signer.clone()).await;
        registration.disconnect().await;

        // Connection A: capture the exact bytes of a valid Authenticate and use them.
        let mut a = server.connect("alice", signer.clone()).await;
        let captured = a.authenticate_frame(1).encode();
        a.send_raw(&captured).await;
        assert!(matches!(a.response(1).await, Frame::Authenticated(_)));

        // Connection B: the same bytes are bound to A's TLS exporter and must not verify.
        let mut b = server.connect("alice", Signer::ed25519()).await;
        b.send_raw(&captured).await;
        b.expect_closed(ErrorCode::AuthenticationFailed).await;

        // A replayed Register is refused the same way.
        let mut c = server.connect("carol", signer.clone()).await;
        let captured = c.register_frame(1).encode();
        let mut d = server.connect("carol", Signer::ed25519()).await;
        d.send_raw(&captured).await;
        d.expect_closed(ErrorCode::AuthenticationFailed).await;
        // c can still use its own frame.
        c.send_raw(&captured).await;
        assert!(matches!(c.response(1).await, Frame::Authenticated(_)));

        // A was not disturbed by the replay attempt.
        a.ping().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_authentication_close_the_connection() {
    timed(async {
        let server = TestServer::start().await;
        let requests = [
            Frame::CreateGroup(CreateGroup {
                request_id: 5,
                group_id: group("g"),
            }),
            Frame::Ping(Ping { request_id: 5 }),
            Frame::Fetch(Fetch {
                request_id: 5,
                group_id: group("g"),
                after_seq: 0,
                limit: 10,
            }),
            Frame::Send(mlschat_ds::protocol::Send {
                request_id: 5,
                client_message_id: [0; 16],
                message: common::private_message(&group("g"), 0, ContentType::Application, b"x")
                    .into(),
                commit: None,
            }),
        ];
        for request in requests {
            let mut client = server.connect("alice", Signer::ed25519()).await;
            client.send_frame(&request).await;
            client.expect_closed(ErrorCode::NotAuthenticated).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_or_authenticate_after_authentication_is_refused() {
    timed(async {
        let server = TestServer::start().await;
        let mut alice = server.register("alice").await;

        let id = alice.next_request_id();
        let frame = alice.register_frame(id);
        alice.send_frame(&frame).await;
        let error = expect_error(alice.response(id).await, ErrorCode::AlreadyAuthenticated);
        assert_eq!(error.request_id, id);

        let id = alice.next_request_id();
        let frame = alice.authenticate_frame(id);
        alice.send_frame(&frame).await;
        let error = expect_error(alice.response(id).await, ErrorCode::AlreadyAuthenticated);
        assert_eq!(error.request_id, id);

        // Switching identity on the same connection is refused too, and the session goes on.
        let id = alice.next_request_id();
        alice.name = user("bob");
        let frame = alice.register_frame(id);
        alice.name = user("alice");
        alice.send_frame(&frame).await;
        expect_error(alice.response(id).await, ErrorCode::AlreadyAuthenticated);
        alice.ping().await;
        alice.create_group(&group("still-alice")).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_cannot_authenticate() {
    timed(async {
        let server = TestServer::start().await;
        let mut ghost = server.connect("ghost", Signer::ed25519()).await;
        let frame = ghost.authenticate_frame(1);
        ghost.send_frame(&frame).await;
        ghost.expect_closed(ErrorCode::AuthenticationFailed).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_replaces_the_first() {
    timed(async {
        let server = TestServer::start().await;
        let signer = Signer::ed25519();
        let mut first = server.register_with("alice", signer.clone()).await;
        first.ping().await;

        let mut second = server.login(&user("alice"), &signer).await;
        first
            .expect_closed_without_frame(ErrorCode::SessionReplaced)
            .await;

        // The replacement is the live session: it gets pushed deliveries (its own commit comes
        // back to it). The old connection's teardown must not detach it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let group_id = group("replaced");
        second.create_group(&group_id).await;
        let accepted =
            common::expect_accepted(second.send_commit(&group_id, 0, b"self-update", None).await);
        let delivery = second.next_delivery().await;
        assert_eq!(
            (delivery.seq, delivery.sender.as_str()),
            (accepted.seq, "alice")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_deadline() {
    timed(async {
        let limits = Limits {
            auth_timeout_secs: 1,
            ..Limits::default()
        };
        let server = TestServer::start_with(limits).await;

        // Connected, but nothing sent at all (the stream is not even open on the wire).
        let started = Instant::now();
        let silent = server.raw().await;
        common::expect_close_code(&silent.connection, ErrorCode::AuthenticationTimeout).await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
            "closed after {elapsed:?}"
        );

        // Stream open, half a frame header sent, then silence.
        let started = Instant::now();
        let mut stalled = server.connect("alice", Signer::ed25519()).await;
        stalled.send_raw(&[0x00, 0x01, 0x00]).await;
        stalled
            .expect_closed(ErrorCode::AuthenticationTimeout)
            .await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
            "closed after {elapsed:?}"
        );

        // A client that authenticates in time is not affected by the deadline afterwards.
        let mut alice = server.register("alice").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        alice.ping().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_registrations_close_the_connection() {
    timed(async {
        let server = TestServer::start().await;
        let _alice = server.register("alice").await;

        let mut prober = server.connect("alice", Signer::ed25519()).await;
        for _ in 0..4 {
            let response = prober.register().await;
            expect_error(response, ErrorCode::NameTaken);
        }
        // The fifth failure ends the connection instead of another NameTaken.
        let id = prober.next_request_id();
        let frame = prober.register_frame(id);
        prober.send_frame(&frame).await;
        prober.expect_closed(ErrorCode::AuthenticationFailed).await;
    })
    .await;
}
