"""The tree shows the layers, and the imports keep to them (STYLE.md: layers).

Layers, lowest first (docs/architecture.md, "Layout"):

- ``protocol/`` the wire format (frames, header, the protobuf messages);
- ``common/`` helpers every process uses (metrics, the admin HTTP server,
  secret files, Unix sockets, start-up errors);
- ``core/`` the sans-IO data-plane kernel (engine, relay twins, balancer,
  inbound guard, authorization, hot-restart tables) and ``governance/`` its
  policy cores;
- ``discovery/`` the protocol the proxy and the control plane both speak;
- the processes: ``proxy/`` (Trio shell of the kernel), ``controlplane/``,
  ``agent/``, ``sdk/`` (the app's side), ``ctl/`` (operator CLI).

Checked here: every module of a sans-IO layer (and the sans-IO cores the
shells keep beside them) imports no Trio, sockets or asyncio and reads no
clock, *transitively*; and the import graph, followed transitively (function
level imports included), never crosses into a layer a module must not know:
the proxy never loads the control plane's server or stores, the SDK never
loads the proxy, the kernel never loads a shell.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterable

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "src" / "octoproxy"
SANS_IO_FOLDERS = ("protocol", "core", "governance")
# sans-IO cores that live beside their shells
CORES = ["identity/_names.py", "proxy/_config.py", "common/_metrics.py", "agent/_policy.py", "discovery/_xds_client.py",
         "discovery/_xds_server.py", "discovery/_appconfig.py", "sdk/_core.py", "sdk/_server_core.py", "sdk/_subscribe_core.py",
         "sdk/_config_core.py", "identity/_ca.py", "identity/_csr.py", "controlplane/_auth.py", "controlplane/_issuance.py"]
FORBIDDEN_MODULES = {"trio", "socket", "selectors", "asyncio", "trio_websocket", "ssl"}
SHELLS = ("proxy", "controlplane", "agent", "sdk", "ctl")
# layer -> the octoproxy packages its modules must never load, even indirectly
MUST_NOT_LOAD = {
    "protocol": ("core", "governance", "discovery", "common", "identity", *SHELLS),
    "common": ("core", "governance", "discovery", *SHELLS),
    "core": ("discovery", *SHELLS),
    "governance": ("discovery", *SHELLS),
    "discovery": SHELLS,
    "proxy": ("controlplane", "agent", "ctl"),
    "sdk": ("proxy", "controlplane", "agent", "ctl", "core", "governance"),
    "controlplane": ("proxy", "agent", "ctl", "sdk"),  # core: it validates what it stores (authorization rules)
    "identity": ("core", "governance", "discovery", *SHELLS),
}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PKG.rglob("*")):
        if path.suffix in (".py", ".pyx") and "__pycache__" not in path.parts:
            out[_module_name(path)] = path
    return out


SOURCES = _sources()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every module ``name`` imports (absolute names), at any level of the file."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    if path.suffix == ".pyx":  # Cython: the import lines, read as text
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("import", "from", "cimport"):
                target = words[1]
                if target.startswith("."):
                    level = len(target) - len(target.lstrip("."))
                    base = package.split(".")[: len(package.split(".")) - level + 1]
                    target = ".".join(base + [target.lstrip(".")]).rstrip(".")
                found.add(target)
        return found
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            for a in node.names:  # `from pkg import submodule`
                if f"{module}.{a.name}" in SOURCES:
                    found.add(f"{module}.{a.name}")
    return found


def _with_parents(names: Iterable[str]) -> set[str]:
    """Importing ``a.b.c`` runs ``a`` and ``a.b`` first."""
    out = set()
    for n in names:
        parts = n.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


GRAPH = {name: _with_parents(_imports(name, path)) for name, path in SOURCES.items()}


def closure(name: str, own_packages: bool = True) -> dict[str, str]:
    """Everything ``name`` loads, transitively: module -> the module that imported it.

    ``own_packages``: count the packages that contain ``name`` (Python runs
    their ``__init__`` first). The sans-IO check leaves them out: a core may
    sit in a package whose ``__init__`` offers its Trio front end.
    """
    seen: dict[str, str] = {}
    todo = [name]
    for parent in _with_parents([name]) if own_packages else ():
        if parent != name and parent in GRAPH:
            seen.setdefault(parent, name)
            todo.append(parent)
    skip = {name} if own_packages else _with_parents([name])
    while todo:
        cur = todo.pop()
        for dep in GRAPH.get(cur, ()):
            if dep not in seen and dep not in skip:
                seen[dep] = cur
                if dep in GRAPH:
                    todo.append(dep)
    return seen


def chain(name: str, target: str, via: dict[str, str]) -> str:
    path = [target]
    while path[-1] != name and path[-1] in via:
        path.append(via[path[-1]])
    return " <- ".join(path)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "octoproxy" else None


def test_the_layer_folders_exist() -> None:
    for folder in ("protocol", "core", "governance", "discovery", "common", *SHELLS, "identity"):
        assert (PKG / folder / "__init__.py").is_file(), folder
    # the public import paths stay where users find them
    for public in ("octoproxy.sdk", "octoproxy.frame", "octoproxy.testing"):
        assert public in SOURCES, public


SANS_IO = sorted(n for n in SOURCES if _layer(n) in SANS_IO_FOLDERS) + [_module_name(PKG / c) for c in CORES]


@pytest.mark.parametrize("name", SANS_IO)
def test_core_is_sans_io(name: str) -> None:
    via = closure(name, own_packages=False)
    loaded = {name, *via}
    for mod in sorted(loaded):
        bad = {m for m in GRAPH.get(mod, set()) if m.split(".")[0] in FORBIDDEN_MODULES} if mod.startswith("octoproxy") else set()
        assert not bad, f"{name} loads {mod}, which imports {bad}: {chain(name, mod, via)}"
    text = SOURCES[name].read_text()
    for clock in ("time.time(", "time.monotonic(", "trio.current_time(", "time.perf_counter("):
        assert clock not in text, f"{name} reads the clock ({clock}); pass time in"


@pytest.mark.parametrize("layer", sorted(MUST_NOT_LOAD))
def test_layer_never_loads_what_it_must_not(layer: str) -> None:
    banned = MUST_NOT_LOAD[layer]
    problems = []
    for name in sorted(n for n in SOURCES if _layer(n) == layer):
        via = closure(name)
        for mod in via:
            if _layer(mod) in banned:
                problems.append(chain(name, mod, via))
                break
    assert not problems, "\n".join(problems)


def test_the_graph_sees_function_level_and_submodule_imports() -> None:
    """The checker itself: a lazy import and a ``from pkg import module`` are followed."""
    via = closure("octoproxy._cli")
    assert "octoproxy.controlplane._main" in via  # imported inside a function
    assert "octoproxy.protocol._frame_py" in closure("octoproxy.frame")  # from .protocol import _frame_py


def test_no_script_folder_module_shadows_the_standard_library() -> None:
    """A script's folder comes first on sys.path: ``bench/http.py`` once hid the
    ``http`` package from every other benchmark (``urllib.request`` failed)."""
    import sys

    root = PKG.parent.parent
    for folder in ("bench", "examples", "ci", "tests", "tests/apps"):
        for path in sorted((root / folder).glob("*.py")):
            assert path.stem not in sys.stdlib_module_names, f"{path.relative_to(root)} shadows the standard library's {path.stem!r}"
