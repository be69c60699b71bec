"""Build script: the only compiled part is ``octoproxy._fastframe`` (Cython).

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
    ext = Extension(
        "octoproxy._fastframe",
        ["src/octoproxy/_fastframe.pyx"],
        define_macros=macros,
        extra_compile_args=["-O3"] if sys.platform != "win32" else [],
    )
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
        "octoproxy: building the Cython extension _fastframe%s" % (" with line tracing" if TRACE else ""),
        file=sys.stderr,
    )
    return cythonize([ext], compiler_directives=directives)


setup(ext_modules=extensions())
