#!/usr/bin/env bash
# Starts a test Kubernetes control plane on loopback: etcd and kube-apiserver built from
# Go modules (tests/controlplane/*/go.mod pin the versions), client-certificate auth, RBAC.
# Writes $CONTROLPLANE_DIR/kubeconfig and prints `export KUBECONFIG=...`.
# Fails loudly with the component's log when something does not come up.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${EVENTWORKER_CACHE:-$HOME/.cache/eventworker}"
bin="$cache/bin"
dir=$(realpath -m "${CONTROLPLANE_DIR:-/tmp/eventworker-controlplane}")

kube_version=$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$here/kube/go.mod" | head -1)
kube_version=${kube_version:-$(grep -o 'k8s.io/kubernetes v[0-9.]*' "$here/kube/go.mod" | head -1 | cut -d' ' -f2)}
minor=$(echo "$kube_version" | cut -d. -f2)
# Version stamps the release build would set (helm and clients check them).
ldflags="-X k8s.io/component-base/version.gitVersion=$kube_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$kube_version -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
build() { # name module-dir package
  local stamp="$bin/.$1.$( (cat "$here/$2/go.mod"; echo "$ldflags") | sha256sum | cut -c1-16)"
  if [ ! -x "$bin/$1" ] || [ ! -e "$stamp" ]; then
    echo "building $1 (first use of this version; cached in $bin)" >&2
    mkdir -p "$bin"
    (cd "$here/$2" && GOFLAGS=-mod=mod go build -ldflags "$ldflags" -o "$bin/$1" "$3") || { echo "building $1 failed" >&2; exit 1; }
    rm -f "$bin/.$1".*; touch "$stamp"
  fi
}
source "$here/versions.env"
build etcd etcd .
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do build "$c" kube "k8s.io/kubernetes/cmd/$c"; done
install_tool() { # name package version
  if [ ! -x "$bin/$1" ] || [ ! -e "$bin/.$1.$3" ]; then
    echo "installing $1 $3 (cached in $bin)" >&2
    GOBIN="$bin" go install "$2@$3" || { echo "installing $1 failed" >&2; exit 1; }
    rm -f "$bin/.$1".*; touch "$bin/.$1.$3"
  fi
}
install_tool kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
install_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
# Third-party CRDs, from the projects' own Go modules.
moddir() { (cd "$here/etcd" && GOFLAGS=-mod=mod go mod download -json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])'); }
prometheus_operator_crds="$(moddir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")/example/prometheus-operator-crd"
servicemonitor_crd="$prometheus_operator_crds/monitoring.coreos.com_servicemonitors.yaml"
prometheusrule_crd="$prometheus_operator_crds/monitoring.coreos.com_prometheusrules.yaml"
keda_crds="$(moddir "github.com/kedacore/keda/v2@$KEDA_VERSION")/config/crd/bases"
scaledobject_crd="$keda_crds/keda.sh_scaledobjects.yaml"
triggerauth_crd="$keda_crds/keda.sh_triggerauthentications.yaml"
# EW_BUILD_ONLY=1: build and download everything (needs the network), start nothing. .ci/run
# does this before entering the network namespace, which has no way out.
if [ -n "${EW_BUILD_ONLY:-}" ]; then
  [ -f "$servicemonitor_crd" ] && [ -f "$prometheusrule_crd" ] && [ -f "$scaledobject_crd" ] && [ -f "$triggerauth_crd" ] || { echo "third-party CRDs missing" >&2; exit 1; }
  exit 0
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
fail() { echo "control plane: $1 did not come up; its log:" >&2; tail -n 60 "$dir/$1.log" >&2; exit 1; }

"$here/down.sh" >/dev/null 2>&1 || true
# A component that does not come up leaves nothing running behind it.
trap 'rc=$?; [ "$rc" = 0 ] || "$here/down.sh" >/dev/null 2>&1' EXIT
rm -rf "$dir"; mkdir -p "$dir/pki"; cd "$dir/pki"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -subj "/CN=eventworker-test-ca" -days 7 2>/dev/null
cert() { # name subject extensions (X.509 v3: rustls refuses v1 certificates)
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 7 -extfile "$1.ext" 2>/dev/null
}
# With a real node (EW_REAL_NODE=1, inside netns.sh) pods reach the API server through the
# `kubernetes` Service (10.96.0.1, kube-proxy) at the node's address.
real_node="${EW_REAL_NODE:-}"
if [ -n "$real_node" ] && [ "$(readlink /proc/self/ns/net)" = "$(readlink /proc/1/ns/net)" ]; then
  echo "EW_REAL_NODE=1: run inside tests/controlplane/netns.sh (the node's addresses must not land on the machine's interfaces)" >&2
  exit 1
fi
node_ip="${NODE_IP:-10.245.255.1}"
sans="IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
[ -n "$real_node" ] && sans="$sans,IP:10.96.0.1,IP:$node_ip"
cert apiserver "/CN=kube-apiserver" "subjectAltName=$sans
extendedKeyUsage=serverAuth"
cert admin "/O=system:masters/CN=admin" "extendedKeyUsage=clientAuth"
# The aggregation layer (APIServices, e.g. the operator's external metrics): the front
# proxy's own CA and client certificate, as kubeadm sets them up.
openssl req -x509 -newkey rsa:2048 -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt \
  -subj "/CN=eventworker-test-front-proxy-ca" -days 7 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout front-proxy-client.key -out front-proxy-client.csr \
  -subj "/CN=front-proxy-client" 2>/dev/null
printf 'extendedKeyUsage=clientAuth\n' > front-proxy-client.ext
openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key -CAcreateserial \
  -out front-proxy-client.crt -days 7 -extfile front-proxy-client.ext 2>/dev/null
openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
cd "$dir"

etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
"$bin/etcd" --data-dir "$dir/etcd" --name default \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "default=http://127.0.0.1:$peer_port" --unsafe-no-fsync > "$dir/etcd.log" 2>&1 &
echo $! > "$dir/etcd.pid"
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$etcd_port/health" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$etcd_port/health" >/dev/null || fail etcd

if [ -n "$real_node" ]; then
  # Reachable from pods (the node's address, in this network namespace only); kubectl
  # logs goes to the kubelet with the admin client certificate.
  api_net=(--bind-address 0.0.0.0 --advertise-address "$node_ip"
    --kubelet-client-certificate pki/admin.crt --kubelet-client-key pki/admin.key
    --kubelet-preferred-address-types InternalIP)
else
  api_net=(--bind-address 127.0.0.1 --advertise-address 127.0.0.1)
fi
"$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
  "${api_net[@]}" --secure-port "$api_port" \
  --tls-cert-file pki/apiserver.crt --tls-private-key-file pki/apiserver.key --client-ca-file pki/ca.crt \
  --service-account-issuer https://kubernetes.default.svc --service-account-key-file pki/sa.pub \
  --service-account-signing-key-file pki/sa.key --service-cluster-ip-range 10.96.0.0/16 \
  --requestheader-client-ca-file pki/front-proxy-ca.crt --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --proxy-client-cert-file pki/front-proxy-client.crt --proxy-client-key-file pki/front-proxy-client.key \
  --enable-aggregator-routing=true \
  --authorization-mode RBAC --allow-privileged=true > "$dir/kube-apiserver.log" 2>&1 &
echo $! > "$dir/kube-apiserver.pid"
ok=""
for _ in $(seq 300); do
  if curl -sf --cacert pki/ca.crt --cert pki/admin.crt --key pki/admin.key "https://127.0.0.1:$api_port/readyz" >/dev/null; then ok=1; break; fi
  kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null || break
  sleep 0.2
done
[ -n "$ok" ] || fail kube-apiserver

kc="$dir/kubeconfig"
cat > "$kc" <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$dir/pki/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$dir/pki/admin.crt", client-key: "$dir/pki/admin.key"}
contexts:
- name: test
  context: {cluster: test, user: admin, namespace: default}
current-context: test
KC

start() { # name args...
  local name="$1"; shift
  "$bin/$name" "$@" > "$dir/$name.log" 2>&1 &
  echo $! > "$dir/$name.pid"
}
start kube-controller-manager --kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc" \
  --bind-address 127.0.0.1 --secure-port "$(free_port)" --leader-elect=false --use-service-account-credentials=false \
  --service-account-private-key-file pki/sa.key --root-ca-file pki/ca.crt \
  --cluster-signing-cert-file pki/ca.crt --cluster-signing-key-file pki/ca.key
start kube-scheduler --kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc" \
  --bind-address 127.0.0.1 --secure-port "$(free_port)" --leader-elect=false
start kwok --kubeconfig "$kc" --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
  --cidr 10.244.0.1/24 --node-ip 10.244.0.1 --node-lease-duration-seconds 40
k() { "$bin/kubectl" --kubeconfig "$kc" "$@"; }
for c in kube-controller-manager kube-scheduler kwok; do
  sleep 0.2; kill -0 "$(cat "$dir/$c.pid")" 2>/dev/null || fail "$c"
done
k apply -f - >/dev/null <<'NODE' || fail kube-apiserver
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels: {kubernetes.io/hostname: kwok-node-0, kubernetes.io/os: linux, kubernetes.io/arch: amd64, type: kwok}
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "1000"}
  capacity: {cpu: "32", memory: 256Gi, pods: "1000"}
NODE
k apply --server-side -f "$servicemonitor_crd" -f "$prometheusrule_crd" -f "$scaledobject_crd" -f "$triggerauth_crd" >/dev/null || fail kube-apiserver
for _ in $(seq 150); do
  [ "$(k get node kwok-node-0 -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] && break
  sleep 0.2
done
[ "$(k get node kwok-node-0 -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] || fail kwok
for _ in $(seq 150); do k get serviceaccount default >/dev/null 2>&1 && break; sleep 0.2; done
k get serviceaccount default >/dev/null 2>&1 || fail kube-controller-manager
node_env=""
if [ -n "$real_node" ]; then
  node_env=$(dir="$dir" bin="$bin" kc="$kc" NODE_IP="$node_ip" "$here/node/up.sh") || exit 1
fi
printf 'export KUBECONFIG=%q\n' "$kc"
[ -z "$node_env" ] || echo "$node_env"
