//! Property tests of the codec: any frame round-trips however its bytes are
//! split, and no input makes the decoder panic or over-allocate.

use bytes::{Bytes, BytesMut};
use holdfast_wire::*;
use proptest::prelude::*;

const MAX: u32 = 64 * 1024;

fn text() -> impl Strategy<Value = Text> {
    // Mixed-width characters exercise byte lengths that differ from char counts.
    "[a-z.>*_é漢🦀]{0,12}".prop_map(Text::from)
}

/// Optional strings are never `Some("")` (that encodes as absent).
fn opt_text() -> impl Strategy<Value = Option<Text>> {
    prop::option::of("[a-z._é]{1,12}".prop_map(Text::from))
}

fn payload() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

fn headers() -> impl Strategy<Value = Headers> {
    prop::collection::vec((text(), text()), 0..4).prop_map(Headers)
}

fn code() -> impl Strategy<Value = ErrorCode> {
    // Through from_u16 so known values never appear as `Unknown(n)`.
    prop_oneof![1u16..=20, any::<u16>()].prop_map(ErrorCode::from_u16)
}

fn link_status() -> impl Strategy<Value = LinkStatus> {
    prop_oneof![
        Just(LinkStatus::Unknown),
        Just(LinkStatus::Up),
        Just(LinkStatus::Down)
    ]
}

fn ack_outcome() -> impl Strategy<Value = AckOutcome> {
    prop_oneof![
        Just(AckOutcome::Forwarded),
        Just(AckOutcome::Journaled),
        Just(AckOutcome::Queued),
        (code(), text()).prop_map(|(code, message)| AckOutcome::Rejected { code, message }),
    ]
}

fn response_outcome() -> impl Strategy<Value = ResponseOutcome> {
    prop_oneof![
        (headers(), payload())
            .prop_map(|(headers, payload)| ResponseOutcome::Reply { headers, payload }),
        (code(), text()).prop_map(|(code, message)| ResponseOutcome::Failed { code, message }),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u64>(), text()).prop_map(
            |(min_version, max_version, instance_id, client_name)| Frame::Hello(Hello {
                min_version,
                max_version,
                client_name,
                instance_id,
            })
        ),
        (
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            text(),
            any::<u32>(),
            link_status(),
            link_status()
        )
            .prop_map(
                |(version, session_id, instance_id, relay_id, max_frame_bytes, nats, etcd)| {
                    Frame::Welcome(Welcome {
                        version,
                        session_id,
                        instance_id,
                        relay_id,
                        max_frame_bytes,
                        nats,
                        etcd,
                    })
                }
            ),
        (
            any::<u64>(),
            text(),
            opt_text(),
            opt_text(),
            headers(),
            payload()
        )
            .prop_map(|(ack_id, subject, reply, class, headers, payload)| {
                Frame::Publish(Publish {
                    ack_id,
                    subject,
                    reply,
                    class,
                    headers,
                    payload,
                })
            }),
        (any::<u64>(), ack_outcome(), any::<u32>()).prop_map(
            |(ack_id, outcome, local_deliveries)| Frame::PubAck(PubAck {
                ack_id,
                outcome,
                local_deliveries,
            })
        ),
        (any::<u32>(), text(), opt_text()).prop_map(|(sid, subject, queue_group)| {
            Frame::Subscribe(Subscribe {
                sid,
                subject,
                queue_group,
            })
        }),
        any::<u32>().prop_map(|sid| Frame::Unsubscribe(Unsubscribe { sid })),
        (any::<u32>(), text(), opt_text(), headers(), payload()).prop_map(
            |(sid, subject, reply, headers, payload)| Frame::Message(Message {
                sid,
                subject,
                reply,
                headers,
                payload,
            })
        ),
        (any::<u64>(), any::<u32>(), text(), headers(), payload()).prop_map(
            |(request_id, timeout_ms, subject, headers, payload)| Frame::Request(Request {
                request_id,
                timeout_ms,
                subject,
                headers,
                payload,
            })
        ),
        (any::<u64>(), response_outcome()).prop_map(|(request_id, outcome)| {
            Frame::Response(Response {
                request_id,
                outcome,
            })
        }),
        any::<u64>().prop_map(|nonce| Frame::Ping(Ping { nonce })),
        any::<u64>().prop_map(|nonce| Frame::Pong(Pong { nonce })),
        (code(), any::<u64>(), text()).prop_map(|(code, reference, message)| {
            Frame::Error(ErrorFrame {
                code,
                reference,
                message,
            })
        }),
        (code(), text()).prop_map(|(code, message)| Frame::GoAway(GoAway { code, message })),
        (
            prop_oneof![Just(Service::Nats), Just(Service::Etcd)],
            link_status()
        )
            .prop_map(|(service, status)| Frame::LinkState(LinkState { service, status })),
        any::<u64>().prop_map(|request_id| Frame::StatusRequest(StatusRequest { request_id })),
        (any::<u64>(), payload()).prop_map(|(request_id, json)| {
            Frame::StatusResponse(StatusResponse { request_id, json })
        }),
        (any::<u64>(), key(), payload()).prop_map(|(request_id, key, value)| {
            Frame::Register(Register {
                request_id,
                key,
                value,
            })
        }),
        (any::<u64>(), key())
            .prop_map(|(request_id, key)| Frame::Deregister(Deregister { request_id, key })),
        (any::<u64>(), registration_outcome()).prop_map(|(request_id, outcome)| {
            Frame::RegisterAck(RegisterAck {
                request_id,
                outcome,
            })
        }),
        (any::<u64>(), any::<bool>(), key()).prop_map(|(request_id, linearizable, prefix)| {
            Frame::Get(Get {
                request_id,
                linearizable,
                prefix,
            })
        }),
        (any::<u64>(), get_outcome()).prop_map(|(request_id, outcome)| {
            Frame::GetResponse(GetResponse {
                request_id,
                outcome,
            })
        }),
        (any::<u32>(), any::<bool>(), key()).prop_map(|(watch_id, send_initial, prefix)| {
            Frame::Watch(Watch {
                watch_id,
                send_initial,
                prefix,
            })
        }),
        any::<u32>().prop_map(|watch_id| Frame::Unwatch(Unwatch { watch_id })),
        (
            any::<u32>(),
            any::<u64>(),
            watch_event_kind(),
            key(),
            payload()
        )
            .prop_map(|(watch_id, revision, kind, key, value)| Frame::WatchEvent(
                WatchEvent {
                    watch_id,
                    revision,
                    kind,
                    key,
                    value,
                }
            )),
    ]
}

fn key() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from)
}

fn registration_outcome() -> impl Strategy<Value = RegistrationOutcome> {
    prop_oneof![
        Just(RegistrationOutcome::Applied),
        Just(RegistrationOutcome::Buffered),
        (code(), text())
            .prop_map(|(code, message)| RegistrationOutcome::Rejected { code, message }),
    ]
}

fn get_outcome() -> impl Strategy<Value = GetOutcome> {
    let entry = (key(), payload()).prop_map(|(key, value)| KeyValue { key, value });
    prop_oneof![
        (
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            proptest::collection::vec(entry, 0..6)
        )
            .prop_map(|(revision, stale, age_ms, entries)| {
                GetOutcome::Snapshot(Snapshot {
                    revision,
                    stale,
                    age_ms,
                    entries,
                })
            }),
        (code(), text()).prop_map(|(code, message)| GetOutcome::Failed { code, message }),
    ]
}

fn watch_event_kind() -> impl Strategy<Value = WatchEventKind> {
    prop_oneof![
        Just(WatchEventKind::Put),
        Just(WatchEventKind::Delete),
        Just(WatchEventKind::Synced),
    ]
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut buf = BytesMut::new();
    for frame in frames {
        encode(frame, MAX, &mut buf).expect("generated frames fit");
    }
    buf
}

/// Feeds `bytes` to a decoder in chunks of the given sizes (cycled), the way
/// reads of varying size would, and collects every frame.
fn decode_in_chunks(bytes: &[u8], chunks: &[usize]) -> Vec<Frame> {
    let mut decoder = FrameDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = bytes;
    for &size in chunks.iter().cycle() {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        buf.extend_from_slice(chunk);
        rest = tail;
        while let Some(frame) = decoder.decode(&mut buf).expect("valid bytes decode") {
            frames.push(frame);
        }
        if rest.is_empty() {
            break;
        }
    }
    assert!(buf.is_empty(), "bytes left after the last frame");
    frames
}

proptest! {
    #[test]
    fn frames_round_trip(frames in prop::collection::vec(frame(), 1..6)) {
        let bytes = encode_all(&frames);
        let expected_len: usize = frames.iter().map(encoded_len).sum();
        prop_assert_eq!(bytes.len(), expected_len);
        prop_assert_eq!(decode_in_chunks(&bytes, &[bytes.len()]), frames);
    }

    #[test]
    fn frames_round_trip_in_random_chunks(
        frames in prop::collection::vec(frame(), 1..6),
        chunks in prop::collection::vec(1usize..40, 1..8),
    ) {
        let bytes = encode_all(&frames);
        prop_assert_eq!(decode_in_chunks(&bytes, &chunks), frames);
    }

    #[test]
    fn every_strict_prefix_needs_more(frame in frame()) {
        let bytes = encode_all(std::slice::from_ref(&frame));
        let mut decoder = FrameDecoder::new(MAX);
        for end in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..end]);
            prop_assert_eq!(decoder.decode(&mut buf), Ok(None), "prefix of {} bytes", end);
            prop_assert_eq!(&buf[..], &bytes[..end]);
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut decoder = FrameDecoder::new(MAX);
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    // Whatever decodes must re-encode to the bytes it came from.
                    let mut again = BytesMut::new();
                    encode(&frame, MAX, &mut again).expect("decoded frames re-encode");
                    prop_assert_eq!(before - buf.len(), again.len());
                }
                Ok(None) => break,
                Err(_) => break,
            }
            prop_assert!(buf.capacity() <= MAX as usize + 4 + bytes.len());
        }
    }

    #[test]
    fn random_bodies_behind_valid_prefixes_never_panic(
        ty in any::<u8>(),
        body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        // Random bytes rarely form a plausible length; this reaches the body parsers.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
        buf.extend_from_slice(&[ty]);
        buf.extend_from_slice(&body);
        match FrameDecoder::new(MAX).decode(&mut buf) {
            Ok(Some(frame)) => {
                let mut again = BytesMut::new();
                encode(&frame, MAX, &mut again).expect("decoded frames re-encode");
                prop_assert_eq!(again[4], ty);
                prop_assert_eq!(again.len(), body.len() + 5);
            }
            Ok(None) => prop_assert!(false, "a complete frame must not need more bytes"),
            Err(error) => prop_assert_eq!(error.code(), ErrorCode::BadFrame),
        }
        prop_assert!(buf.is_empty(), "the frame was consumed");
    }

    #[test]
    fn oversized_prefix_is_rejected_without_growing(
        len in (MAX + 1)..=u32::MAX,
        tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut buf = BytesMut::with_capacity(32);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&tail);
        let capacity = buf.capacity();
        prop_assert_eq!(
            FrameDecoder::new(MAX).decode(&mut buf),
            Err(DecodeError::FrameTooLarge { len, max: MAX })
        );
        prop_assert_eq!(buf.capacity(), capacity);
        prop_assert!(buf.capacity() <= MAX as usize + 4);
        prop_assert_eq!(buf.len(), 4 + tail.len());
    }
}
