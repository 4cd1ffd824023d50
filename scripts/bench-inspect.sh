#!/usr/bin/env bash
# Benchmark etcd-inspect against etcdctl on the same data (not a test).
# Starts a throwaway etcd 3.4 (/usr/bin/etcd) in a temp dir on free loopback
# ports, builds etcd-inspect and the bench driver in release mode, seeds
# kube-shaped data (small protobuf Secrets and ConfigMaps, 1 in 500 a 100 KiB
# ConfigMap, mixed providers) and prints wall time, CPU (user+sys), peak RSS
# and etcd's CPU for each key count, best of 2 runs each. Then the same data
# as an `etcdctl snapshot save` file: `etcd-inspect snapshot FILE` against the
# live audit and against `etcdctl snapshot restore` + etcd start + live audit.
#
#   scripts/bench-inspect.sh [KEYS] [extra flags of etcd-inspect-bench]
#   KEYS (or $BENCH_INSPECT_KEYS) default: 100000,200000,1000000 (about 11
#   minutes on a quiet 2-core machine after the release build, most of it
#   seeding and etcdctl reading 1M keys); e.g. `scripts/bench-inspect.sh
#   2000,10000` for a quick check. Extra flags: --runs N, --no-snapshot,
#   --no-etcdctl, --keep-snapshots DIR, --variant '--page-size 5000'.
#
# Targets (issue 12): at most 0.8x etcdctl's wall time at every size; wall
# 1M / 200k at most 5.5; peak RSS under 64 MiB. Issue 10: the offline audit
# faster than the live one, peak RSS under 64 MiB and flat in the key count.
# etcdctl needs ETCDCTL_API=3.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
keys="${BENCH_INSPECT_KEYS:-100000,200000,1000000}"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then keys="$1"; shift; fi

[ -x /usr/bin/etcd ] || { echo "install etcd-server (/usr/bin/etcd missing)" >&2; exit 2; }
# One invocation: both binaries share one feature-unified dependency build.
cargo build --release -p etcd-inspect --bin etcd-inspect -p atrest-bench --bin etcd-inspect-bench

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir="$(mktemp -d /tmp/atrest-bench-etcd.XXXXXX)"
cport="$(free_port)"; pport="$(free_port)"
/usr/bin/etcd --name bench --data-dir "$dir/data" \
  --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
  --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
  --initial-cluster "bench=http://127.0.0.1:$pport" --quota-backend-bytes 8589934592 \
  --logger zap --log-level error >"$dir/etcd.log" 2>&1 &
etcd_pid=$!
# '|| true': wait returns etcd's SIGTERM status, and set -e would end the
# trap there, leaving the data dir (GBs at 1M keys) behind.
trap 'kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
  ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$cport" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done
ETCDCTL_API=3 target/release/etcd-inspect-bench --endpoints "http://127.0.0.1:$cport" --keys "$keys" \
  --etcd-inspect target/release/etcd-inspect --etcd-pid "$etcd_pid" --etcd /usr/bin/etcd "$@"
echo "bench-inspect: done in $((SECONDS - start)) s (release build included)" >&2
