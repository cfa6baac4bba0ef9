#!/usr/bin/env bash
# promtool on the shipped monitoring (promtool from tests/tools/build.sh): the rules file
# and a per-EventWorker render are valid, the alerts behave as rules.test.yaml says, and
# every query of the Grafana dashboard parses.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
cache="${EVENTWORKER_CACHE:-$HOME/.cache/eventworker}"
promtool="${PROMTOOL:-$cache/bin/promtool}"
operator="${EVENTWORKER_OPERATOR_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/eventworker-operator}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$operator" prometheus-rules > "$tmp/all.yaml"
if ! diff -u "$root/monitoring/prometheus-rules.yaml" "$tmp/all.yaml"; then
  echo "monitoring/prometheus-rules.yaml is stale: run 'eventworker-operator prometheus-rules > monitoring/prometheus-rules.yaml' (and copy it to charts/eventworker-operator/files/)" >&2
  exit 1
fi
diff -u "$root/monitoring/prometheus-rules.yaml" "$root/charts/eventworker-operator/files/prometheus-rules.yaml"
"$operator" prometheus-rules --eventworker shop/orders > "$tmp/one.yaml"
"$promtool" check rules "$root/monitoring/prometheus-rules.yaml" "$tmp/one.yaml"
"$promtool" test rules "$here/rules.test.yaml"

# The dashboard: the generator's output is committed (both copies), and each query parses
# (written as recording rules, Grafana's variables replaced by values).
python3 "$root/monitoring/dashboard.py" --check
python3 - "$root/monitoring/grafana-dashboard.json" > "$tmp/dashboard.yaml" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("groups:\n- name: dashboard\n  rules:")
for p in d["panels"]:
    for t in p["targets"]:
        expr = t["expr"].replace("$__rate_interval", "5m").replace("$namespace", "shop").replace("$eventworker", "orders")
        print(f"  - record: dashboard:panel_{p['id']}_{t['refId']}\n    expr: {json.dumps(expr)}")
PY
"$promtool" check rules "$tmp/dashboard.yaml"
