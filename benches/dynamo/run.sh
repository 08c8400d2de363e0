#!/usr/bin/env bash
# The real check (issue 8, part 4): unmodified Dynamo (PyPI ai-dynamo-runtime
# 1.6.1) through etcd/NATS faults, directly and through holdfastd.
# Not run in CI. Usage: benches/dynamo/run.sh [dynamo_check.py flags]
#   e.g. benches/dynamo/run.sh --etcd-outage 30s --nats-outage 20s --lease-ttl 10s
# Env: DYN_VENV (default /tmp/dynvenv), PYTHON3 (interpreter used to create it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${DYN_VENV:-/tmp/dynvenv}"
py3="${PYTHON3:-python3}"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import dynamo.runtime' 2>/dev/null; then
    echo "creating venv $venv with ai-dynamo-runtime==1.6.1" >&2
    "$py3" -m venv "$venv"
    "$venv/bin/pip" install --quiet 'ai-dynamo-runtime==1.6.1'
fi

(cd "$repo" && cargo build --release -p holdfast-broker)

command -v etcd >/dev/null || { echo "etcd not in PATH (deploy/install-deps.sh)" >&2; exit 1; }
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] \
    || { echo "nats-server not found (deploy/install-deps.sh)" >&2; exit 1; }

exec "$venv/bin/python" "$here/dynamo_check.py" \
    --python "$venv/bin/python" \
    --holdfastd "$repo/target/release/holdfastd" "$@"
