"""Where modse-megatron meets the hardware: megatron-core version pinning and the CPU layer.

``import modse_megatron`` arranges that :func:`activate` runs when megatron-core is imported, so
a user or a test needs nothing else for megatron-core to run on a CPU-only machine. This
package is the only place that patches anything: :mod:`.megatron_0_16` holds every piece that
exists because of megatron-core 0.16.1 (the CPU layer, bug fixes) with the upgrade checklist
naming the upstream line each one answers.

Whether the CPU layer is installed (:func:`cpu_layer_wanted`): ``MODSE_CPU_LAYER=1`` on,
``MODSE_CPU_LAYER=0`` off (torch, threading and megatron stay exactly as upstream has them),
unset: on only where CUDA is unavailable, or where ``--device cpu`` asks for the CPU on a CUDA
machine (:func:`use_cpu_layer`).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Any, Callable

from .megatron_0_16 import MEGATRON_CORE_VERSION as SUPPORTED_MEGATRON_CORE  # noqa: E402
_SKIP_ENV = "MODSE_SKIP_MEGATRON_VERSION_CHECK"
_LAYER_ENV = "MODSE_CPU_LAYER"
_cpu_requested = False  # set by use_cpu_layer() (--device cpu on a CUDA machine)


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


def _switch() -> str:
    """``MODSE_CPU_LAYER`` as '', '0' or '1', or a one-line error naming the fix."""
    value = os.environ.get(_LAYER_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise PlatformError(
            f"{_LAYER_ENV}={value!r} is not valid: set it to 1 (CPU layer on), 0 (off) "
            f"or leave it unset (on only without CUDA)"
        )
    return value


def cpu_layer_wanted() -> bool:
    """Whether megatron-core should run through the CPU layer in this process.

    ``MODSE_CPU_LAYER=1`` forces it on (e.g. a CPU run on a GPU node), ``=0`` forces it off
    (megatron then fails on a CPU-only machine exactly as upstream does); unset, it is on only
    where CUDA is unavailable. ``resolve_device("cpu")`` on a CUDA machine also asks for it.
    """
    value = _switch()
    if value:
        return value == "1"
    if _cpu_requested:
        return True
    import torch

    return not torch.cuda.is_available()


def activate() -> None:
    """Check the megatron-core version, install the CPU layer (where :func:`cpu_layer_wanted`)
    and the no-apex/TE fixes (only where megatron lacks apex/TE). Idempotent."""
    check_megatron_version()
    from .megatron_0_16 import cpu, fixes

    if cpu_layer_wanted():
        _refuse_cpu_layer_with_gpu_kernels()
        cpu.install()
    fixes.install()


def _refuse_cpu_layer_with_gpu_kernels() -> None:
    """With apex or TransformerEngine installed (a GPU node), megatron binds their CUDA-only
    fused optimizers and norms at import (optimizer/distrib_optimizer.py:21-36,
    models/backends.py:18-23): a CPU run would reach a CUDA kernel mid-step. Say so up front."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        raise PlatformError(
            "megatron on the CPU (--device cpu or MODSE_CPU_LAYER=1) is not supported where apex or "
            "TransformerEngine is installed (megatron binds their CUDA-only fused kernels): run with "
            "--device cuda, or use an environment without them for CPU runs"
        )


def use_cpu_layer() -> None:
    """Run megatron-core through the CPU layer even though CUDA exists (``--device cpu`` on a
    GPU node): megatron asks ``torch.cuda`` for its device everywhere, so without the layer its
    tensors would land on the GPU next to a gloo process group. Installs now if megatron-core is
    already imported (before any megatron object exists), else when it imports."""
    global _cpu_requested
    if _switch() == "0":
        raise PlatformError(
            f"--device cpu on a machine with CUDA needs the CPU layer, which {_LAYER_ENV}=0 turns off: "
            f"unset {_LAYER_ENV} (or set it to 1)"
        )
    _cpu_requested = True
    if "megatron.core" in sys.modules:
        activate()


class _ImportHooks(importlib.abc.MetaPathFinder):
    """Run code around the import of named modules: ``before`` hooks just before the module's
    code runs, ``after`` hooks (given the module) right after it finishes.

    Importing megatron-core costs ~4 s (it pulls in torch inductor); tools that never touch it
    (the placement planner CLI) should not pay that just because they live in this package.
    Several megatron modules the CPU layer adjusts are imported lazily by megatron itself.
    """

    def __init__(self) -> None:
        self.before: dict[str, list[Callable[[], None]]] = {}
        self.after: dict[str, list[Callable[[Any], None]]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.before and fullname not in self.after:
            return None
        before, after = self.before.pop(fullname, []), self.after.pop(fullname, [])
        if not self.before and not self.after:
            sys.meta_path.remove(self)
        spec = None
        for finder in list(sys.meta_path):  # the real spec, from the other finders
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_with_hooks(module):
            for hook in before:
                hook()
            exec_module(module)
            for hook in after:
                hook(module)

        spec.loader.exec_module = exec_with_hooks
        return spec


def _hooks() -> _ImportHooks:
    for finder in sys.meta_path:
        if isinstance(finder, _ImportHooks):
            return finder
    finder = _ImportHooks()
    sys.meta_path.insert(0, finder)
    return finder


def after_import(name: str, hook: Callable[[Any], None]) -> None:
    """Call ``hook(module)`` now if module ``name`` is imported, else right after it is."""
    if name in sys.modules:
        hook(sys.modules[name])
    else:
        _hooks().after.setdefault(name, []).append(hook)


def _hide_warnings_if_cpu_layer() -> None:
    # megatron-core warns at import that apex/TE are missing: hide that before it runs, but
    # only where the CPU layer will be installed (the rest of the layer waits for the import).
    if cpu_layer_wanted():
        from .megatron_0_16.messages import hide_missing_gpu_library_warnings

        hide_missing_gpu_library_warnings()


def _activate_hook(module: Any) -> None:
    activate()


def activate_when_megatron_imports() -> None:
    """Activate now if megatron-core is already imported, else right after it is."""
    if "megatron.core" in sys.modules:
        activate()
        return
    hooks = _hooks()
    if _activate_hook not in hooks.after.get("megatron.core", []):
        hooks.before.setdefault("megatron.core", []).append(_hide_warnings_if_cpu_layer)
        hooks.after.setdefault("megatron.core", []).append(_activate_hook)


def cpu_layer_active() -> bool:
    """Whether megatron-core is running through the CPU compatibility layer."""
    from .megatron_0_16 import cpu

    return cpu.installed()


def resolve_device(requested: str = "auto") -> str:
    """Map a user's ``--device`` choice to 'cuda' or 'cpu', or fail with the fix.

    'auto' picks CUDA when present. Asking for CUDA without it is an error, not a silent
    CPU run: a user who asked for GPUs wants to know they did not get them. 'cpu' on a machine
    with CUDA switches the CPU layer on (:func:`use_cpu_layer`): megatron would otherwise put
    its tensors on the GPU.
    """
    import torch

    requested = requested.lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        if torch.cuda.is_available():
            use_cpu_layer()
        return "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            from .megatron_0_16 import cpu

            if cpu.hides_cuda():
                raise PlatformError(
                    "CUDA was requested but this process already runs megatron through the CPU "
                    f"layer ({_LAYER_ENV}=1 or an earlier --device cpu): unset {_LAYER_ENV} or use --device cpu"
                )
            raise PlatformError(
                "CUDA was requested but no CUDA device is available on this machine: "
                "use --device cpu (gloo backend) or run on a GPU node"
            )
        return "cuda"
    raise PlatformError(f"unknown device {requested!r}: use one of auto, cpu, cuda")


GPU_EXTRA = "pip install 'modse-megatron[gpu]'"


def transformer_engine_problem(feature: str, fallback: str, import_te: bool = False) -> str | None:
    """``None`` if TransformerEngine can run ``feature`` here, else the one-line reason with the
    fix (``fallback`` names the alternative, e.g. "use moe_experts_impl=grouped").

    Without ``import_te`` only checks for a GPU and that TransformerEngine is installed (cheap,
    and it does not touch a GPU before the launcher picked this rank's device); with it, also
    imports it (a broken install or a CUDA mismatch fails here, not in the first forward)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return f"{feature} needs a CUDA GPU and none is available: {fallback} on CPU"
    try:
        installed = importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return f"{feature} needs TransformerEngine, which is not installed: {GPU_EXTRA} (or {fallback})"
    if import_te:
        try:
            import transformer_engine.pytorch  # noqa: F401
        except (ImportError, OSError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            return (f"{feature} needs TransformerEngine, which does not import ({first}): reinstall it with "
                    f"{GPU_EXTRA} (or {fallback})")
    return None


def distributed_backend(device: str) -> str:
    """The torch.distributed backend for a resolved device: NCCL on GPUs, gloo on CPUs."""
    return "nccl" if device == "cuda" else "gloo"


__all__ = [
    "PlatformError",
    "GPU_EXTRA",
    "SUPPORTED_MEGATRON_CORE",
    "activate",
    "activate_when_megatron_imports",
    "after_import",
    "check_megatron_version",
    "cpu_layer_active",
    "cpu_layer_wanted",
    "distributed_backend",
    "resolve_device",
    "transformer_engine_problem",
    "use_cpu_layer",
]
