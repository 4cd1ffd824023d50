#!/usr/bin/env bash
# Benchmark etcd-inspect against etcdctl on the same data (not a test).
# Starts a throwaway etcd (/usr/bin/etcd) in a temp dir on free loopback
# ports, builds etcd-inspect in release mode, seeds realistic Secrets and
# prints a table of wall time and peak RSS for each key count.
#
#   scripts/bench-inspect.sh [KEYS]      # KEYS default: 100000,200000
#
# Targets (from the issue): within 1.2x of etcdctl's wall time; peak RSS under
# 64 MiB and not growing with the key count. etcdctl needs ETCDCTL_API=3.
set -euo pipefail
cd "$(dirname "$0")/.."
keys="${1:-100000,200000}"

[ -x /usr/bin/etcd ] || { echo "install etcd-server (/usr/bin/etcd missing)" >&2; exit 2; }
cargo build --release -p etcd-inspect --bins

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir="$(mktemp -d /tmp/atrest-bench-etcd.XXXXXX)"
cport="$(free_port)"; pport="$(free_port)"
/usr/bin/etcd --name bench --data-dir "$dir/data" \
  --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
  --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
  --initial-cluster "bench=http://127.0.0.1:$pport" --quota-backend-bytes 8589934592 \
  --logger zap --log-level error >"$dir/etcd.log" 2>&1 &
etcd_pid=$!
trap 'kill "$etcd_pid" 2>/dev/null; wait "$etcd_pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
  ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$cport" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done
ETCDCTL_API=3 target/release/etcd-inspect-bench --endpoints "http://127.0.0.1:$cport" --keys "$keys" \
  --etcd-inspect target/release/etcd-inspect
