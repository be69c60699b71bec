"""Build script: the compiled parts are ``octoproxy.protocol._fastframe`` (frame codec,
scanner, route table) and ``octoproxy.core._fastpath`` (the proxy's per-frame relay).

Environment switches:
  OCTOPROXY_NO_EXTENSIONS=1  build a pure-Python wheel (the twin is used at run time)
  OCTOPROXY_CYTHON_TRACE=1   compile with line tracing, for coverage of the .pyx
"""

import os
import sys

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get("OCTOPROXY_NO_EXTENSIONS", "") not in ("", "0")
TRACE = os.environ.get("OCTOPROXY_CYTHON_TRACE", "") not in ("", "0")


def extensions() -> list:
    if NO_EXTENSIONS:
        print("octoproxy: building WITHOUT extensions (pure-Python twin only)", file=sys.stderr)
        return []
    from Cython.Build import cythonize

    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if TRACE else []
    args = ["-O3"] if sys.platform != "win32" else []
    exts = [
        Extension(f"octoproxy.{name}", [f"src/octoproxy/{name.replace('.', '/')}.pyx"], define_macros=macros, extra_compile_args=args)
        for name in ("protocol._fastframe", "core._fastpath", "core._fastguard")
    ]
    directives = {
        "language_level": "3",
        "boundscheck": False,
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": False,
        "linetrace": TRACE,
        "embedsignature": True,
    }
    print(
        "octoproxy: building the Cython extensions _fastframe, _fastpath, _fastguard%s" % (" with line tracing" if TRACE else ""),
        file=sys.stderr,
    )
    return cythonize(exts, compiler_directives=directives, include_path=["src"])


setup(ext_modules=extensions())
