//! `tokio_util::codec::Decoder` for [`ClientOpDecoder`], for `FramedRead`.

use super::{ClientOp, ClientOpDecoder, NatsProtocolError};
use bytes::BytesMut;

/// Any failure while reading ops from a NATS client: the socket, or the bytes on it.
#[derive(Debug, thiserror::Error)]
pub enum NatsCodecError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] NatsProtocolError),
}

impl tokio_util::codec::Decoder for ClientOpDecoder {
    type Item = ClientOp;
    type Error = NatsCodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ClientOp>, NatsCodecError> {
        Ok(ClientOpDecoder::decode(self, src)?)
    }
}
