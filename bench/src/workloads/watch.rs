//! The watch workloads, modelled on etcd's `benchmark watch` and `benchmark watch-latency`.
//!
//! `--watchers` watchers watch one key (or a prefix), multiplexed on `--streams` gRPC watch
//! streams spread over `--conns` connections: every stream is one call of etcd's `Watch` (one
//! HTTP/2 stream) carrying one `WatchCreateRequest` per watcher, read with a decoder that takes
//! only the fields checked here ([`EventsResponse`]). `--clients` writers then put `--total`
//! values, paced at `--put-rate`, with `etcd-client` on a connection of their own.
//!
//! Every put's value starts with its sequence number (8 bytes, little endian), and the writer
//! stores the time taken just before sending the put under that number, so a watcher can turn
//! each event into a put→event latency the moment it arrives, even when the event overtakes the
//! put response. The writer also stores the put response's revision, and the event's
//! `mod_revision` is checked against it; each watcher must see strictly increasing revisions.

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use etcd_client::Client;
use fetcd_proto::etcdserverpb::watch_request::RequestUnion;
use fetcd_proto::etcdserverpb::WatchCreateRequest;
use fetcd_proto::etcdserverpb::WatchRequest;
use indicatif::ProgressBar;
use prost::encoding::check_wire_type;
use prost::encoding::WireType;
use tokio::sync::watch;

use crate::args::key;
use crate::args::prefix_end;
use crate::args::Args;
use crate::args::Workload;
use crate::driver::connect;
use crate::driver::connect_each;
use crate::driver::grpc_channel;
use crate::driver::Ui;
use crate::grpc_stream;
use crate::stats::Hist;
use crate::stats::Report;

/// How long the watchers may take to be created before the run is abandoned.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Per-put timeout; a put that takes longer counts as an error.
const PUT_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies a stream task buffers before merging them into the shared histogram.
const FLUSH_EVERY: usize = 4096;
/// Watch errors printed to stderr before the rest are only counted.
const MAX_PRINTED_ERRORS: u64 = 5;

/// State shared by the writers, the stream tasks and the reporter.
struct Shared {
    epoch: Instant,
    total: u64,
    /// Per put: nanoseconds since `epoch` just before it was sent, plus one (0 = not sent yet).
    sent_at: Vec<AtomicU64>,
    /// Per put: the revision of its response (0 = not known yet).
    revision: Vec<AtomicI64>,
    created: AtomicUsize,
    /// Stream tasks still reading; the drain stops early once none is left.
    live_streams: AtomicUsize,
    /// Events that matched one of our puts, first time for their watcher.
    delivered: AtomicU64,
    /// Watch responses that carried at least one such event (events / responses shows how much
    /// the server batches).
    responses: AtomicU64,
    /// Nanoseconds since `epoch` when the latest matching event arrived.
    last_event: AtomicU64,
    /// Stream failures, refused or canceled watchers.
    watch_errors: AtomicU64,
    /// Events whose revision was not above the watcher's previous one.
    order_errors: AtomicU64,
    /// Events whose `mod_revision` differs from the revision the put returned.
    revision_mismatches: AtomicU64,
    hist: Mutex<Hist>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Counts a watch error, printing only the first few.
    fn watch_error(&self, msg: std::fmt::Arguments<'_>) {
        let n = self.watch_errors.fetch_add(1, Ordering::Relaxed);
        if n < MAX_PRINTED_ERRORS {
            eprintln!("{msg}");
        } else if n == MAX_PRINTED_ERRORS {
            eprintln!("(further watch errors are only counted)");
        }
    }

    fn merge(&self, lat: &mut Vec<u64>) {
        let mut h = match self.hist.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        for v in lat.drain(..) {
            h.record_ns(v);
        }
    }
}

/// A `WatchResponse` as the watch workloads read it: only the fields they check are decoded
/// (the rest, keys and headers included, are skipped), and of each value only the put's
/// sequence number ([`RevisionAndSeq`]). The client shares the two cores with the server under
/// test, and with 10,000 watchers decoding whole responses (two allocations and copies per
/// event) took ~40 % of them for either server; this is the same client for both.
#[derive(Clone, Debug, Default, PartialEq)]
struct EventsResponse {
    watch_id: i64,
    created: bool,
    canceled: bool,
    cancel_reason: String,
    events: Vec<EventOnly>,
}

impl prost::Message for EventsResponse {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        use prost::encoding;
        if self.watch_id != 0 {
            encoding::int64::encode(2, &self.watch_id, buf);
        }
        if self.created {
            encoding::bool::encode(3, &self.created, buf);
        }
        if self.canceled {
            encoding::bool::encode(4, &self.canceled, buf);
        }
        if !self.cancel_reason.is_empty() {
            encoding::string::encode(6, &self.cancel_reason, buf);
        }
        encoding::message::encode_repeated(11, &self.events, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        use prost::encoding;
        match tag {
            2 => encoding::int64::merge(wire_type, &mut self.watch_id, buf, ctx),
            3 => encoding::bool::merge(wire_type, &mut self.created, buf, ctx),
            4 => encoding::bool::merge(wire_type, &mut self.canceled, buf, ctx),
            6 => encoding::string::merge(wire_type, &mut self.cancel_reason, buf, ctx),
            11 => {
                // Events are read straight from the received bytes (the frame that holds the
                // whole event, see `grpc_stream`): prost's nested-message decoding went through
                // two levels of generic merging per event and was most of this client's
                // decoding.
                check_wire_type(WireType::LengthDelimited, wire_type)?;
                let len = usize::try_from(encoding::decode_varint(buf)?).map_err(|_| past_end())?;
                if len > buf.remaining() {
                    return Err(past_end());
                }
                let chunk = buf.chunk();
                let event = if chunk.len() >= len {
                    let e = EventOnly::read(&chunk[..len])?;
                    buf.advance(len);
                    e
                } else {
                    EventOnly::read(&buf.copy_to_bytes(len))?
                };
                self.events.push(event);
                Ok(())
            }
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        use prost::encoding;
        let mut len = 0;
        if self.watch_id != 0 {
            len += encoding::int64::encoded_len(2, &self.watch_id);
        }
        len += usize::from(self.created) * encoding::bool::encoded_len(3, &true);
        len += usize::from(self.canceled) * encoding::bool::encoded_len(4, &true);
        if !self.cancel_reason.is_empty() {
            len += encoding::string::encoded_len(6, &self.cancel_reason);
        }
        len + encoding::message::encoded_len_repeated(11, &self.events)
    }

    fn clear(&mut self) {
        *self = EventsResponse::default();
    }
}

/// The error prost gives for a length that runs past the end of the buffer.
fn past_end() -> prost::DecodeError {
    let mut past_end = &[1u8][..];
    match prost::encoding::bytes::merge(
        WireType::LengthDelimited,
        &mut Vec::<u8>::new(),
        &mut past_end,
        prost::encoding::DecodeContext::default(),
    ) {
        Err(e) => e,
        Ok(()) => unreachable!("a length of 1 with nothing after it decoded"),
    }
}

/// A length-delimited field's bytes (its key read).
fn read_delimited<'a>(s: &mut &'a [u8]) -> Result<&'a [u8], prost::DecodeError> {
    let len = usize::try_from(prost::encoding::decode_varint(s)?).map_err(|_| past_end())?;
    if len > s.len() {
        return Err(past_end());
    }
    let (field, rest) = s.split_at(len);
    *s = rest;
    Ok(field)
}

/// Skips a field (its key read), as prost does.
fn skip(s: &mut &[u8], tag: u32, wire: WireType) -> Result<(), prost::DecodeError> {
    match wire {
        WireType::Varint => prost::encoding::decode_varint(s).map(|_| ()),
        WireType::LengthDelimited => read_delimited(s).map(|_| ()),
        _ => prost::encoding::skip_field(wire, tag, s, prost::encoding::DecodeContext::default()),
    }
}

/// `mvccpb.Event` with only its `kv`.
#[derive(Clone, PartialEq, prost::Message)]
struct EventOnly {
    #[prost(message, optional, tag = "2")]
    kv: Option<RevisionAndSeq>,
}

impl EventOnly {
    /// Decodes one encoded `mvccpb.Event` by hand, as prost would decode this type.
    fn read(mut s: &[u8]) -> Result<Self, prost::DecodeError> {
        let mut event = EventOnly { kv: None };
        while !s.is_empty() {
            match prost::encoding::decode_key(&mut s)? {
                (2, wire) => {
                    check_wire_type(WireType::LengthDelimited, wire)?;
                    let kv = event.kv.get_or_insert_with(RevisionAndSeq::default);
                    kv.read(read_delimited(&mut s)?)?;
                }
                (tag, wire) => skip(&mut s, tag, wire)?,
            }
        }
        Ok(event)
    }
}

/// `mvccpb.KeyValue` with only `mod_revision` and the put's sequence number, the first 8 bytes
/// of its `value` (little endian; `None` for a shorter value). Decoded by hand: a `bytes` field
/// would split each value off the buffer, a reference count taken and dropped per event.
#[derive(Clone, Debug, Default, PartialEq)]
struct RevisionAndSeq {
    mod_revision: i64,
    seq: Option<u64>,
}

impl RevisionAndSeq {
    /// Merges one encoded `mvccpb.KeyValue` by hand, as [`prost::Message::merge`] would.
    fn read(&mut self, mut s: &[u8]) -> Result<(), prost::DecodeError> {
        while !s.is_empty() {
            match prost::encoding::decode_key(&mut s)? {
                (3, wire) => {
                    check_wire_type(WireType::Varint, wire)?;
                    self.mod_revision = prost::encoding::decode_varint(&mut s)? as i64;
                }
                (5, wire) => {
                    check_wire_type(WireType::LengthDelimited, wire)?;
                    let value = read_delimited(&mut s)?;
                    self.seq = value
                        .first_chunk::<8>()
                        .map(|first| u64::from_le_bytes(*first));
                }
                (tag, wire) => skip(&mut s, tag, wire)?,
            }
        }
        Ok(())
    }
}

impl prost::Message for RevisionAndSeq {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        if self.mod_revision != 0 {
            prost::encoding::int64::encode(3, &self.mod_revision, buf);
        }
        if let Some(seq) = self.seq {
            prost::encoding::bytes::encode(5, &seq.to_le_bytes().to_vec(), buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            3 => prost::encoding::int64::merge(wire_type, &mut self.mod_revision, buf, ctx),
            5 => {
                // prost's own decoding of the value (the hand decoder's reference in tests).
                let mut value = Vec::new();
                prost::encoding::bytes::merge(wire_type, &mut value, buf, ctx)?;
                self.seq = value
                    .first_chunk::<8>()
                    .map(|first| u64::from_le_bytes(*first));
                Ok(())
            }
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let rev = if self.mod_revision != 0 {
            prost::encoding::int64::encoded_len(3, &self.mod_revision)
        } else {
            0
        };
        rev + self.seq.map_or(0, |_| prost::encoding::key_len(5) + 1 + 8)
    }

    fn clear(&mut self) {
        *self = RevisionAndSeq::default();
    }
}

fn create_request(key: &[u8], prefix: bool) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.to_vec(),
            range_end: if prefix { prefix_end(key) } else { Vec::new() },
            ..Default::default()
        })),
    }
}

/// One gRPC watch stream carrying `watchers` watchers on `key`.
async fn run_stream(
    channel: tonic::transport::Channel,
    key: Vec<u8>,
    prefix: bool,
    watchers: usize,
    sh: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    // The watchers' create requests go out from a channel the stream reads, so their created
    // responses are read while the requests go out (otherwise both directions could fill up).
    // The sender stays alive until the run stops, so the request side is never half-closed.
    let (tx, requests) = futures::channel::mpsc::unbounded::<WatchRequest>();
    for _ in 0..watchers {
        if tx.unbounded_send(create_request(&key, prefix)).is_err() {
            break;
        }
    }
    let mut rx = match grpc_stream::call(channel, "/etcdserverpb.Watch/Watch", requests).await {
        Ok(rx) => rx,
        Err(e) => {
            sh.watch_error(format_args!("watch stream: {e}"));
            sh.live_streams.fetch_sub(1, Ordering::Release);
            return;
        }
    };
    // watch id -> last revision seen
    let mut last_rev: HashMap<i64, i64, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(watchers, Default::default());
    let mut lat = Vec::with_capacity(FLUSH_EVERY);
    loop {
        let msg = tokio::select! {
            m = rx.message::<EventsResponse>() => m,
            _ = stop.wait_for(|s| *s) => break,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => {
                if !*stop.borrow() {
                    sh.watch_error(format_args!("watch stream closed by the server"));
                }
                break;
            }
            Err(e) => {
                sh.watch_error(format_args!("watch stream: {e}"));
                break;
            }
        };
        let now = sh.now();
        if resp.canceled {
            sh.watch_error(format_args!(
                "watcher {} canceled: {}",
                resp.watch_id, resp.cancel_reason
            ));
            continue;
        }
        if resp.created {
            last_rev.insert(resp.watch_id, 0);
            sh.created.fetch_add(1, Ordering::Release);
        }
        let mut matched = 0;
        for ev in &resp.events {
            let Some(kv) = &ev.kv else { continue };
            let Some(seq) = kv.seq else { continue };
            if seq >= sh.total {
                continue;
            }
            let sent = sh.sent_at[seq as usize].load(Ordering::Acquire);
            if sent == 0 {
                // Not one of this run's puts (e.g. a concurrent writer).
                continue;
            }
            let rev = kv.mod_revision;
            let put_rev = sh.revision[seq as usize].load(Ordering::Relaxed);
            if put_rev != 0 && put_rev != rev {
                sh.revision_mismatches.fetch_add(1, Ordering::Relaxed);
            }
            let last = last_rev.entry(resp.watch_id).or_insert(0);
            if rev <= *last {
                sh.order_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            *last = rev;
            lat.push(now.saturating_sub(sent - 1));
            matched += 1;
        }
        if matched > 0 {
            sh.delivered.fetch_add(matched, Ordering::Relaxed);
            sh.responses.fetch_add(1, Ordering::Relaxed);
            sh.last_event.fetch_max(now, Ordering::Relaxed);
            if lat.len() >= FLUSH_EVERY {
                sh.merge(&mut lat);
            }
        }
    }
    sh.merge(&mut lat);
    sh.live_streams.fetch_sub(1, Ordering::Release);
    drop(tx);
}

struct PutStats {
    ok: u64,
    errors: u64,
}

#[allow(clippy::too_many_arguments)]
async fn run_writer(
    mut client: Client,
    sh: Arc<Shared>,
    next: Arc<AtomicU64>,
    start: Instant,
    rate: u64,
    key_base: Vec<u8>,
    prefix: bool,
    key_space: u64,
    key_size: usize,
    val_size: usize,
    pb: ProgressBar,
) -> PutStats {
    let mut st = PutStats { ok: 0, errors: 0 };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= sh.total {
            break;
        }
        if rate > 0 {
            let at = start + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(at.into()).await;
        }
        let k = if prefix {
            let mut k = key_base.clone();
            k.push(b'/');
            k.extend(key(i % key_space, key_size));
            k
        } else {
            key_base.clone()
        };
        let mut v = vec![b'v'; val_size.max(8)];
        v[..8].copy_from_slice(&i.to_le_bytes());
        sh.sent_at[i as usize].store(sh.now() + 1, Ordering::Release);
        match tokio::time::timeout(PUT_TIMEOUT, client.put(k, v, None)).await {
            Ok(Ok(resp)) => {
                let rev = resp.header().map_or(0, |h| h.revision());
                sh.revision[i as usize].store(rev, Ordering::Relaxed);
                st.ok += 1;
            }
            Ok(Err(e)) => {
                if st.errors < MAX_PRINTED_ERRORS {
                    eprintln!("put: {e}");
                }
                st.errors += 1;
            }
            Err(_) => {
                if st.errors < MAX_PRINTED_ERRORS {
                    eprintln!("put: timed out after {PUT_TIMEOUT:?}");
                }
                st.errors += 1;
            }
        }
        pb.inc(1);
    }
    st
}

pub(crate) async fn run(args: &Args, ui: &Ui) -> anyhow::Result<Report> {
    anyhow::ensure!(args.watchers > 0, "--watchers must be at least 1");
    anyhow::ensure!(!args.endpoints.is_empty(), "no --endpoints");
    let total = args.total;
    let workload = args.workload.unwrap_or(Workload::Watch);
    let put_rate = args.put_rate.unwrap_or(match workload {
        Workload::WatchLatency => 100,
        _ => args.rate,
    });
    let key_space = args.key_space();
    let n_conns = args.conns.max(1);
    let n_streams = if args.streams == 0 {
        n_conns
    } else {
        args.streams
    }
    .min(args.watchers);
    let grace = Duration::from_secs_f64(args.grace.max(0.0));

    let sh = Arc::new(Shared {
        epoch: Instant::now(),
        total,
        sent_at: (0..total).map(|_| AtomicU64::new(0)).collect(),
        revision: (0..total).map(|_| AtomicI64::new(0)).collect(),
        created: AtomicUsize::new(0),
        live_streams: AtomicUsize::new(n_streams),
        delivered: AtomicU64::new(0),
        responses: AtomicU64::new(0),
        last_event: AtomicU64::new(0),
        watch_errors: AtomicU64::new(0),
        order_errors: AtomicU64::new(0),
        revision_mismatches: AtomicU64::new(0),
        hist: Mutex::new(Hist::default()),
    });

    let conns = connect_each(&args.endpoints, n_conns, grpc_channel).await?;
    let put_client = connect(&args.endpoints[0]).await?;

    // Watch phase: create every watcher and wait until all are confirmed.
    let (stop_tx, stop_rx) = watch::channel(false);
    let setup_start = Instant::now();
    let mut streams = Vec::with_capacity(n_streams);
    for s in 0..n_streams {
        let w = args.watchers / n_streams + usize::from(s < args.watchers % n_streams);
        streams.push(tokio::spawn(run_stream(
            conns[s % conns.len()].clone(),
            args.key.clone().into_bytes(),
            args.prefix,
            w,
            sh.clone(),
            stop_rx.clone(),
        )));
    }
    loop {
        let created = sh.created.load(Ordering::Acquire);
        if created >= args.watchers {
            break;
        }
        let errs = sh.watch_errors.load(Ordering::Relaxed);
        if errs > 0 || setup_start.elapsed() > SETUP_TIMEOUT {
            let _ = stop_tx.send(true);
            anyhow::bail!(
                "only {created} of {} watchers created after {:.1}s ({errs} watch errors)",
                args.watchers,
                setup_start.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let setup = setup_start.elapsed();

    // Put phase.
    let next = Arc::new(AtomicU64::new(0));
    let put_start = Instant::now();
    let first_put = sh.now();
    let pb = ui.bar(total, &workload.name());
    let mut writers = Vec::new();
    for _ in 0..args.clients.max(1) {
        writers.push(tokio::spawn(run_writer(
            put_client.clone(),
            sh.clone(),
            next.clone(),
            put_start,
            put_rate,
            args.key.clone().into_bytes(),
            args.prefix,
            key_space,
            args.key_size,
            args.val_size,
            pb.clone(),
        )));
    }
    let (mut puts_ok, mut put_errors) = (0, 0);
    for w in writers {
        let st = w.await.context("writer task")?;
        puts_ok += st.ok;
        put_errors += st.errors;
    }
    let put_elapsed = put_start.elapsed();
    pb.finish_and_clear();

    // Drain: wait (bounded) until every watcher has every event, or every stream has failed.
    let expected = puts_ok * args.watchers as u64;
    let deadline = Instant::now() + grace;
    while sh.delivered.load(Ordering::Relaxed) < expected
        && sh.live_streams.load(Ordering::Acquire) > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = stop_tx.send(true);
    for s in streams {
        s.await.context("watch stream task")?;
    }

    let delivered = sh.delivered.load(Ordering::Relaxed);
    let last_event = sh.last_event.load(Ordering::Relaxed);
    let seconds = if last_event > first_put {
        Duration::from_nanos(last_event - first_put).max(put_elapsed)
    } else {
        put_elapsed
    }
    .as_secs_f64();
    let events_per_sec = delivered as f64 / seconds;
    let puts_per_sec = puts_ok as f64 / put_elapsed.as_secs_f64();
    let missing = expected.saturating_sub(delivered);
    let watch_errors = sh.watch_errors.load(Ordering::Relaxed);
    let order_errors = sh.order_errors.load(Ordering::Relaxed);
    let mismatches = sh.revision_mismatches.load(Ordering::Relaxed);
    let errors = put_errors + missing + watch_errors + order_errors + mismatches;
    let hist = match sh.hist.lock() {
        Ok(h) => h.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let mut report = Report {
        workload: workload.name(),
        clients: args.clients,
        total: puts_ok + put_errors,
        errors,
        seconds,
        // For the watch workloads an "op" is one event delivered to one watcher.
        ops_per_sec: events_per_sec,
        latency: hist,
        kinds: Default::default(),
        first_error: None,
        extra: serde_json::Map::new(),
        server_cpu_seconds: None,
        note: Some(format!(
            "{} watchers on {n_streams} streams / {n_conns} conns ({}), setup {:.2}s; \
             {puts_ok} puts in {:.2}s = {puts_per_sec:.0} puts/s; {delivered}/{expected} events; \
             errors: missing {missing}, put {put_errors}, watch {watch_errors}, \
             order {order_errors}, revision {mismatches}; latency is put→event",
            args.watchers,
            if args.prefix { "prefix" } else { "key" },
            setup.as_secs_f64(),
            put_elapsed.as_secs_f64(),
        )),
    };
    let extra = serde_json::json!({
        "watchers": args.watchers,
        "streams": n_streams,
        "conns": n_conns,
        "prefix": args.prefix,
        "put_rate": put_rate,
        "puts_per_sec": puts_per_sec,
        "put_seconds": put_elapsed.as_secs_f64(),
        "setup_seconds": setup.as_secs_f64(),
        "events": delivered,
        "event_responses": sh.responses.load(Ordering::Relaxed),
        "expected_events": expected,
        "events_per_sec": events_per_sec,
        "missing_events": missing,
        "put_errors": put_errors,
        "watch_errors": watch_errors,
        "order_errors": order_errors,
        "revision_mismatches": mismatches,
    });
    if let serde_json::Value::Object(m) = extra {
        report.extra = m;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use fetcd_proto::etcdserverpb::ResponseHeader;
    use fetcd_proto::etcdserverpb::WatchResponse;
    use fetcd_proto::mvccpb::Event;
    use fetcd_proto::mvccpb::KeyValue;
    use prost::Message;

    use super::*;

    fn event(mod_revision: i64, value: Vec<u8>) -> Event {
        Event {
            kv: Some(KeyValue {
                key: b"fetcd-bench/watch".to_vec(),
                create_revision: 2,
                mod_revision,
                version: 7,
                value: value.into(),
                lease: 9,
            }),
            prev_kv: Some(KeyValue {
                key: b"fetcd-bench/watch".to_vec(),
                mod_revision: mod_revision - 1,
                value: 99u64.to_le_bytes().to_vec().into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn events_decode_to_their_revision_and_sequence_number() {
        let mut long = 41u64.to_le_bytes().to_vec();
        long.extend_from_slice(&[0xab; 248]);
        let full = WatchResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 12,
                raft_term: 3,
            }),
            watch_id: 5,
            events: vec![
                event(10, long),
                event(11, 42u64.to_le_bytes().to_vec()),
                event(12, b"short".to_vec()),
            ],
            ..Default::default()
        };
        let bytes = bytes::Bytes::from(full.encode_to_vec());
        let lean = EventsResponse::decode(bytes.clone()).expect("decodes");
        assert_eq!(lean.watch_id, 5);
        let seen: Vec<(i64, Option<u64>)> = lean
            .events
            .iter()
            .map(|e| {
                e.kv.as_ref()
                    .map_or((0, None), |kv| (kv.mod_revision, kv.seq))
            })
            .collect();
        assert_eq!(seen, [(10, Some(41)), (11, Some(42)), (12, None)]);

        // What it encodes decodes the same.
        let again = EventsResponse::decode(lean.encode_to_vec().as_slice()).expect("re-decodes");
        assert_eq!(again, lean);

        // A response cut anywhere is an error, never a panic or a wrong event.
        for cut in 1..bytes.len() {
            if let Ok(r) = EventsResponse::decode(bytes.slice(..cut)) {
                for (e, want) in r.events.iter().zip(&seen) {
                    let kv =
                        e.kv.as_ref()
                            .map_or((0, None), |kv| (kv.mod_revision, kv.seq));
                    assert_eq!(kv, *want, "cut at {cut}");
                }
            }
        }
        // A value whose length runs past the end of the buffer.
        let bad = [0x18, 0x0a, 0x2a, 0x20, 1, 2, 3];
        assert!(RevisionAndSeq::decode(&bad[..]).is_err());
        assert!(RevisionAndSeq::default().read(&bad[..]).is_err());
    }

    /// What prost's generic decoding makes of events, to hold the hand decoder to.
    #[derive(Clone, PartialEq, prost::Message)]
    struct ViaProst {
        #[prost(message, repeated, tag = "11")]
        events: Vec<EventOnly>,
    }

    /// The hand decoder leaves a response as it was when a field runs past its buffer, which
    /// is how `grpc_stream` tells a field cut by a frame's end: responses cut anywhere decode as
    /// they do whole.
    #[tokio::test]
    async fn responses_cut_anywhere_in_frames_decode_as_whole_ones() {
        let mut long = 9u64.to_le_bytes().to_vec();
        long.extend_from_slice(&[0xab; 200]);
        let responses = [
            WatchResponse {
                watch_id: 300,
                created: true,
                ..Default::default()
            },
            WatchResponse {
                watch_id: 1 << 40,
                events: vec![event(5, long), Event::default(), event(6, vec![1; 8])],
                ..Default::default()
            },
            WatchResponse {
                watch_id: 2,
                canceled: true,
                cancel_reason: "mvcc: required revision has been compacted".into(),
                compact_revision: 4,
                ..Default::default()
            },
        ];
        let whole: Vec<EventsResponse> = responses
            .iter()
            .map(|r| EventsResponse::decode(r.encode_to_vec().as_slice()).expect("decode"))
            .collect();
        assert_eq!(whole[1].events.len(), 3);
        let stream: Vec<u8> = responses
            .iter()
            .flat_map(|r| grpc_stream::framed(r).to_vec())
            .collect();
        for c in 1..stream.len() {
            let got = grpc_stream::read_cut::<EventsResponse>(&stream, &[c]).await;
            assert_eq!(got.as_ref().ok(), Some(&whole), "cut at {c}");
        }
        for k in [1, 2, 3, 7, 16] {
            let cuts: Vec<usize> = (1..)
                .map(|i| i * k)
                .take_while(|&c| c < stream.len())
                .collect();
            let got = grpc_stream::read_cut::<EventsResponse>(&stream, &cuts).await;
            assert_eq!(got.as_ref().ok(), Some(&whole), "cuts every {k} bytes");
        }
    }

    #[test]
    fn hand_decoded_events_are_what_prost_decodes() {
        let mut long = 7u64.to_le_bytes().to_vec();
        long.extend_from_slice(&[0xcd; 300]);
        let full = WatchResponse {
            watch_id: 3,
            events: vec![
                event(20, long),
                Event::default(),
                event(i64::MAX, Vec::new()),
                event(22, 8u64.to_le_bytes().to_vec()),
            ],
            ..Default::default()
        };
        let mut inputs = vec![full.encode_to_vec()];
        // Fields an event or a key-value does not have yet, of every wire type, and fields
        // with the wrong wire type.
        for extra in [
            &[0x48, 0x01][..],                   // field 9, varint
            &[0x4d, 1, 2, 3, 4][..],             // field 9, 32-bit
            &[0x49, 1, 2, 3, 4, 5, 6, 7, 8][..], // field 9, 64-bit
            &[0x4a, 0x02, 0xff, 0xff][..],       // field 9, bytes
            &[0x18, 0x05][..],                   // field 3 (mod_revision), varint: kept
            &[0x1a, 0x00][..],                   // field 3 as bytes: an error
            &[0x28, 0x01][..],                   // field 5 (value) as varint: an error
            &[0x10, 0x00][..],                   // field 2 as varint: for an event's kv, an error
            &[0x4b][..],                         // a group start: an error for prost too
            &[0x00][..],                         // field 0: an error
            &[0x4e][..],                         // wire type 6: an error
        ] {
            let mut kv = KeyValue {
                mod_revision: 4,
                value: 5u64.to_le_bytes().to_vec().into(),
                ..Default::default()
            }
            .encode_to_vec();
            kv.extend_from_slice(extra);
            // The key-value with the extra field, and an event with it after its kv.
            let mut ev = Vec::new();
            prost::encoding::bytes::encode(2, &kv, &mut ev);
            let mut with_extra_event = ev.clone();
            with_extra_event.extend_from_slice(extra);
            for e in [ev, with_extra_event] {
                let mut resp = Vec::new();
                prost::encoding::bytes::encode(11, &e, &mut resp);
                inputs.push(resp);
            }
        }
        for input in &inputs {
            let bytes = bytes::Bytes::from(input.clone());
            let hand = EventsResponse::decode(bytes.clone()).map(|r| r.events);
            let prost = ViaProst::decode(bytes.clone()).map(|r| r.events);
            match (&hand, &prost) {
                (Ok(h), Ok(p)) => assert_eq!(h, p, "{input:02x?}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{input:02x?}: hand {hand:?}, prost {prost:?}"),
            }
            for cut in 0..input.len() {
                let hand = EventsResponse::decode(bytes.slice(..cut)).map(|r| r.events);
                let prost = ViaProst::decode(bytes.slice(..cut)).map(|r| r.events);
                assert_eq!(hand.is_ok(), prost.is_ok(), "{input:02x?} cut at {cut}");
                if let (Ok(h), Ok(p)) = (hand, prost) {
                    assert_eq!(h, p, "{input:02x?} cut at {cut}");
                }
            }
        }
    }
}
