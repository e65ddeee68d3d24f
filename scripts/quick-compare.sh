#!/usr/bin/env bash
# Quick side-by-side: the same fetcd-bench workloads against real etcd and fetcd, one member
# each, on loopback, each with its own temporary data dir. Informative only; the benchmark issue
# grows this into `fetcd-bench --compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${TOTAL:-20000}
if ! command -v etcd >/dev/null || ! command -v protoc >/dev/null; then
  apt-get update -qq && apt-get install -y -qq etcd-server etcd-client protobuf-compiler >/dev/null
fi
cargo build --release --locked -p fetcd-server -p fetcd-bench >/dev/null
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

etcd --name bench --data-dir "$tmp/etcd" --listen-client-urls http://127.0.0.1:32379 \
  --advertise-client-urls http://127.0.0.1:32379 --listen-peer-urls http://127.0.0.1:32380 \
  --initial-advertise-peer-urls http://127.0.0.1:32380 --initial-cluster bench=http://127.0.0.1:32380 \
  >"$tmp/etcd.log" 2>&1 &
pids+=($!)
target/release/fetcd --name bench --data-dir "$tmp/fetcd" --listen-client-urls http://127.0.0.1:42379 \
  >"$tmp/fetcd.log" 2>&1 &
pids+=($!)
sleep 3

run() { target/release/fetcd-bench "$@" --json; }
printf '%-28s %12s %12s %8s %10s %10s\n' workload etcd_ops/s fetcd_ops/s ratio etcd_p50ms fetcd_p50ms
for spec in "put --clients 1" "put --clients 64 --conns 8" "range --clients 64 --conns 8" "range --clients 64 --conns 8 --consistency s"; do
  # shellcheck disable=SC2086
  e=$(run $spec --total "$TOTAL" --endpoints http://127.0.0.1:32379)
  # shellcheck disable=SC2086
  f=$(run $spec --total "$TOTAL" --endpoints http://127.0.0.1:42379)
  python3 - "$spec" "$e" "$f" <<'PY'
import json, sys
spec, e, f = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"{spec:28s} {e['ops_per_sec']:12.0f} {f['ops_per_sec']:12.0f} {f['ops_per_sec']/e['ops_per_sec']:8.2f} {e['p50_ms']:10.2f} {f['p50_ms']:10.2f}")
PY
done

# Watch: put -> event latency at 100 puts/s, and event throughput. Each line sets its own
# --total (10,000 watchers x 20,000 puts would be 200M events).
echo
printf '%-52s %11s %11s %7s %9s %9s %7s\n' workload etcd_ev/s fetcd_ev/s ratio etcd_p99 fetcd_p99 p99x
for spec in \
  "watch-latency --watchers 1 --total 1000" \
  "watch-latency --watchers 100 --total 1000" \
  "watch-latency --watchers 100 --total 1000 --prefix" \
  "watch-latency --watchers 10000 --conns 10 --total 200 --grace 30" \
  "watch-latency --watchers 10000 --conns 10 --total 200 --grace 30 --prefix" \
  "watch --watchers 1 --total 20000" \
  "watch --watchers 100 --total 5000" \
  "watch --watchers 10000 --conns 10 --total 200 --grace 30"; do
  # shellcheck disable=SC2086
  e=$(target/release/fetcd-bench $spec --json --endpoints http://127.0.0.1:32379)
  # shellcheck disable=SC2086
  f=$(target/release/fetcd-bench $spec --json --endpoints http://127.0.0.1:42379)
  python3 - "$spec" "$e" "$f" <<'PY'
import json, sys
spec, e, f = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ev = lambda r: r.get("events_per_sec", r["ops_per_sec"])
bad = [n for n, r in (("etcd", e), ("fetcd", f)) if r.get("missing_events", 0) or r.get("order_errors", 0) or r.get("revision_mismatches", 0)]
note = "  ERRORS: " + ",".join(bad) if bad else ""
print(f"{spec:52s} {ev(e):11.0f} {ev(f):11.0f} {ev(f)/ev(e):7.2f} {e['p99_ms']:9.2f} {f['p99_ms']:9.2f} {f['p99_ms']/max(e['p99_ms'],1e-9):7.2f}{note}")
PY
done
