//! Hostile and broken input: garbage datagrams, the wrong ALPN, broken frames, oversized
//! frames, frames only the DS may send, rate limits and connection caps. After each, a pair of
//! well-behaved clients that were connected all along must still exchange messages.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{Client, TestServer, expect_error, group, setup_group, timed};
use mlschat_ds::client::RawConnection;
use mlschat_ds::config::Limits;
use mlschat_ds::protocol::mls::ContentType;
use mlschat_ds::protocol::{
    ALPN, Delivery, ErrorCode, FRAME_HEADER_LEN, Fetch, Frame, FrameHeader, FrameKind, GroupId,
    Ping, max_body_len,
};
use rand::rngs::StdRng;
use rand::{Rng as _, RngCore as _, SeedableRng as _};

/// Two members of one group, connected for the whole test, proving the DS still works.
struct Witnesses {
    alice: Client,
    bob: Client,
    group_id: GroupId,
    sent: u32,
}

impl Witnesses {
    async fn new(server: &TestServer) -> Witnesses {
        let mut alice = server.register("alice").await;
        let mut bob = server.register("bob").await;
        let group_id = group("witnesses");
        setup_group(&mut [&mut alice, &mut bob], &group_id).await;
        Witnesses {
            alice,
            bob,
            group_id,
            sent: 0,
        }
    }

    /// Alice sends a message and bob receives it, both ways checked by seq and payload.
    async fn still_working(&mut self, after: &str) {
        self.sent += 1;
        let body = format!("still working after {after}");
        let accepted = self
            .alice
            .send_application(&self.group_id, 1, body.as_bytes())
            .await;
        assert_eq!(accepted.seq, 1 + u64::from(self.sent), "after {after}");
        let delivery: Delivery = self.bob.next_delivery().await;
        assert_eq!(delivery.seq, accepted.seq, "after {after}");
        let expected =
            common::private_message(&self.group_id, 1, ContentType::Application, body.as_bytes());
        assert_eq!(delivery.payload.as_slice(), expected.as_slice());
        self.bob.ping().await;
    }
}

fn header(kind: u16, body_len: u32) -> Vec<u8> {
    let mut bytes = kind.to_be_bytes().to_vec();
    bytes.extend_from_slice(&body_len.to_be_bytes());
    bytes
}

/// A fresh client for the misbehaviour, authenticated or not.
async fn offender(server: &TestServer, index: &mut u32, authenticated: bool) -> Client {
    *index += 1;
    let name = format!("offender{index}");
    if authenticated {
        server.register(&name).await
    } else {
        server.connect(&name, common::Signer::ed25519()).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_do_not_disturb_the_ds() {
    timed(async {
        let server = TestServer::start().await;
        let mut witnesses = Witnesses::new(&server).await;

        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
        let mut rng = StdRng::seed_from_u64(0x6d6c7363686174);
        for index in 0..400 {
            let len = rng.gen_range(1..=1500);
            let mut datagram = vec![0u8; len];
            rng.fill_bytes(&mut datagram);
            // Every other datagram looks like a QUIC v1 long-header packet, so that it gets
            // past the first checks of the packet parser.
            if index % 2 == 0 && len >= 7 {
                datagram[0] = 0xc0 | (datagram[0] & 0x3f);
                datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
                datagram[5] = 8;
            }
            socket
                .send_to(&datagram, server.address())
                .expect("send a datagram");
        }
        witnesses.still_working("garbage datagrams").await;
        // New clients can still connect and register.
        let mut carol = server.register("carol").await;
        carol.ping().await;
    })
    .await;
}

/// Connects with a client configuration like `tls::client_config`, but with `alpn`.
async fn connect_with_alpn(
    server: &TestServer,
    alpn: &[u8],
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let endpoint = common::client_endpoint(common::client_config(server, alpn, None));
    endpoint
        .connect(server.address(), "mlschat-ds")
        .expect("start connecting")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_alpn_fails_the_handshake() {
    timed(async {
        let server = TestServer::start().await;
        let mut witnesses = Witnesses::new(&server).await;

        let refused = connect_with_alpn(&server, b"h3").await;
        assert!(refused.is_err(), "a client offering only h3 was accepted");
        // The control: the same configuration with the right ALPN connects, so the ALPN is what
        // made the difference.
        let accepted = connect_with_alpn(&server, ALPN)
            .await
            .expect("mlschat/1 connects");
        accepted.close(0u32.into(), b"bye");
        witnesses.still_working("a wrong ALPN").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_frames_close_the_offending_connection_only() {
    timed(async {
        let limits = Limits {
            max_send_bytes: 4096,
            ..Limits::default()
        };
        let server = TestServer::start_with(limits).await;
        let mut witnesses = Witnesses::new(&server).await;
        let mut index = 0;
        let mut rng = StdRng::seed_from_u64(7);

        for authenticated in [false, true] {
            let stage = if authenticated {
                "authenticated"
            } else {
                "unauthenticated"
            };

            // A frame header, then the stream ends.
            let mut client = offender(&server, &mut index, authenticated).await;
            client.send_raw(&header(FrameKind::Ping as u16, 4)).await;
            client.finish();
            client.expect_closed(ErrorCode::MalformedFrame).await;
            witnesses
                .still_working(&format!("a truncated body ({stage})"))
                .await;

            // Half a header, then the stream ends.
            let mut client = offender(&server, &mut index, authenticated).await;
            client.send_raw(&[0x00, 0x30, 0x00]).await;
            client.finish();
            client.expect_closed(ErrorCode::MalformedFrame).await;
            witnesses
                .still_working(&format!("a truncated header ({stage})"))
                .await;

            // A header over the kind's limit; the body is never sent.
            for (kind, len) in [
                (FrameKind::Ping, max_body_len(FrameKind::Ping) + 1),
                (FrameKind::Register, max_body_len(FrameKind::Register) + 1),
                (FrameKind::Send, max_body_len(FrameKind::Send) + 1),
                (FrameKind::Fetch, u32::MAX),
            ] {
                let mut client = offender(&server, &mut index, authenticated).await;
                client.send_raw(&header(kind as u16, len)).await;
                client.expect_closed(ErrorCode::FrameTooLarge).await;
                witnesses
                    .still_working(&format!("an oversized {kind:?} ({stage})"))
                    .await;
            }

            // Unknown frame kinds.
            for kind in [0x0042u16, 0x7fff, 0x8999] {
                let mut client = offender(&server, &mut index, authenticated).await;
                client.send_raw(&header(kind, 0)).await;
                client.expect_closed(ErrorCode::UnknownFrameKind).await;
                witnesses
                    .still_working(&format!("frame kind {kind:#06x} ({stage})"))
                    .await;
            }

            // Frames only the DS sends, with well-formed bodies.
            let ds_frames = [
                Frame::Deliver(Delivery {
                    group_id: group("witnesses"),
                    seq: 99,
                    epoch: 1,
                    kind: 1,
                    sender: common::user("alice"),
                    payload: b"forged".to_vec().into(),
                }),
                Frame::Pong(mlschat_ds::protocol::Pong { request_id: 1 }),
                Frame::error(1, ErrorCode::Internal, None, "forged"),
            ];
            for frame in ds_frames {
                let mut client = offender(&server, &mut index, authenticated).await;
                client.send_frame(&frame).await;
                client.expect_closed(ErrorCode::UnexpectedFrame).await;
                witnesses
                    .still_working(&format!("a {:?} from a client ({stage})", frame.kind()))
                    .await;
            }

            // Random bytes under valid request headers.
            for kind in [
                FrameKind::CreateGroup,
                FrameKind::Fetch,
                FrameKind::Register,
                FrameKind::Send,
            ] {
                let body = loop {
                    let mut body = vec![0u8; rng.gen_range(1..64)];
                    rng.fill_bytes(&mut body);
                    if Frame::decode(kind, &body).is_err() {
                        break body;
                    }
                };
                let mut bytes = FrameHeader {
                    kind,
                    body_len: u32::try_from(body.len()).expect("small"),
                }
                .to_bytes()
                .to_vec();
                assert_eq!(bytes.len(), FRAME_HEADER_LEN);
                bytes.extend_from_slice(&body);
                let mut client = offender(&server, &mut index, authenticated).await;
                client.send_raw(&bytes).await;
                client.expect_closed(ErrorCode::MalformedFrame).await;
                witnesses
                    .still_working(&format!("a malformed {kind:?} ({stage})"))
                    .await;
            }
        }

        // An invalid user name is a decoding failure too.
        let mut client = offender(&server, &mut index, false).await;
        let mut register = client.register_frame(1).encode();
        let name_at = FRAME_HEADER_LEN + 4 + 1; // request_id, then the name's length byte
        register[name_at] = b'A';
        client.send_raw(&register).await;
        client.expect_closed(ErrorCode::MalformedFrame).await;
        witnesses.still_working("an invalid user name").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_over_the_configured_limit_is_refused() {
    timed(async {
        let limits = Limits {
            max_send_bytes: 4096,
            ..Limits::default()
        };
        let server = TestServer::start_with(limits).await;
        let mut witnesses = Witnesses::new(&server).await;
        let group_id = witnesses.group_id.clone();

        // Just under the limit is fine (the control).
        let message = common::private_message(&group_id, 1, ContentType::Application, &[7; 3800]);
        let frame = common::send_frame(1, [1; 16], message, None);
        assert!(frame.encode().len() - FRAME_HEADER_LEN <= 4096);
        let response = witnesses.alice.request(|id| match frame {
            Frame::Send(mut send) => {
                send.request_id = id;
                Frame::Send(send)
            }
            other => other,
        });
        common::expect_accepted(response.await);
        witnesses.bob.next_delivery().await;
        witnesses.sent += 1;

        // Over the limit: MessageTooLarge, and the connection is closed.
        let mut mallory = server.register("mallory").await;
        let message = common::private_message(&group_id, 1, ContentType::Application, &[7; 5000]);
        mallory
            .send_frame(&common::send_frame(1, [2; 16], message, None))
            .await;
        mallory.expect_closed(ErrorCode::MessageTooLarge).await;
        witnesses.still_working("an oversized Send").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_of_another_groups_messages_is_refused() {
    timed(async {
        let server = TestServer::start().await;
        let mut witnesses = Witnesses::new(&server).await;
        witnesses.still_working("setup").await;
        let mut eve = server.register("eve").await;
        let group_id = witnesses.group_id.clone();
        let response = eve
            .request(|id| {
                Frame::Fetch(Fetch {
                    request_id: id,
                    group_id,
                    after_seq: 0,
                    limit: 100,
                })
            })
            .await;
        expect_error(response, ErrorCode::NotMember);
        // Not fatal: eve's connection goes on.
        eve.ping().await;
        witnesses.still_working("a foreign Fetch").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_is_limited_without_closing() {
    timed(async {
        let limits = Limits {
            requests_per_second: 1,
            request_burst: 5,
            ..Limits::default()
        };
        let server = TestServer::start_with(limits).await;
        let mut client = server.register("alice").await;

        let ids: Vec<u32> = (0..6).map(|_| client.next_request_id()).collect();
        let mut pings = Vec::new();
        for id in &ids {
            pings.extend(Frame::Ping(Ping { request_id: *id }).encode());
        }
        client.send_raw(&pings).await;
        for id in &ids[..5] {
            assert!(
                matches!(client.response(*id).await, Frame::Pong(_)),
                "ping {id} within the burst"
            );
        }
        let error = expect_error(client.response(ids[5]).await, ErrorCode::RateLimited);
        assert_eq!(error.request_id, ids[5]);

        // The connection stays open, and a token comes back after a second.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        client.ping().await;
        assert!(client.connection.close_reason().is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_capped() {
    timed(async {
        let limits = Limits {
            max_connections_per_ip: 2,
            ..Limits::default()
        };
        let server = TestServer::start_with(limits).await;
        let mut first = server.register("alice").await;
        let mut second = server.register("bob").await;

        let third = RawConnection::connect(server.address(), server.fingerprint()).await;
        assert!(
            third.is_err(),
            "a third connection from 127.0.0.1 was accepted"
        );
        first.ping().await;
        second.ping().await;

        // Closing one frees its slot.
        first.close().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let replacement = loop {
            match RawConnection::connect(server.address(), server.fingerprint()).await {
                Ok(connection) => break connection,
                Err(error) if tokio::time::Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("the freed slot was not reusable: {error}"),
            }
        };
        let mut carol = Client::new(
            replacement,
            common::user("carol"),
            common::Signer::ed25519(),
        );
        carol.expect_authenticated_by_register().await;
        carol.ping().await;
        second.ping().await;
    })
    .await;
}
