"""Shared fixtures: every codec test runs on both implementations.

The compiled module is expected unless OCTOPROXY_NO_EXTENSIONS=1 (then only
the twin is tested). A missing compiled module is a failure, not a skip
(see test_codec.py::test_compiled_module_loaded).
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from octoproxy.protocol import _frame_py

NO_EXTENSIONS = os.environ.get("OCTOPROXY_NO_EXTENSIONS", "") not in ("", "0")

try:
    from octoproxy.protocol import _fastframe
except ImportError:  # a failing test reports it; see test_compiled_module_loaded
    _fastframe = None  # type: ignore[assignment]

IMPLS: dict[str, ModuleType] = {"python": _frame_py}
if not NO_EXTENSIONS and _fastframe is not None:
    IMPLS["cython"] = _fastframe


@pytest.fixture(params=sorted(IMPLS))
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The codec implementation under test (compiled module or twin)."""
    return IMPLS[request.param]
