//! Gathers HTTP/2 frames into few socket writes: a large response's DATA frames on the client
//! port, and a peer request's HEADERS and DATA frames on the peer channels.
//!
//! h2 sends a DATA frame of at most the client's `SETTINGS_MAX_FRAME_SIZE` (16 KiB for etcd's
//! and tonic's clients) and writes each such frame to the socket on its own, flushing in
//! between. A 500-object list page (~550 KiB) thus cost ~34 `writev`s, and on loopback each one
//! pays TCP's and netfilter's per-packet work on both ends: `tcp_sendmsg` was 14 % of the
//! server's CPU in the kube mix. grpc-go (etcd) writes through a 32 KiB buffer.
//!
//! [`CoalescedWrites`] copies writes into its own buffer. A flush with less than one full frame
//! buffered (a unary answer, a watch event, settings, pings) goes to the socket at once, as before.
//! A flush with more is taken to be mid-way through a large response, since h2 flushes after
//! every large frame: it is held back and the connection's task is woken, so the next poll of the
//! connection writes it unless more frames were added by then. Everything buffered is written
//! once it reaches [`MAX_BUFFERED`], on the second flush without new data, before any read,
//! and on shutdown, so held data waits at most one poll of its own connection.
//!
//! On the peer channels ([`CoalescedWrites::for_requests`]) hyper's HTTP/2 client writes a
//! request's HEADERS frame when it takes the request and the DATA frame from the body's own
//! task a moment later: every peer RPC (each AppendEntries) took two `writev`s, the second one
//! only after the scheduler had run whatever was queued in between. There, every flush of new
//! data is held once and the connection's task woken; h2 flushes on every poll of the
//! connection, so the next poll writes HEADERS and DATA together (or what was held, alone).
//! And a peer request's DATA frame carries END_STREAM itself ([`EndStreamWithData`]) rather
//! than being followed by an empty frame that hyper wrote later, on its own.

use std::io;
use std::pin::Pin;
use std::task::ready;
use std::task::Context;
use std::task::Poll;

use hyper_util::rt::TokioIo;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tonic::codegen::http;
use tonic::codegen::Bytes;

/// At least this much buffered at a flush means a large response is being sent: an HTTP/2
/// frame header plus a 16 KiB payload.
const BULK: usize = 9 + 16 * 1024;
/// Buffered bytes past which a write first empties the buffer into the socket.
pub const MAX_BUFFERED: usize = 256 * 1024;

/// A connection whose writes are gathered into fewer, larger socket writes; see the module doc.
pub struct CoalescedWrites<S> {
    inner: S,
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already written to `inner`.
    written: usize,
    /// A flush held back data; the next poll of this connection writes it.
    held: bool,
    /// Data was added since the last flush.
    fresh: bool,
    /// Hold every flush of new data once, not only a large response's (peer requests).
    hold_all: bool,
}

impl<S> CoalescedWrites<S> {
    /// Wraps an accepted connection: large responses are gathered.
    pub fn new(inner: S) -> Self {
        CoalescedWrites {
            inner,
            buf: Vec::new(),
            written: 0,
            held: false,
            fresh: false,
            hold_all: false,
        }
    }

    /// Wraps a peer channel's connection: each request leaves in one write.
    pub fn for_requests(inner: S) -> Self {
        CoalescedWrites {
            hold_all: true,
            ..Self::new(inner)
        }
    }

    fn buffered(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<S: AsyncWrite + Unpin> CoalescedWrites<S> {
    /// Writes everything buffered to the socket.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        self.held = false;
        Poll::Ready(Ok(()))
    }

    /// Appends `data`. A buffer about to hold more than one frame is sized for a whole
    /// [`MAX_BUFFERED`] batch at once, so a large response does not regrow (and copy) it step by
    /// step.
    fn push(&mut self, data: &[u8]) {
        let need = self.buf.len() + data.len();
        if need > self.buf.capacity() && need >= BULK {
            self.buf
                .reserve_exact((MAX_BUFFERED + BULK).max(need) - self.buf.len());
        }
        self.buf.extend_from_slice(data);
        self.fresh |= !data.is_empty();
    }

    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buffered() >= MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for CoalescedWrites<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A held request is sent by the flush that ends this poll, with what the poll adds.
        if this.held && !this.hold_all {
            // The poll after a held flush: send what was held. If the socket is full, its
            // readiness wakes this task again.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        this.push(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        for b in bufs {
            this.push(b);
        }
        Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.fresh && (this.buffered() >= BULK || (this.hold_all && !this.held)) {
            // Likely more frames of this response to come in this same poll: hold it, and
            // make sure the connection is polled again to write it if none come.
            this.fresh = false;
            this.held = true;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        this.fresh = false;
        let small = this.buffered() < BULK;
        ready!(this.poll_drain(cx))?;
        if small && this.buf.capacity() > BULK {
            // Small answers again after a large response: its buffer is not kept for them. (A
            // large response's own batches reuse it, however often they drain.)
            this.buf.shrink_to(BULK);
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for CoalescedWrites<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Opens the TCP connection of a gRPC channel that sends requests (no Nagle delay), where a
/// request's HEADERS and DATA leave in one socket write ([`CoalescedWrites::for_requests`]), as
/// grpc-go's buffered writer sends them. For the peer channels, and for clients that share a
/// machine with the server they measure (`fetcd-bench`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestConnector;

impl tower::Service<http::Uri> for RequestConnector {
    type Response = TokioIo<CoalescedWrites<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            // An IPv6 literal comes bracketed in a URI.
            let host = uri
                .host()
                .unwrap_or("127.0.0.1")
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(CoalescedWrites::for_requests(stream)))
        })
    }
}

/// A gRPC channel whose requests end with their last DATA frame, as grpc-go's unary requests
/// do, instead of with an empty END_STREAM frame sent after it.
///
/// tonic's request body learns that it has ended only when polled once more after its message.
/// hyper sends the message's DATA frame without END_STREAM, waits for flow-control capacity,
/// and only then sends END_STREAM in a frame of its own: a second socket write on the sender,
/// and a second read on the receiver, whose tonic server does not hand a unary request to its
/// handler before the stream has ended. On the three-member write path that gap lay between a
/// follower receiving an AppendEntries and starting its log write. Wrapping every request body
/// in [`EndWithData`] looks one frame ahead, so the last DATA frame carries END_STREAM.
#[derive(Clone, Debug)]
pub struct EndStreamWithData<S>(pub S);

impl<S> tower::Service<http::Request<tonic::body::Body>> for EndStreamWithData<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        self.0
            .call(req.map(|body| tonic::body::Body::new(EndWithData::new(body))))
    }
}

/// A request body that polls its inner body one frame ahead, so that it can tell it has ended
/// when it yields its last frame; see [`EndStreamWithData`].
#[derive(Debug)]
pub struct EndWithData<B> {
    inner: B,
    /// The frame read ahead, given out on the next poll.
    next: Option<Result<http_body::Frame<Bytes>, tonic::Status>>,
    /// The inner body has ended.
    ended: bool,
}

impl<B> EndWithData<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        EndWithData {
            inner,
            next: None,
            ended: false,
        }
    }
}

impl<B> http_body::Body for EndWithData<B>
where
    B: http_body::Body<Data = Bytes, Error = tonic::Status> + Unpin,
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        let frame = match this.next.take() {
            Some(frame) => frame,
            None if this.ended => return Poll::Ready(None),
            None => match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(frame) => frame,
                None => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
            },
        };
        if frame.is_ok() && !this.ended {
            // A unary request's body has ended by now; a streaming one may have more, or be
            // waiting for it (then its waker is registered, and it is polled again anyway).
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(None) => this.ended = true,
                Poll::Ready(Some(next)) => this.next = Some(next),
                Poll::Pending => {}
            }
        }
        Poll::Ready(Some(frame))
    }

    fn is_end_stream(&self) -> bool {
        self.next.is_none() && (self.ended || self.inner.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::task::Wake;
    use std::task::Waker;

    use super::*;

    /// A socket that records each write it is given.
    #[derive(Default)]
    struct Recording {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        /// Accept at most this many bytes per write (0 = all).
        limit: usize,
    }

    impl AsyncRead for Recording {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = if self.limit == 0 {
                data.len()
            } else {
                data.len().min(self.limit)
            };
            self.get_mut().writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn write_frame(c: &mut CoalescedWrites<Recording>, cx: &mut Context<'_>, payload: usize) {
        let header = [0u8; 9];
        let data = vec![7u8; payload];
        let bufs = [io::IoSlice::new(&header), io::IoSlice::new(&data)];
        let r = Pin::new(&mut *c).poll_write_vectored(cx, &bufs);
        assert!(matches!(r, Poll::Ready(Ok(n)) if n == 9 + payload), "{r:?}");
    }

    fn flush(c: &mut CoalescedWrites<Recording>, cx: &mut Context<'_>) {
        assert!(matches!(
            Pin::new(&mut *c).poll_flush(cx),
            Poll::Ready(Ok(()))
        ));
    }

    fn written(c: &CoalescedWrites<Recording>) -> usize {
        c.inner.writes.iter().map(Vec::len).sum()
    }

    #[test]
    fn small_answers_are_written_at_each_flush() {
        let wake = Arc::new(CountingWaker::default());
        let waker = Waker::from(wake.clone());
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::new(Recording::default());
        for i in 1..=3 {
            write_frame(&mut c, &mut cx, 100);
            flush(&mut c, &mut cx);
            assert_eq!(c.inner.writes.len(), i);
            assert_eq!(c.inner.flushes, i);
        }
        assert_eq!(written(&c), 3 * 109);
        assert_eq!(wake.0.load(Ordering::SeqCst), 0, "nothing was held");
    }

    /// A peer request as hyper's client writes it: HEADERS and a flush in one poll of the
    /// connection, DATA and a flush in the next. Both leave in one write; a flush with nothing
    /// new writes what was held.
    #[test]
    fn a_request_leaves_in_one_write() {
        let wake = Arc::new(CountingWaker::default());
        let waker = Waker::from(wake.clone());
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::for_requests(Recording::default());
        write_frame(&mut c, &mut cx, 33);
        flush(&mut c, &mut cx);
        assert_eq!(written(&c), 0, "the HEADERS frame waits for its DATA");
        assert_eq!(
            wake.0.load(Ordering::SeqCst),
            1,
            "and the connection is polled again"
        );
        // The next poll reads first: a held request is not written by the read.
        let mut space = [0u8; 16];
        let mut rb = ReadBuf::new(&mut space);
        assert!(Pin::new(&mut c).poll_read(&mut cx, &mut rb).is_pending());
        assert_eq!(written(&c), 0);
        write_frame(&mut c, &mut cx, 140);
        flush(&mut c, &mut cx);
        assert_eq!(c.inner.writes.len(), 1, "HEADERS and DATA in one write");
        assert_eq!(written(&c), 42 + 149);
        // A lone frame (a PING, say) is held once, then written by the next poll's flush.
        write_frame(&mut c, &mut cx, 8);
        flush(&mut c, &mut cx);
        assert_eq!(c.inner.writes.len(), 1);
        flush(&mut c, &mut cx);
        assert_eq!(c.inner.writes.len(), 2);
        assert_eq!(written(&c), 42 + 149 + 17);
    }

    #[test]
    fn a_large_response_goes_out_in_few_writes_and_nothing_is_left_behind() {
        let wake = Arc::new(CountingWaker::default());
        let waker = Waker::from(wake.clone());
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::new(Recording::default());
        // 34 full frames, h2 style: each written, then flushed.
        let frames = 34;
        for _ in 0..frames {
            write_frame(&mut c, &mut cx, 16 * 1024);
            flush(&mut c, &mut cx);
        }
        let total = frames * (9 + 16 * 1024);
        let before = c.inner.writes.len();
        assert!(before <= total / MAX_BUFFERED + 1, "{before} writes");
        assert!(wake.0.load(Ordering::SeqCst) > 0, "held data woke the task");
        assert!(written(&c) < total, "the tail is held until the next poll");
        // The next poll of the connection: a read first.
        let mut space = [0u8; 16];
        let mut rb = ReadBuf::new(&mut space);
        assert!(Pin::new(&mut c).poll_read(&mut cx, &mut rb).is_pending());
        assert_eq!(written(&c), total);
        assert!(c
            .inner
            .writes
            .iter()
            .flatten()
            .skip(9)
            .take(16)
            .all(|b| *b == 7));
    }

    #[test]
    fn a_large_response_keeps_its_buffer_until_small_answers_follow() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::new(Recording::default());
        let mut space = [0u8; 16];
        // A large response sent over several polls of the connection: each poll's frames are
        // held, and written when the connection is polled again (a read first).
        for _ in 0..4 {
            for _ in 0..4 {
                write_frame(&mut c, &mut cx, 16 * 1024);
                flush(&mut c, &mut cx);
            }
            let mut rb = ReadBuf::new(&mut space);
            assert!(Pin::new(&mut c).poll_read(&mut cx, &mut rb).is_pending());
            assert_eq!(c.buffered(), 0, "the held frames were written");
            assert!(
                c.buf.capacity() >= MAX_BUFFERED,
                "the buffer was given back mid-response: {}",
                c.buf.capacity()
            );
        }
        // Then a small answer: the buffer is not kept for those.
        write_frame(&mut c, &mut cx, 100);
        flush(&mut c, &mut cx);
        assert!(c.buf.capacity() <= BULK, "{}", c.buf.capacity());
        assert_eq!(written(&c), 16 * (9 + 16 * 1024) + 109);
    }

    #[test]
    fn a_second_flush_without_new_data_writes_what_was_held() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::new(Recording::default());
        write_frame(&mut c, &mut cx, 16 * 1024);
        write_frame(&mut c, &mut cx, 16 * 1024);
        flush(&mut c, &mut cx);
        assert_eq!(written(&c), 0);
        flush(&mut c, &mut cx);
        assert_eq!(written(&c), 2 * (9 + 16 * 1024));
        assert_eq!(c.inner.writes.len(), 1);
    }

    #[test]
    fn short_socket_writes_and_shutdown_lose_nothing() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::new(Recording {
            limit: 1000,
            ..Recording::default()
        });
        for _ in 0..3 {
            write_frame(&mut c, &mut cx, 16 * 1024);
            flush(&mut c, &mut cx);
        }
        assert!(matches!(
            Pin::new(&mut c).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(written(&c), 3 * (9 + 16 * 1024));
        let bytes: Vec<u8> = c.inner.writes.concat();
        for frame in bytes.chunks(9 + 16 * 1024) {
            assert!(frame[..9].iter().all(|b| *b == 0));
            assert!(frame[9..].iter().all(|b| *b == 7));
        }
    }

    /// A body that answers its polls as scripted (a `None` entry is one `Pending`), then ends.
    struct Scripted(
        std::collections::VecDeque<Option<Result<http_body::Frame<Bytes>, tonic::Status>>>,
    );

    impl http_body::Body for Scripted {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
            match self.get_mut().0.pop_front() {
                Some(Some(frame)) => Poll::Ready(Some(frame)),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        }
    }

    fn data(s: &'static str) -> Option<Result<http_body::Frame<Bytes>, tonic::Status>> {
        Some(Ok(http_body::Frame::data(Bytes::from_static(s.as_bytes()))))
    }

    /// Polls `body` to its end; each frame as its data (or `error`, `trailers`) with whether
    /// the body said it had ended right after giving it.
    fn drain(mut body: EndWithData<Scripted>) -> Vec<(String, bool)> {
        use http_body::Body;
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        for _ in 0..100 {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => {
                    let what = match f.into_data() {
                        Ok(d) => String::from_utf8_lossy(&d).into_owned(),
                        Err(_) => "trailers".to_owned(),
                    };
                    out.push((what, body.is_end_stream()));
                }
                Poll::Ready(Some(Err(_))) => out.push(("error".to_owned(), body.is_end_stream())),
                Poll::Ready(None) => return out,
                Poll::Pending => {}
            }
        }
        panic!("the body never ended: {out:?}");
    }

    #[test]
    fn a_body_read_ahead_ends_with_its_last_frame() {
        let run = |script: Vec<Option<Result<http_body::Frame<Bytes>, tonic::Status>>>| {
            drain(EndWithData::new(Scripted(script.into())))
        };
        let s = |v: &[(&str, bool)]| -> Vec<(String, bool)> {
            v.iter().map(|(d, e)| (d.to_string(), *e)).collect()
        };
        // A unary request: its one frame already says the body has ended.
        assert_eq!(run(vec![data("a")]), s(&[("a", true)]));
        // A stream: only its last frame does, however its frames come.
        assert_eq!(
            run(vec![data("a"), data("b"), data("c")]),
            s(&[("a", false), ("b", false), ("c", true)])
        );
        assert_eq!(
            run(vec![data("a"), None, None, data("b"), None]),
            s(&[("a", false), ("b", false)])
        );
        // Errors and trailers pass through in order.
        let trailers = Some(Ok(http_body::Frame::trailers(http::HeaderMap::new())));
        assert_eq!(
            run(vec![data("a"), Some(Err(tonic::Status::internal("x")))]),
            s(&[("a", false), ("error", false)])
        );
        assert_eq!(
            run(vec![data("a"), trailers]),
            s(&[("a", false), ("trailers", true)])
        );
    }

    /// A server-side socket that keeps a copy of everything read from it.
    struct Recorded {
        inner: TcpStream,
        seen: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Recorded {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let mut seen = this.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.extend_from_slice(&buf.filled()[before..]);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Recorded {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    impl tonic::transport::server::Connected for Recorded {
        type ConnectInfo = ();

        fn connect_info(&self) {}
    }

    /// The HTTP/2 frames (type, flags, payload length) a client sent on stream 1, from the
    /// bytes after the connection preface; `None` while the stream has not ended.
    fn stream_one(bytes: &[u8]) -> Option<Vec<(u8, u8, usize)>> {
        let mut at = 24; // "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        let mut frames = Vec::new();
        while at + 9 <= bytes.len() {
            let h = &bytes[at..at + 9];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if stream == 1 {
                frames.push((h[3], h[4], len));
                // DATA or HEADERS with END_STREAM, or RST_STREAM.
                if (h[3] <= 1 && h[4] & 1 == 1) || h[3] == 3 {
                    return Some(frames);
                }
            }
            at += 9 + len;
        }
        None
    }

    #[tokio::test]
    async fn a_peer_request_ends_with_its_data_frame() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let incoming = futures::stream::once(async move {
            let (inner, _) = listener.accept().await?;
            Ok::<_, io::Error>(Recorded {
                inner,
                seen: recorded,
            })
        });
        // No services: the request is answered Unimplemented, after it was read.
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(tonic::service::Routes::default())
                .serve_with_incoming(incoming),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_with_connector(RequestConnector)
            .await
            .expect("connect");
        let mut client =
            fetcd_proto::raftpb::raft_peer_client::RaftPeerClient::new(EndStreamWithData(channel));
        let answer = client
            .append_entries(fetcd_proto::raftpb::PeerMessage { data: vec![7; 300] })
            .await;
        assert_eq!(
            answer.err().map(|s| s.code()),
            Some(tonic::Code::Unimplemented)
        );
        let mut frames = None;
        for _ in 0..500 {
            frames = stream_one(&seen.lock().unwrap_or_else(|p| p.into_inner()));
            if frames.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        server.abort();
        // HEADERS (type 1) without END_STREAM, then one DATA frame (type 0) with the message
        // and END_STREAM (flag 1): no empty DATA frame after it.
        let frames = frames.expect("stream 1 never ended");
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!((frames[0].0, frames[0].1 & 1), (1, 0), "{frames:?}");
        assert_eq!((frames[1].0, frames[1].1 & 1), (0, 1), "{frames:?}");
        assert!(frames[1].2 > 300, "{frames:?}");
    }
}
