#!/usr/bin/env bash
# On a machine with Docker and kind: builds both images, creates (or reuses) the kind
# cluster from kind/cluster.yaml, loads the images, installs the chart, installs the
# ServiceMonitor and ScaledObject CRDs, and runs the same end-to-end suite as .ci/run.
# Pods run for real on kind, so EventWorkers in the suite must reach the test's Redis from
# inside the cluster: E2E_REDIS_HOST (default: the kind network's gateway) is the address
# the suite puts into EventWorker specs.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in docker kind kubectl helm go cargo; do
  command -v "$tool" >/dev/null || { echo "kind/e2e.sh needs $tool" >&2; exit 1; }
done
version=$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)
cluster=eventworker-e2e

docker build -f worker/Dockerfile --build-arg VERSION="$version" -t "eventworker:$version" .
docker build -f operator/Dockerfile --build-arg VERSION="$version" -t "eventworker-operator:$version" .
kind get clusters | grep -qx "$cluster" || kind create cluster --config kind/cluster.yaml
kind load docker-image --name "$cluster" "eventworker:$version" "eventworker-operator:$version"
export KUBECONFIG="${TMPDIR:-/tmp}/kind-$cluster.kubeconfig"
kind get kubeconfig --name "$cluster" > "$KUBECONFIG"

source tests/controlplane/versions.env
moddir() { (cd tests/controlplane/etcd && GOFLAGS=-mod=mod go mod download -json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])'); }
kubectl apply --server-side \
  -f "$(moddir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
  -f "$(moddir "github.com/kedacore/keda/v2@$KEDA_VERSION")/config/crd/bases/keda.sh_scaledobjects.yaml"

# The in-cluster operator watches only its own namespace; the suite runs its own operators
# in namespaces of their own.
helm upgrade --install eventworker-operator charts/eventworker-operator -n eventworker-system --create-namespace \
  --set image.tag="$version" --set watchNamespace=eventworker-system --wait --timeout 180s

export E2E_REDIS_HOST="${E2E_REDIS_HOST:-$(docker network inspect kind -f '{{(index .IPAM.Config 0).Gateway}}')}"
export EW_REDIS_BIND=0.0.0.0
cargo build --locked -p eventworker -p eventworker-operator --bins
cargo test --locked -p eventworker-e2e
