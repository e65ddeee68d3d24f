#!/usr/bin/env bash
# A quick side-by-side of etcd and fetcd: `bench-compare.sh` with smaller totals and a smaller
# load (a few minutes on two cores). Extra arguments go to fetcd-bench and win over these.
set -euo pipefail
exec "$(dirname "$0")/bench-compare.sh" --scale 0.2 --load-keys 100000 "$@"
