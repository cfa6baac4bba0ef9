#!/usr/bin/env bash
# netns.sh CMD [ARGS...]: run CMD in a network namespace of its own (loopback up), then
# delete the namespace. The real node's address, its pod bridge and kube-proxy's rules
# live there and nowhere else: the machine's own interfaces are never touched. Only the
# network is separate (nsenter --net): files, cgroups and processes are the machine's.
set -euo pipefail
ns="eventworker-e2e-$$"
ip netns add "$ns"
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
nsenter --net="/run/netns/$ns" ip link set lo up
nsenter --net="/run/netns/$ns" "$@"
