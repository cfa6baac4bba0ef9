#!/usr/bin/env bash
# Adds a real node to the test control plane (called by ../up.sh with EW_REAL_NODE=1,
# inside the network namespace of ../netns.sh): containerd and runc from Debian, a kubelet
# and kube-proxy built from the pinned Kubernetes modules, bridge CNI from Debian's
# containernetworking-plugins, the node's address on a dummy interface. Pods really run.
# Images come from ../image.py (no Docker, no registry): `localhost/` names, imported into
# containerd. Everything it starts is stopped by ../down.sh, by pid.
# Env: dir, bin, kc (from ../up.sh), NODE_IP, NODE_NAME.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${dir:?}" "${bin:?}" "${kc:?}"
node_ip="${NODE_IP:-10.245.255.1}"
node="${NODE_NAME:-ew-node}"
pod_cidr="10.245.0.0/24"
state="$dir/node"
mkdir -p "$state/net.d" "$state/kubelet" "$state/pod-logs" "$state/images"
fail() { echo "real node: $1 did not come up; its log:" >&2; tail -n 60 "$state/$1.log" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Debian packages, installed when missing (like the databases).
missing=()
for p in containerd:containerd runc:runc conntrack:conntrack iptables:iptables; do
  command -v "${p%%:*}" >/dev/null || missing+=("${p#*:}")
done
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
command -v gcc >/dev/null || missing+=(gcc)
compgen -G "/usr/lib/*/libc.a" >/dev/null || missing+=(libc6-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

# The node's address: on a dummy interface of this network namespace only.
if [ "$(readlink /proc/self/ns/net)" = "$(readlink /proc/1/ns/net)" ]; then
  echo "real node: run inside tests/controlplane/netns.sh (its address must not land on the machine's interfaces)" >&2
  exit 1
fi
# A dummy interface where the kernel has the module, else an empty bridge: either holds
# an address of this namespace and nothing else.
ip link show ewnode >/dev/null 2>&1 || ip link add ewnode type dummy 2>/dev/null || ip link add ewnode type bridge
ip addr add "$node_ip/32" dev ewnode 2>/dev/null || true
ip link set ewnode up

# The kubelet changes global sysctls: ../down.sh puts them back.
"$here/sysctls.sh" save "$state/sysctls.saved"

# The sandbox image: a static pause.
if [ ! -x "$bin/pause" ] || [ "$here/pause.c" -nt "$bin/pause" ]; then
  gcc -static -O2 -o "$bin/pause" "$here/pause.c"
fi
python3 "$here/../image.py" --pause "$bin/pause" localhost/pause:local "$state/images/pause.tar"

cat > "$state/containerd.toml" <<EOF
version = 2
root = "$state/containerd/root"
state = "$state/containerd/state"
[grpc]
  address = "$state/containerd.sock"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$state/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "localhost/pause:local"
    # Root here lacks CAP_SYS_RESOURCE: runc must not raise oom_score_adj.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$state/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "$state/runc"
EOF
cat > "$state/net.d/10-podnet.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "podnet",
  "plugins": [
    {"type": "bridge", "bridge": "cni-ew0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$state/cni", "ranges": [[{"subnet": "$pod_cidr", "gateway": "10.245.0.1"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
EOF
# Pod network namespaces containerd creates appear in /run/netns: ../down.sh removes ours.
ls /run/netns 2>/dev/null > "$state/netns.before" || true
containerd --config "$state/containerd.toml" > "$state/containerd.log" 2>&1 &
echo $! > "$dir/containerd.pid"
for _ in $(seq 100); do [ -S "$state/containerd.sock" ] && break; sleep 0.1; done
[ -S "$state/containerd.sock" ] || fail containerd
ctr() { command ctr -a "$state/containerd.sock" -n k8s.io "$@"; }
ctr images import "$state/images/pause.tar" >/dev/null || fail containerd
# Images to import (OCI archives from ../image.py), space-separated.
read -r -a images <<< "${EW_NODE_IMAGES:-}"
for img in "${images[@]}"; do
  ctr images import "$img" >/dev/null || fail containerd
done

# The kubelet's cgroup root must exist in every hierarchy (cgroup v1) or once (v2).
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  mkdir -p /sys/fs/cgroup/eventworker-e2e
else
  for h in /sys/fs/cgroup/*/; do
    [ -e "$h/cgroup.procs" ] && mkdir -p "$h/eventworker-e2e"
  done
fi
kubelet_port=$(free_port)
cat > "$state/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
port: $kubelet_port
healthzPort: 0
readOnlyPort: 0
cgroupDriver: cgroupfs
cgroupRoot: /eventworker-e2e
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
containerRuntimeEndpoint: unix://$state/containerd.sock
podLogsDir: $state/pod-logs
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
authentication: {x509: {clientCAFile: $dir/pki/ca.crt}, webhook: {enabled: false}, anonymous: {enabled: false}}
authorization: {mode: AlwaysAllow}
serializeImagePulls: false
podCIDR: $pod_cidr
maxPods: 30
EOF
"$bin/kubelet" --config "$state/kubelet.yaml" --kubeconfig "$kc" --hostname-override "$node" \
  --node-ip "$node_ip" --node-labels "type=real" --root-dir "$state/kubelet" \
  --cert-dir "$state/kubelet/pki" > "$state/kubelet.log" 2>&1 &
echo $! > "$dir/kubelet.pid"
proxy_health=$(free_port)
"$bin/kube-proxy" --kubeconfig "$kc" --hostname-override "$node" --proxy-mode iptables \
  --cluster-cidr 10.245.0.0/16 --conntrack-max-per-core 0 \
  --metrics-bind-address "127.0.0.1:$(free_port)" --healthz-bind-address "127.0.0.1:$proxy_health" \
  > "$state/kube-proxy.log" 2>&1 &
echo $! > "$dir/kube-proxy.pid"
k() { "$bin/kubectl" --kubeconfig "$kc" "$@"; }
ready() { [ "$(k get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; }
for _ in $(seq 300); do
  ready && break
  kill -0 "$(cat "$dir/kubelet.pid")" 2>/dev/null || fail kubelet
  sleep 0.2
done
ready || fail kubelet
# kube-proxy's rules are synced once its health check answers (the `kubernetes` Service).
for _ in $(seq 150); do
  curl -sf "http://127.0.0.1:$proxy_health/healthz" >/dev/null && break
  kill -0 "$(cat "$dir/kube-proxy.pid")" 2>/dev/null || fail kube-proxy
  sleep 0.2
done
curl -sf "http://127.0.0.1:$proxy_health/healthz" >/dev/null || fail kube-proxy
# Workloads land on the real node; tests that need many pods tolerate the kwok node's taint.
k taint node kwok-node-0 eventworker.io/fake=true:NoSchedule --overwrite >/dev/null
printf 'export EW_NODE_IP=%q EW_NODE_NAME=%q EW_CONTAINERD_SOCK=%q\n' "$node_ip" "$node" "$state/containerd.sock"
