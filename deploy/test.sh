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
# Three at a time: the end-to-end tests mostly wait on their servers, so a
# third thread shortens the run by a quarter on two cores; the suite was
# also run clean at four.
cargo test --workspace --locked -- --test-threads 3
