"""When the CPU layer is installed: MODSE_CPU_LAYER=0/1, unset (only without CUDA), --device cpu
on a CUDA machine; and that off means off (torch, threading, warnings and megatron as upstream)."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from modse_megatron.platform import PlatformError, cpu_layer_wanted, use_cpu_layer
from modse_megatron.platform.megatron_0_16.messages import hide_missing_gpu_library_warnings

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these fake CUDA on a CPU-only machine")


def _run(code: str, **env: str) -> str:
    """``code`` in a fresh interpreter (megatron-core imported there: ~5 s); its stdout."""
    environ = {k: v for k, v in os.environ.items() if k != "MODSE_CPU_LAYER"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env={**environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("value", ["yes", "true", "2", "on"])
def test_invalid_switch_is_one_line_naming_the_fix(monkeypatch, value):
    monkeypatch.setenv("MODSE_CPU_LAYER", value)
    with pytest.raises(PlatformError) as err:
        cpu_layer_wanted()
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (f"MODSE_CPU_LAYER={value!r} is not valid: set it to 1 (CPU layer on), 0 (off) "
                   "or leave it unset (on only without CUDA)")


def test_switch_values(monkeypatch):
    monkeypatch.setenv("MODSE_CPU_LAYER", "0")
    assert cpu_layer_wanted() is False
    monkeypatch.setenv("MODSE_CPU_LAYER", "1")
    assert cpu_layer_wanted() is True
    monkeypatch.delenv("MODSE_CPU_LAYER")
    assert cpu_layer_wanted() is True  # no CUDA here


def test_device_cpu_with_the_layer_switched_off_names_the_fix(monkeypatch):
    monkeypatch.setenv("MODSE_CPU_LAYER", "0")
    with pytest.raises(PlatformError) as err:
        use_cpu_layer()
    assert str(err.value) == ("--device cpu on a machine with CUDA needs the CPU layer, which "
                              "MODSE_CPU_LAYER=0 turns off: unset MODSE_CPU_LAYER (or set it to 1)")


def test_missing_apex_te_warnings_hidden_for_megatron_only():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hide_missing_gpu_library_warnings()
        for module in ("megatron.core.models.backends", "megatron_fsdp.mixed_precision", "users_code"):
            warnings.warn_explicit("Apex is not installed. Falling back to Torch Norm", UserWarning,
                                   "f.py", 1, module=module)
        warnings.warn_explicit("Transformer Engine and Apex are not installed. Falling back to Torch "
                               "optimizers.", UserWarning, "f.py", 2, module="megatron.core.optimizer")
        warnings.warn_explicit("something else", UserWarning, "f.py", 3, module="megatron.core.utils")
    assert [str(w.message) for w in seen] == ["Apex is not installed. Falling back to Torch Norm",
                                              "something else"]
    assert seen[0].filename == "f.py" and seen[0].lineno == 1  # the user's own, kept


# Everything the CPU layer replaces, captured in a plain torch interpreter before modse_megatron.
_SNAPSHOT = """
import concurrent.futures, sys, threading, warnings
import torch, torch.distributed as dist
from torch.autograd.function import BackwardCFunction

CUDA = ["current_device", "set_device", "synchronize", "Stream", "Event", "ExternalStream",
        "current_stream", "default_stream", "set_stream", "stream", "reset_peak_memory_stats",
        "reset_max_memory_allocated", "get_rng_state", "set_rng_state", "manual_seed",
        "manual_seed_all", "is_available", "device_count", "default_generators", "_lazy_call"]
def snapshot():
    return {
        **{f"torch.cuda.{n}": getattr(torch.cuda, n) for n in CUDA},
        **{f"torch.cuda.random.{n}": getattr(torch.cuda.random, n)
           for n in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all")},
        **{f"torch.cuda.nvtx.{n}": getattr(torch.cuda.nvtx, n) for n in ("range_push", "range_pop", "mark", "range")},
        "dist.all_gather": dist.all_gather, "dist.all_to_all_single": dist.all_to_all_single,
        "Thread.run": threading.Thread.run, "Thread.start": threading.Thread.start,
        "ThreadPoolExecutor": concurrent.futures.ThreadPoolExecutor,
        "ThreadPoolExecutor.submit": concurrent.futures.ThreadPoolExecutor.submit,
        "BackwardCFunction.apply": BackwardCFunction.apply,
    }
plain = snapshot()
def apex_filters():
    return [f for f in warnings.filters if f[1] is not None and "Apex" in f[1].pattern and f[3] is not None]
"""


@pytest.mark.slow  # a fresh interpreter importing megatron-core: ~5 s
def test_switched_off_leaves_torch_untouched():
    code = _SNAPSHOT + """
import modse_megatron
import megatron.core
from megatron.core.datasets import blended_megatron_dataset_builder as datasets
from megatron.core.inference.engines import dynamic_engine
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.transformer.moe import moe_utils
from megatron.core.utils import StragglerDetector
from modse_megatron.platform import PlatformError, cpu_layer_active, resolve_device

changed = [name for name, obj in snapshot().items() if obj is not plain[name]]
assert not changed, changed
assert torch._C._len_torch_function_stack() == 0
assert not cpu_layer_active()
assert not apex_filters(), apex_filters()  # the platform hides megatron's apex/TE warnings only under the layer
# megatron as upstream has it
assert mp_random._lazy_call is torch.cuda._lazy_call
assert not hasattr(moe_utils, "te_general_gemm")
assert datasets.ThreadPoolExecutor is concurrent.futures.ThreadPoolExecutor
assert dynamic_engine.concurrent is sys.modules["concurrent"]
assert not hasattr(StragglerDetector._handler, "__wrapped__")
try:  # ... so it fails on a CPU-only machine as upstream does
    torch.empty(1, device=torch.cuda.current_device())
    raise SystemExit("megatron's device request should fail without the layer")
except (AssertionError, RuntimeError) as err:
    assert "CUDA" in str(err), err
# --device cpu on a CUDA machine needs the layer: with it switched off, one line says so
torch.cuda.is_available = lambda: True
try:
    resolve_device("cpu")
    raise SystemExit("resolve_device('cpu') should refuse")
except PlatformError as err:
    assert "MODSE_CPU_LAYER=0" in str(err) and "\\n" not in str(err)
print("untouched")
"""
    assert _run(code, MODSE_CPU_LAYER="0").strip().endswith("untouched")


_FAKE_CUDA_CHECKS = """
assert cpu_layer_active()
assert torch.cuda.is_available() is False and torch.cuda.device_count() == 0  # as on a CPU-only machine
assert resolve_device("auto") == "cpu"
assert torch.zeros(1, device="cuda").device.type == "cpu"
assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
assert apex_filters(), "megatron's apex/TE warnings are hidden under the layer"
try:
    resolve_device("cuda")
    raise SystemExit("resolve_device('cuda') should refuse")
except PlatformError as err:
    assert "CPU layer" in str(err) and "\\n" not in str(err), err
"""


@pytest.mark.slow  # a fresh interpreter importing megatron-core: ~5 s
def test_switched_on_where_cuda_exists():
    code = _SNAPSHOT + """
torch.cuda.is_available = lambda: True  # a GPU node
import modse_megatron, megatron.core
from modse_megatron.platform import PlatformError, cpu_layer_active, resolve_device
""" + _FAKE_CUDA_CHECKS + """
print("forced")
"""
    assert _run(code, MODSE_CPU_LAYER="1").strip().endswith("forced")


@pytest.mark.slow  # a fresh interpreter importing megatron-core: ~5 s
def test_layer_stays_off_when_cuda_is_available_until_device_cpu():
    # A fresh interpreter where CUDA claims to be available: nothing may be patched ...
    code = _SNAPSHOT + """
torch.cuda.is_available = lambda: True
plain = snapshot()
import modse_megatron, megatron.core
from modse_megatron.platform import PlatformError, cpu_layer_active, resolve_device
assert not cpu_layer_active()
assert torch._C._len_torch_function_stack() == 0
changed = [name for name, obj in snapshot().items() if obj is not plain[name]]
assert not changed, changed
assert not apex_filters(), apex_filters()
print("untouched")
# ... until --device cpu asks for the CPU: then megatron runs through the layer
assert resolve_device("cpu") == "cpu"
""" + _FAKE_CUDA_CHECKS + """
print("cpu layer")
"""
    assert _run(code).splitlines()[-2:] == ["untouched", "cpu layer"]


def test_cpu_layer_refused_where_megatron_binds_gpu_kernels(monkeypatch):
    """A GPU node with apex/TE: megatron picked their CUDA-only fused kernels at import, so the
    CPU layer is refused with one line instead of a CUDA error mid-step."""
    import megatron.core  # noqa: F401
    from megatron.core.optimizer import distrib_optimizer

    from modse_megatron.platform import _refuse_cpu_layer_with_gpu_kernels

    _refuse_cpu_layer_with_gpu_kernels()  # this machine: no apex/TE, nothing to refuse
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    with pytest.raises(PlatformError, match="not supported where apex or TransformerEngine is installed") as err:
        _refuse_cpu_layer_with_gpu_kernels()
    assert "\n" not in str(err.value)
