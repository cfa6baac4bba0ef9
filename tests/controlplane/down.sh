#!/usr/bin/env bash
# Stops the test control plane started by up.sh (and its real node, if any) and removes
# its state. By pid: pods, shims and the kubelet's mounts and cgroups live outside the
# processes' tree, so each is cleaned explicitly. A pid is only killed while its command
# line is still ours (pid files can outlive their processes).
dir="${CONTROLPLANE_DIR:-/tmp/eventworker-controlplane}"
dir=$(realpath -m "$dir")
bin="${EVENTWORKER_CACHE:-$HOME/.cache/eventworker}/bin"
state="$dir/node"
ours() { # pid: its command line names our state directory or one of our binaries
  local cmd; cmd=$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null) || return 1
  case "$cmd" in *"$dir"*|*"$bin/"*) return 0 ;; *) return 1 ;; esac
}
gone() { for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done; return 1; }
stop() { # pidfile
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  ours "$pid" || return 0
  kill "$pid" 2>/dev/null
  gone "$pid" || { kill -9 "$pid" 2>/dev/null; gone "$pid"; }
}
# Pods first, while the kubelet still runs: their sandboxes go through CNI DEL.
if [ -f "$dir/kubelet.pid" ] && ours "$(cat "$dir/kubelet.pid")" && [ -f "$dir/kubeconfig" ]; then
  timeout 60 "$bin/kubectl" --kubeconfig "$dir/kubeconfig" delete pods -A --all --grace-period=1 \
    --wait --timeout=50s >/dev/null 2>&1 || true
fi
stop "$dir/kubelet.pid"
stop "$dir/kube-proxy.pid"
shim_sockets=()
if [ -S "$state/containerd.sock" ]; then
  c() { timeout 20 ctr -a "$state/containerd.sock" -n k8s.io "$@"; }
  for t in $(c tasks ls -q 2>/dev/null); do c tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
  sleep 0.5
  for t in $(c tasks ls -q 2>/dev/null); do c tasks delete -f "$t" >/dev/null 2>&1; done
fi
if [ -d "$state/containerd/state" ]; then
  while read -r f; do shim_sockets+=("$(sed 's|^unix://||' "$f")"); done \
    < <(find "$state/containerd/state" -name address 2>/dev/null)
fi
stop "$dir/containerd.pid"
# Shims outlive containerd: each wrote its pid (and runs with our socket on its command line).
if [ -d "$state/containerd/state" ]; then
  find "$state/containerd/state" -name shim.pid 2>/dev/null | while read -r f; do
    pid=$(cat "$f"); ours "$pid" && { kill -9 "$pid" 2>/dev/null; gone "$pid"; }
  done
fi
# Whatever still runs in the kubelet's cgroups (pause, workers) is ours by definition.
cgroups=(/sys/fs/cgroup/*/eventworker-e2e /sys/fs/cgroup/eventworker-e2e)
for _ in 1 2 3; do
  pids=$(cat $(find "${cgroups[@]}" -name cgroup.procs 2>/dev/null) /dev/null 2>/dev/null | sort -u)
  [ -z "$pids" ] && break
  kill -9 $pids 2>/dev/null; sleep 0.3
done
# Pod network namespaces containerd created (not there before the node started).
if [ -f "$state/netns.before" ]; then
  for n in $(ls /run/netns 2>/dev/null); do
    case "$n" in cni-*) grep -qx "$n" "$state/netns.before" || ip netns del "$n" 2>/dev/null || true ;; esac
  done
fi
# Mounts under the state dir (container root filesystems, pod volumes), deepest first,
# until none is left (a detached parent can uncover another).
if [ -d "$dir" ]; then
  for _ in 1 2 3 4 5; do
    mounts=$(findmnt -rn -o TARGET 2>/dev/null | awk -v d="$dir/" 'index($0, d) == 1' | sort -r)
    [ -z "$mounts" ] && break
    while read -r m; do umount -l "$m" 2>/dev/null || true; done <<< "$mounts"
  done
fi
# The kubelet's cgroups, deepest first (a process just killed may still be leaving).
for _ in $(seq 20); do
  left=""
  for root in "${cgroups[@]}"; do
    [ -d "$root" ] || continue
    find "$root" -depth -type d -exec rmdir {} \; 2>/dev/null
    [ -d "$root" ] && left=1
  done
  [ -z "$left" ] && break
  sleep 0.25
done
[ -f "$state/sysctls.saved" ] && "$(dirname "$0")/node/sysctls.sh" restore "$state/sysctls.saved"
# What the kubelet, CNI and containerd keep outside the state directory.
rm -f /var/lib/kubelet/device-plugins/kubelet.sock
find /var/log/containers -maxdepth 1 -lname "$dir/*" -delete 2>/dev/null
rm -f /var/lib/cni/results/podnet-* 2>/dev/null
for s in "${shim_sockets[@]}"; do [ -n "$s" ] && rm -f "$s"; done
for c in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$dir/$c.pid"; done
rm -rf --one-file-system "$dir"
