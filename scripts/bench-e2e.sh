#!/usr/bin/env bash
# End-to-end benchmark on this machine: a real mosquitto, the release daemon with a fresh state
# directory, and examples/loadgen sending N ADT^A01 over 1, 8 and 64 MLLP connections.
#   ./scripts/bench-e2e.sh [N]          (default N = 20000 per run)
# Prints one line per run: ACK rate, ACK latency p50/p99, and the end-to-end rate (first send to
# last Bundle received by a subscriber).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20000}"
./scripts/test-deps.sh >/dev/null
[ "${SKIP_BUILD:-}" = 1 ] || cargo build --release --locked --bin hl7-edge --example loadgen 2>&1 | tail -1

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
cleanup() { kill "${daemon:-}" "${broker:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

mport=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\n' "$mport" > "$work/mosquitto.conf"
/usr/sbin/mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
broker=$!

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for c in 1 8 64; do
  lport=$(free_port)
  mkdir -p "$work/$c/adapters"
  printf 'name = "bench"\n[transport]\nkind = "mllp"\nbind = "127.0.0.1:%s"\n' "$lport" > "$work/$c/adapters/bench.toml"
  printf 'state_dir = "%s"\nadapters_dir = "%s"\n[site]\nods_code = "RRV"\nappliance_id = "bench"\n[mqtt]\nurl = "mqtt://127.0.0.1:%s"\n[log]\nlevel = "warn"\n' \
    "$work/$c/state" "$work/$c/adapters" "$mport" > "$work/$c/config.toml"
  # As systemd/hl7-edge.service runs it (see the comment there on mimalloc's eager commit).
  MIMALLOC_ARENA_EAGER_COMMIT=0 "${CARGO_TARGET_DIR:-target}"/release/hl7-edge run --config "$work/$c/config.toml" 2>"$work/$c/daemon.log" &
  daemon=$!
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$lport) 2>/dev/null && break; sleep 0.1; done
  "${CARGO_TARGET_DIR:-target}"/release/examples/loadgen --addr "127.0.0.1:$lport" -n "$N" -c "$c" \
    --mqtt "127.0.0.1:$mport" --topic 'hl7-edge/bench/#'
  rss=$(awk '/VmHWM/ {print $2}' /proc/$daemon/status)
  echo "daemon peak RSS: $((rss / 1024)) MiB"
  kill -TERM "$daemon"; wait "$daemon" || true
done
