#!/usr/bin/env bash
# After down.sh: nothing of the test control plane or its real node may be left. Exits 1
# naming what is. With a file argument, also compares the kubelet's sysctls to the values
# saved there before up.sh.
dir="${CONTROLPLANE_DIR:-/tmp/eventworker-controlplane}"
left=()
procs=$(pgrep -af -- "$dir" | grep -v -e pgrep -e check-teardown || true)
[ -z "$procs" ] || left+=("processes: $procs")
for c in /sys/fs/cgroup/*/eventworker-e2e /sys/fs/cgroup/eventworker-e2e; do
  [ -e "$c" ] && left+=("cgroup $c")
done
mounts=$(findmnt -rn -o TARGET | grep "^$dir" || true)
[ -z "$mounts" ] || left+=("mounts: $mounts")
[ -e "$dir" ] && left+=("state directory $dir")
# Pod network namespaces containerd made: none may outlive the node.
if [ -n "${NETNS_BEFORE:-}" ]; then
  for n in $(ls /run/netns 2>/dev/null | grep '^cni-'); do
    grep -qx "$n" "$NETNS_BEFORE" || left+=("pod network namespace /run/netns/$n")
  done
fi
if [ -n "${1:-}" ]; then
  changed=$("$(dirname "$0")/node/sysctls.sh" check "$1" 2>&1) || left+=("$changed")
fi
# What the kubelet and containerd keep outside the state directory.
for f in /var/lib/kubelet/device-plugins/kubelet.sock; do
  [ -e "$f" ] && left+=("$f")
done
links=$(find /var/log/containers -maxdepth 1 -lname "$dir/*" 2>/dev/null || true)
[ -z "$links" ] || left+=("log links: $links")
if [ ${#left[@]} -gt 0 ]; then
  printf 'teardown left behind: %s\n' "${left[@]}" >&2
  exit 1
fi
echo "teardown: nothing left behind"
