#!/usr/bin/env bash
# Stops the test control plane started by up.sh (and its real node, if any) and removes
# its state. By pid: pods, shims and the kubelet's mounts and cgroups live outside the
# processes' tree, so each is cleaned explicitly.
dir="${CONTROLPLANE_DIR:-/tmp/eventworker-controlplane}"
stop() { # pidfile
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
# The node first: no kubelet restarting what we stop.
stop "$dir/kubelet.pid"
stop "$dir/kube-proxy.pid"
state="$dir/node"
if [ -S "$state/containerd.sock" ]; then
  c() { timeout 20 ctr -a "$state/containerd.sock" -n k8s.io "$@"; }
  for t in $(c tasks ls -q 2>/dev/null); do c tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
  sleep 0.5
  for t in $(c tasks ls -q 2>/dev/null); do c tasks delete -f "$t" >/dev/null 2>&1; done
fi
stop "$dir/containerd.pid"
# Shims outlive containerd: each wrote its pid.
if [ -d "$state/containerd/state" ]; then
  find "$state/containerd/state" -name shim.pid 2>/dev/null | while read -r f; do
    kill -9 "$(cat "$f")" 2>/dev/null || true
  done
  # Containers' processes (pause, workers) whose shim is gone.
  find "$state/containerd/state" -name init.pid 2>/dev/null | while read -r f; do
    kill -9 "$(cat "$f")" 2>/dev/null || true
  done
fi
# Pod network namespaces containerd created (not there before the node started).
if [ -f "$state/netns.before" ]; then
  for n in $(ls /run/netns 2>/dev/null); do
    case "$n" in cni-*) grep -qx "$n" "$state/netns.before" || ip netns del "$n" 2>/dev/null || true ;; esac
  done
fi
# Mounts under the state dir (container root filesystems, pod volumes), deepest first.
if [ -d "$dir" ]; then
  findmnt -rn -o TARGET 2>/dev/null | grep "^$dir/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
fi
# The kubelet's cgroups (cgroupRoot /eventworker-e2e), deepest first.
for root in /sys/fs/cgroup/*/eventworker-e2e /sys/fs/cgroup/eventworker-e2e; do
  [ -d "$root" ] && find "$root" -depth -type d -exec rmdir {} \; 2>/dev/null
done
if [ -f "$state/sysctls.saved" ]; then
  while read -r kv; do sysctl -q -w "$kv" >/dev/null 2>&1 || true; done < "$state/sysctls.saved"
fi
for c in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$dir/$c.pid"; done
rm -rf "$dir"
