#!/usr/bin/env bash
# Starts a working local holdfast demo: a nats-server, an etcd and holdfastd
# on loopback, in the foreground. Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
export PATH="/usr/sbin:$PATH"
cargo build --release --bins
bin_dir="$(realpath "${CARGO_TARGET_DIR:-target}")/release"

# First free loopback port from $1 on (a distro nats-server may already hold 4222).
free_port() {
  local port=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
  echo "$port"
}

demo_dir="${HOLDFAST_DEMO_DIR:-$(mktemp -d -t holdfast-demo.XXXXXX)}"
mkdir -p "$demo_dir"
nats_port="${HOLDFAST_DEMO_NATS_PORT:-$(free_port 4222)}"
metrics_port="$(free_port 9477)"
nats_front_port="$(free_port $((nats_port + 1)))"
etcd_port="${HOLDFAST_DEMO_ETCD_PORT:-$(free_port 2379)}"
etcd_peer_port="$(free_port $((etcd_port + 1)))"
socket="$demo_dir/holdfast.sock"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

.deps/bin/nats-server -a 127.0.0.1 -p "$nats_port" >"$demo_dir/nats.log" 2>&1 &
pids+=($!)
etcd_url="http://127.0.0.1:$etcd_port"
etcd_peer="http://127.0.0.1:$etcd_peer_port"
etcd --name holdfast-demo --data-dir "$demo_dir/etcd" \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "$etcd_peer" --initial-advertise-peer-urls "$etcd_peer" \
  --initial-cluster "holdfast-demo=$etcd_peer" >"$demo_dir/etcd.log" 2>&1 &
pids+=($!)
"$bin_dir/holdfastd" --socket "$socket" --nats "nats://127.0.0.1:$nats_port" \
  --etcd "$etcd_url" --data-dir "$demo_dir/data" \
  --metrics-addr "127.0.0.1:$metrics_port" \
  --nats-listen "127.0.0.1:$nats_front_port" 2>"$demo_dir/holdfastd.log" &
pids+=($!)

for _ in $(seq 1 100); do
  [ -S "$socket" ] && break
  sleep 0.1
done
[ -S "$socket" ] || { echo "holdfastd did not start; see $demo_dir/holdfastd.log" >&2; exit 1; }

cat <<MSG
holdfast demo is running (logs in $demo_dir). In another terminal:

  export HOLDFAST_URL=unix://$socket PATH="$bin_dir:\$PATH"
  holdfast status
  holdfast sub demo.greetings &
  echo hello | holdfast pub demo.greetings --ack
  holdfast req demo.nobody ping        # a typed error: no_responders
  holdfast register 'v1/instances/demo/worker/generate/{instance_id}' '{"port":9000}' &
  holdfast get v1/instances/ --json
  holdfast watch v1/instances/          # Ctrl-C the register above: DELETE at once

Unmodified NATS clients connect to the relay at nats://127.0.0.1:$nats_front_port
(e.g. NATS_SERVER=nats://127.0.0.1:$nats_front_port, or any NATS client library).

Metrics and health:  curl -s 127.0.0.1:$metrics_port/metrics | grep holdfast_
                     curl -s 127.0.0.1:$metrics_port/status
See an outage:  kill -STOP ${pids[0]}   (NATS stops answering; holdfast status says down)
                kill -CONT ${pids[0]}   (it comes back; subscriptions work again)
                kill -STOP ${pids[1]}   (etcd stops: registrations buffer, gets answer stale)
                kill -CONT ${pids[1]}   (etcd returns: registrations reconciled)
Ctrl-C here stops everything.
MSG
wait "${pids[2]}"
