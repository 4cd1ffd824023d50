#!/usr/bin/env bash
# The KMS plugin load benchmark with the primary KEK in a SoftHSM2 token, next
# to the same benchmark with a local KEK: Decrypt (and Encrypt) at 1/16/64
# callers and the 10,000-call Decrypt restart burst, each printed as the
# Markdown table of kms-loadgen (ops/s, p50/p99, plugin CPU per call and,
# for the token runs, its split into the module's CPU and ours).
# Needs softhsm2 (scripts/setup.sh installs it). The token lives in a temp dir
# of its own (SOFTHSM2_CONF is set for the plugin only). Extra arguments go to
# every kms-loadgen run, e.g.  scripts/bench-kms-hsm.sh --duration 2s
# The token runs twice: with the default session bound (one per CPU for a
# software slot) and with 16 (a hardware slot's default); SESSIONS="4 8"
# picks other counts ("default" for no flag).
# PLUGIN_CPUS / LOADGEN_CPUS (taskset lists, e.g. PLUGIN_CPUS=0-1
# LOADGEN_CPUS=2-3) keep the plugin and the load generator on CPUs of their
# own, so the plugin's CPU per call is not inflated by sharing cores with its
# load; both or neither.
# Results depend on the machine and on whatever else runs on it.
set -euo pipefail
cd "$(dirname "$0")/.."
module=/usr/lib/softhsm/libsofthsm2.so
[ -f "$module" ] || { echo "bench-kms-hsm: $module missing: run scripts/setup.sh" >&2; exit 1; }
cargo build --release -p kms-plugin -p atrest-bench
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin="${target_dir:-target}/release"

work="$(mktemp -d)"
plugin_pid=""
cleanup() {
  if [ -n "$plugin_pid" ]; then kill "$plugin_pid" 2>/dev/null || true; wait "$plugin_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Optional CPU pinning: every plugin (including the one kms-loadgen starts
# for the local-KEK run, through a wrapper that execs it under the same pid)
# runs on PLUGIN_CPUS, every kms-loadgen on LOADGEN_CPUS.
plugin_pin=()
loadgen_pin=()
local_plugin="$bin/kms-plugin"
if [ -n "${PLUGIN_CPUS:-}${LOADGEN_CPUS:-}" ]; then
  [ -n "${PLUGIN_CPUS:-}" ] && [ -n "${LOADGEN_CPUS:-}" ] || {
    echo "bench-kms-hsm: set both PLUGIN_CPUS and LOADGEN_CPUS, or neither" >&2; exit 2; }
  command -v taskset >/dev/null || { echo "bench-kms-hsm: taskset (util-linux) missing" >&2; exit 1; }
  for cpus in "$PLUGIN_CPUS" "$LOADGEN_CPUS"; do
    taskset -c "$cpus" true || { echo "bench-kms-hsm: not a usable CPU list: $cpus" >&2; exit 2; }
  done
  plugin_pin=(taskset -c "$PLUGIN_CPUS")
  loadgen_pin=(taskset -c "$LOADGEN_CPUS")
  local_plugin="$work/kms-plugin-pinned"
  printf '#!/bin/sh\nexec taskset -c %q %q "$@"\n' "$PLUGIN_CPUS" "$bin/kms-plugin" > "$local_plugin"
  chmod +x "$local_plugin"
  echo "CPU pinning: plugin on CPUs $PLUGIN_CPUS, load generator on CPUs $LOADGEN_CPUS"
  echo
fi
mkdir "$work/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" > "$work/softhsm2.conf"
pin="bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
(umask 077; printf '%s\n' "$pin" > "$work/pin")
SOFTHSM2_CONF="$work/softhsm2.conf" softhsm2-util --init-token --free --label atrest \
  --so-pin "so-$pin" --pin "$pin" >/dev/null
"$bin/kms-plugin" keyring init --keyring "$work/keyring.json" >/dev/null
kek="$(SOFTHSM2_CONF="$work/softhsm2.conf" "$bin/kms-plugin" keyring add --keyring "$work/keyring.json" \
  --pkcs11-module "$module" --pkcs11-token atrest --pkcs11-pin-file "$work/pin")"
"$bin/kms-plugin" keyring promote --keyring "$work/keyring.json" --kek "$kek" >/dev/null

# Twice: the default session bound (for SoftHSM2, a software slot: one per
# CPU) and 16 (the default for a hardware slot, sized for a network HSM's
# round trips).
for sessions in ${SESSIONS:-default 16}; do
  flags=()
  if [ "$sessions" = default ]; then
    # The plugin counts the CPUs it may run on (its affinity), as nproc does.
    echo "## KEK in SoftHSM2 (PKCS#11, default session bound: one per CPU for a software slot = $("${plugin_pin[@]}" nproc))"
  else
    echo "## KEK in SoftHSM2 (PKCS#11, --pkcs11-max-sessions $sessions)"
    flags=(--pkcs11-max-sessions "$sessions")
  fi
  SOFTHSM2_CONF="$work/softhsm2.conf" "${plugin_pin[@]}" "$bin/kms-plugin" serve --listen "unix://$work/kms.sock" \
    --keyring "$work/keyring.json" --pkcs11-module "$module" --pkcs11-pin-file "$work/pin" \
    --metrics-addr 127.0.0.1:0 "${flags[@]}" 2>"$work/plugin.log" &
  plugin_pid=$!
  for _ in $(seq 100); do
    "$bin/kms-plugin" probe --listen "unix://$work/kms.sock" >/dev/null 2>&1 && break
    kill -0 "$plugin_pid" 2>/dev/null || { cat "$work/plugin.log" >&2; exit 1; }
    sleep 0.1
  done
  # The port the plugin picked: kms-loadgen reads the module's CPU there
  # before and after each row, so every row splits plugin CPU into the
  # module's and ours.
  metrics="$(sed -n 's/.*metrics listening addr=\([0-9.:]*\).*/\1/p' "$work/plugin.log" | head -n1)"
  [ -n "$metrics" ] || { echo "bench-kms-hsm: the plugin logged no metrics address" >&2; cat "$work/plugin.log" >&2; exit 1; }
  "${loadgen_pin[@]}" "$bin/kms-loadgen" --listen "unix://$work/kms.sock" --plugin-pid "$plugin_pid" \
    --plugin-metrics "$metrics" --methods encrypt,decrypt "$@"
  kill "$plugin_pid"; wait "$plugin_pid" 2>/dev/null || true; plugin_pid=""
  # The plugin's own account over the whole run (sealing and warm-ups too).
  echo
  echo "plugin: $(grep -o 'PKCS#11 usage.*' "$work/plugin.log" || echo 'no PKCS#11 usage line')"
  echo "plugin: $(grep -o 'PKCS#11 call queue.*' "$work/plugin.log" || echo 'no PKCS#11 call queue line')"
  echo
done

echo "## Local KEK (same machine, same run)"
"${loadgen_pin[@]}" "$bin/kms-loadgen" --plugin-bin "$local_plugin" --methods encrypt,decrypt "$@"
