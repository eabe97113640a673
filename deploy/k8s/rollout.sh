#!/usr/bin/env bash
# Roll turngate out with migrations first, without Helm:
#   deploy/k8s/rollout.sh IMAGE [NAMESPACE] [--gpu]
# 1. config (the Secret must exist already: see secret.example.yaml); 2. the migration Job with
# IMAGE, waited on (a failure stops here, the running pods are untouched); 3. the StatefulSet and
# the rest with IMAGE; 4. rollout status.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
image="${1:?usage: rollout.sh IMAGE [NAMESPACE] [--gpu]}"
ns="${2:-default}"
overlay="$here/base"
[[ "${3:-}" == "--gpu" ]] && overlay="$here/gpu"
k() { kubectl --namespace "$ns" "$@"; }

if ! k get secret turngate >/dev/null 2>&1; then
  echo "no Secret 'turngate' in namespace $ns: create it from real values first (see $here/secret.example.yaml)" >&2
  exit 1
fi
k apply -f "$here/base/configmap.yaml"
k delete job turngate-migrate --ignore-not-found --wait=true
sed "s#image: turngate:latest#image: ${image}#" "$here/migrate-job.yaml" | k apply -f -
if ! k wait --for=condition=complete job/turngate-migrate --timeout=600s; then
  k logs job/turngate-migrate --tail=100 || true
  echo "migration failed; the running pods were not changed" >&2
  exit 1
fi
kubectl kustomize "$overlay" | sed -E "s#image: turngate(:[A-Za-z0-9._-]+)?\$#image: ${image}#" | k apply -f -
if kubectl get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1; then  # Prometheus Operator
  k apply -f "$here/servicemonitor.yaml" -f "$here/prometheusrule.yaml"
fi
k rollout status statefulset/turngate --timeout=900s
# Earlier releases ran the proxy as a Deployment of the same name: retire it once the StatefulSet's
# pods are ready (its pods drain on SIGTERM like any other).
k delete deployment turngate --ignore-not-found
