#!/usr/bin/env bash
# Build release wheels for CPython 3.10-3.13, manylinux and musllinux, x86_64
# and aarch64 ([tool.cibuildwheel] in pyproject.toml), running the codec test
# suite inside each wheel. Needs a container engine (Docker or Podman).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet "cibuildwheel>=2.20"
python3 -m cibuildwheel --platform linux --output-dir wheelhouse "$@"
