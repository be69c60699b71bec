#!/usr/bin/env bash
# Servers the end-to-end tests need, from Debian's packages (idempotent).
# Nothing yet: etcd arrives with the discovery work.
set -euo pipefail
exit 0
