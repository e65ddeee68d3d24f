#!/usr/bin/env bash
# Records pgo/fetcd.profdata, the profile optimised builds use (pgo/README.md): builds an
# instrumented fetcd, runs the benchmark's workloads against one member of it on loopback,
# and merges the counts that member wrote at its clean stop. Run it after changes to a hot
# path, before benchmarking, and commit the new profile. Takes about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/debian.sh

llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
# The merge tool has to understand this rustc's raw profiles: the same LLVM major version.
need_commands "$PROTOC" "llvm-profdata-$llvm:llvm-$llvm"

raw=$(mktemp -d /tmp/fetcd-pgo.XXXXXX)
data=$(mktemp -d /tmp/fetcd-pgo-data.XXXXXX)
member=""
cleanup() {
  if [ -n "$member" ]; then kill -KILL "$member" 2>/dev/null || true; fi
  rm -rf "$raw" "$data"
}
trap cleanup EXIT

echo "==> instrumented build (target/pgo-generate)"
# The workspace's default members, as `cargo run --release --bin fetcd`, bench-compare.sh and
# docker-image.sh build them: the profile names functions by their symbols, which change with
# the features a selection unifies into shared dependencies (tokio, hyper, ...).
FETCD_PGO="generate:$raw/other" CARGO_TARGET_DIR=target/pgo-generate \
  cargo build --release --locked
bench=target/pgo-generate/release/fetcd-bench
# The bench client is instrumented too; its counts are not kept.
export LLVM_PROFILE_FILE="$raw/other/%p.profraw"

port_client=23979
port_peer=23980
LLVM_PROFILE_FILE="$raw/fetcd-%p.profraw" target/pgo-generate/release/fetcd \
  --data-dir "$data/member" \
  --listen-client-urls "http://127.0.0.1:$port_client" \
  --advertise-client-urls "http://127.0.0.1:$port_client" \
  --listen-peer-urls "http://127.0.0.1:$port_peer" \
  --initial-advertise-peer-urls "http://127.0.0.1:$port_peer" >"$data/member.log" 2>&1 &
member=$!
e=(--endpoints "http://127.0.0.1:$port_client")
for _ in $(seq 50); do
  "$bench" range "${e[@]}" --clients 1 --total 1 >/dev/null 2>&1 && break
  sleep 0.2
done

echo "==> workloads"
# The compare's standard cases, shorter: each code path they take is what is measured.
kv=(--key-size 16 --val-size 256 --key-space-size 100000)
"$bench" put "${e[@]}" --clients 1 --conns 1 --total 4000 "${kv[@]}"
"$bench" put "${e[@]}" --clients 1 --conns 1 --total 1000 --rate 1000 "${kv[@]}"
"$bench" put "${e[@]}" --clients 64 --total 30000 "${kv[@]}"
"$bench" txn-put "${e[@]}" --clients 64 --total 10000 "${kv[@]}"
"$bench" range "${e[@]}" --clients 64 --total 20000 --consistency l
"$bench" range "${e[@]}" --clients 64 --total 20000 --consistency s
"$bench" txn-mixed "${e[@]}" --clients 64 --total 10000
"$bench" watch "${e[@]}" --total 5000
"$bench" watch-latency "${e[@]}" --total 300
"$bench" lease-keepalive "${e[@]}" --total 20000
"$bench" lease-grant-revoke "${e[@]}" --total 5000
"$bench" kube "${e[@]}" --total 5000

# The counts are written when the member exits cleanly.
kill -TERM "$member"
wait "$member"
member=""

echo "==> merging"
"llvm-profdata-$llvm" merge -o pgo/fetcd.profdata "$raw"/fetcd-*.profraw
echo "$llvm" > pgo/llvm-major
# Cargo does not track the profile: optimised builds made with the last one must go.
rm -rf "${CARGO_TARGET_DIR:-target}/release"
ls -l pgo/fetcd.profdata
