#!/usr/bin/env bash
# Stops the test control plane started by up.sh and removes its state.
dir="${CONTROLPLANE_DIR:-/tmp/eventworker-controlplane}"
for c in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  if [ -f "$dir/$c.pid" ]; then
    pid=$(cat "$dir/$c.pid"); kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
done
rm -rf "$dir"
