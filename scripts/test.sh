#!/usr/bin/env bash
# The whole test suite: unit tests, known-answer vectors, and the end-to-end
# tests that start a real etcd, the real kms-plugin over real unix sockets and
# the real CLIs. Installs what it needs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --tests
# End-to-end tests run the workspace binaries as child processes: build them first.
cargo build --workspace --bins --locked
cargo test --workspace --doc --locked
# Last, so its summary closes the run.
cargo nextest run --workspace --locked --no-fail-fast
