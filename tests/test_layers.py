"""The sans-IO cores import no Trio and read no clock (STYLE.md: layers)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "src" / "octoproxy"
CORES = ["identity/_names.py", "_protocol.py", "_errors.py", "_frame.py", "_frame_py.py", "_fastframe.pyx", "_balancer.py", "_config.py", "_metrics.py", "agent/_policy.py", "proxy/_engine.py", "proxy/_hot_restart.py", "proxy/_relay_py.py", "_xds_client.py", "_xds_server.py"]
# governance policy cores (docs/governance.md)
CORES += ["governance/__init__.py", "governance/_verdict.py", "governance/_routing.py", "governance/_outlier.py", "governance/_breaker.py",
          "governance/_retry.py", "governance/_ratelimit.py", "governance/_trace.py", "governance/_policy.py", "governance/_proto.py"]
# the SDK's sans-IO cores (docs/sdk.md)
CORES += ["sdk/_core.py", "sdk/_server_core.py", "sdk/_subscribe_core.py", "sdk/_config_core.py"]
# configuration for apps: versions and gradual-release decisions (docs/control-plane.md)
CORES += ["_appconfig.py"]
# mesh-tls: authorization and the inbound guard (docs/security.md)
CORES += ["proxy/_authz.py", "proxy/_guard.py", "proxy/_guard_py.py", "_fastguard.pyx"]
FORBIDDEN_MODULES = {"trio", "socket", "selectors", "asyncio"}


def imported_modules(path: pathlib.Path) -> set[str]:
    if path.suffix == ".pyx":  # Cython: check the import lines textually
        mods = set()
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("import", "from", "cimport"):
                mods.add(words[1].split(".")[0])
        return mods
    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


@pytest.mark.parametrize("name", CORES)
def test_core_is_sans_io(name: str) -> None:
    path = PKG / name
    if not path.exists():
        pytest.fail(f"{name} is listed as a core but does not exist")
    bad = imported_modules(path) & FORBIDDEN_MODULES
    assert not bad, f"{name} imports {bad}"
    text = path.read_text()
    for clock in ("time.time(", "time.monotonic(", "trio.current_time(", "time.perf_counter("):
        assert clock not in text, f"{name} reads the clock ({clock}); pass time in"
