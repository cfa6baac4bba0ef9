#!/usr/bin/env bash
# netns.sh CMD [ARGS...]: run CMD in a network namespace of its own (loopback up), then
# delete the namespace. The real node's address, its pod bridge and kube-proxy's rules
# live there and nowhere else: the machine's own interfaces are never touched. Only the
# network is separate (nsenter --net): files, cgroups and processes are the machine's.
set -euo pipefail
ns="eventworker-e2e-$$"
ip netns add "$ns"
# Anything still running in the namespace would keep it (and its addresses, bridge and
# rules) alive without a name: report it, stop it, then remove the namespace.
cleanup() {
  local rc=$? pids
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  if [ -n "${pids// /}" ]; then
    echo "netns.sh: processes left in $ns: $pids" >&2
    for p in $pids; do echo "  $p: $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-120)" >&2; done
    kill -9 $pids 2>/dev/null || true
    rc=1
  fi
  ip netns del "$ns" 2>/dev/null || true
  exit "$rc"
}
trap cleanup EXIT
# Namespaces of earlier runs that were killed before they could clean up.
for old in $(ip netns list 2>/dev/null | awk '/^eventworker-e2e-/ {print $1}'); do
  kill -0 "${old#eventworker-e2e-}" 2>/dev/null || ip netns del "$old" 2>/dev/null || true
done
nsenter --net="/run/netns/$ns" ip link set lo up
nsenter --net="/run/netns/$ns" "$@"
