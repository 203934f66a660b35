"""Build the C++17 placement planner (csrc/) as ``modse_megatron.placement._planner``.

All package metadata lives in pyproject.toml; this file only declares the extension,
so ``pip install .`` compiles it once and nothing is compiled at run time.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "modse_megatron.placement._planner",
        ["csrc/bindings.cpp"],
        include_dirs=["csrc"],
        depends=sorted(glob("csrc/*.h")),  # rebuild when a header changes
        cxx_std=17,
        extra_compile_args=["-O3", "-Wall"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
