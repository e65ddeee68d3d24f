#!/usr/bin/env bash
# Builds fetcd's runtime image offline, from what is on this machine only: CI machines have a
# Docker engine but no registry, so no base image (rust, debian, distroless) can be pulled.
#
# It builds the release binaries (fetcd and the fetcd-health healthcheck), assembles a root
# filesystem holding them plus exactly the shared libraries `ldd` lists for them (the dynamic
# loader included) and an nsswitch.conf, and builds docker/Dockerfile.local (`FROM scratch`) on
# it. The result matches the top-level Dockerfile's image (binaries on a glibc runtime), which
# machines with a registry can build instead.
#
# Usage: scripts/docker-image.sh [--no-cargo]
#   FETCD_IMAGE   tag to build (default fetcd:local, what docker-compose.yml runs)
#   --no-cargo    use the binaries already in the target directory, do not run cargo
set -euo pipefail
cd "$(dirname "$0")/.."

image=${FETCD_IMAGE:-fetcd:local}
run_cargo=1
for arg in "$@"; do
  case "$arg" in
    --no-cargo) run_cargo=0 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "docker-image.sh: unknown argument $arg" >&2
      exit 2
      ;;
  esac
done

target_dir=${CARGO_TARGET_DIR:-target}
if [ "$run_cargo" = 1 ]; then
  . scripts/debian.sh
  need_commands "$PROTOC"
  # The workspace's default members, as the README's start command builds them: the same
  # selection the optimisation profile was recorded from (pgo/README.md).
  echo "==> cargo build --release --locked"
  cargo build --release --locked
fi
bins=("$target_dir/release/fetcd" "$target_dir/release/fetcd-health")
for b in "${bins[@]}"; do
  [ -x "$b" ] || {
    echo "docker-image.sh: $b is missing (build it or drop --no-cargo)" >&2
    exit 1
  }
done

ctx=$(mktemp -d "${TMPDIR:-/tmp}/fetcd-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/var/lib/fetcd" "$root/tmp"
chmod 1777 "$root/tmp"
cp "${bins[@]}" "$root/usr/local/bin/"

# Every shared object the binaries load, at the path the loader will look for it: `ldd` prints
# `name => /path (addr)` for libraries and `/path (addr)` for the loader; vdso has no file.
mapfile -t libs < <(
  for b in "${bins[@]}"; do
    ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
  done | sort -u
)
if [ ${#libs[@]} -eq 0 ]; then
  echo "docker-image.sh: ldd found no shared libraries (a static build needs no script)" >&2
fi
for lib in "${libs[@]}"; do
  # -L: copy the file a symlink (e.g. /lib64/ld-linux-x86-64.so.2) points to, under its name.
  cp -L --parents "$lib" "$root/"
done
# Names resolve through /etc/hosts, then DNS (Docker's resolver for the other members).
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
cp docker/Dockerfile.local "$ctx/Dockerfile"

echo "==> docker build -t $image (FROM scratch: ${#bins[@]} binaries, ${#libs[@]} libraries)"
printf '    %s\n' "${libs[@]}"
docker build --quiet -t "$image" "$ctx" >/dev/null
docker image ls "$image"
