#!/usr/bin/env bash
# Store-and-forward benchmark (issue 7) on this machine, real parts only: mosquitto, the release
# daemon with a fresh state directory, examples/loadgen over MLLP, an MQTT subscriber.
#
#   ./scripts/bench-outbox.sh [SUSTAINED_N] [BACKLOG_N] [CONNECTIONS]
#        defaults:               100000        100000       8
#
# 1. sustained: SUSTAINED_N ADT^A01 over CONNECTIONS MLLP connections, end to end (MLLP in ->
#    map -> validate -> sign -> durable outbox -> MQTT QoS 1 -> subscriber); loadgen prints the
#    ACK rate and the end-to-end rate (first send to last Bundle at its subscriber); the daemon's
#    peak RSS (VmHWM) is read from /proc.
# 2. backlog drain: the broker is down while BACKLOG_N messages are ACKed, mapped and signed
#    into the outbox; then the broker starts and the time until a subscriber has every Bundle is
#    the drain rate.
set -euo pipefail
cd "$(dirname "$0")/.."
SUSTAINED="${1:-100000}"
BACKLOG="${2:-100000}"
CONN="${3:-8}"
./scripts/test-deps.sh >/dev/null
cargo build --release --locked --bin hl7-edge --example loadgen 2>&1 | tail -1
target="${CARGO_TARGET_DIR:-target}"
# The daemon runs as systemd/hl7-edge.service runs it (see the comment there on mimalloc's eager
# commit, which otherwise adds ~20 MiB of committed but unused arena to the peak RSS).
export MIMALLOC_ARENA_EAGER_COMMIT=0
bin="$target/release/hl7-edge"
loadgen="$target/release/examples/loadgen"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
daemon=""; broker=""; sub=""
cleanup() {
  for p in $sub $daemon $broker; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_broker() { # port
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 0\n' "$1" > "$work/mosquitto.conf"
  /usr/sbin/mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
  broker=$!
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && break; sleep 0.05; done
}

start_daemon() { # name mllp_port mqtt_port
  mkdir -p "$work/$1/adapters"
  printf 'name = "bench"\n[transport]\nkind = "mllp"\nbind = "127.0.0.1:%s"\n' "$2" > "$work/$1/adapters/bench.toml"
  printf 'state_dir = "%s"\nadapters_dir = "%s"\n[site]\nods_code = "RRV"\nappliance_id = "bench"\n[mqtt]\nurl = "mqtt://127.0.0.1:%s"\nreconnect_initial_ms = 100\nreconnect_max_secs = 1\nmax_inflight = 256\n[log]\nlevel = "warn"\n' \
    "$work/$1/state" "$work/$1/adapters" "$3" > "$work/$1/config.toml"
  "$bin" run --config "$work/$1/config.toml" 2>"$work/$1/daemon.log" &
  daemon=$!
  for _ in $(seq 200); do (echo > /dev/tcp/127.0.0.1/$2) 2>/dev/null && break; sleep 0.05; done
}

stats() { "$bin" outbox stats --json --config "$work/$1/config.toml"; }
jfield() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "disk: $(df -h "$work" | awk 'NR==2 {print $1, $2}')"

# --- 1. sustained ---------------------------------------------------------------------------
mport=$(free_port); start_broker "$mport"
lport=$(free_port); start_daemon sustained "$lport" "$mport"
echo "== sustained: $SUSTAINED ADT^A01 over $CONN connections, QoS 1 =="
"$loadgen" --addr "127.0.0.1:$lport" -n "$SUSTAINED" -c "$CONN" \
  --mqtt "127.0.0.1:$mport" --topic 'hl7-edge/bench/#'
echo "daemon peak RSS (VmHWM): $(( $(awk '/VmHWM/ {print $2}' /proc/$daemon/status) / 1024 )) MiB"
kill -TERM "$daemon"; wait "$daemon" || true; daemon=""
kill "$broker"; wait "$broker" 2>/dev/null || true; broker=""

# --- 2. backlog drain -------------------------------------------------------------------------
mport=$(free_port)
lport=$(free_port); start_daemon backlog "$lport" "$mport"
echo "== backlog: $BACKLOG messages stored while the broker is down =="
"$loadgen" --addr "127.0.0.1:$lport" -n "$BACKLOG" -c "$CONN"
while [ "$(stats backlog | jfield "['received']")" != "0" ]; do sleep 0.5; done
echo "stored and signed: $(stats backlog | jfield "['ready']") ready, $(( $(stats backlog | jfield "['bytes']") / 1048576 )) MiB in the outbox"
echo "ingest+map peak RSS (VmHWM): $(( $(awk '/VmHWM/ {print $2}' /proc/$daemon/status) / 1024 )) MiB"
# Stop the daemon, bring up the broker and a subscriber, start the daemon again: the drain
# includes its restart (crash recovery reads the backlog from the store).
kill -TERM "$daemon"; wait "$daemon" || true; daemon=""
start_broker "$mport"
mosquitto_sub -h 127.0.0.1 -p "$mport" -t 'hl7-edge/bench/#' -q 1 -C "$BACKLOG" > /dev/null &
sub=$!
sleep 0.5
t0=$(date +%s.%N)
"$bin" run --config "$work/backlog/config.toml" 2>>"$work/backlog/daemon.log" &
daemon=$!
wait "$sub"; sub=""
t1=$(date +%s.%N)
python3 -c "d=$t1-$t0; print(f'drained {$BACKLOG} Bundles to the subscriber in {d:.1f} s: {$BACKLOG/d:.0f} msg/s')"
while [ "$(stats backlog | jfield "['ready']")" != "0" ]; do sleep 0.2; done
echo "outbox empty: delivered_total $(stats backlog | jfield "['delivered_total']")"
echo "drain peak RSS (VmHWM): $(( $(awk '/VmHWM/ {print $2}' /proc/$daemon/status) / 1024 )) MiB"
