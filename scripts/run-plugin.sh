#!/usr/bin/env bash
# Runs the kms-plugin on a local default: a keyring in ./.atrest/keyring.json
# (created on first run), the socket ./.atrest/kms.sock, metrics on
# 127.0.0.1:9464. Ctrl-C stops it gracefully. Extra arguments go to `serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release --locked -p kms-plugin
bin=target/release/kms-plugin
state=${ATREST_STATE_DIR:-$PWD/.atrest}
mkdir -p "$state"
chmod 700 "$state"
if [ ! -e "$state/keyring.json" ]; then
  "$bin" keyring init --keyring "$state/keyring.json" >/dev/null
  echo "created keyring $state/keyring.json" >&2
fi
echo "kms-plugin: socket unix://$state/kms.sock, metrics http://127.0.0.1:9464/metrics" >&2
echo "check it from another shell: $bin probe --listen unix://$state/kms.sock" >&2
exec "$bin" serve --listen "unix://$state/kms.sock" --keyring "$state/keyring.json" \
  --metrics-addr 127.0.0.1:9464 "$@"
