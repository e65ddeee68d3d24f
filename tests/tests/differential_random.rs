//! Randomized differential test: seeded sequences of KV, Txn, Compact and Lease requests with
//! every option the API has, sent to a fresh real etcd and a fresh fetcd; the normalized
//! transcripts must be identical, and at the end both must replay the same history to watchers
//! started at random revisions.
//!
//! The scripted scenarios in `differential.rs` pin down what each option does; this test looks
//! for what no one thought to script: combinations (a limit with a sort and a revision filter, a
//! Txn whose compare spans a range, a lease revoked under a key a Txn reads), and now and then
//! input etcd refuses or reads its own way (an empty key, a negative revision or limit), over a
//! small key space, so that keys collide, are deleted and come back, and revisions get compacted under
//! later requests. The sequence is a pure function of the seed, so a failure is replayed with
//! `FETCD_DIFF_SEED=<seed>` (the seeds CI runs are fixed; set `FETCD_DIFF_OPS` for longer runs).
//!
//! `random_watch_streams_match_etcd` adds the Watch protocol: between such requests, watches are
//! created on one stream (random spans and filters, from now, a past or a future revision,
//! sometimes under an id the client chose, which may be taken), canceled (live and unknown ids)
//! and asked for progress; every watch's responses are compared.
//!
//! Absolute checks (which fail even if both servers agree): header revisions never go back,
//! a write that changes something bumps the revision by exactly one, an unsorted range is in key
//! order, returned kvs are consistent (create <= mod <= header, version >= 1), and a watcher
//! receives each revision once, in order, from its start revision on.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{ensure, Result};
use etcd_client::{
    CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, LeaseGrantOptions,
    LeaseTimeToLiveOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use fetcd_proto::etcdserverpb::watch_create_request::FilterType;
use fetcd_proto::etcdserverpb::WatchCreateRequest;
use fetcd_tests::observe::revision;
use fetcd_tests::watch::{self as w, Received};
use fetcd_tests::{run_differential, Session};
use serde_json::json;

/// The seeds CI runs. Each is a different mix; together they cover every request shape below.
const SEEDS: [u64; 4] = [1, 7, 42, 2026];

/// Requests per seed unless `FETCD_DIFF_OPS` says otherwise.
const DEFAULT_OPS: usize = 300;

/// Ten keys: nested under two prefixes, one sorting before all, one after. Few enough that keys
/// collide constantly, and at most twelve so that sorts with ties stay in key order (see
/// `range_sort_ties` in `differential.rs`).
const KEYS: [&str; 10] = [
    "a", "a/1", "a/2", "a/b/1", "b", "b/1", "b/2", "c", "\u{1}", "zz",
];

/// Lease IDs the test grants (explicitly, so both servers use the same ones).
const LEASES: [i64; 3] = [101, 102, 103];

/// How long a watcher may stay silent before its history is taken to be complete.
const WATCH_QUIET: Duration = Duration::from_millis(400);

/// splitmix64: a few lines, no dependency, and the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of [`KEYS`], or now and then the empty key (which etcd refuses).
    fn key(&mut self) -> &'static str {
        if self.chance(2) {
            ""
        } else {
            self.pick::<&str>(&KEYS)
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// A revision to ask for: mostly recent ones, sometimes 0 (current), negative, compacted or
    /// future.
    fn revision(&mut self, current: i64) -> i64 {
        match self.below(7) {
            0 => 0,
            1 => current + 1 + self.below(2) as i64,
            2 => -1 - self.below(2) as i64,
            _ => 1 + self.below(current.max(1) as u64) as i64,
        }
    }
}

/// Which keys a request covers, in etcd's range vocabulary.
#[derive(Clone, Copy)]
enum Span {
    Key,
    Prefix,
    FromKey,
    /// `[key, other)`, which may be empty or inverted.
    Range(&'static str),
    All,
}

impl Span {
    fn random(rng: &mut Rng) -> (&'static str, Span) {
        let key = rng.key();
        let span = match rng.below(10) {
            0..=3 => Span::Key,
            4..=5 => Span::Prefix,
            6 => Span::FromKey,
            7..=8 => Span::Range(rng.pick::<&str>(&KEYS)),
            _ => Span::All,
        };
        (key, span)
    }

    fn describe(self, key: &str) -> String {
        match self {
            Span::Key => format!("{key:?}"),
            Span::Prefix => format!("prefix {key:?}"),
            Span::FromKey => format!("from {key:?}"),
            Span::Range(end) => format!("[{key:?}, {end:?})"),
            Span::All => "all keys".to_owned(),
        }
    }

    /// The `(key, range_end)` a request over this span sends.
    fn bounds(self, key: &str) -> (Vec<u8>, Vec<u8>) {
        match self {
            Span::Key => (key.into(), Vec::new()),
            Span::Prefix => (key.into(), w::prefix_end(key.as_bytes())),
            Span::FromKey => (key.into(), vec![0]),
            Span::Range(end) => (key.into(), end.into()),
            Span::All => (vec![0], vec![0]),
        }
    }

    /// `o` with this span's range end; the request's key is `bounds(key).0`.
    fn options<O: WithRangeEnd>(self, key: &str, o: O) -> O {
        match self.bounds(key).1 {
            end if end.is_empty() => o,
            end => o.with_range_end(end),
        }
    }

    fn watch(self, key: &str) -> WatchCreateRequest {
        let (key, range_end) = self.bounds(key);
        WatchCreateRequest {
            key,
            range_end,
            ..Default::default()
        }
    }
}

/// The etcd-client options that carry a range end.
trait WithRangeEnd {
    fn with_range_end(self, end: Vec<u8>) -> Self;
}

impl WithRangeEnd for GetOptions {
    fn with_range_end(self, end: Vec<u8>) -> Self {
        self.with_range(end)
    }
}

impl WithRangeEnd for DeleteOptions {
    fn with_range_end(self, end: Vec<u8>) -> Self {
        self.with_range(end)
    }
}

/// What the generator knows while it runs; the same on both servers as long as their answers
/// agree (and when they do not, the transcripts already differ).
struct Walk {
    rng: Rng,
    /// The last header revision seen.
    rev: i64,
    /// The last compaction the generator asked for.
    compacted: i64,
    /// No compaction above this revision (see `random_stream_scenario`; 0: none at all).
    compact_cap: i64,
    values: u64,
    /// The Txn being generated has deleted from a key (`range_end` `"\0"`) before this point.
    /// A later put with `ignore_value` or `ignore_lease` of a key after it makes etcd 3.4 panic
    /// (fetcd refuses it; `txn_refuses_ignore_flags_on_a_key_it_deleted_from` in storage's
    /// tests), so the generator leaves those flags off from then on.
    deleted_from_key: bool,
    /// Whether ranges may be serializable: not through a cluster's members in turn, where a
    /// follower may serve one before it applied the write just acknowledged by the leader.
    serializable: bool,
    problems: Vec<String>,
}

impl Walk {
    fn value(&mut self) -> String {
        self.values += 1;
        // Some values repeat, so that value compares and value sorts see ties.
        if self.rng.chance(20) {
            format!("v{}", self.rng.below(3))
        } else {
            format!("v{}", self.values)
        }
    }

    /// Records a revision from a response header, checking it never goes back and moves by at
    /// most one for a write.
    fn saw(&mut self, step: &str, rev: i64, write: bool) {
        if rev == 0 {
            return;
        }
        if rev < self.rev || (write && rev > self.rev + 1) || (!write && rev != self.rev) {
            self.problems.push(format!(
                "{step}: header.revision {rev} after {} ({})",
                self.rev,
                if write { "write" } else { "read" }
            ));
        }
        self.rev = rev;
    }

    fn check_kvs(&mut self, step: &str, kvs: &[KeyValue], header: i64, sorted_by_key: bool) {
        for kv in kvs {
            let ok = kv.create_revision() >= 1
                && kv.create_revision() <= kv.mod_revision()
                && kv.mod_revision() <= header
                && kv.version() >= 1;
            if !ok {
                self.problems
                    .push(format!("{step}: inconsistent kv {kv:?}"));
            }
        }
        if sorted_by_key && kvs.windows(2).any(|p| p[0].key() >= p[1].key()) {
            self.problems
                .push(format!("{step}: keys not strictly ascending"));
        }
    }

    fn get_options(&mut self, key: &str, span: Span) -> (GetOptions, String, bool) {
        let rng = &mut self.rng;
        let mut o = span.options(key, GetOptions::new());
        let mut what = Vec::new();
        let mut by_key = true;
        if rng.chance(40) {
            let limit = rng.below(5) as i64 - 1;
            o = o.with_limit(limit);
            what.push(format!("limit {limit}"));
        }
        if rng.chance(35) {
            let (tn, t) = *rng.pick(&[
                ("KEY", SortTarget::Key),
                ("VERSION", SortTarget::Version),
                ("CREATE", SortTarget::Create),
                ("MOD", SortTarget::Mod),
                ("VALUE", SortTarget::Value),
            ]);
            let (on, order) = *rng.pick(&[
                ("NONE", SortOrder::None),
                ("ASCEND", SortOrder::Ascend),
                ("DESCEND", SortOrder::Descend),
            ]);
            o = o.with_sort(t, order);
            what.push(format!("sort {tn} {on}"));
            // etcd sorts ASCEND when a target other than KEY comes with order NONE.
            by_key = matches!(t, SortTarget::Key) && !matches!(order, SortOrder::Descend);
        }
        if rng.chance(30) {
            let r = rng.revision(self.rev);
            o = o.with_revision(r);
            what.push(format!("rev {r}"));
        }
        if rng.chance(15) {
            o = o.with_keys_only();
            what.push("keys_only".into());
        }
        if rng.chance(10) {
            o = o.with_count_only();
            what.push("count_only".into());
        }
        if self.serializable && rng.chance(10) {
            o = o.with_serializable();
            what.push("serializable".into());
        }
        for (name, pct) in [
            ("min_mod", 8),
            ("max_mod", 8),
            ("min_create", 8),
            ("max_create", 8),
        ] {
            if rng.chance(pct) {
                let r = rng.below(self.rev.max(1) as u64 + 1) as i64;
                o = match name {
                    "min_mod" => o.with_min_mod_revision(r),
                    "max_mod" => o.with_max_mod_revision(r),
                    "min_create" => o.with_min_create_revision(r),
                    _ => o.with_max_create_revision(r),
                };
                what.push(format!("{name} {r}"));
            }
        }
        (o, what.join(" "), by_key)
    }

    fn put_options(&mut self, allow_ignore: bool) -> (Option<PutOptions>, String, bool) {
        let rng = &mut self.rng;
        let mut o = PutOptions::new();
        let mut what = Vec::new();
        let mut ignore_value = false;
        if rng.chance(50) {
            o = o.with_prev_key();
            what.push("prev_kv".to_owned());
        }
        if rng.chance(20) {
            let id = *rng.pick(&LEASES);
            o = o.with_lease(id);
            what.push(format!("lease {id}"));
        }
        if allow_ignore && rng.chance(8) {
            o = o.with_ignore_value();
            ignore_value = true;
            what.push("ignore_value".into());
        }
        if allow_ignore && rng.chance(8) {
            o = o.with_ignore_lease();
            what.push("ignore_lease".into());
        }
        (Some(o), what.join(" "), ignore_value)
    }

    fn compare(&mut self) -> (Compare, String) {
        let key = self.rng.key();
        let (on, op) = *self.rng.pick(&[
            ("=", CompareOp::Equal),
            ("!=", CompareOp::NotEqual),
            ("<", CompareOp::Less),
            (">", CompareOp::Greater),
        ]);
        let rev = self.rng.below(self.rev.max(1) as u64 + 2) as i64;
        let (mut c, what) = match self.rng.below(5) {
            0 => {
                let v = format!("v{}", self.rng.below(self.values.max(1) + 1));
                (
                    Compare::value(key, op, v.clone()),
                    format!("value({key:?}) {on} {v}"),
                )
            }
            1 => {
                let n = self.rng.below(4) as i64;
                (
                    Compare::version(key, op, n),
                    format!("version({key:?}) {on} {n}"),
                )
            }
            2 => (
                Compare::create_revision(key, op, rev),
                format!("create({key:?}) {on} {rev}"),
            ),
            3 => (
                Compare::mod_revision(key, op, rev),
                format!("mod({key:?}) {on} {rev}"),
            ),
            _ => {
                let id = if self.rng.chance(30) {
                    0
                } else {
                    *self.rng.pick(&LEASES)
                };
                (
                    Compare::lease(key, op, id),
                    format!("lease({key:?}) {on} {id}"),
                )
            }
        };
        if self.rng.chance(15) {
            c = c.with_prefix();
            return (c, format!("{what} over prefix"));
        }
        (c, what)
    }

    /// One operation of a Txn branch; `depth` limits nesting.
    fn txn_op(&mut self, depth: u32) -> (TxnOp, String) {
        match self.rng.below(if depth > 0 { 7 } else { 6 }) {
            0..=1 => {
                let key = self.rng.key();
                let v = self.value();
                let (o, what, _) = self.put_options(!self.deleted_from_key);
                (
                    TxnOp::put(key, v.clone(), o),
                    format!("put {key:?}={v} {what}"),
                )
            }
            2..=3 => {
                let (key, span) = Span::random(&mut self.rng);
                let (o, what, _) = self.get_options(key, span);
                (
                    TxnOp::get(span.bounds(key).0, Some(o)),
                    format!("get {} {what}", span.describe(key)),
                )
            }
            4..=5 => {
                let (key, span) = Span::random(&mut self.rng);
                if matches!(span, Span::FromKey | Span::All) {
                    self.deleted_from_key = true;
                }
                let mut o = span.options(key, DeleteOptions::new());
                if self.rng.chance(50) {
                    o = o.with_prev_key();
                }
                (
                    TxnOp::delete(span.bounds(key).0, Some(o)),
                    format!("delete {}", span.describe(key)),
                )
            }
            _ => {
                let (t, what) = self.txn(depth - 1);
                (TxnOp::txn(t), format!("txn {{{what}}}"))
            }
        }
    }

    fn txn(&mut self, depth: u32) -> (Txn, String) {
        let compares: Vec<_> = (0..self.rng.below(3)).map(|_| self.compare()).collect();
        let success: Vec<_> = (0..self.rng.below(4)).map(|_| self.txn_op(depth)).collect();
        let failure: Vec<_> = (0..self.rng.below(3)).map(|_| self.txn_op(depth)).collect();
        let what = format!(
            "if {} then {} else {}",
            compares
                .iter()
                .map(|c| c.1.as_str())
                .collect::<Vec<_>>()
                .join(" && "),
            success
                .iter()
                .map(|o| o.1.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            failure
                .iter()
                .map(|o| o.1.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        );
        let txn = Txn::new()
            .when(compares.into_iter().map(|c| c.0).collect::<Vec<_>>())
            .and_then(success.into_iter().map(|o| o.0).collect::<Vec<_>>())
            .or_else(failure.into_iter().map(|o| o.0).collect::<Vec<_>>());
        (txn, what)
    }
}

/// Checks every kv of a Txn's responses (recursively) and whether it wrote.
fn txn_kvs(walk: &mut Walk, step: &str, responses: &[TxnOpResponse], header: i64) -> bool {
    let mut wrote = false;
    for r in responses {
        match r {
            TxnOpResponse::Put(_) => wrote = true,
            TxnOpResponse::Delete(d) => wrote |= d.deleted() > 0,
            TxnOpResponse::Get(g) => walk.check_kvs(step, g.kvs(), header, false),
            TxnOpResponse::Txn(t) => wrote |= txn_kvs(walk, step, &t.op_responses(), header),
        }
    }
    wrote
}

async fn one_request(s: &mut Session, walk: &mut Walk, i: usize) -> Result<()> {
    match walk.rng.below(100) {
        // Put.
        0..=27 => {
            let key = walk.rng.key();
            let (o, what, ignore_value) = walk.put_options(true);
            let v = if ignore_value && walk.rng.chance(70) {
                String::new()
            } else {
                walk.value()
            };
            let step = format!("#{i} put {key:?}={v:?} {what}");
            if let Ok(r) = s.put(&step, key, v, o).await {
                walk.saw(&step, revision(r.header()), true);
            }
        }
        // Range.
        28..=55 => {
            let (key, span) = Span::random(&mut walk.rng);
            let (o, what, by_key) = walk.get_options(key, span);
            let step = format!("#{i} get {} {what}", span.describe(key));
            if let Ok(r) = s.get(&step, span.bounds(key).0, Some(o)).await {
                let rev = revision(r.header());
                walk.saw(&step, rev, false);
                walk.check_kvs(&step, r.kvs(), rev, by_key);
                if (r.kvs().len() as i64) > r.count() {
                    walk.problems.push(format!("{step}: more kvs than count"));
                }
            }
        }
        // DeleteRange.
        56..=65 => {
            let (key, span) = Span::random(&mut walk.rng);
            let mut o = span.options(key, DeleteOptions::new());
            let prev = walk.rng.chance(50);
            if prev {
                o = o.with_prev_key();
            }
            let step = format!("#{i} delete {} prev_kv={prev}", span.describe(key));
            if let Ok(r) = s.delete(&step, span.bounds(key).0, Some(o)).await {
                let rev = revision(r.header());
                walk.saw(&step, rev, r.deleted() > 0);
                if prev && r.prev_kvs().len() as i64 != r.deleted() {
                    walk.problems
                        .push(format!("{step}: prev_kvs do not match deleted"));
                }
            }
        }
        // Txn, sometimes nested.
        66..=87 => {
            walk.deleted_from_key = false;
            let (txn, what) = walk.txn(1);
            let step = format!("#{i} txn {what}");
            if let Ok(r) = s.txn(&step, txn).await {
                let rev = revision(r.header());
                let wrote = txn_kvs(walk, &step, &r.op_responses(), rev);
                walk.saw(&step, rev, wrote);
            }
        }
        // Compact, at a revision that may be old, current, already compacted or future.
        88..=90 => {
            let r = (walk.compacted + walk.rng.below(8) as i64 - 2)
                .clamp(1, walk.rev + 1)
                .min(walk.compact_cap);
            let mut o = CompactionOptions::new();
            if walk.rng.chance(50) {
                o = o.with_physical();
            }
            let step = format!("#{i} compact {r}");
            if r >= 1 && s.compact(&step, r, Some(o)).await.is_ok() {
                walk.compacted = walk.compacted.max(r);
            }
        }
        // Lease grant (IDs repeat, so some are refused as existing).
        91..=94 => {
            let id = *walk.rng.pick(&LEASES);
            let step = format!("#{i} lease grant {id}");
            s.lease_grant(&step, 600, Some(LeaseGrantOptions::new().with_id(id)))
                .await
                .ok();
        }
        // Lease TimeToLive with the keys attached (the remaining TTL is not compared).
        95..=96 => {
            let id = *walk.rng.pick(&LEASES);
            let step = format!("#{i} lease timetolive {id} --keys");
            s.lease_time_to_live(&step, id, Some(LeaseTimeToLiveOptions::new().with_keys()))
                .await
                .ok();
        }
        // Lease revoke: deletes the lease's keys in one revision.
        _ => {
            let id = *walk.rng.pick(&LEASES);
            let step = format!("#{i} lease revoke {id}");
            if let Ok(r) = s.lease_revoke(&step, id).await {
                // A write when the lease had keys, so it may move the revision by one.
                walk.saw(&step, revision(r.header()), true);
            }
        }
    }
    Ok(())
}

/// A watcher opened by the test, drained at the end.
struct Watcher {
    step: String,
    conn: w::WatchConn,
    /// The first revision it may report (for a watch from "now", the revision after the one
    /// current when it was created).
    start: i64,
}

/// Opens a watch on a random span from `start` (0: from now), with random `prev_kv` and filters.
async fn open_watcher(s: &mut Session, walk: &mut Walk, name: &str, start: i64) -> Result<Watcher> {
    let (key, span) = Span::random(&mut walk.rng);
    let mut req = span.watch(key);
    req.start_revision = start;
    req.prev_kv = walk.rng.chance(50);
    if walk.rng.chance(15) {
        req.filters.push(FilterType::Noput as i32);
    } else if walk.rng.chance(15) {
        req.filters.push(FilterType::Nodelete as i32);
    }
    let step = format!(
        "watch {name} {} from {start} prev_kv={} filters={:?}",
        span.describe(key),
        req.prev_kv,
        req.filters
    );
    let conn = s.watch_create(&step, req).await?;
    let start = if start == 0 { walk.rev + 1 } else { start };
    Ok(Watcher { step, conn, start })
}

/// Receives everything a watcher has to say until it is quiet, and records it flattened: the
/// non-event responses (created, canceled) and the events in order. How a server batches
/// revisions into responses is its own business and is not recorded.
async fn drain(s: &mut Session, walk: &mut Walk, watcher: Watcher) {
    let Watcher {
        step,
        mut conn,
        start,
    } = watcher;
    let mut control = Vec::new();
    let mut events = Vec::new();
    let mut last = 0i64;
    let end = loop {
        match conn.recv_within(WATCH_QUIET).await {
            Received::Response(r) => {
                if r.created || r.canceled || r.events.is_empty() {
                    let mut v = w::watch_response(&r);
                    // The revision a created response reports depends on when it was sent
                    // relative to the writes around it.
                    if let Some(o) = v.as_object_mut() {
                        o.remove("header");
                    }
                    control.push(v);
                }
                for e in &r.events {
                    let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                    if rev < start || rev < last {
                        walk.problems.push(format!(
                            "{step}: event at revision {rev} after {last} (start {start})"
                        ));
                    }
                    last = rev;
                    events.push(w::event(e));
                }
                if r.canceled {
                    break json!("canceled");
                }
            }
            Received::Nothing => break json!("quiet"),
            other => break other.to_value(),
        }
    };
    s.record(
        format!("{step}: history"),
        json!({ "control": control, "events": events, "end": end }),
    );
    conn.close_send();
}

fn ops_per_seed() -> usize {
    std::env::var("FETCD_DIFF_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_OPS)
}

/// A fresh generator for `seed`, with the leases the requests name granted first (so they
/// exist before the first put that names them, most of the time).
async fn start_walk(s: &mut Session, seed: u64, serializable: bool) -> Result<Walk> {
    for id in &LEASES[..2] {
        s.lease_grant(
            &format!("lease grant {id}"),
            600,
            Some(LeaseGrantOptions::new().with_id(*id)),
        )
        .await?;
    }
    Ok(Walk {
        rng: Rng(seed),
        rev: 1,
        compacted: 0,
        compact_cap: i64::MAX,
        values: 0,
        deleted_from_key: false,
        serializable,
        problems: Vec::new(),
    })
}

async fn random_scenario(s: &mut Session, seed: u64, serializable: bool) -> Result<()> {
    let mut walk = start_walk(s, seed, serializable).await?;
    // Live watchers see every request below as it happens (and fall behind and catch up if
    // their stream's flow-control window fills before they are drained).
    let mut live = Vec::new();
    for n in 0..3 {
        live.push(open_watcher(s, &mut walk, &format!("live #{n}"), 0).await?);
    }
    for i in 0..ops_per_seed() {
        one_request(s, &mut walk, i).await?;
    }
    for watcher in live {
        drain(s, &mut walk, watcher).await;
    }
    // Watchers from past revisions replay the history, some of it compacted.
    for n in 0..5 {
        let start = 1 + walk.rng.below(walk.rev.max(1) as u64 + 1) as i64;
        let watcher = open_watcher(s, &mut walk, &format!("replay #{n}"), start).await?;
        drain(s, &mut walk, watcher).await;
    }
    ensure!(
        walk.problems.is_empty(),
        "seed {seed}: {}",
        walk.problems.join("\n")
    );
    Ok(())
}

fn seeds() -> Vec<u64> {
    match std::env::var("FETCD_DIFF_SEED") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => SEEDS.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_match_etcd() -> Result<()> {
    for seed in seeds() {
        run_differential(&format!("random seed {seed}"), async |s: &mut Session| {
            random_scenario(s, seed, true).await
        })
        .await?;
    }
    Ok(())
}

/// The same requests through a three-member fetcd cluster, each to the next member in turn,
/// against one etcd: follower forwarding, linearizable reads on followers (a read served by a
/// member other than the one that took the write just before must see it) and watches on
/// every member give one etcd's answers.
#[cfg(feature = "fetcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_through_three_members_match_one_etcd() -> Result<()> {
    use fetcd_tests::{run_differential_against, TargetKind};
    // Two of CI's seeds (a cluster is slower to start), or all of those given.
    let seeds = match std::env::var_os("FETCD_DIFF_SEED") {
        Some(_) => seeds(),
        None => SEEDS[..2].to_vec(),
    };
    for seed in seeds {
        run_differential_against(
            &format!("random seed {seed}, 3 members"),
            TargetKind::FetcdCluster,
            async |s: &mut Session| random_scenario(s, seed, false).await,
        )
        .await?;
    }
    Ok(())
}

// --- many watches on one stream, created and canceled between the requests ------------------

/// What one watch stream has said, by watch: its control responses (created, canceled; the
/// header left out) and its events, flattened, in the order they came; and the revisions of the
/// progress responses. A watch is its id and the how-manyeth creation of that id it is (a
/// client may reuse the id of a canceled watch).
#[derive(Default)]
struct StreamLog {
    by_watch: std::collections::BTreeMap<(i64, u32), Vec<serde_json::Value>>,
    generation: std::collections::BTreeMap<i64, u32>,
    /// The first revision each watch may report, and the last one it did.
    bounds: std::collections::BTreeMap<(i64, u32), (i64, i64)>,
    /// Watches the test canceled.
    canceled: std::collections::BTreeSet<(i64, u32)>,
    progress: Vec<i64>,
}

impl StreamLog {
    fn watch(&self, id: i64) -> (i64, u32) {
        (id, self.generation.get(&id).copied().unwrap_or(0))
    }

    fn take(&mut self, walk: &mut Walk, r: &fetcd_proto::etcdserverpb::WatchResponse) {
        if r.created {
            *self.generation.entry(r.watch_id).or_default() += 1;
        }
        let watch = self.watch(r.watch_id);
        let entry = self.by_watch.entry(watch).or_default();
        if r.created || r.canceled {
            let mut v = w::watch_response(r);
            if let Some(o) = v.as_object_mut() {
                o.remove("header");
                o.remove("events");
            }
            entry.push(v);
        } else if r.events.is_empty() && r.watch_id == -1 {
            self.progress
                .push(r.header.as_ref().map_or(0, |h| h.revision));
        }
        for e in &r.events {
            let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            let (start, last) = self.bounds.get(&watch).copied().unwrap_or((0, 0));
            if rev < start || rev < last {
                walk.problems.push(format!(
                    "watch {watch:?}: event at revision {rev} after {last} (start {start})"
                ));
            }
            self.bounds.insert(watch, (start, rev));
            entry.push(w::event(e));
        }
    }

    /// Records every watch's history. Of a watch the test canceled, only its control
    /// responses: whether events still queued for it when the cancel arrives go out first is a
    /// matter of timing (etcd 3.4's send loop may hold them back for good).
    fn record(&self, s: &mut Session) {
        for (watch, history) in &self.by_watch {
            let history: Vec<_> = if self.canceled.contains(watch) {
                history
                    .iter()
                    .filter(|v| v.get("created").is_some())
                    .cloned()
                    .collect()
            } else {
                history.clone()
            };
            s.record(format!("stream: watch {watch:?}"), json!(history));
        }
        s.record("stream: progress revisions", json!(self.progress));
    }
}

/// Reads the stream until a response satisfies `done` (recording everything on the way), or
/// until it has been quiet for [`WATCH_QUIET`] when `done` is `None`.
async fn read_stream(
    conn: &mut w::WatchConn,
    walk: &mut Walk,
    log: &mut StreamLog,
    step: &str,
    done: Option<&dyn Fn(&fetcd_proto::etcdserverpb::WatchResponse) -> bool>,
) {
    let wait = if done.is_some() {
        Duration::from_secs(10)
    } else {
        WATCH_QUIET
    };
    loop {
        match conn.recv_within(wait).await {
            Received::Response(r) => {
                log.take(walk, &r);
                if done.is_some_and(|d| d(&r)) {
                    return;
                }
            }
            Received::Nothing if done.is_none() => return,
            other => {
                walk.problems
                    .push(format!("{step}: the stream ended: {}", other.to_value()));
                return;
            }
        }
    }
}

/// Random KV requests with, between them, watches created on one stream (on random spans, from
/// now, a past or a future revision, sometimes with an id the client chose, which may be taken),
/// canceled (live ids and unknown ones) and progress requests. Each create, cancel of a live
/// watch and progress request waits for its answer before the next request, so what a watch
/// from "now" sees does not depend on timing; everything the stream says is compared per watch.
///
/// No id is used twice: etcd 3.4's send loop keeps events that reach it for a watch id it no
/// longer knows (one canceled a moment ago, its events already queued) and hands them to the
/// next watch created with that id (`pending` in `v3rpc/watch.go`), with the new watch's id and
/// without their prev_kv. What a reused id sees there depends on timing, so client-chosen ids
/// skip canceled ones, and only watches whose id the automatic numbering has passed (which it
/// never goes back to) are canceled. Reusing a canceled id is tested in `tests/watch.rs`.
async fn random_stream_scenario(s: &mut Session, seed: u64) -> Result<()> {
    // Its own sequence, not the KV-only scenario's with watch requests in between.
    let mut walk = start_walk(s, seed ^ 0x5754_4348, true).await?;
    let mut log = StreamLog::default();
    let mut conn = s
        .watch_open("open the stream", w::progress_request())
        .await?;
    read_stream(
        &mut conn,
        &mut walk,
        &mut log,
        "first progress",
        Some(&|r| r.watch_id == -1),
    )
    .await;
    let mut live: Vec<i64> = Vec::new();
    let mut retired = std::collections::BTreeSet::new();
    // The id the server numbers the next automatic watch from (etcd's `nextID`).
    let mut next_auto = 0;
    for i in 0..ops_per_seed() / 2 {
        let roll = walk.rng.below(100);
        if roll < 65 {
            one_request(s, &mut walk, i).await?;
            continue;
        }
        if roll < 85 {
            let (key, span) = Span::random(&mut walk.rng);
            let mut req = span.watch(key);
            req.start_revision = match walk.rng.below(10) {
                0..=4 => 0,
                5..=7 => 1 + walk.rng.below(walk.rev.max(1) as u64) as i64,
                _ => walk.rev + 1 + walk.rng.below(3) as i64,
            };
            req.prev_kv = walk.rng.chance(50);
            if walk.rng.chance(15) {
                req.filters.push(FilterType::Noput as i32);
            } else if walk.rng.chance(15) {
                req.filters.push(FilterType::Nodelete as i32);
            }
            if walk.rng.chance(25) {
                let id = 1 + walk.rng.below(8) as i64;
                if !retired.contains(&id) {
                    req.watch_id = id;
                }
            }
            let auto = req.watch_id == 0;
            let step = format!(
                "#{i} stream: watch id {} {} from {} prev_kv={} filters={:?}",
                req.watch_id,
                span.describe(key),
                req.start_revision,
                req.prev_kv,
                req.filters
            );
            let from_past = (1..=walk.rev).contains(&req.start_revision);
            let start = if req.start_revision == 0 {
                walk.rev + 1
            } else {
                req.start_revision
            };
            conn.create(req).await?;
            let created = std::cell::Cell::new(None);
            read_stream(
                &mut conn,
                &mut walk,
                &mut log,
                &step,
                Some(&|r| {
                    let ours = r.created;
                    if ours {
                        created.set(Some((r.watch_id, r.canceled)));
                    }
                    ours
                }),
            )
            .await;
            s.record(step, json!({ "created": created.get() }));
            if let Some((id, false)) = created.get() {
                if auto {
                    next_auto = id + 1;
                }
                log.bounds.insert(log.watch(id), (start, 0));
                if from_past {
                    // etcd 3.4 replays history to such a watch up to 100 ms later, and cancels
                    // it if a compaction passed its start meanwhile; fetcd replays at once. A
                    // compaction at its start is no cancel, but takes a delete at that revision
                    // out of the history (both servers then replay without it). So nothing is
                    // compacted at or above its start from now on.
                    walk.compact_cap = walk.compact_cap.min(start - 1);
                } else {
                    live.push(id);
                }
            }
        } else if roll < 95 {
            let passed: Vec<usize> = (0..live.len()).filter(|&k| live[k] < next_auto).collect();
            let known = !passed.is_empty() && walk.rng.chance(70);
            let id = if known {
                let id = live.remove(passed[walk.rng.below(passed.len() as u64) as usize]);
                retired.insert(id);
                id
            } else {
                100 + walk.rng.below(5) as i64
            };
            conn.cancel(id).await?;
            if known {
                log.canceled.insert(log.watch(id));
                let step = format!("#{i} stream: cancel {id}");
                read_stream(
                    &mut conn,
                    &mut walk,
                    &mut log,
                    &step,
                    Some(&|r| r.canceled && r.watch_id == id),
                )
                .await;
            }
        } else {
            conn.request_progress().await?;
            let step = format!("#{i} stream: progress");
            read_stream(
                &mut conn,
                &mut walk,
                &mut log,
                &step,
                Some(&|r| r.watch_id == -1 && !r.created),
            )
            .await;
        }
    }
    read_stream(&mut conn, &mut walk, &mut log, "end", None).await;
    conn.close_send();
    log.record(s);
    ensure!(
        walk.problems.is_empty(),
        "seed {seed}: {}",
        walk.problems.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_watch_streams_match_etcd() -> Result<()> {
    for seed in seeds() {
        run_differential(
            &format!("random watch stream seed {seed}"),
            async |s: &mut Session| random_stream_scenario(s, seed).await,
        )
        .await?;
    }
    Ok(())
}
