"""Build the C++17 placement planner (csrc/) as ``modse_megatron.placement._planner``.

All package metadata lives in pyproject.toml; this file only declares the extension,
so ``pip install .`` compiles it once and nothing is compiled at run time.

``MODSE_SANITIZE=1 pip install -e .`` builds it with AddressSanitizer and UndefinedBehavior-
Sanitizer (and the planner's debug asserts on); ``.ci/sanitize`` runs the placement tests on
such a build without touching the normal one.
"""
import os
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

SANITIZE = os.environ.get("MODSE_SANITIZE", "0") not in ("", "0")
# -UNDEBUG: Python's own CFLAGS define NDEBUG; a sanitized build wants the asserts too.
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]

ext_modules = [
    Pybind11Extension(
        "modse_megatron.placement._planner",
        ["csrc/bindings.cpp"],
        include_dirs=["csrc"],
        depends=sorted(glob("csrc/*.h")),  # rebuild when a header changes
        cxx_std=17,
        extra_compile_args=[*(SANITIZER_FLAGS + ["-UNDEBUG"] if SANITIZE else ["-O3"]), "-Wall"],
        extra_link_args=SANITIZER_FLAGS if SANITIZE else [],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
