#!/usr/bin/env bash
# The three-member cluster of docker-compose.yml, end to end, in containers: the offline image
# build (scripts/docker-image.sh), `up` until all three members are healthy, a write through one
# member read linearizably through another, `etcdctl move-leader` to a follower, the leader
# killed (SIGKILL) while writes go on through the other two, the old leader started again and
# caught up (its serializable reads, answered from its own state, return the latest value), then
# `down -v`.
#
# Everything it creates belongs to a compose project of its own (unique name, its own network
# and volumes), removed on exit whatever happens. Client ports are free loopback ports it picks,
# so it runs beside other tests and a developer's own `docker compose up`.
#
# Environment: FETCD_IMAGE (default fetcd:local), FETCD_COMPOSE_SKIP_BUILD=1 (use the image as
# it is), FETCD1_PORT/FETCD2_PORT/FETCD3_PORT (host ports), ETCDCTL (default etcdctl),
# FETCD_COMPOSE_KEEP=1 (leave the cluster running for inspection).
set -euo pipefail
cd "$(dirname "$0")/../.."

started=$SECONDS
step_started=$SECONDS
step() {
  echo "==> [compose +$((SECONDS - started))s] $*"
  step_started=$SECONDS
}
step_done() { echo "    ($((SECONDS - step_started))s)"; }
fail() {
  echo "compose-test: FAILED: $*" >&2
  exit 1
}

# Compose v2 (the docker plugin) if present, else v1's docker-compose.
if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
else
  fail "neither 'docker compose' nor 'docker-compose' is installed"
fi
docker info >/dev/null 2>&1 || fail "the Docker engine does not answer (docker info)"

export FETCD_IMAGE=${FETCD_IMAGE:-fetcd:local}
etcdctl_bin=${ETCDCTL:-etcdctl}
command -v "$etcdctl_bin" >/dev/null 2>&1 || fail "$etcdctl_bin not found (apt-get install etcd-client)"
export ETCDCTL_API=3

project="fetcdci$$x${RANDOM}"
compose() { "${compose_cmd[@]}" --project-name "$project" --file docker-compose.yml "$@"; }

# A loopback port nothing listens on (nothing answers a connection to it).
used_ports=" "
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 20000))
    case "$used_ports" in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      used_ports+="$p "
      echo "$p"
      return 0
    fi
  done
  fail "no free loopback port found"
}
export FETCD1_PORT=${FETCD1_PORT:-$(free_port)}
used_ports+="$FETCD1_PORT "
export FETCD2_PORT=${FETCD2_PORT:-$(free_port)}
used_ports+="$FETCD2_PORT "
export FETCD3_PORT=${FETCD3_PORT:-$(free_port)}
export FETCD_HOST_IP=127.0.0.1
export FETCD_CLUSTER_TOKEN="$project"
ports=("" "$FETCD1_PORT" "$FETCD2_PORT" "$FETCD3_PORT")

cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "---- compose ps / logs (test failed with status $rc) ----" >&2
    compose ps >&2 || true
    compose logs --no-color --tail=80 >&2 || true
  fi
  if [ "${FETCD_COMPOSE_KEEP:-0}" = 1 ]; then
    echo "FETCD_COMPOSE_KEEP=1: leaving project $project running; remove it with:" >&2
    echo "  ${compose_cmd[*]} -p $project down -v" >&2
  else
    compose down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  fi
  echo "==> [compose] finished in $((SECONDS - started))s with status $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ctl() {
  local port=$1
  shift
  "$etcdctl_bin" --endpoints="http://127.0.0.1:$port" --dial-timeout=2s --command-timeout=5s "$@"
}
# The value of a key through member $1 (extra flags, e.g. --consistency=s, after the key).
value_on() {
  local n=$1 key=$2
  shift 2
  ctl "${ports[$n]}" get "$key" --print-value-only "$@"
}
container() { compose ps -q "fetcd$1"; }
health() {
  local id
  id=$(container "$1")
  [ -n "$id" ] || {
    echo missing
    return
  }
  docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id"
}
# Waits until members $@ report healthy (their healthcheck: a linearizable Range).
wait_healthy() {
  local deadline=$((SECONDS + 90)) n all
  while :; do
    all=1
    for n in "$@"; do
      [ "$(health "$n")" = healthy ] || all=0
    done
    [ "$all" = 1 ] && return 0
    if [ "$SECONDS" -ge "$deadline" ]; then
      for n in "$@"; do echo "fetcd$n: $(health "$n")" >&2; done
      fail "members $* not healthy within 90s"
    fi
    sleep 1
  done
}
# The member whose latest leadership line is "lessor promoted" (the leader starts keeping lease
# deadlines once it leads and has applied every earlier term; it logs "lessor demoted" when it
# stops leading). Only members $@ are considered. Prints nothing unless exactly one qualifies.
leader_by_log() {
  local n last found=()
  for n in "$@"; do
    last=$(docker logs "$(container "$n")" 2>&1 | grep -aoE 'lessor (promoted|demoted)' | tail -n 1 || true)
    [ "$last" = "lessor promoted" ] && found+=("$n")
  done
  [ ${#found[@]} -eq 1 ] && echo "${found[0]}"
  return 0
}

# ---------------------------------------------------------------------------------------------
if [ "${FETCD_COMPOSE_SKIP_BUILD:-0}" = 1 ]; then
  step "image: using $FETCD_IMAGE as it is (FETCD_COMPOSE_SKIP_BUILD=1)"
  docker image inspect "$FETCD_IMAGE" >/dev/null || fail "$FETCD_IMAGE does not exist"
else
  step "image: scripts/docker-image.sh -> $FETCD_IMAGE"
  ./scripts/docker-image.sh
  step_done
fi

step "up: project $project, client ports $FETCD1_PORT $FETCD2_PORT $FETCD3_PORT"
compose up -d --no-build
wait_healthy 1 2 3
step_done

step "write through fetcd1, linearizable read through fetcd3"
ctl "$FETCD1_PORT" put /compose/k v0 >/dev/null
[ "$(value_on 3 /compose/k)" = v0 ] || fail "fetcd3 does not read v0 written through fetcd1"
# Every member answers, with the same cluster id (etcdctl -w json shows the response header).
cluster_ids=$(for n in 1 2 3; do ctl "${ports[$n]}" get /compose/k -w json | grep -oE '"cluster_id":[0-9]+'; done | sort -u)
[ "$(wc -l <<<"$cluster_ids")" = 1 ] || fail "members disagree on the cluster id: $cluster_ids"
step_done

# etcdctl 3.4's per-endpoint commands send the endpoint as HTTP/2 :authority; give them host:port
# (see README, Maintenance).
all="127.0.0.1:$FETCD1_PORT,127.0.0.1:$FETCD2_PORT,127.0.0.1:$FETCD3_PORT"
mctl() { "$etcdctl_bin" --endpoints="$all" --dial-timeout=2s --command-timeout=5s "$@"; }

step "etcdctl: member list, endpoint health/status, alarm list, defrag, snapshot save; /health"
# Members publish their names and client URLs once a leader is there.
deadline=$((SECONDS + 30))
until [ "$(ctl "$FETCD1_PORT" member list | grep -c ', started, fetcd[123], http://fetcd[123]:2380, http://fetcd[123]:2379, false$')" = 3 ]; do
  [ "$SECONDS" -lt "$deadline" ] || fail "member list: $(ctl "$FETCD1_PORT" member list)"
  sleep 0.5
done
health_out=$(mctl endpoint health 2>&1) || fail "endpoint health: $health_out"
[ "$(grep -c 'is healthy: successfully committed proposal' <<<"$health_out")" = 3 ] || fail "endpoint health: $health_out"
status=$(mctl endpoint status -w json) || fail "endpoint status failed"
leaders=$(grep -oE '"leader":[0-9]+' <<<"$status" | sort -u | wc -l)
[ "$leaders" = 1 ] || fail "members disagree on the leader: $status"
[ "$(grep -oE '"version":"3\.5\.[0-9]+"' <<<"$status" | wc -l)" = 3 ] || fail "endpoint status version: $status"
[ -z "$(ctl "$FETCD1_PORT" alarm list)" ] || fail "alarm list is not empty"
defrag_out=$(mctl defrag 2>&1) || fail "defrag: $defrag_out"
[ "$(grep -c '^Finished defragmenting etcd member' <<<"$defrag_out")" = 3 ] || fail "defrag: $defrag_out"
snap=$(mktemp -d)/snap.db
ctl "$FETCD2_PORT" snapshot save "$snap" >/dev/null 2>&1 || fail "snapshot save"
[ -s "$snap" ] || fail "snapshot file is empty"
curl -fsS "http://127.0.0.1:$FETCD3_PORT/health" | grep -q '"health":"true"' || fail "/health of fetcd3"
step_done

step "etcdctl move-leader: hand leadership to a follower"
# `endpoint status` lines: endpoint, id (hex), version, size, is-leader, is-learner, ...
leader_hex() { mctl endpoint status | awk -F', ' '$5 == "true" { print $2 }'; }
status=$(mctl endpoint status) || fail "endpoint status failed"
from_hex=$(awk -F', ' '$5 == "true" { print $2; exit }' <<<"$status")
to_hex=$(awk -F', ' '$5 == "false" { print $2; exit }' <<<"$status")
[ -n "$from_hex" ] && [ -n "$to_hex" ] || fail "no leader and follower in: $status"
move_out=$(mctl move-leader "$to_hex" 2>&1) || fail "move-leader: $move_out"
[ "$move_out" = "Leadership transferred from $from_hex to $to_hex" ] || fail "move-leader: $move_out"
deadline=$((SECONDS + 10))
until [ "$(leader_hex)" = "$to_hex" ]; do
  [ "$SECONDS" -lt "$deadline" ] || fail "leader is $(leader_hex), not $to_hex, after move-leader"
  sleep 0.5
done
ctl "$FETCD1_PORT" put /compose/moved yes >/dev/null || fail "write after move-leader"
[ "$(value_on 2 /compose/moved)" = yes ] || fail "fetcd2 misses the write after move-leader"
echo "    leadership moved from $from_hex to $to_hex"
step_done

step "find the leader"
leader=""
deadline=$((SECONDS + 30))
while [ -z "$leader" ]; do
  leader=$(leader_by_log 1 2 3)
  [ -n "$leader" ] && break
  [ "$SECONDS" -lt "$deadline" ] || fail "no single member logged 'lessor promoted' within 30s"
  sleep 1
done
survivors=()
for n in 1 2 3; do [ "$n" = "$leader" ] || survivors+=("$n"); done
echo "    leader fetcd$leader, followers fetcd${survivors[0]} fetcd${survivors[1]}"

step "kill the leader fetcd$leader (SIGKILL); writes go on through fetcd${survivors[0]} and fetcd${survivors[1]}"
compose kill -s SIGKILL "fetcd$leader" >/dev/null 2>&1
state=$(docker inspect -f '{{.State.Status}}' "$(container "$leader")")
[ "$state" = exited ] || fail "fetcd$leader is $state after the kill, not exited"
# The first writes may wait for (or fail during) the election of a new leader; retry until one
# succeeds, then every further write must succeed at once.
deadline=$((SECONDS + 30))
until ctl "${ports[${survivors[0]}]}" put /compose/k v1 >/dev/null 2>&1; do
  [ "$SECONDS" -lt "$deadline" ] || fail "no write succeeded within 30s of killing the leader"
  sleep 0.5
done
echo "    first write after the kill accepted $((SECONDS - step_started))s after it"
last=1
for i in $(seq 2 40); do
  n=${survivors[$((i % 2))]}
  ctl "${ports[$n]}" put /compose/k "v$i" >/dev/null || fail "write v$i through fetcd$n failed"
  ctl "${ports[$n]}" put "/compose/seq/$i" "$i" >/dev/null || fail "write /compose/seq/$i through fetcd$n failed"
  last=$i
done
for n in "${survivors[@]}"; do
  got=$(value_on "$n" /compose/k)
  [ "$got" = "v$last" ] || fail "fetcd$n reads $got, not v$last"
done
new_leader=$(leader_by_log "${survivors[@]}")
echo "    $((last * 2 - 1)) writes accepted by the two survivors; new leader fetcd${new_leader:-?}"
step_done

step "start fetcd$leader again; it catches up"
compose start "fetcd$leader" >/dev/null 2>&1
deadline=$((SECONDS + 60))
while :; do
  got=$(value_on "$leader" /compose/k --consistency=s 2>/dev/null || true)
  [ "$got" = "v$last" ] && break
  [ "$SECONDS" -lt "$deadline" ] || fail "fetcd$leader still reads '${got}' (serializable), not v$last, 60s after restarting"
  sleep 0.5
done
count=$(ctl "${ports[$leader]}" get /compose/seq/ --prefix --keys-only --consistency=s -w json | grep -oE '"count":[0-9]+' | cut -d: -f2)
[ "$count" = "$((last - 1))" ] || fail "fetcd$leader has $count of $((last - 1)) keys under /compose/seq/"
echo "    fetcd$leader serves v$last and all $count sequence keys from its own state"
# And it is a full member again: a write through it is read back through the others.
ctl "${ports[$leader]}" put /compose/k after-restart >/dev/null || fail "write through the restarted fetcd$leader failed"
for n in "${survivors[@]}"; do
  [ "$(value_on "$n" /compose/k)" = after-restart ] || fail "fetcd$n misses the write through fetcd$leader"
done
wait_healthy 1 2 3
step_done

step "endpoint hashkv: one hash on all three members"
deadline=$((SECONDS + 30))
while :; do
  hashes=$(mctl endpoint hashkv -w json | grep -oE '"hash":[0-9]+' | sort -u)
  [ "$(wc -l <<<"$hashes")" = 1 ] && break
  [ "$SECONDS" -lt "$deadline" ] || fail "hashes differ: $hashes"
  sleep 0.5
done
step_done

step "down -v"
compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1
left=$(docker volume ls -q --filter "label=com.docker.compose.project=$project" | wc -l)
[ "$left" = 0 ] || fail "$left volumes of $project left after down -v"
step_done
echo "compose-test: OK (three members, leader fetcd$leader killed and caught up)"
