//! A streaming gRPC call whose responses are decoded from the HTTP/2 DATA frames as h2 hands
//! them over, for the watch workloads.
//!
//! tonic's `Streaming` copies every received frame into a buffer of its own before a message is
//! decoded from it. With 10,000 watchers that copy (and the buffer's regrowth) was ~12 % of this
//! client's CPU, on a machine whose two cores the client shares with the server under test.
//! Here a message's fields are merged straight from the frames' bytes, one by one in place,
//! and only a field cut by a frame's end (one event of the ~50 a 16 KiB frame holds) is
//! copied, alone. Merging a message's fields piecewise is decoding it: protobuf defines an
//! encoding's concatenation as the merge of its parts. Against fetcd under 10,000 watchers,
//! eight alternating pairs: client user CPU −8 %, events/s +5 % (docs/benchmarks.md). A first
//! version that scanned each frame for whole fields before merging them gained nothing: the
//! scan paid the first touch of every event.

use std::collections::VecDeque;
use std::convert::Infallible;

use bytes::Buf;
use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;
use futures::Stream;
use futures::StreamExt;
use http_body::Frame;
use http_body_util::BodyExt;
use http_body_util::StreamBody;
use prost::encoding::WireType;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::Status;

/// gRPC's message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;
/// A field's key and length prefix take at most this many bytes (two 10-byte varints).
const MAX_FIELD_HEAD: usize = 20;

/// The response messages of one streaming call, read without tonic's `Streaming`.
pub(crate) struct MessageStream {
    body: tonic::body::Body,
    /// Received bytes not yet decoded, as the frames they came in.
    received: Chunks,
    /// A field that straddles two frames, put back together.
    scratch: Vec<u8>,
    /// The trailers (or the end of the body) were read.
    ended: bool,
}

/// Calls the streaming method `path` on `channel`, sending `requests` as its request stream.
/// Fails as tonic's client would on an HTTP error or a trailers-only error status.
pub(crate) async fn call<R, S>(
    mut channel: tonic::transport::Channel,
    path: &'static str,
    requests: S,
) -> Result<MessageStream, Status>
where
    R: prost::Message + 'static,
    S: Stream<Item = R> + Send + 'static,
{
    let frames = requests.map(|r| Ok::<_, Infallible>(Frame::data(framed(&r))));
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .version(http::Version::HTTP_2)
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(tonic::body::Body::new(StreamBody::new(frames)))
        .map_err(|e| Status::internal(format!("building the request: {e}")))?;
    futures::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::unavailable(format!("{e}")))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::unavailable(format!("{e}")))?;
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    if response.status() != http::StatusCode::OK {
        return Err(Status::unknown(format!(
            "HTTP status {}",
            response.status()
        )));
    }
    Ok(MessageStream::new(response.into_body()))
}

/// `message` with gRPC's prefix (uncompressed).
pub(crate) fn framed(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // The buffer was sized for the message, so encoding cannot run out of room.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

impl MessageStream {
    /// Reads the messages of a response body (after its headers were checked).
    pub(crate) fn new(body: tonic::body::Body) -> Self {
        MessageStream {
            body,
            received: Chunks::default(),
            scratch: Vec::new(),
            ended: false,
        }
    }

    /// The next message, `None` once the call ended with an OK status, or the call's error.
    pub(crate) async fn message<M: prost::Message + Default>(
        &mut self,
    ) -> Result<Option<M>, Status> {
        loop {
            if let Some(len) = self.whole_message()? {
                return self.decode(len).map(Some);
            }
            if self.ended {
                return match self.received.remaining() {
                    0 => Ok(None),
                    n => Err(Status::internal(format!(
                        "the stream ended {n} bytes into a message"
                    ))),
                };
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.received.push(data),
                    Err(frame) => {
                        self.ended = true;
                        if let Some(trailers) = frame.trailers_ref() {
                            match Status::from_header_map(trailers) {
                                Some(s) if s.code() != tonic::Code::Ok => return Err(s),
                                Some(_) => {}
                                None => {
                                    return Err(Status::internal("trailers without grpc-status"))
                                }
                            }
                        }
                    }
                },
                Some(Err(status)) => return Err(status),
                None => {
                    self.ended = true;
                    if self.received.remaining() == 0 {
                        return Err(Status::internal("the stream ended without trailers"));
                    }
                }
            }
        }
    }

    /// The length of the first message, once all of it has been received.
    fn whole_message(&self) -> Result<Option<usize>, Status> {
        let mut prefix = [0u8; PREFIX];
        if self.received.peek(&mut prefix) < PREFIX {
            return Ok(None);
        }
        if prefix[0] != 0 {
            return Err(Status::internal(
                "a compressed message (none was asked for)",
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        Ok((self.received.remaining() >= PREFIX + len).then_some(len))
    }

    /// Decodes the first message (`len` bytes after its prefix, all received). `M`'s
    /// `merge_field` must leave the message as it was when a field runs past the buffer it is
    /// given, as prost's generated decoders and this crate's hand-written ones do: that is how
    /// a field cut by a frame's end is told apart here.
    fn decode<M: prost::Message + Default>(&mut self, len: usize) -> Result<M, Status> {
        self.received.advance(PREFIX);
        let mut message = M::default();
        let mut left = len;
        while left > 0 {
            let chunk = self.received.chunk();
            let here = chunk.len().min(left);
            let last = here == left;
            let mut s = &chunk[..here];
            // Fields whole in this frame are merged in place, one by one.
            let mut failed = None;
            while !s.is_empty() {
                let before = s;
                let merged = prost::encoding::decode_key(&mut s).and_then(|(tag, wire)| {
                    message.merge_field(tag, wire, &mut s, Default::default())
                });
                if let Err(e) = merged {
                    if last {
                        failed = Some(e);
                    } else {
                        // Most likely cut by the frame's end; put together below.
                        s = before;
                    }
                    break;
                }
            }
            let cut = !s.is_empty();
            let used = here - s.len();
            self.received.advance(used);
            left -= used;
            if failed.is_none() && cut {
                // The next field runs past this frame: put it together alone (or, if its
                // size cannot be told, the rest of the message).
                let mut head = [0u8; MAX_FIELD_HEAD];
                let seen = self.received.peek(&mut head).min(left);
                let n = field_size(&head[..seen])
                    .filter(|&n| n <= left)
                    .unwrap_or(left);
                self.scratch.clear();
                self.received.copy_into(n, &mut self.scratch);
                left -= n;
                failed = message.merge(&self.scratch[..]).err();
            }
            if let Some(e) = failed {
                // The stream cannot be resynchronised past a message that fails to decode.
                self.received.advance(left);
                self.ended = true;
                return Err(Status::internal(format!("decoding a response: {e}")));
            }
        }
        Ok(message)
    }
}

/// The size of the field that starts `s` (key included), if its key, and its length for a
/// length-delimited field, can be read from `s`; `None` for a group or an invalid key, which are
/// left for prost to judge with the whole rest of the message.
fn field_size(s: &[u8]) -> Option<usize> {
    use prost::encoding::decode_key;
    use prost::encoding::decode_varint;
    let mut rest = s;
    let (_, wire) = decode_key(&mut rest).ok()?;
    let head = s.len() - rest.len();
    let body = match wire {
        WireType::Varint => {
            let before = rest.len();
            decode_varint(&mut rest).ok()?;
            before - rest.len()
        }
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => {
            let before = rest.len();
            let len = usize::try_from(decode_varint(&mut rest).ok()?).ok()?;
            (before - rest.len()).checked_add(len)?
        }
        WireType::StartGroup | WireType::EndGroup => return None,
    };
    head.checked_add(body)
}

/// Received bytes as a queue of the frames they came in (none empty).
#[derive(Default)]
struct Chunks {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.chunks.push_back(data);
        }
    }

    /// Copies the first bytes into `out` without taking them; returns how many there were.
    fn peek(&self, out: &mut [u8]) -> usize {
        let mut n = 0;
        for c in &self.chunks {
            let k = c.len().min(out.len() - n);
            out[n..n + k].copy_from_slice(&c[..k]);
            n += k;
            if n == out.len() {
                break;
            }
        }
        n
    }

    /// Takes the first `n` bytes (at most all) into `out`.
    fn copy_into(&mut self, mut n: usize, out: &mut Vec<u8>) {
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                return;
            };
            let k = front.len().min(n);
            out.extend_from_slice(&front[..k]);
            self.advance(k);
            n -= k;
        }
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c[..])
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if front.len() > n {
                front.advance(n);
                self.len -= n;
                return;
            }
            n -= front.len();
            self.len -= front.len();
            self.chunks.pop_front();
        }
    }
}

/// Test support: the messages of a response whose bytes arrive in frames cut at `cuts`
/// (sorted offsets), ended by an OK status.
#[cfg(test)]
pub(crate) async fn read_cut<M: prost::Message + Default>(
    bytes: &[u8],
    cuts: &[usize],
) -> Result<Vec<M>, Status> {
    tests::read_all(tests::cut(bytes, cuts), Some(tests::ok_trailers())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response body of `chunks`, then `trailers` (if any).
    fn body(chunks: Vec<Bytes>, trailers: Option<http::HeaderMap>) -> tonic::body::Body {
        let mut frames: Vec<Result<Frame<Bytes>, Infallible>> =
            chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
        if let Some(t) = trailers {
            frames.push(Ok(Frame::trailers(t)));
        }
        tonic::body::Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    pub(super) fn ok_trailers() -> http::HeaderMap {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        t
    }

    /// `bytes` cut at each of `cuts` (sorted offsets).
    pub(super) fn cut(bytes: &[u8], cuts: &[usize]) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain([bytes.len()].iter()) {
            out.push(Bytes::copy_from_slice(&bytes[at..c]));
            at = c;
        }
        out
    }

    pub(super) async fn read_all<M: prost::Message + Default>(
        chunks: Vec<Bytes>,
        trailers: Option<http::HeaderMap>,
    ) -> Result<Vec<M>, Status> {
        let mut s = MessageStream::new(body(chunks, trailers));
        let mut out = Vec::new();
        while let Some(m) = s.message::<M>().await? {
            out.push(m);
        }
        Ok(out)
    }

    /// A message with fields of every wire type prost decodes, a nested one, a long one, and
    /// a repeated field merged across them.
    fn messages() -> Vec<prost_types_like::Sample> {
        use prost_types_like::Sample;
        vec![
            Sample {
                id: 7,
                fixed: 0x0102_0304_0506_0708,
                small: 0x0a0b_0c0d,
                name: "first".into(),
                items: vec![vec![1; 3], vec![2; 300], Vec::new()],
                inner: Some(prost_types_like::Inner { n: -5 }),
            },
            Sample::default(),
            Sample {
                id: u64::MAX,
                items: (0..40).map(|i| vec![i as u8; 37]).collect(),
                ..Default::default()
            },
        ]
    }

    mod prost_types_like {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Inner {
            #[prost(sint32, tag = "1")]
            pub n: i32,
        }

        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Sample {
            #[prost(uint64, tag = "1")]
            pub id: u64,
            #[prost(fixed64, tag = "2")]
            pub fixed: u64,
            #[prost(fixed32, tag = "3")]
            pub small: u32,
            #[prost(string, tag = "4")]
            pub name: String,
            #[prost(bytes = "vec", repeated, tag = "5")]
            pub items: Vec<Vec<u8>>,
            #[prost(message, optional, tag = "6")]
            pub inner: Option<Inner>,
        }
    }

    #[tokio::test]
    async fn messages_cut_anywhere_decode_as_prost_decodes_them() {
        let sent = messages();
        let stream: Vec<u8> = sent.iter().flat_map(|m| framed(m).to_vec()).collect();
        // One cut at every offset, and cuts every k bytes for small k.
        for c in 1..stream.len() {
            let got = read_all(cut(&stream, &[c]), Some(ok_trailers())).await;
            assert_eq!(got.as_ref().ok(), Some(&sent), "cut at {c}");
        }
        for k in 1..24 {
            let cuts: Vec<usize> = (1..)
                .map(|i| i * k)
                .take_while(|&c| c < stream.len())
                .collect();
            let got = read_all(cut(&stream, &cuts), Some(ok_trailers())).await;
            assert_eq!(got.as_ref().ok(), Some(&sent), "cuts every {k} bytes");
        }
    }

    #[tokio::test]
    async fn a_malformed_message_fails_as_prost_fails_it() {
        // A length-delimited field whose length runs past the message, and an invalid key.
        for body in [vec![0x2a, 0x05, b'a'], vec![0x00, 0x01], vec![0x0b]] {
            let mut stream = vec![0u8];
            stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
            stream.extend_from_slice(&body);
            assert!(
                <prost_types_like::Sample as prost::Message>::decode(&body[..]).is_err(),
                "{body:?} must be malformed"
            );
            for c in 1..stream.len() {
                let got =
                    read_all::<prost_types_like::Sample>(cut(&stream, &[c]), Some(ok_trailers()))
                        .await;
                assert!(got.is_err(), "{body:?} cut at {c} decoded: {got:?}");
            }
        }
    }

    #[tokio::test]
    async fn the_calls_end_is_told_by_its_trailers() {
        let stream = framed(&messages()[0]).to_vec();
        // An error status after the messages.
        let mut failed = http::HeaderMap::new();
        failed.insert("grpc-status", http::HeaderValue::from_static("14"));
        failed.insert("grpc-message", http::HeaderValue::from_static("gone"));
        let e = read_all::<prost_types_like::Sample>(cut(&stream, &[]), Some(failed))
            .await
            .err();
        assert_eq!(
            e.map(|s| (s.code(), s.message().to_owned())),
            Some((tonic::Code::Unavailable, "gone".to_owned()))
        );
        // No trailers at all, or a message cut short by the end.
        assert!(
            read_all::<prost_types_like::Sample>(cut(&stream, &[]), None)
                .await
                .is_err()
        );
        let short = &stream[..stream.len() - 1];
        assert!(
            read_all::<prost_types_like::Sample>(cut(short, &[]), Some(ok_trailers()))
                .await
                .is_err()
        );
        // A compressed message (never asked for).
        let mut compressed = stream.clone();
        compressed[0] = 1;
        assert!(
            read_all::<prost_types_like::Sample>(cut(&compressed, &[]), Some(ok_trailers()))
                .await
                .is_err()
        );
    }
}
