"""Shared fixtures: the kernel and its byte-level primitives run on both implementations in one run.

Three compiled modules have a hand-written pure-Python twin: the frame codec
(``_fastframe`` / ``_frame_py``), the relay fast path (``_fastpath`` /
``_relay_py``) and the inbound guard's loops (``_fastguard`` /
``_guard_py``). The kernel itself (``Engine``, ``Link``, ``Cluster``,
``Route``) has one source, ``core/_kernel.py``, run interpreted or compiled
(``_kernel_c``). The ``impl`` fixture is parametrized ``compiled`` and
``python``; for the length of a test it installs that implementation of all
four (every name of the kernel modules and of the test modules that refers
to one implementation's object is pointed at the other's object of the same
name), so the engine, the relay and the guard run on it, and it checks that
no such module still refers to the other implementation. A test that imports
``Engine`` from ``octoproxy.core._engine`` at its top gets the installed one.

The ``compiled`` param is skipped only when the extensions are not built (a
failure elsewhere: see test_codec.py::test_compiled_module_loaded). With
``OCTOPROXY_NO_EXTENSIONS=1`` the package loads the twins by default and the
fixture still runs both (installing the compiled modules for ``compiled``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

NO_EXTENSIONS = os.environ.get("OCTOPROXY_NO_EXTENSIONS", "") not in ("", "0")

#: (pure-Python twin, compiled module) per primitive
TWIN_MODULES = {
    "codec": ("octoproxy.protocol._frame_py", "octoproxy.protocol._fastframe"),
    "relay": ("octoproxy.core._relay_py", "octoproxy.core._fastpath"),
    "guard": ("octoproxy.core._guard_py", "octoproxy.core._fastguard"),
    "kernel": ("octoproxy.core._kernel", "octoproxy.core._kernel_c"),
}
#: the twins of one source (their own globals are swapped too, for the byte-level twins)
ONE_SOURCE = ("kernel",)
#: the kernel: modules that use the twins (their names are swapped), by package
KERNEL = ("octoproxy.frame", "octoproxy.protocol", "octoproxy.core")
#: imported first, so that every kernel module that uses a twin is loaded
KERNEL_ENTRIES = ("octoproxy.frame", "octoproxy.core._engine", "octoproxy.core._guard")


@dataclass(frozen=True)
class Impl:
    """One implementation of the byte-level primitives.

    Attribute access falls through to the codec module, so a codec test reads
    ``impl.FrameDecoder`` or ``impl.encode_request``.
    """

    name: str
    codec: ModuleType
    relay: ModuleType
    guard: ModuleType
    kernel: ModuleType

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.codec, attr)


def _load(which: int) -> Impl | None:
    mods = {}
    for key, names in TWIN_MODULES.items():
        try:
            mods[key] = importlib.import_module(names[which])
        except ImportError:
            return None
    return Impl("compiled" if which else "python", **mods)


PYTHON = _load(0)
assert PYTHON is not None
COMPILED = _load(1)

#: the implementations this run tests, by name
IMPLS: dict[str, Impl] = {"python": PYTHON}
if COMPILED is not None:
    IMPLS["compiled"] = COMPILED


def _kernel_modules() -> list[ModuleType]:
    """The modules whose names are swapped: the kernel's (but the hand-written twins) and the tests'."""
    for name in KERNEL_ENTRIES:
        importlib.import_module(name)
    twins = {name for key, pair in TWIN_MODULES.items() if key not in ONE_SOURCE for name in pair}
    return [
        m
        for name, m in sorted(sys.modules.items())
        if m is not None
        and name not in twins
        and (name in KERNEL or name.startswith(tuple(k + "." for k in KERNEL)) or name.startswith("test_") or name == "conftest")
    ]


def _swaps_for(mod: ModuleType, swap: dict[int, tuple[Any, Any]], own: dict[int, tuple[Any, Any]]) -> dict[int, tuple[Any, Any]]:
    """A one-source kernel module keeps its own classes (only its byte-level twins are swapped)."""
    one_source = {name for key in ONE_SOURCE for name in TWIN_MODULES[key]}
    return {k: v for k, v in swap.items() if k not in own} if mod.__name__ in one_source else swap


def _twin_pairs(target: Impl, others: list[Impl], keys: tuple[str, ...] = tuple(TWIN_MODULES)) -> dict[int, tuple[Any, Any]]:
    """id(object of another implementation) -> (that object, the same-named object of ``target``), where they differ."""
    swap: dict[int, tuple[Any, Any]] = {}
    for other in others:
        for key in keys:
            src, dst = getattr(other, key), getattr(target, key)
            if src is not dst:
                swap[id(src)] = (src, dst)
            for attr in set(vars(src)) & set(vars(dst)):
                if attr.startswith("__"):
                    continue
                a, b = vars(src)[attr], vars(dst)[attr]
                if a is b or (isinstance(a, (int, float, bytes)) and a == b):
                    continue
                # a name that refers to a whole twin module (the kernel's ``_relay_impl``)
                # keeps that module's own mapping
                swap.setdefault(id(a), (a, b))
    return swap


@contextlib.contextmanager
def installed(impl: Impl) -> Iterator[Impl]:
    """Run the kernel on ``impl`` inside the block (restored after).

    ``impl`` may also be a variant made by a test (e.g. one twin function
    replaced): every name that refers to another implementation's object is
    pointed at ``impl``'s.
    """
    others = [i for i in IMPLS.values() if i is not impl]
    with pytest.MonkeyPatch.context() as mp:
        swap = _twin_pairs(impl, others)
        own = _twin_pairs(impl, others, ONE_SOURCE)
        for mod in _kernel_modules():
            mine = _swaps_for(mod, swap, own)
            for attr, value in list(vars(mod).items()):
                hit = mine.get(id(value))
                if hit is not None and hit[0] is value:
                    mp.setattr(mod, attr, hit[1])
        stale = [
            f"{mod.__name__}.{attr}"
            for mod in _kernel_modules()
            for attr, value in vars(mod).items()
            if (hit := _swaps_for(mod, swap, own).get(id(value))) is not None and hit[0] is value
        ]
        assert not stale, f"still on another implementation than {impl.name}: {stale}"
        yield impl


def _params() -> list[Any]:
    return [
        pytest.param("compiled", marks=pytest.mark.skipif(COMPILED is None, reason="the compiled extensions are not built")),
        pytest.param("python"),
    ]


@pytest.fixture(params=_params())
def impl(request: pytest.FixtureRequest) -> Iterator[Impl]:
    """The implementation under test (compiled or python), installed in the kernel."""
    with installed(IMPLS[request.param]) as chosen:
        yield chosen
