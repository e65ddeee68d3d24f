#!/usr/bin/env bash
# Builds fetcd and fetcd-bench in release mode, then runs `fetcd-bench --compare`: real etcd
# (installed from Debian when missing) and fetcd side by side on this machine, every standard
# workload A B A B for --rounds, ratios, targets and an SVG chart. Extra arguments go to
# fetcd-bench, e.g. `--scale 0.2 --load-keys 100000` for a quick run, `--nodes 3`,
# `--only put-64,kube`, `--chart out.svg`, `--json`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/debian.sh
need_commands "$PROTOC"
# The workspace's default members (fetcd, fetcd-bench, ...), as the README's start command and the
# optimisation profile's recording build them (pgo/README.md).
cargo build --release --locked
exec "${CARGO_TARGET_DIR:-target}/release/fetcd-bench" --compare "$@"
