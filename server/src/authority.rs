//! Accepts the `:authority` values real etcd clients send and the h2 crate refuses.
//!
//! grpc-go (etcd's server) takes any `:authority`; the h2 crate under tonic resets a request whose
//! `:authority` is not a valid URI authority (`PROTOCOL_ERROR`). Two clients operators meet send
//! such values: etcdctl 3.4's per-endpoint commands (`endpoint status`, `endpoint hashkv`,
//! `defrag`, `move-leader`) send the endpoint as given, `http://host:port`, and clientv3 v3.5.0
//! (kube-apiserver 1.22 and 1.23) sends `#initially=[https://host:port]`.
//!
//! [`AuthorityFix`] wraps a client connection below HTTP/2. It reads the connection's first
//! request header block: if its `:authority` is valid (every other client), the connection is
//! passed through untouched from then on. Otherwise every header block of that connection is
//! decoded (HPACK, keeping the client's dynamic table) and re-encoded as plain literals with the
//! authority repaired (`host:port` taken out of the value) or, if nothing valid is left, without
//! it. Literals without indexing leave the server's HPACK table untouched, so the two tables never
//! disagree. A client's authority is fixed per connection (grpc-go sets it per `ClientConn`), so
//! checking the first block suffices.

use std::io;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use bytes::Buf;
use bytes::BufMut;
use bytes::BytesMut;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Re-encoded blocks are split into frames of at most this size (the smallest maximum a peer
/// may set, so always allowed).
const MAX_FRAME: usize = 16_384;
/// Frames larger than this are not buffered: h2 refuses them (it advertises the default 16 KiB
/// maximum), so the connection is passed through as is for h2 to answer.
const MAX_PARSED_FRAME: usize = MAX_FRAME;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reading the connection preface.
    Preface,
    /// Reading frames up to the end of the first header block.
    First,
    /// The first block had a bad authority: every block is re-encoded.
    Rewrite,
    /// Bytes go through untouched.
    Passthrough,
}

/// A request header block being collected (HEADERS + CONTINUATION frames).
struct Block {
    stream: u32,
    end_stream: bool,
    /// Stream dependency and weight, if the HEADERS frame carried them.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, to send on unchanged.
    raw: Vec<u8>,
}

/// A client connection with `:authority` repair on its request headers (see the module doc).
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    /// Read from `inner`, not yet processed.
    input: BytesMut,
    /// Processed, not yet handed to the reader.
    output: BytesMut,
    decoder: fluke_hpack::Decoder<'static>,
    block: Option<Block>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            mode: Mode::Preface,
            input: BytesMut::new(),
            output: BytesMut::new(),
            decoder: fluke_hpack::Decoder::new(),
            block: None,
            eof: false,
        }
    }

    /// Moves everything unprocessed to the output and stops looking.
    fn pass_through(&mut self) {
        if let Some(b) = self.block.take() {
            self.output.extend_from_slice(&b.raw);
        }
        let rest = self.input.split();
        self.output.unsplit(rest);
        self.mode = Mode::Passthrough;
    }

    /// Processes what `input` holds as far as complete units allow.
    fn process(&mut self) {
        loop {
            match self.mode {
                Mode::Passthrough => {
                    let rest = self.input.split();
                    self.output.unsplit(rest);
                    return;
                }
                Mode::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        // HTTP/1 (etcd's HTTP endpoints share the port), or not ours to judge.
                        self.pass_through();
                        return;
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    let preface = self.input.split_to(PREFACE.len());
                    self.output.unsplit(preface);
                    self.mode = Mode::First;
                }
                Mode::First | Mode::Rewrite => {
                    if self.input.len() < FRAME_HEADER {
                        return;
                    }
                    let len = (usize::from(self.input[0]) << 16)
                        | (usize::from(self.input[1]) << 8)
                        | usize::from(self.input[2]);
                    if len > MAX_PARSED_FRAME {
                        self.pass_through();
                        return;
                    }
                    if self.input.len() < FRAME_HEADER + len {
                        return;
                    }
                    let frame = self.input.split_to(FRAME_HEADER + len);
                    if !self.frame(&frame) {
                        // Not something this shim understands: h2 judges it as sent.
                        self.output.extend_from_slice(&frame);
                        self.pass_through();
                        return;
                    }
                }
            }
        }
    }

    /// Handles one complete frame; false if it cannot be handled (the caller passes it and the
    /// rest of the connection through).
    fn frame(&mut self, frame: &[u8]) -> bool {
        let kind = frame[3];
        let flags = frame[4];
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        match (kind, &mut self.block) {
            (HEADERS, None) => {
                let mut p = payload;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    let Some((&n, rest)) = p.split_first() else {
                        return false;
                    };
                    pad = usize::from(n);
                    p = rest;
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    if p.len() < 5 {
                        return false;
                    }
                    let mut pr = [0u8; 5];
                    pr.copy_from_slice(&p[..5]);
                    priority = Some(pr);
                    p = &p[5..];
                }
                if pad > p.len() {
                    return false;
                }
                self.block = Some(Block {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: p[..p.len() - pad].to_vec(),
                    raw: frame.to_vec(),
                });
            }
            (CONTINUATION, Some(b)) if b.stream == stream => {
                b.fragment.extend_from_slice(payload);
                b.raw.extend_from_slice(frame);
            }
            (HEADERS | CONTINUATION, _) => return false,
            (_, Some(_)) => return false,
            (_, None) => {
                self.output.extend_from_slice(frame);
                return true;
            }
        }
        if flags & END_HEADERS != 0 {
            if let Some(b) = self.block.take() {
                return self.end_of_block(b);
            }
        }
        true
    }

    /// A complete header block: decided and passed on.
    fn end_of_block(&mut self, b: Block) -> bool {
        let headers = match self.decoder.decode(&b.fragment) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = ?e, "undecodable request headers; passing through");
                self.output.extend_from_slice(&b.raw);
                self.mode = Mode::Passthrough;
                return true;
            }
        };
        let authority = headers
            .iter()
            .find(|(n, _)| n.as_slice() == b":authority")
            .map(|(_, v)| v.as_slice());
        if self.mode == Mode::First {
            if authority.is_none_or(valid) {
                self.output.extend_from_slice(&b.raw);
                self.mode = Mode::Passthrough;
                return true;
            }
            tracing::debug!(
                authority = %String::from_utf8_lossy(authority.unwrap_or_default()),
                "client sends an invalid :authority; repairing its request headers"
            );
            self.mode = Mode::Rewrite;
        }
        let block = encode_literals(&headers);
        write_header_frames(&mut self.output, &b, &block);
        true
    }
}

/// True if h2 accepts `v` as `:authority`.
fn valid(v: &[u8]) -> bool {
    ::http::uri::Authority::try_from(v).is_ok()
}

/// `host:port` out of the values clients are known to send: `http://host:port`,
/// `#initially=[https://host:port;…]`; `None` if nothing valid remains.
fn repair(v: &[u8]) -> Option<Vec<u8>> {
    let s = String::from_utf8_lossy(v);
    let mut s: &str = &s;
    if let Some(rest) = s.strip_prefix("#initially=[") {
        s = rest.trim_end_matches(']');
        s = s.split([';', ',', ' ']).next().unwrap_or_default();
    }
    if let Some(i) = s.find("://") {
        s = &s[i + 3..];
    }
    let s = s.split('/').next().unwrap_or_default();
    valid(s.as_bytes()).then(|| s.as_bytes().to_vec())
}

/// The headers as HPACK literals without indexing (no Huffman), `:authority` repaired or left
/// out.
fn encode_literals(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let fixed;
        let value = if name.as_slice() == b":authority" && !valid(value) {
            match repair(value) {
                Some(v) => {
                    fixed = v;
                    &fixed
                }
                None => continue,
            }
        } else {
            value
        };
        // Literal header field without indexing, new name (RFC 7541 6.2.2): 0000 0000.
        out.push(0);
        put_string(&mut out, name);
        put_string(&mut out, value);
    }
    out
}

/// An HPACK string literal without Huffman coding.
fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    // H = 0 and a 7-bit prefix length.
    out.extend(fluke_hpack::encoder::encode_integer(s.len(), 7));
    out.extend_from_slice(s);
}

/// The block as a HEADERS frame (keeping END_STREAM and the priority) and CONTINUATION frames.
fn write_header_frames(out: &mut BytesMut, b: &Block, block: &[u8]) {
    let prio_len = if b.priority.is_some() { 5 } else { 0 };
    let first_room = MAX_FRAME - prio_len;
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut flags = if b.end_stream { END_STREAM } else { 0 };
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    if b.priority.is_some() {
        flags |= PRIORITY;
    }
    put_frame_header(out, first.len() + prio_len, HEADERS, flags, b.stream);
    if let Some(p) = &b.priority {
        out.put_slice(p);
    }
    out.put_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        put_frame_header(out, chunk.len(), CONTINUATION, flags, b.stream);
        out.put_slice(chunk);
    }
}

fn put_frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::Passthrough && this.input.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.eof {
                // Whatever was left unparsed goes to h2 as it came.
                let rest = this.input.split();
                if rest.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.output.unsplit(rest);
                continue;
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                        if let Some(b) = this.block.take() {
                            this.output.extend_from_slice(&b.raw);
                        }
                    } else {
                        this.input.extend_from_slice(rb.filled());
                        this.process();
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn headers(authority: &[u8], path: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":authority".to_vec(), authority.to_vec()),
            (b":path".to_vec(), path.to_vec()),
            (b"content-type".to_vec(), b"application/grpc".to_vec()),
            (b"te".to_vec(), b"trailers".to_vec()),
        ]
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame_header(&mut out, payload.len(), kind, flags, stream);
        out.put_slice(payload);
        out.to_vec()
    }

    /// A client connection: preface, SETTINGS, then one request per `(authority, path)`, encoded
    /// with a dynamic table as real clients do; the second request's block is split into
    /// HEADERS + CONTINUATION, and DATA follows each.
    fn client_bytes(reqs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut enc = fluke_hpack::Encoder::new();
        let mut out = PREFACE.to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        for (i, (authority, path)) in reqs.iter().enumerate() {
            let hs = headers(authority, path);
            let block = enc.encode(hs.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            let stream = 1 + 2 * i as u32;
            if i == 1 {
                let (a, b) = block.split_at(block.len() / 2);
                out.extend(frame(HEADERS, 0, stream, a));
                out.extend(frame(CONTINUATION, END_HEADERS, stream, b));
            } else {
                out.extend(frame(HEADERS, END_HEADERS, stream, &block));
            }
            out.extend(frame(0x0, END_STREAM, stream, b"\0\0\0\0\x02hi"));
        }
        out
    }

    /// Runs `input` through the shim in small pieces and returns what h2 would read.
    async fn through(input: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for chunk in input.chunks(7) {
                client.write_all(chunk).await.expect("write");
            }
            client.shutdown().await.expect("shutdown");
        });
        let mut fix = AuthorityFix::new(server);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.expect("read");
        writer.await.expect("writer");
        out
    }

    /// The request header lists h2 would decode from `bytes`.
    fn decoded_requests(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        assert!(bytes.starts_with(PREFACE));
        let mut p = &bytes[PREFACE.len()..];
        let mut dec = fluke_hpack::Decoder::new();
        let mut out = Vec::new();
        let mut block = Vec::new();
        while !p.is_empty() {
            let len = (usize::from(p[0]) << 16) | (usize::from(p[1]) << 8) | usize::from(p[2]);
            let (kind, flags) = (p[3], p[4]);
            let payload = &p[FRAME_HEADER..FRAME_HEADER + len];
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    out.push(dec.decode(&block).expect("h2 can decode it"));
                    block.clear();
                }
            }
            p = &p[FRAME_HEADER + len..];
        }
        out
    }

    #[tokio::test]
    async fn valid_authorities_pass_through_byte_for_byte() {
        let input = client_bytes(&[
            (b"127.0.0.1:2379", b"/etcdserverpb.KV/Range"),
            (b"127.0.0.1:2379", b"/etcdserverpb.KV/Put"),
        ]);
        assert_eq!(through(input.clone()).await, input);
        // A frame over the 16 KiB limit before any headers: not buffered, handed on as sent.
        let mut oversized = PREFACE.to_vec();
        oversized.extend(frame(0x0, 0, 1, &vec![7u8; MAX_FRAME + 1]));
        oversized.extend(client_bytes(&[(b"http://x:1", b"/p")])[PREFACE.len()..].to_vec());
        assert_eq!(through(oversized.clone()).await, oversized);
        // Not HTTP/2 at all (the HTTP endpoints share the port): untouched too.
        let http1 = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(through(http1.clone()).await, http1);
    }

    #[tokio::test]
    async fn etcdctl_and_clientv3_3_5_0_authorities_are_repaired_on_every_request() {
        for (sent, repaired) in [
            (&b"http://127.0.0.1:2379"[..], Some(&b"127.0.0.1:2379"[..])),
            (
                b"#initially=[https://etcd-0.etcd:2379]",
                Some(b"etcd-0.etcd:2379"),
            ),
            (b"#initially=[]", None),
        ] {
            let input = client_bytes(&[
                (sent, b"/etcdserverpb.Maintenance/Status"),
                (sent, b"/etcdserverpb.KV/Range"),
                (sent, b"/etcdserverpb.KV/Put"),
            ]);
            let out = through(input).await;
            let reqs = decoded_requests(&out);
            assert_eq!(reqs.len(), 3);
            for (req, path) in reqs.iter().zip([
                &b"/etcdserverpb.Maintenance/Status"[..],
                b"/etcdserverpb.KV/Range",
                b"/etcdserverpb.KV/Put",
            ]) {
                let mut want = headers(repaired.unwrap_or_default(), path);
                if repaired.is_none() {
                    want.retain(|(n, _)| n.as_slice() != b":authority");
                }
                assert_eq!(req, &want);
            }
            // Every DATA frame still arrives, once each.
            let data = out.windows(7).filter(|w| w == b"\0\0\0\0\x02hi").count();
            assert_eq!(data, 3);
        }
    }

    #[test]
    fn large_blocks_are_split_into_continuations_within_the_frame_limit() {
        let b = Block {
            stream: 5,
            end_stream: true,
            priority: Some([0, 0, 0, 3, 15]),
            fragment: Vec::new(),
            raw: Vec::new(),
        };
        let block: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut out = BytesMut::new();
        write_header_frames(&mut out, &b, &block);
        let mut p = &out[..];
        let mut got = Vec::new();
        let mut frames = 0;
        while !p.is_empty() {
            let len = (usize::from(p[0]) << 16) | (usize::from(p[1]) << 8) | usize::from(p[2]);
            assert!(len <= MAX_FRAME);
            let mut payload = &p[FRAME_HEADER..FRAME_HEADER + len];
            if frames == 0 {
                assert_eq!(p[3], HEADERS);
                assert_eq!(p[4] & (END_STREAM | PRIORITY), END_STREAM | PRIORITY);
                payload = &payload[5..];
            } else {
                assert_eq!(p[3], CONTINUATION);
            }
            let last = FRAME_HEADER + len == p.len();
            assert_eq!(p[4] & END_HEADERS != 0, last);
            got.extend_from_slice(payload);
            frames += 1;
            p = &p[FRAME_HEADER + len..];
        }
        assert_eq!(got, block);
        assert_eq!(frames, 3);
    }
}
