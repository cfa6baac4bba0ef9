#!/usr/bin/env bash
# Local demo of eventworker: a redis-server, a small HTTP sink, the worker, 10,000 events.
# Installs redis-server from the distribution's packages when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing it from the distribution's packages"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi

echo "building eventworker (release)..."
cargo build --release -q -p eventworker --bin eventworker --example demo
target="${CARGO_TARGET_DIR:-target}"
EVENTWORKER_BIN="$target/release/eventworker" exec "$target/release/examples/demo" "$@"
