//! The closed-loop client driver shared by the request workloads: `--clients` tasks take op
//! numbers from one counter until `--total`, paced by `--rate`, each recording into its own
//! `Recorder`; plus connections, the progress bar and key preloading.

use std::future::Future;
use std::io::IsTerminal;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use etcd_client::Client;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_raft::coalesce::RequestConnector;
use indicatif::ProgressBar;
use indicatif::ProgressDrawTarget;
use indicatif::ProgressStyle;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;

use crate::stats::Recorder;

/// An op that takes longer than this counts as an error (a stuck server must not hang a run).
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// How a run shows itself while it runs.
#[derive(Clone, Debug)]
pub(crate) struct Ui {
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
    /// Prefix of the bar's message, e.g. `[2/3] fetcd put-64`.
    pub label: String,
}

impl Ui {
    pub(crate) fn bar(&self, len: u64, what: &str) -> ProgressBar {
        if !self.progress || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg:32} [{bar:30}] {pos:>8}/{len:8} {per_sec:>12} {elapsed_precise} eta {eta}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        pb.set_style(style);
        let msg = if self.label.is_empty() {
            what.to_owned()
        } else {
            format!("{} {what}", self.label)
        };
        pb.set_message(msg);
        pb
    }
}

/// An `etcd-client` on a connection of its own ([`grpc_channel`]).
pub(crate) async fn connect(endpoint: &str) -> anyhow::Result<Client> {
    client_on(grpc_channel(endpoint).await?)
        .await
        .with_context(|| format!("connect {endpoint}"))
}

/// An `etcd-client` on `channel`, for workloads that also call etcd's services directly on the
/// same connection.
pub(crate) async fn client_on(channel: tonic::transport::Channel) -> anyhow::Result<Client> {
    Ok(Client::from_channel(etcd_client::Channel::Tonic(channel), None).await?)
}

/// One put of a workload's probe writer (whose latency witnesses what the workload does to
/// writes), timed into `rec`.
pub(crate) async fn probe_put(writer: &mut Client, key: &str, i: u64, rec: &mut Recorder) {
    let started = Instant::now();
    let r = writer
        .put(key, format!("{i}"), None)
        .await
        .map(|_| ())
        .map_err(anyhow::Error::from);
    rec.op(started.elapsed(), r);
}

/// One gRPC connection, for `etcd-client` and for workloads that call etcd's services
/// directly to decode only what they check.
///
/// A request's HEADERS and DATA leave in one socket write, with the frames of other requests
/// made meanwhile ([`RequestConnector`]), as grpc-go's buffered writer sends them. hyper's
/// HTTP/2 client alone writes a request's two frames apart: under put with 64 clients, 37.5k
/// `writev`s for 30k puts took a quarter of this client's CPU (18.8k writes with the
/// connector), and the client shares the machine's cores with the server under test, whichever
/// server it is.
pub(crate) async fn grpc_channel(endpoint: &str) -> anyhow::Result<tonic::transport::Channel> {
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector(RequestConnector)
        .await
        .with_context(|| format!("connect {endpoint}"))
}

/// prost's gRPC codec, except that a response is decoded from one contiguous `Bytes`: the
/// message's bytes are split off tonic's buffer (no copy), and prost then reads them as a
/// slice. Decoded from tonic's buffer itself, every varint and field went through `BytesMut`'s
/// bookkeeping: with 10,000 watchers (whose streams used this codec then) that was half of this
/// client's decoding. `bytes` fields of the response are slices of the same buffer. For the
/// list pages of `range_as`; the watch streams are read by `grpc_stream`.
pub(crate) struct BytesCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for BytesCodec<T, U> {
    fn default() -> Self {
        BytesCodec(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for BytesCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = FromBytes<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic::codec::Codec::encoder(&mut tonic_prost::ProstCodec::<T, U>::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        FromBytes(std::marker::PhantomData)
    }
}

/// [`BytesCodec`]'s decoder.
pub(crate) struct FromBytes<U>(std::marker::PhantomData<U>);

impl<U: prost::Message + Default> tonic::codec::Decoder for FromBytes<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<U>, tonic::Status> {
        use bytes::Buf;
        let message = buf.copy_to_bytes(buf.remaining());
        U::decode(message)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("decoding a response: {e}")))
    }
}

/// etcd's `KV` service called directly on `channel`, for ranges decoded only as far as a
/// workload reads them. A page may be far over tonic's default 4 MiB limit, as it is over
/// etcd's Go client's; the apiserver raises that limit too.
pub(crate) fn kv_grpc(channel: tonic::transport::Channel) -> Grpc<tonic::transport::Channel> {
    Grpc::new(channel).max_decoding_message_size(usize::MAX)
}

/// Calls `KV.Range` on `grpc` ([`kv_grpc`]) and decodes the answer as `U`, a view of
/// `RangeResponse` with only the fields the caller reads ([`BytesCodec`]).
pub(crate) async fn range_as<U>(
    grpc: &mut Grpc<tonic::transport::Channel>,
    req: RangeRequest,
) -> anyhow::Result<U>
where
    U: prost::Message + Default + Send + 'static,
{
    grpc.ready().await?;
    let path = PathAndQuery::from_static("/etcdserverpb.KV/Range");
    let codec = BytesCodec::<RangeRequest, U>::default();
    Ok(grpc
        .unary(tonic::Request::new(req), path, codec)
        .await?
        .into_inner())
}

/// `n` connections, round-robin over the endpoints.
pub(crate) async fn connect_all(endpoints: &[String], n: usize) -> anyhow::Result<Vec<Client>> {
    connect_each(endpoints, n, connect).await
}

/// `n` connections made by `connect` (at least one), round-robin over the endpoints.
pub(crate) async fn connect_each<'a, T, F>(
    endpoints: &'a [String],
    n: usize,
    connect: impl Fn(&'a str) -> F,
) -> anyhow::Result<Vec<T>>
where
    F: Future<Output = anyhow::Result<T>>,
{
    anyhow::ensure!(!endpoints.is_empty(), "no --endpoints");
    let mut conns = Vec::with_capacity(n.max(1));
    for i in 0..n.max(1) {
        conns.push(connect(&endpoints[i % endpoints.len()]).await?);
    }
    Ok(conns)
}

/// When op `i` may start under `--rate` (None = unlimited): ops are spread evenly over time
/// from the start, so a slow stretch is followed by a catch-up burst, as with a token bucket.
pub(crate) fn scheduled_offset(i: u64, rate: u64) -> Option<Duration> {
    (rate > 0).then(|| Duration::from_secs_f64(i as f64 / rate as f64))
}

/// One client's ops. `op` does the requests of op number `i`, may record its sub-requests by
/// kind in `rec`, and returns whether the op succeeded; the driver times it as a whole.
pub(crate) trait ClientOp: Send + 'static {
    /// Work before the clock starts (e.g. granting the lease a keepalive client uses). A
    /// failure is kept by the client and reported by its ops, so the run still counts them.
    fn setup(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    fn op(&mut self, i: u64, rec: &mut Recorder)
        -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// What a closed-loop run measured.
pub(crate) struct Run<C> {
    pub rec: Recorder,
    pub clients: Vec<C>,
    pub elapsed: Duration,
}

/// Runs `total` ops over `clients`, paced at `rate` ops/s overall (0 = unlimited).
pub(crate) async fn closed_loop<C: ClientOp>(
    mut clients: Vec<C>,
    total: u64,
    rate: u64,
    pb: &ProgressBar,
) -> anyhow::Result<Run<C>> {
    futures::future::join_all(clients.iter_mut().map(|c| c.setup())).await;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients.len());
    for mut c in clients {
        let next = next.clone();
        let pb = pb.clone();
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                if let Some(off) = scheduled_offset(i, rate) {
                    tokio::time::sleep_until((start + off).into()).await;
                }
                let t = Instant::now();
                let r = match tokio::time::timeout(OP_TIMEOUT, c.op(i, &mut rec)).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("op timed out after {OP_TIMEOUT:?}")),
                };
                rec.op(t.elapsed(), r);
                pb.inc(1);
            }
            (c, rec)
        }));
    }
    let mut rec = Recorder::default();
    let mut clients = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (c, r) = t.await.context("client task")?;
        rec.merge(r);
        clients.push(c);
    }
    Ok(Run {
        rec,
        clients,
        elapsed: start.elapsed(),
    })
}

struct PreloadOp<F> {
    client: Client,
    key_of: Arc<F>,
    value: Vec<u8>,
}

impl<F: Fn(u64) -> Vec<u8> + Send + Sync + 'static> ClientOp for PreloadOp<F> {
    async fn op(&mut self, i: u64, _rec: &mut Recorder) -> anyhow::Result<()> {
        self.client
            .put((self.key_of)(i), self.value.clone(), None)
            .await?;
        Ok(())
    }
}

/// Puts keys `key_of(0..n)` with 32 concurrent clients over `conns`, so reads find data. Any
/// failed put fails the preload: a half-loaded key space would skew what follows.
pub(crate) async fn preload<F: Fn(u64) -> Vec<u8> + Send + Sync + 'static>(
    conns: &[Client],
    n: u64,
    key_of: F,
    val_size: usize,
    ui: &Ui,
) -> anyhow::Result<()> {
    let key_of = Arc::new(key_of);
    let clients = (0..32)
        .map(|c| PreloadOp {
            client: conns[c % conns.len()].clone(),
            key_of: key_of.clone(),
            value: vec![b'v'; val_size],
        })
        .collect();
    let pb = ui.bar(n, "preload");
    let run = closed_loop(clients, n, 0, &pb).await?;
    pb.finish_and_clear();
    if run.rec.errors > 0 {
        anyhow::bail!(
            "preload: {} of {n} puts failed; first: {}",
            run.rec.errors,
            run.rec.first_error.unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_spreads_ops_evenly() {
        assert_eq!(scheduled_offset(5, 0), None);
        assert_eq!(scheduled_offset(0, 100), Some(Duration::ZERO));
        assert_eq!(
            scheduled_offset(250, 100),
            Some(Duration::from_millis(2500))
        );
    }
}
