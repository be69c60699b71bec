#!/usr/bin/env bash
# Install octoproxy from this checkout (building the Cython extension) and run
# the test suite: once with the compiled codec, then the codec tests again on
# the pure-Python twin. Used by .ci/run and by the GitHub workflow.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
echo "== installing octoproxy and test dependencies"
$PY -m pip install --quiet --disable-pip-version-check ".[test]"
bash ci/install_services.sh

echo "== mypy --strict on the package"
$PY -m pip install --quiet --disable-pip-version-check "mypy>=1.10"
$PY -m mypy

echo "== octoproxy --version"
# run from outside the checkout so that the installed package is imported
version=$(cd / && octoproxy --version)
echo "$version"
case "$version" in *"frame codec: cython"*) ;; *) echo "the compiled codec did not load" >&2; exit 1 ;; esac

echo "== test suite (compiled codec)"
# CI runs the etcd tests for real: a missing etcd binary fails the run instead of skipping
OCTOPROXY_REQUIRE_ETCD=1 $PY -m pytest -q -p no:cacheprovider

echo "== codec, engine and proxy end-to-end tests again on the pure-Python twins"
# the env var reaches the proxy processes the end-to-end tests start, so they
# run the twin codec and relay too
OCTOPROXY_NO_EXTENSIONS=1 $PY -m pytest -q -p no:cacheprovider tests/test_codec.py tests/test_vectors.py tests/test_engine.py tests/test_proxy_e2e.py tests/test_sdk_core.py
OCTOPROXY_NO_EXTENSIONS=1 $PY -m pytest -q -p no:cacheprovider tests/test_authz.py tests/test_mesh_tls.py tests/test_http_e2e.py
(cd / && OCTOPROXY_NO_EXTENSIONS=1 octoproxy --version) | grep -q "frame codec: python"
