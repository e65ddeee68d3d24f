#!/usr/bin/env bash
# Runs fetcd's whole test suite on a fresh machine. It installs what the tests need from Debian —
# real etcd and etcdctl (the reference for differential tests) and protoc (the third-party
# etcd-client crate the tests use compiles its protos with it; fetcd's own build vendors protoc)
# — then checks formatting and lints, builds once and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/debian.sh
need_commands etcd:etcd-server etcdctl:etcd-client "$PROTOC"
# Debian's package may start its own etcd on the default ports; the tests start their own
# servers on free loopback ports, so a packaged one only costs memory.
as_root systemctl stop etcd >/dev/null 2>&1 || true

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
  # Doc examples first, so the run closes on nextest's summary of every test.
  cargo test --workspace --locked --doc
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

# ---------------------------------------------------------------------------------------------
# The docker-compose cluster: the offline image build (a release build of fetcd-server, then a
# FROM-scratch image), three members in containers, a leader killed and restarted. It needs a
# Docker engine with compose (v2 plugin or v1 docker-compose); without the docker command at all
# it is skipped, loudly. Anything else missing fails the run.
echo "==> compose cluster test (tests/compose/compose-test.sh)"
if command -v docker >/dev/null 2>&1; then
  ./tests/compose/compose-test.sh
else
  echo "##############################################################################" >&2
  echo "## SKIPPED: tests/compose/compose-test.sh — no 'docker' command on this machine" >&2
  echo "##############################################################################" >&2
fi
