# Sourced by the scripts here: installs from Debian what a fresh machine lacks.
#
#   need_commands protoc:protobuf-compiler etcd:etcd-server ...
#
# installs, in one apt-get run, the package of every command not on PATH.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_commands() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# The workspace's default members include fetcd-bench, whose etcd-client dependency compiles
# its protos with a system protoc (fetcd's own protos use a vendored one).
PROTOC=protoc:protobuf-compiler
