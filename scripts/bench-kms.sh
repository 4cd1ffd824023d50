#!/usr/bin/env bash
# Builds kms-plugin and kms-loadgen in release and runs the KMS plugin load
# benchmark: one gRPC connection, 1/16/64 callers, Status/Encrypt/Decrypt,
# plus a 10,000-call Decrypt restart burst. Prints a Markdown table on stdout
# (progress on stderr). Extra arguments go to kms-loadgen, e.g.
#   scripts/bench-kms.sh --duration 5s --callers 1,64
# Results depend on the machine and on whatever else runs on it: run it on an
# otherwise idle host and keep the header lines (CPU, nproc, load) with the table.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kms-plugin -p atrest-bench
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "${target_dir:-target}/release/kms-loadgen" "$@"
