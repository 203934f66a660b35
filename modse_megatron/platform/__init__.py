"""Where modse-megatron meets the hardware: megatron-core version pinning and the CPU layer.

``import modse_megatron`` calls :func:`activate`, so a user or a test needs nothing else for
megatron-core to run on a CPU-only machine. This package is the only place that patches
anything (see :mod:`modse_megatron.platform.cpu` for each CPU patch and
:mod:`modse_megatron.platform.fixes` for megatron bugs on its no-apex/TE path, each with the
line it answers).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

SUPPORTED_MEGATRON_CORE = "0.16.1"
_SKIP_ENV = "MODSE_SKIP_MEGATRON_VERSION_CHECK"


class PlatformError(RuntimeError):
    """The environment cannot run modse-megatron as asked; the message names the fix."""


def check_megatron_version(version: str | None = None) -> str:
    """Refuse a megatron-core release this layer was not written for.

    The CPU patches and the MoDSE layer subclass megatron internals that change between
    releases, so a mismatch fails loudly here instead of deep inside a training step.
    Set ``MODSE_SKIP_MEGATRON_VERSION_CHECK=1`` to try another release at your own risk.
    """
    if version is None:
        from megatron.core.package_info import __version__ as version
    if version != SUPPORTED_MEGATRON_CORE and os.environ.get(_SKIP_ENV) != "1":
        raise PlatformError(
            f"megatron-core {version} is installed but modse-megatron supports only "
            f"{SUPPORTED_MEGATRON_CORE}: run `pip install megatron-core=={SUPPORTED_MEGATRON_CORE}` "
            f"(or set {_SKIP_ENV}=1 to try anyway)"
        )
    return version


def activate() -> None:
    """Check the megatron-core version, install the CPU layer (only without CUDA) and the
    no-apex/TE fixes (only where megatron lacks apex/TE). Idempotent."""
    check_megatron_version()
    from . import cpu, fixes

    cpu.install()
    fixes.install()


class _ActivateAfterImport(importlib.abc.MetaPathFinder):
    """Run :func:`activate` right after ``megatron.core`` finishes importing.

    Importing megatron-core costs ~4 s (it pulls in torch inductor); tools that never touch it
    (the placement planner CLI) should not pay that just because they live in this package.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != "megatron.core":
            return None
        sys.meta_path.remove(self)  # find the real spec with the remaining finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_activate(module):
            exec_module(module)
            activate()

        spec.loader.exec_module = exec_then_activate
        return spec


def activate_when_megatron_imports() -> None:
    """Activate now if megatron-core is already imported, else right after it is."""
    if "megatron.core" in sys.modules:
        activate()
    elif not any(isinstance(f, _ActivateAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _ActivateAfterImport())


def cpu_layer_active() -> bool:
    """Whether megatron-core is running through the CPU compatibility layer."""
    from . import cpu

    return cpu.installed()


def resolve_device(requested: str = "auto") -> str:
    """Map a user's ``--device`` choice to 'cuda' or 'cpu', or fail with the fix.

    'auto' picks CUDA when present. Asking for CUDA without it is an error, not a silent
    CPU run: a user who asked for GPUs wants to know they did not get them.
    """
    import torch

    requested = requested.lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise PlatformError(
                "CUDA was requested but no CUDA device is available on this machine: "
                "use --device cpu (gloo backend) or run on a GPU node"
            )
        return "cuda"
    raise PlatformError(f"unknown device {requested!r}: use one of auto, cpu, cuda")


def distributed_backend(device: str) -> str:
    """The torch.distributed backend for a resolved device: NCCL on GPUs, gloo on CPUs."""
    return "nccl" if device == "cuda" else "gloo"


__all__ = [
    "PlatformError",
    "SUPPORTED_MEGATRON_CORE",
    "activate",
    "activate_when_megatron_imports",
    "check_megatron_version",
    "cpu_layer_active",
    "distributed_backend",
    "resolve_device",
]
