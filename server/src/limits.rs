//! gRPC's receive-size limit with grpc-go's answer.
//!
//! etcd's gRPC server accepts messages up to `--max-request-bytes` plus 512 KiB of overhead and
//! refuses larger ones from the 5-byte frame header alone — before reading the message — with
//! `ResourceExhausted: grpc: received message larger than max (N vs. M)`. This layer does the same
//! for unary KV requests, so clients see etcd's code and text and the server never buffers an
//! oversized request. Streaming services keep tonic's own limit: a stream's first message may
//! arrive late, and the layer must not hold the call until it does.

use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use http_body_util::BodyStream;
use http_body_util::StreamBody;
use tonic::body::Body;
use tonic::Status;

/// Paths whose first (and only) message is checked: the unary KV service.
const CHECKED_PREFIX: &str = "/etcdserverpb.KV/";

/// Adds [`MaxRecvMsgSize`] around a service.
#[derive(Clone, Copy, Debug)]
pub struct MaxRecvMsgSizeLayer {
    limit: usize,
}

impl MaxRecvMsgSizeLayer {
    /// Refuse messages longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        MaxRecvMsgSizeLayer { limit }
    }
}

impl<S> tower::Layer<S> for MaxRecvMsgSizeLayer {
    type Service = MaxRecvMsgSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MaxRecvMsgSize {
            inner,
            limit: self.limit,
        }
    }
}

/// Refuses over-limit unary KV requests from their gRPC frame header.
#[derive(Clone, Debug)]
pub struct MaxRecvMsgSize<S> {
    inner: S,
    limit: usize,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S> tower::Service<http::Request<Body>> for MaxRecvMsgSize<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone has not been polled ready; swap so the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !req.uri().path().starts_with(CHECKED_PREFIX) {
            return Box::pin(inner.call(req));
        }
        let limit = self.limit;
        Box::pin(async move {
            let (parts, mut body) = req.into_parts();
            let mut head = Vec::with_capacity(5);
            let mut frames = Vec::new();
            while head.len() < 5 {
                match body.frame().await {
                    None => break,
                    Some(Err(e)) => {
                        // Let the service see the broken body and answer as it would.
                        frames.push(Err(e));
                        break;
                    }
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            head.extend_from_slice(&data[..data.len().min(5 - head.len())]);
                        }
                        frames.push(Ok(frame));
                    }
                }
            }
            if head.len() == 5 {
                let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                if len > limit {
                    return Ok(Status::resource_exhausted(format!(
                        "grpc: received message larger than max ({len} vs. {limit})"
                    ))
                    .into_http());
                }
            }
            let rest = futures::stream::iter(frames).chain(BodyStream::new(body));
            let body = Body::new(StreamBody::new(
                rest.map(|f| f.map(|f| f.map_data(Bytes::from))),
            ));
            inner.call(http::Request::from_parts(parts, body)).await
        })
    }
}
