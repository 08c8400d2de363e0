//! Fuzz target: arbitrary bytes through `FrameDecoder`, and every frame that
//! decodes must re-encode to bytes that decode to the same frame.

#![no_main]

use bytes::BytesMut;
use holdfast_wire::{encode, encoded_len, FrameDecoder};
use libfuzzer_sys::fuzz_target;

// Small enough that the fuzzer reaches FrameTooLarge with short inputs.
const MAX: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::new(MAX);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
        let mut again = BytesMut::new();
        encode(&frame, MAX, &mut again).expect("a decoded frame re-encodes");
        assert_eq!(again.len(), encoded_len(&frame));
        let decoded = FrameDecoder::new(MAX)
            .decode(&mut again)
            .expect("a re-encoded frame decodes");
        assert_eq!(decoded.as_ref(), Some(&frame));
        assert!(again.is_empty());
    }
    assert!(buf.capacity() <= data.len().max(MAX as usize + 4) * 2);
});
