#!/usr/bin/env bash
# Installs what building and testing atrest needs on Debian 12, when missing:
# etcd (server + etcdctl) for the tests, protoc for the gRPC/etcd builds,
# SoftHSM2, OpenSSH (sshd + ssh), cargo-nextest as the test runner; with
# --tests also a Python venv holding grpcio (a non-Go gRPC client for a test).
# Safe to run again: it skips what is there.
set -euo pipefail

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# SoftHSM2 and pkcs11-tool for the PKCS#11 (HSM) tests.
[ -f /usr/lib/softhsm/libsofthsm2.so ] || need_apt+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need_apt+=(opensc)
# OpenSSH server and client for the rotator's hosts-over-SSH tests (each test starts its own sshd).
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
# `--tests`: Python's venv for the grpc-python client of the :authority test (below).
if [ "${1:-}" = "--tests" ]; then
  command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # Debian starts etcd as a service on install where systemd runs; tests start their own.
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi

# `--tests` (scripts/test.sh): also grpc-python for the :authority test
# (tests/tests/kms_plugin_authority.rs). Since 1.57 it sends the
# percent-encoded socket path as :authority, which is what the test needs
# (Debian 12's python3-grpcio 1.51 sends "localhost"). A venv of its own, so
# the system's Python is left alone; ATREST_GRPC_VENV overrides where.
if [ "${1:-}" = "--tests" ]; then
  grpc_venv="${ATREST_GRPC_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/atrest/grpc-venv}"
  grpcio_version="1.85.4"
  if ! "$grpc_venv/bin/python" -c "import grpc, sys; sys.exit(grpc.__version__ != '$grpcio_version')" >/dev/null 2>&1; then
    echo "setup: installing grpcio $grpcio_version in $grpc_venv" >&2
    python3 -m venv "$grpc_venv"
    "$grpc_venv/bin/python" -m pip install -q --disable-pip-version-check "grpcio==$grpcio_version"
  fi
fi
