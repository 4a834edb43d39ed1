#!/usr/bin/env bash
# Validates every manifest offline: Kubernetes schemas in strict mode (several versions),
# yamllint, the generated variants being current, and our own drop-in and hardening rules
# (check-deploy.py, which also runs the DRA driver's CEL: its admission policy and DeviceClass
# selectors). Then the monitoring files (check-monitoring.py, with promtool taken out of Debian's
# prometheus package): the alerts' rules and their unit tests, the dashboard's queries, the
# PodMonitor. Also lints the shell scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
py_tools kubernetes-validate==1.37.0 yamllint==1.38.0 cel-expr-python==0.1.3

# validate K8S FILE...: strict schemas. kubernetes-validate only warns (and exits 0) for a kind
# it has no schema for, so any output fails here: an apiVersion the version lacks is an error.
validate() {
  local k8s=$1 out
  shift
  if ! out=$(python3 -m kubernetes_validate --strict --quiet -k "$k8s" "$@" 2>&1) || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    echo "check-deploy: schemas (strict) fail for Kubernetes $k8s" >&2
    exit 1
  fi
}

# The DRA driver and its examples use resource.k8s.io/v1 (DeviceClass with extendedResourceName,
# ResourceClaimTemplate: schemas from 1.34 on), ValidatingAdmissionPolicy v1 (1.30 on),
# recursiveReadOnly and pods' resourceClaims: they are valid from 1.34 only, and checked there.
# The device-plugin manifests and examples still go back to 1.25. deploy/monitoring/ holds
# prometheus-operator kinds (PodMonitor, PrometheusRule) that have no schema here: promtool and
# check-monitoring.py check those.
dra=(deploy/rdma-dra.yml deploy/dra-*.yml)
plugin=()
for f in deploy/*.yml; do
  case "$f" in
    deploy/rdma-dra.yml | deploy/dra-*.yml) ;;
    *) plugin+=("$f") ;;
  esac
done
for k8s in 1.25.0 1.30.0 1.37.0; do
  validate "$k8s" "${plugin[@]}"
done
echo "check-deploy: schemas (strict) ok for Kubernetes 1.25, 1.30, 1.37: ${plugin[*]}"
for k8s in 1.34.0 1.36.0 1.37.0; do
  validate "$k8s" "${dra[@]}"
done
echo "check-deploy: schemas (strict) ok for Kubernetes 1.34, 1.36, 1.37: ${dra[*]}"
python3 -m yamllint -s deploy/
echo "check-deploy: yamllint ok (deploy/, deploy/monitoring/)"
variants=(deploy/rdma-device-k3s-legacy.yml deploy/rdma-device-cdi.yml deploy/rdma-device-metrics.yml)
before=$(cat "${variants[@]}")
deploy/variants.sh
if [ "$before" != "$(cat "${variants[@]}")" ]; then
  echo "check-deploy: a generated variant in deploy/ was stale; run deploy/variants.sh and commit" >&2
  exit 1
fi
python3 scripts/check-deploy.py
deb_tool prometheus /usr/bin/promtool
python3 scripts/check-monitoring.py
apt_need shellcheck
shellcheck -x manifest.sh scripts/*.sh deploy/variants.sh .ci/run
echo "check-deploy: shellcheck ok"
