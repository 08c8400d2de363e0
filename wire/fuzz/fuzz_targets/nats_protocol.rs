//! Fuzz target: arbitrary bytes through `ClientOpDecoder`, fed whole and in
//! small pieces. Both must agree, never buffer past the limits, and every op
//! that decodes must re-encode (as a client would) to bytes that decode to it.

#![no_main]

use bytes::BytesMut;
use holdfast_wire::nats_protocol::{
    encode_client_op, ClientOp, ClientOpDecoder, NatsProtocolError, DEFAULT_MAX_PAYLOAD,
};
use libfuzzer_sys::fuzz_target;

// Small enough that the fuzzer reaches both limits with short inputs.
const MAX_PAYLOAD: usize = 256;
const MAX_CONTROL_LINE: usize = 128;

fn decode(data: &[u8], chunk: usize) -> (Vec<ClientOp>, Option<NatsProtocolError>) {
    let mut decoder = ClientOpDecoder::new(MAX_PAYLOAD).with_max_control_line(MAX_CONTROL_LINE);
    let mut buf = BytesMut::new();
    let mut ops = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(op)) => {
                    assert!(buf.len() < before, "an op consumed nothing");
                    ops.push(op);
                }
                Ok(None) => {
                    assert!(buf.len() <= MAX_CONTROL_LINE.max(MAX_PAYLOAD) + 1);
                    break;
                }
                Err(error) => return (ops, Some(error)),
            }
        }
        assert!(buf.capacity() <= data.len().max(MAX_PAYLOAD + 2) * 2);
    }
    (ops, None)
}

fuzz_target!(|data: &[u8]| {
    let whole = decode(data, data.len());
    assert_eq!(decode(data, 7), whole);
    for op in &whole.0 {
        let mut again = BytesMut::new();
        encode_client_op(op, &mut again);
        let mut decoder = ClientOpDecoder::new(DEFAULT_MAX_PAYLOAD);
        let decoded = decoder.decode(&mut again).expect("a re-encoded op decodes");
        assert_eq!(decoded.as_ref(), Some(op));
        assert!(again.is_empty());
    }
});
