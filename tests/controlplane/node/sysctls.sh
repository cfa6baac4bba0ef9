#!/usr/bin/env bash
# sysctls.sh save FILE | restore FILE | check FILE: the global sysctls the kubelet sets
# (setupKernelTunables), read and written through /proc/sys.
set -euo pipefail
keys=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes)
case "$1" in
  save)
    : > "$2"
    for k in "${keys[@]}"; do
      v=$(cat "/proc/sys/$k")
      [ -n "$v" ] || { echo "cannot read /proc/sys/$k" >&2; exit 1; }
      echo "$k=$v" >> "$2"
    done ;;
  restore)
    while IFS== read -r k v; do echo "$v" > "/proc/sys/$k" 2>/dev/null || true; done < "$2" ;;
  check)
    bad=0
    while IFS== read -r k v; do
      now=$(cat "/proc/sys/$k")
      [ "$now" = "$v" ] || { echo "sysctl $k is $now, was $v" >&2; bad=1; }
    done < "$2"
    exit $bad ;;
esac
