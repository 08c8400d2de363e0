#!/usr/bin/env bash
# The real check (issue 8, part 4): unmodified Dynamo (PyPI ai-dynamo-runtime
# 1.6.1) through etcd/NATS faults, directly and through holdfastd.
# Not run in CI. Usage: benches/dynamo/run.sh [dynamo_check.py flags]
#   e.g. benches/dynamo/run.sh --etcd-outage 30s --nats-outage 20s --lease-ttl 10s
#        benches/dynamo/run.sh --secured --only etcd_member_kill,nats_node_kill --modes holdfast
#        benches/dynamo/run.sh kv --quick          # KV router consistency (kv_router_check.py)
# Env: DYN_VENV (default /tmp/dynvenv), PYTHON3 (interpreter used to create it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${DYN_VENV:-/tmp/dynvenv}"
py3="${PYTHON3:-python3}"

# nkeys (ed25519 for the NATS JWTs of --secured) is pure Python over PyNaCl.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import dynamo.runtime, nkeys' 2>/dev/null; then
    echo "creating venv $venv with ai-dynamo-runtime==1.6.1 nkeys==0.2.1" >&2
    [ -x "$venv/bin/python" ] || "$py3" -m venv "$venv"
    "$venv/bin/pip" install --quiet 'ai-dynamo-runtime==1.6.1' 'nkeys==0.2.1'
fi

(cd "$repo" && cargo build --release -p holdfast-broker)
target="${CARGO_TARGET_DIR:-$repo/target}"

# The project-local nats-server (2.15.1) is preferred; deploy/install-deps.sh puts it there.
[ -x "$repo/.deps/bin/nats-server" ] || "$repo/deploy/install-deps.sh"
command -v etcd >/dev/null || { echo "etcd not in PATH (deploy/install-deps.sh)" >&2; exit 1; }

# `run.sh kv [flags]`: the KV router consistency check (kv_router_check.py).
script="$here/dynamo_check.py"
if [ "${1:-}" = kv ]; then
    shift
    script="$here/kv_router_check.py"
fi
exec "$venv/bin/python" "$script" \
    --python "$venv/bin/python" \
    --holdfastd "$target/release/holdfastd" "$@"
