#!/usr/bin/env bash
# Runs fetcd's whole test suite on a fresh machine. It installs what the tests need — real etcd
# and etcdctl from Debian (the reference for differential tests); protoc is vendored by the
# build — then checks formatting and lints, builds once and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
  echo "==> installing etcd-server and etcd-client (reference server and etcdctl)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null
fi
# Debian's package may start its own etcd on the default ports; the tests start their own
# servers on free loopback ports, so a packaged one only costs memory.
as_root systemctl stop etcd >/dev/null 2>&1 || true

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi
