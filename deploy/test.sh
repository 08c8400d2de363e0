#!/usr/bin/env bash
# Runs holdfast's whole test suite on a fresh Debian/Ubuntu machine:
# installs what is missing, checks formatting and lints, runs every test
# (the end-to-end ones start their own nats-server processes on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
export PATH="/usr/sbin:$PATH"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
