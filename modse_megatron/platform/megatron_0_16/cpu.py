"""Run megatron-core 0.16.1, unchanged, on a CPU-only machine with torch.distributed on gloo.

megatron-core assumes CUDA everywhere: ~175 ``torch.cuda.current_device()`` calls used as a
``device=`` argument, ``device="cuda"`` literals in the optimizer and schedules, ``.cuda()``
calls, ``param.type() == 'torch.cuda.FloatTensor'`` checks, the CUDA RNG tracker, CUDA
streams/events in the alltoall token dispatcher, NVTX ranges, and a ``te_general_gemm`` name
that is only bound when TransformerEngine imports. Rather than fork it, this module answers
each assumption at the narrowest seam that covers it:

1. ``_CpuDeviceMode`` (a ``TorchFunctionMode``): every torch call that names a CUDA device
   (``device="cuda"``, ``device=0``, ``torch.device("cuda", i)``, ``.to("cuda")``, ``.cuda()``)
   gets the CPU instead, and ``Tensor.type()`` reports CPU tensors under their
   ``torch.cuda.*Tensor`` names. It costs ~1 µs per torch call from Python (see
   ``benchmarks/platform_overhead.py``) and nothing in autograd's backward, which runs in C++.
2. ``torch.cuda`` stand-ins: ``current_device``/``set_device``/``synchronize``/streams/events/
   NVTX/peak-memory calls become CPU no-ops, and the CUDA RNG API is served by the CPU
   generator, so megatron's model-parallel RNG tracker forks the CPU RNG. ``is_available()``
   stays ``False`` and ``Tensor.is_cuda`` stays honest, so code that checks for CUDA still
   takes its CPU path.
3. megatron-core module fixes, each named with the line it answers (see ``_patch_megatron``).
4. ``torch.distributed.all_to_all_single``: gloo only accepts ``list[int]`` split sizes, while
   megatron's alltoall dispatcher passes CPU tensors/numpy arrays (it moves the splits to host
   only when they are CUDA tensors, ``moe_utils.maybe_move_tensor_to_cpu``).
5. ``torch.distributed.all_gather`` of unequal sizes (alltoall dispatcher with EP x expert-TP):
   gloo refuses it, NCCL accepts it; padded to equal sizes and trimmed.
   4 and 5 apply only to calls made from megatron-core's own code (the caller's module, one
   frame up): anyone else's call behaves, and fails, exactly as torch's.
6. Threads: torch function modes are thread-local, so the threads megatron-core starts enter the
   mode at megatron's own creation points (``_enter_mode_in_megatron_threads``); other threads
   in the process are left alone.

Everything here is installed by :func:`install`, which :func:`modse_megatron.platform.activate`
calls only where the CPU layer is wanted (no CUDA, ``MODSE_CPU_LAYER=1``, or ``--device cpu``
on a CUDA machine); with ``MODSE_CPU_LAYER=0`` or on a GPU run none of it runs.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")

# Legacy tensor-type names megatron compares against (optimizer.py:690, distrib_optimizer.py:420,
# clip_grads.py:167): the CPU names map to the CUDA ones on this platform.
_CUDA_TYPE_NAME = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    """True for anything torch would read as a CUDA device: 'cuda', 'cuda:1', 0, torch.device('cuda')."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device parsing (torch.cuda.current_device() → 0).
    return isinstance(device, int) and not isinstance(device, bool)


def _to_cpu_args(args: tuple) -> tuple:
    """``Tensor.to(device, ...)`` / ``Tensor.to(0)``: replace a positional CUDA device."""
    if len(args) > 1 and _is_cuda_device(args[1]):
        return (args[0], _CPU) + tuple(args[2:])
    return args


class _CpuDeviceMode(TorchFunctionMode):
    """Redirect CUDA device requests to the CPU (answers megatron's device='cuda' literals and
    ``device=torch.cuda.current_device()`` arguments, ~220 call sites)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_cuda_device(device):
                kwargs["device"] = _CPU
                kwargs.pop("pin_memory", None)
        if func in _SPECIAL:
            return _SPECIAL[func](func, args, kwargs or {})
        if kwargs:
            return func(*args, **kwargs)
        return func(*args)


def _tensor_cuda(func, args, kwargs):
    # Tensor.cuda() → the tensor itself (it already lives on the only device we have).
    return args[0]


def _tensor_to(func, args, kwargs):
    return func(*_to_cpu_args(args), **kwargs)


def _tensor_type(func, args, kwargs):
    out = func(*args, **kwargs)
    if len(args) == 1 and not kwargs and isinstance(out, str):
        return _CUDA_TYPE_NAME.get(out, out)
    return out


def _record_stream(func, args, kwargs):
    # Tensor.record_stream(torch.cuda.current_stream()) (moe_utils.py:1097): no streams on CPU.
    return None


def _pin_memory(func, args, kwargs):
    # Pinned host memory needs a CUDA driver; plain CPU memory is what pinning would give us.
    return args[0]


_SPECIAL: dict[Callable, Callable] = {
    torch.Tensor.cuda: _tensor_cuda,
    torch.Tensor.to: _tensor_to,
    torch.Tensor.type: _tensor_type,
    torch.Tensor.record_stream: _record_stream,
    torch.Tensor.pin_memory: _pin_memory,
}


# --------------------------------------------------------------------------------------------
# torch.cuda stand-ins
# --------------------------------------------------------------------------------------------
class _Event:
    """CPU stand-in for torch.cuda.Event: records wall-clock time so elapsed_time() is real."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end: "_Event") -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("elapsed_time: both events must be recorded first")
        return (end._t - self._t) * 1e3


class _Stream:
    """CPU stand-in for torch.cuda.Stream: work on the CPU is already ordered."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: _Event | None = None) -> _Event:
        event = event or _Event()
        event.record()
        return event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Stream)

    def __hash__(self) -> int:
        return 0

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_DEFAULT_STREAM = _Stream()


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _fresh(fn: Any) -> Any:
    """A distinct function object calling ``fn`` (classes are returned as they are)."""
    if isinstance(fn, type):
        return fn

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return call


def _cuda_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cuda_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _cuda_manual_seed(seed: int) -> None:
    # Seed the CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    """Give ``torch.cuda`` CPU meanings for the calls megatron makes unconditionally.

    ``is_available()`` and ``device_count()`` are left alone on purpose: they are how
    megatron and torch decide between their CUDA and CPU code paths.
    """
    # Each attribute gets its own function object: torch._dynamo keys its trace rules by object
    # identity and refuses one object registered under two names with different rules.
    replacements = {
        "current_device": lambda: 0,
        "set_device": _noop,
        "synchronize": _noop,
        "Stream": _Stream,
        "Event": _Event,
        "ExternalStream": _Stream,
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "set_stream": _noop,
        "stream": lambda stream=None: contextlib.nullcontext(stream),
        "reset_peak_memory_stats": _noop,
        "reset_max_memory_allocated": _noop,
        # CUDA RNG API → the CPU generator. megatron's CudaRNGStatesTracker
        # (tensor_parallel/random.py:235-240, :250-277) then forks the CPU RNG for
        # model-parallel regions (dropout, initialisation).
        "get_rng_state": _cuda_get_rng_state,
        "set_rng_state": _cuda_set_rng_state,
        "manual_seed": _cuda_manual_seed,
        "manual_seed_all": _cuda_manual_seed,
    }
    for name, fn in replacements.items():
        setattr(torch.cuda, name, _fresh(fn))
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
        setattr(torch.cuda.random, name, getattr(torch.cuda, name))  # same objects as upstream
    torch.cuda.default_generators = (torch.default_generator,)
    nvtx = torch.cuda.nvtx
    nvtx.range_push = _fresh(lambda msg: 0)
    nvtx.range_pop = _fresh(lambda: 0)
    nvtx.mark = _fresh(_noop)
    nvtx.range = _fresh(lambda *a, **k: contextlib.nullcontext())


def _called_from_megatron() -> bool:
    """Whether the caller of the function calling this one is megatron-core code (one frame
    lookup, ~0.1 µs): the collective patches below answer megatron's call sites, not anyone's."""
    return sys._getframe(2).f_globals.get("__name__", "").startswith("megatron.core")


def _patch_all_to_all() -> None:
    """gloo's all_to_all_single wants ``list[int]`` split sizes; megatron's alltoall dispatcher
    passes the splits as CPU tensors or numpy arrays (token_dispatcher.py:695/778,
    mappings.py:444 ``_AllToAll.forward``)."""
    original = dist.all_to_all_single

    @functools.wraps(original)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if not _called_from_megatron():
            return original(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)
        if output_split_sizes is not None and not isinstance(output_split_sizes, list):
            output_split_sizes = [int(s) for s in output_split_sizes]
        if input_split_sizes is not None and not isinstance(input_split_sizes, list):
            input_split_sizes = [int(s) for s in input_split_sizes]
        return original(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    dist.all_to_all_single = all_to_all_single


class _DoneWork:
    """A finished collective for callers that asked for ``async_op=True``."""

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _patch_all_gather() -> None:
    """gloo's all_gather needs equal tensor sizes; megatron's alltoall dispatcher with EP and
    expert-TP gathers unequal token counts (``gather_from_sequence_parallel_region(...,
    output_split_sizes=...)``, mappings.py:149 via token_dispatcher.py), which NCCL accepts.
    Pad every piece to the largest first dimension, gather, then copy the real rows out; only
    for megatron's calls (a user's unequal gather fails as torch's does)."""
    original = dist.all_gather

    @functools.wraps(original)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}
        if (len(shapes) == 1 or tensor.dim() == 0 or not _called_from_megatron()
                or dist.get_backend(group) != "gloo"):
            return original(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded_in = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded_in[: tensor.shape[0]] = tensor
        padded_out = [tensor.new_empty((rows, *tensor.shape[1:])) for _ in tensor_list]
        original(padded_out, padded_in, group=group)
        for out, gathered in zip(tensor_list, padded_out):
            out.copy_(gathered[: out.shape[0]])
        return _DoneWork() if async_op else None

    dist.all_gather = all_gather


def _patch_megatron() -> None:
    """Fixes inside megatron-core modules, each answering one line of 0.16.1."""
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils

    # tensor_parallel/random.py:99-111 `_set_cuda_rng_state` defers the state change through
    # `torch.cuda._lazy_call`, which on a CPU build queues it for a CUDA init that never comes.
    mp_random._lazy_call = lambda callback: callback()
    # random.py:263-265 warns when the CPU RNG changes inside `fork()`; on CPU the "CUDA" RNG
    # the tracker forks IS the CPU generator, so every draw in a forked region (dropout, init)
    # would warn although the tracker saves and restores it correctly.
    import logging

    logging.getLogger(mp_random.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context"
    )
    # moe_utils.py:1192 reads `te_general_gemm`, bound only when TransformerEngine imports (:34).
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


_MODE = _CpuDeviceMode()
_installed = False
_suspended = False
_hid_cuda = False


def _in_mode(fn: Callable) -> Callable:
    """``fn`` run inside the device mode unless a torch function mode is already active."""

    @functools.wraps(fn)
    def run_in_cpu_mode(*args: Any, **kwargs: Any) -> Any:
        if torch._C._len_torch_function_stack():
            return fn(*args, **kwargs)
        with _CpuDeviceMode():
            return fn(*args, **kwargs)

    return run_in_cpu_mode


class _ModeThreadPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor whose tasks run in the device mode (megatron's executors only)."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(_in_mode(fn), *args, **kwargs)


class _ModuleView:
    """A module as one megatron module sees it: the same attributes but a few replaced, so a
    module-level name megatron looks up (``concurrent.futures.ThreadPoolExecutor``) changes for
    megatron alone."""

    def __init__(self, module: Any, **replaced: Any):
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _mode_executors_for(module: Any) -> None:
    # `import concurrent.futures` binds `concurrent` in the module; megatron calls
    # `concurrent.futures.ThreadPoolExecutor(...)` through it.
    module.concurrent = _ModuleView(
        concurrent, futures=_ModuleView(concurrent.futures, ThreadPoolExecutor=_ModeThreadPoolExecutor)
    )


def _mode_in_straggler_controller(module: Any) -> None:
    cls = module.StragglerDetector
    cls._handler = _in_mode(cls._handler)


def _mode_in_dataset_builder(module: Any) -> None:
    module.ThreadPoolExecutor = _ModeThreadPoolExecutor


# Every place megatron-core 0.16.1 starts a thread (grep 'Thread(\|ThreadPoolExecutor' in
# megatron/core); re-check on upgrade. Its checkpoint writers are processes, not threads (a
# forked one inherits the forking thread's mode).
_MEGATRON_THREADS: dict[str, Callable[[Any], None]] = {
    # utils.py:1754 StragglerDetector's controller: threading.Thread(target=self._handler)
    "megatron.core.utils": _mode_in_straggler_controller,
    # datasets/blended_megatron_dataset_builder.py:357 ThreadPoolExecutor building datasets
    "megatron.core.datasets.blended_megatron_dataset_builder": _mode_in_dataset_builder,
    # inference/engines/dynamic_engine.py:1433 runs the engine's coroutine in a worker thread
    "megatron.core.inference.engines.dynamic_engine": _mode_executors_for,
    # inference/text_generation_controllers/text_generation_controller.py:1091 token streaming
    "megatron.core.inference.text_generation_controllers.text_generation_controller": _mode_executors_for,
}


def _enter_mode_in_megatron_threads() -> None:
    """Torch function modes are thread-local: the threads megatron-core starts enter the mode at
    megatron's own creation points (now, or when megatron imports the module lazily). Threads
    anyone else starts run as torch has them."""
    from .. import after_import

    for name, patch in _MEGATRON_THREADS.items():
        after_import(name, patch)


def _enter_mode_in_backward() -> None:
    """The autograd engine runs ``Function.backward`` with an empty torch-function-mode stack,
    and megatron's backward passes allocate on ``torch.cuda.current_device()`` too
    (mappings.py:439 ``_AllToAll`` re-applied in backward at :458). Re-enter the mode there."""
    from torch.autograd.function import BackwardCFunction

    original_apply = BackwardCFunction.apply

    def apply(self, *args):
        if torch._C._len_torch_function_stack() == 0 and not _suspended:
            with _CpuDeviceMode():
                return original_apply(self, *args)
        return original_apply(self, *args)

    BackwardCFunction.apply = apply


def _hide_cuda() -> None:
    """With the layer forced on a machine that has CUDA (``MODSE_CPU_LAYER=1``, ``--device
    cpu``), report no CUDA, as on a CPU-only machine: megatron and torch then take their CPU
    paths, and nothing allocates on a GPU behind the mode's back."""
    global _hid_cuda
    if torch.cuda.is_available():
        torch.cuda.is_available = _fresh(lambda: False)
        torch.cuda.device_count = _fresh(lambda: 0)
        _hid_cuda = True


def install() -> None:
    """Install every CPU patch once (the caller decides whether the layer is wanted).
    Idempotent."""
    global _installed
    if _installed:
        return
    from .messages import hide_missing_gpu_library_warnings

    hide_missing_gpu_library_warnings()
    _hide_cuda()
    _patch_torch_cuda()
    _patch_all_to_all()
    _patch_all_gather()
    _patch_megatron()
    _enter_mode_in_megatron_threads()
    _enter_mode_in_backward()
    _MODE.__enter__()
    _installed = True


def hides_cuda() -> bool:
    """Whether the layer was forced on a machine that has CUDA (which it now reports absent)."""
    return _hid_cuda


def installed() -> bool:
    """Whether the CPU platform layer is active in this process."""
    return _installed


@contextlib.contextmanager
def suspended():
    """Run without the device-redirecting mode (the overhead benchmark's plain-torch baseline).

    Only code that never names a CUDA device can run inside; the torch.cuda stand-ins stay.
    """
    global _suspended
    if not _installed:
        yield
        return
    assert torch._C._len_torch_function_stack() == 1, "another torch function mode is active"
    _suspended = True
    try:
        with torch.overrides._pop_mode_temporarily():
            yield
    finally:
        _suspended = False
