//! Latency histograms, per-op-kind recording and the run report (text summary and JSON line).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;
use serde_json::Value;

/// Log-linear histogram of nanosecond values: exact below 256 ns, then 128 sub-buckets per
/// power of two (relative error under 0.4 %), grown on demand. Mergeable, so every client task
/// records into its own and the run adds them up at the end.
#[derive(Clone, Debug, Default)]
pub(crate) struct Hist {
    counts: Vec<u64>,
    n: u64,
    sum_ns: u128,
    max_ns: u64,
}

const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;

fn bucket_of(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let shift = e - SUB_BITS;
    let m = v >> shift;
    (2 * SUB + u64::from(shift - 1) * SUB + (m - SUB)) as usize
}

/// The midpoint of bucket `i`.
fn bucket_value(i: usize) -> u64 {
    let i = i as u64;
    if i < 2 * SUB {
        return i;
    }
    let j = i - 2 * SUB;
    let shift = j / SUB + 1;
    let m = j % SUB + SUB;
    (m << shift) + (1 << (shift - 1))
}

impl Hist {
    pub(crate) fn record(&mut self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub(crate) fn record_ns(&mut self, v: u64) {
        let b = bucket_of(v);
        if self.counts.len() <= b {
            self.counts.resize(b + 1, 0);
        }
        self.counts[b] += 1;
        self.n += 1;
        self.sum_ns += u128::from(v);
        self.max_ns = self.max_ns.max(v);
    }

    pub(crate) fn merge(&mut self, other: &Hist) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub(crate) fn count(&self) -> u64 {
        self.n
    }

    /// The value at rank round((n-1)·p), as etcd's and most tools' nearest-rank rule.
    pub(crate) fn percentile(&self, p: f64) -> Duration {
        if self.n == 0 {
            return Duration::ZERO;
        }
        let rank = ((self.n - 1) as f64 * p.clamp(0.0, 1.0)).round() as u64;
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c;
            if cum > rank {
                return Duration::from_nanos(bucket_value(i).min(self.max_ns));
            }
        }
        Duration::from_nanos(self.max_ns)
    }

    pub(crate) fn p_ms(&self, p: f64) -> f64 {
        self.percentile(p).as_secs_f64() * 1e3
    }

    pub(crate) fn mean_ms(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        self.sum_ns as f64 / self.n as f64 / 1e6
    }

    pub(crate) fn max_ms(&self) -> f64 {
        self.max_ns as f64 / 1e6
    }

    /// Counts per power-of-two millisecond bucket (`< 0.125 ms`, `< 0.25 ms`, …), trimmed to the
    /// buckets between the first and last non-empty one: the text histogram's rows.
    pub(crate) fn ms_buckets(&self) -> Vec<(f64, u64)> {
        // Upper bounds in ms: 2^-3 .. 2^16 (65 s); anything slower lands in the last one.
        let bounds: Vec<f64> = (-3..=16).map(|e| 2f64.powi(e)).collect();
        let mut out: Vec<(f64, u64)> = bounds.iter().map(|&b| (b, 0)).collect();
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let ms = bucket_value(i) as f64 / 1e6;
            let slot = bounds
                .iter()
                .position(|&b| ms < b)
                .unwrap_or(bounds.len() - 1);
            out[slot].1 += c;
        }
        let first = out.iter().position(|&(_, c)| c > 0);
        let last = out.iter().rposition(|&(_, c)| c > 0);
        match (first, last) {
            (Some(f), Some(l)) => out[f..=l].to_vec(),
            _ => Vec::new(),
        }
    }
}

/// Latencies and errors of one kind of request (e.g. `list`, `update`).
#[derive(Clone, Debug, Default)]
pub(crate) struct KindStats {
    pub hist: Hist,
    pub errors: u64,
}

/// What one client task measured; merged into the run's totals.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    /// Latency of every successful op.
    pub ops: Hist,
    pub errors: u64,
    pub first_error: Option<String>,
    pub kinds: BTreeMap<&'static str, KindStats>,
}

impl Recorder {
    /// Records one request of `kind` (sub-requests of an op, or the op itself).
    pub(crate) fn kind(&mut self, kind: &'static str, d: Duration, ok: bool) {
        let k = self.kinds.entry(kind).or_default();
        if ok {
            k.hist.record(d);
        } else {
            k.errors += 1;
        }
    }

    pub(crate) fn op(&mut self, d: Duration, r: anyhow::Result<()>) {
        match r {
            Ok(()) => self.ops.record(d),
            Err(e) => self.error(&e),
        }
    }

    pub(crate) fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }

    pub(crate) fn merge(&mut self, o: Recorder) {
        self.ops.merge(&o.ops);
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        for (k, s) in o.kinds {
            let e = self.kinds.entry(k).or_default();
            e.hist.merge(&s.hist);
            e.errors += s.errors;
        }
    }
}

/// One run of one workload against one endpoint set.
#[derive(Clone, Debug)]
pub(crate) struct Report {
    pub workload: String,
    pub clients: usize,
    /// Ops attempted (for watch workloads: puts).
    pub total: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Successful ops per second (for watch workloads: events delivered per second).
    pub ops_per_sec: f64,
    /// Latency of successful ops (for watch workloads: put→event).
    pub latency: Hist,
    pub kinds: BTreeMap<String, KindStats>,
    pub first_error: Option<String>,
    /// Workload-specific numbers, copied into the JSON line as they are.
    pub extra: serde_json::Map<String, Value>,
    /// A workload-specific line for the text summary.
    pub note: Option<String>,
    /// CPU seconds the server's processes spent over the run (setup included), when the bench
    /// started them itself (`--compare`): what a request costs the server, whatever share of
    /// the machine the client took.
    pub server_cpu_seconds: Option<f64>,
}

impl Report {
    pub(crate) fn from_recorder(
        workload: String,
        clients: usize,
        total: u64,
        seconds: f64,
        rec: Recorder,
    ) -> Report {
        let ok = rec.ops.count();
        Report {
            workload,
            clients,
            total,
            errors: rec.errors,
            seconds,
            ops_per_sec: if seconds > 0.0 {
                ok as f64 / seconds
            } else {
                0.0
            },
            latency: rec.ops,
            kinds: rec
                .kinds
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            first_error: rec.first_error,
            extra: serde_json::Map::new(),
            note: None,
            server_cpu_seconds: None,
        }
    }

    /// A run that could not even start (e.g. its preload failed): every op counts as an error.
    pub(crate) fn failed(
        workload: String,
        clients: usize,
        total: u64,
        e: &anyhow::Error,
    ) -> Report {
        let mut rec = Recorder::default();
        rec.error(e);
        let mut r = Report::from_recorder(workload, clients, total, 0.0, rec);
        r.errors = total.max(1);
        r
    }

    pub(crate) fn p_ms(&self, p: f64) -> f64 {
        self.latency.p_ms(p)
    }

    /// Server CPU microseconds per successful op (per event delivered, for watch workloads).
    pub(crate) fn server_cpu_us_per_op(&self) -> Option<f64> {
        let ops = self.ops_per_sec * self.seconds;
        self.server_cpu_seconds
            .filter(|_| ops >= 1.0)
            .map(|cpu| cpu * 1e6 / ops)
    }

    /// The JSON line: the fields scripts already read first, then per-kind latencies and extras.
    pub(crate) fn to_json(&self) -> Value {
        let mut v = json!({
            "workload": self.workload,
            "clients": self.clients,
            "total": self.total,
            "errors": self.errors,
            "seconds": self.seconds,
            "ops_per_sec": self.ops_per_sec,
            "p50_ms": self.p_ms(0.50),
            "p90_ms": self.p_ms(0.90),
            "p99_ms": self.p_ms(0.99),
            "p999_ms": self.p_ms(0.999),
            "mean_ms": self.latency.mean_ms(),
            "max_ms": self.latency.max_ms(),
            "server_cpu_seconds": self.server_cpu_seconds,
            "server_cpu_us_per_op": self.server_cpu_us_per_op(),
        });
        if let Value::Object(m) = &mut v {
            if !self.kinds.is_empty() {
                let kinds: serde_json::Map<String, Value> = self
                    .kinds
                    .iter()
                    .map(|(k, s)| {
                        (
                            k.clone(),
                            json!({
                                "count": s.hist.count(),
                                "errors": s.errors,
                                "p50_ms": s.hist.p_ms(0.50),
                                "p99_ms": s.hist.p_ms(0.99),
                                "max_ms": s.hist.max_ms(),
                            }),
                        )
                    })
                    .collect();
                m.insert("per_op".into(), Value::Object(kinds));
            }
            if let Some(e) = &self.first_error {
                m.insert("first_error".into(), Value::String(e.clone()));
            }
            for (k, x) in &self.extra {
                m.insert(k.clone(), x.clone());
            }
        }
        v
    }

    /// The one-screen summary.
    pub(crate) fn render_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} ops ({} clients) in {:.2}s = {:.0} ops/s, errors {}",
            self.workload, self.total, self.clients, self.seconds, self.ops_per_sec, self.errors
        );
        let _ = writeln!(
            s,
            "  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  mean {:.3}  max {:.3}",
            self.p_ms(0.50),
            self.p_ms(0.90),
            self.p_ms(0.99),
            self.p_ms(0.999),
            self.latency.mean_ms(),
            self.latency.max_ms(),
        );
        if let Some(n) = &self.note {
            let _ = writeln!(s, "  {n}");
        }
        if let Some(e) = &self.first_error {
            let _ = writeln!(s, "  first error: {e}");
        }
        if !self.kinds.is_empty() {
            let _ = writeln!(
                s,
                "  {:<14} {:>8} {:>7} {:>9} {:>9} {:>9}",
                "op", "count", "errors", "p50 ms", "p99 ms", "max ms"
            );
            for (k, st) in &self.kinds {
                let _ = writeln!(
                    s,
                    "  {:<14} {:>8} {:>7} {:>9.3} {:>9.3} {:>9.3}",
                    k,
                    st.hist.count(),
                    st.errors,
                    st.hist.p_ms(0.50),
                    st.hist.p_ms(0.99),
                    st.hist.max_ms()
                );
            }
        }
        s.push_str(&text_histogram(&self.latency.ms_buckets(), 40));
        s
    }
}

/// A small text histogram: one row per bucket, `#` bars scaled to `width` for the largest.
pub(crate) fn text_histogram(buckets: &[(f64, u64)], width: usize) -> String {
    let max = buckets.iter().map(|&(_, c)| c).max().unwrap_or(0);
    if max == 0 {
        return String::new();
    }
    let mut s = String::new();
    for &(bound, c) in buckets {
        let bar = (c as f64 / max as f64 * width as f64).ceil() as usize;
        let _ = writeln!(
            s,
            "  < {:>9} ms {:>9} |{}",
            fmt_bound(bound),
            c,
            "#".repeat(bar)
        );
    }
    s
}

fn fmt_bound(b: f64) -> String {
    if b < 1.0 {
        format!("{b:.3}")
    } else {
        format!("{b:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut prev = 0;
        for v in [
            0u64,
            1,
            255,
            256,
            257,
            511,
            512,
            1_000,
            123_456,
            1 << 40,
            u64::MAX / 2,
        ] {
            let b = bucket_of(v);
            assert!(b >= prev);
            prev = b;
            let r = bucket_value(b);
            let err = (r as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.01, "{v} -> {r}");
        }
        for v in 0..100_000u64 {
            assert!(bucket_of(v + 1) - bucket_of(v) <= 1);
        }
    }

    #[test]
    fn percentiles_follow_nearest_rank() {
        let mut h = Hist::default();
        for v in 1..=1000u64 {
            h.record_ns(v * 1_000_000);
        }
        assert!((h.p_ms(0.5) - 500.0).abs() < 5.0, "{}", h.p_ms(0.5));
        assert!((h.p_ms(0.999) - 999.0).abs() < 8.0, "{}", h.p_ms(0.999));
        assert!((h.p_ms(1.0) - 1000.0).abs() < 0.001);
        assert!((h.mean_ms() - 500.5).abs() < 1e-9);
        assert_eq!(Hist::default().p_ms(0.99), 0.0);
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let (mut a, mut b, mut all) = (Hist::default(), Hist::default(), Hist::default());
        for v in 0..5000u64 {
            let ns = v * 7919 % 10_000_000;
            if v % 3 == 0 { &mut a } else { &mut b }.record_ns(ns);
            all.record_ns(ns);
        }
        a.merge(&b);
        assert_eq!(a.count(), all.count());
        for p in [0.1, 0.5, 0.9, 0.99, 0.999] {
            assert_eq!(a.percentile(p), all.percentile(p));
        }
        assert_eq!(a.max_ms(), all.max_ms());
    }

    #[test]
    fn ms_buckets_trim_and_place_values() {
        let mut h = Hist::default();
        h.record(Duration::from_micros(300)); // < 0.5 ms
        h.record(Duration::from_micros(400)); // < 0.5 ms
        h.record(Duration::from_millis(3)); // < 4 ms
        let b = h.ms_buckets();
        assert_eq!(b.first(), Some(&(0.5, 2)));
        assert_eq!(b.last(), Some(&(4.0, 1)));
        assert_eq!(b.iter().map(|&(_, c)| c).sum::<u64>(), 3);
        assert!(Hist::default().ms_buckets().is_empty());
    }

    #[test]
    fn text_histogram_scales_bars() {
        let s = text_histogram(&[(1.0, 10), (2.0, 5), (4.0, 0)], 10);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].ends_with(&"#".repeat(10)));
        assert!(lines[1].ends_with("|#####"));
        assert!(lines[2].ends_with('|'));
    }

    #[test]
    fn report_json_keeps_script_fields() {
        let mut rec = Recorder::default();
        rec.op(Duration::from_millis(2), Ok(()));
        rec.op(Duration::from_millis(2), Err(anyhow::anyhow!("boom")));
        rec.kind("get", Duration::from_millis(1), true);
        let r = Report::from_recorder("put".into(), 4, 2, 0.5, rec);
        let v = r.to_json();
        for f in [
            "workload",
            "clients",
            "total",
            "errors",
            "seconds",
            "ops_per_sec",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "p999_ms",
        ] {
            assert!(v.get(f).is_some(), "missing {f}");
        }
        assert_eq!(v["errors"], 1);
        assert_eq!(v["ops_per_sec"], 2.0);
        assert_eq!(v["first_error"], "boom");
        assert_eq!(v["per_op"]["get"]["count"], 1);
    }
}
