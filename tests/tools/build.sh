#!/usr/bin/env bash
# Builds the test tools that come from Go modules (tests/tools/<name>/go.mod pins each one)
# into $EVENTWORKER_CACHE/bin, once per go.mod: jaeger (an OTLP receiver with a query API,
# for the tracing tests) and promtool (checks and unit-tests the Prometheus rules).
# Usage: tests/tools/build.sh [jaeger] [promtool]   (no argument: both)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${EVENTWORKER_CACHE:-$HOME/.cache/eventworker}/bin"
mkdir -p "$bin"
build() { # name
  local pkg stamp
  pkg=$(awk '$1 == "tool" {print $2; exit}' "$here/$1/go.mod")
  stamp="$bin/.$1.$(sha256sum < "$here/$1/go.mod" | cut -c1-16)"
  if [ ! -x "$bin/$1" ] || [ ! -e "$stamp" ]; then
    echo "building $1 from $pkg (first use of this version; cached in $bin)" >&2
    (cd "$here/$1" && GOFLAGS=-mod=mod go build -trimpath -ldflags '-s -w' -o "$bin/$1" "$pkg") ||
      { echo "building $1 failed" >&2; exit 1; }
    rm -f "$bin/.$1".*; touch "$stamp"
  fi
}
for tool in "${@:-jaeger promtool}"; do
  for t in $tool; do build "$t"; done
done
