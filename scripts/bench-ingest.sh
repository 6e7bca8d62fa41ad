#!/usr/bin/env bash
# Ingest benchmark on this machine: ACK rate and ACK latency of the release daemon (durable group
# commit through the intake journal, mapping and MQTT forwarding running at the same time, as in
# production) over 1, 8 and 64 MLLP connections, then the same load against python-hl7's asyncio ACK server as a reference
# (parse + ACK only: no storage, no fsync).
#   ./scripts/bench-ingest.sh [N] [C...]   (default N = 20000 messages per run, C = 1 8 64)
# HL7EDGE_BIN=path compares another build of the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20000}"
shift || true
CONNS="${*:-1 8 64}"
T="${CARGO_TARGET_DIR:-target}"
BIN="${HL7EDGE_BIN:-$T/release/hl7-edge}"
./scripts/test-deps.sh >/dev/null
cargo build --release --locked --bin hl7-edge --example loadgen 2>&1 | tail -1

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
work=$(mktemp -d)
daemon=""; broker=""; pyserver=""
cleanup() { for p in $daemon $pyserver $broker; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

mport=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\n' "$mport" > "$work/mosquitto.conf"
/usr/sbin/mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
broker=$!
wait_port "$mport"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r); state dir on $(df -T "$work" | awk 'NR==2 {print $2}')"
echo "== hl7-edge (each ACK after the message is on disk; mapping, signing and MQTT forwarding running)"
for c in $CONNS; do
  lport=$(free_port)
  mkdir -p "$work/$c/adapters"
  printf 'name = "bench"\n[transport]\nkind = "mllp"\nbind = "127.0.0.1:%s"\n' "$lport" > "$work/$c/adapters/bench.toml"
  printf 'state_dir = "%s"\nadapters_dir = "%s"\n[site]\nods_code = "RRV"\nappliance_id = "bench"\n[mqtt]\nurl = "mqtt://127.0.0.1:%s"\n[log]\nlevel = "warn"\n' \
    "$work/$c/state" "$work/$c/adapters" "$mport" > "$work/$c/config.toml"
  "$BIN" run --config "$work/$c/config.toml" 2>"$work/$c/daemon.log" &
  daemon=$!
  wait_port "$lport"
  "$T/release/examples/loadgen" --addr "127.0.0.1:$lport" -n "$N" -c "$c"
  kill -TERM "$daemon"; wait "$daemon" || true; daemon=""
done

echo "== reference: python-hl7 asyncio ACK server (parse + ACK, nothing stored)"
pport=$(free_port)
target/test-venv/bin/python scripts/python-ack-server.py --port "$pport" &
pyserver=$!
wait_port "$pport"
for c in $CONNS; do
  "$T/release/examples/loadgen" --addr "127.0.0.1:$pport" -n "$N" -c "$c"
done
