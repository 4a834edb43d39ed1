#!/usr/bin/env bash
# Validates every manifest offline: Kubernetes schemas in strict mode (several versions),
# yamllint, the generated k3s-legacy variant being current, and our own drop-in and
# hardening rules (check-deploy.py). Also lints the shell scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
py_tools kubernetes-validate==1.37.0 yamllint==1.38.0
for k8s in 1.25.0 1.30.0 1.37.0; do
  python3 -m kubernetes_validate --strict --quiet -k "$k8s" deploy/*.yml
done
echo "check-deploy: schemas (strict) ok for Kubernetes 1.25, 1.30, 1.37"
python3 -m yamllint -s deploy/
echo "check-deploy: yamllint ok"
before=$(cat deploy/rdma-device-k3s-legacy.yml deploy/rdma-device-cdi.yml)
deploy/variants.sh
if [ "$before" != "$(cat deploy/rdma-device-k3s-legacy.yml deploy/rdma-device-cdi.yml)" ]; then
  echo "check-deploy: a generated variant in deploy/ was stale; run deploy/variants.sh and commit" >&2
  exit 1
fi
python3 scripts/check-deploy.py
apt_need shellcheck
shellcheck -x manifest.sh scripts/*.sh deploy/variants.sh .ci/run
echo "check-deploy: shellcheck ok"
