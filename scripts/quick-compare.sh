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
