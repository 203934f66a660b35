"""The CPU compatibility layer's own behaviour: each patch does what it claims, and only then."""
import subprocess
import sys
import threading

import pytest
import torch

import modse_megatron  # noqa: F401
from modse_megatron.platform import PlatformError, check_megatron_version, cpu_layer_active, resolve_device

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is inactive with CUDA")


@pytest.fixture(autouse=True, scope="module")
def _megatron_imported():
    import megatron.core  # noqa: F401  (activation happens when megatron-core is imported)

    assert cpu_layer_active()


@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, torch.device("cuda"), torch.device("cuda", 0)])
def test_factories_put_cuda_requests_on_cpu(device):
    for make in (
        lambda: torch.zeros(3, device=device),
        lambda: torch.empty(2, 2, device=device, dtype=torch.bfloat16),
        lambda: torch.tensor([1, 2], device=device),
        lambda: torch.arange(4, device=device),
        lambda: torch.ones(2).new_empty((3,), device=device),
    ):
        assert make().device.type == "cpu"


def test_tensor_methods():
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to(0, dtype=torch.float64).dtype == torch.float64
    assert x.to(torch.float16).dtype == torch.float16  # a dtype is not a device
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert x.type(torch.float64).dtype == torch.float64  # conversion form untouched
    assert not x.is_cuda  # honest: code that checks for CUDA takes its CPU path
    assert x.pin_memory() is x


def test_cuda_module_stand_ins():
    assert torch.cuda.is_available() is False
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    sum(range(10000))
    end.record()
    assert end.elapsed_time(start) <= 0 <= start.elapsed_time(end)
    torch.cuda.nvtx.range_push("x")
    torch.cuda.nvtx.range_pop()


def test_model_parallel_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    def fresh_tracker():
        tracker = CudaRNGStatesTracker()
        tracker.add("model-parallel-rng", 123)
        return tracker

    tracker = fresh_tracker()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        inside_a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
    with tracker.fork("model-parallel-rng"):
        inside_b = torch.rand(4)
    assert not torch.equal(inside_a, inside_b), "the tracked stream must advance between forks"
    with fresh_tracker().fork("model-parallel-rng"):
        assert torch.equal(torch.rand(4), inside_a), "the same seed must reproduce the stream"


def test_threads_get_the_mode():
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.zeros(1, device="cuda").device.type))
    t.start()
    t.join()
    assert seen == ["cpu"]


def test_backward_of_python_functions_gets_the_mode():
    class AllocatesOnCuda(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * torch.full_like(g, 2.0, device=torch.cuda.current_device())

    x = torch.ones(3, requires_grad=True)
    AllocatesOnCuda.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_wrong_megatron_version_is_one_line_error():
    with pytest.raises(PlatformError) as err:
        check_megatron_version("0.15.0")
    msg = str(err.value)
    assert "\n" not in msg and "pip install megatron-core==0.16.1" in msg


@pytest.mark.slow  # a fresh interpreter importing megatron-core: ~5 s
def test_wrong_megatron_version_refused_at_import():
    code = (
        "import megatron.core.package_info as p; p.__version__ = '0.99.0'\n"
        "import modse_megatron\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("modse_megatron.platform.PlatformError: megatron-core 0.99.0 is installed")
    assert "pip install megatron-core==0.16.1" in last


def test_cuda_request_without_cuda_names_the_fix():
    with pytest.raises(PlatformError, match="--device cpu") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(PlatformError) as err:
        resolve_device("tpu")
    assert str(err.value) == "unknown device 'tpu': use one of auto, cpu, cuda"


@pytest.mark.slow  # a fresh interpreter importing megatron-core: ~5 s
def test_layer_stays_off_when_cuda_is_available():
    # A fresh interpreter where CUDA claims to be available: nothing may be patched.
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "import modse_megatron, megatron.core\n"
        "from modse_megatron.platform import cpu_layer_active\n"
        "assert not cpu_layer_active()\n"
        "assert torch._C._len_torch_function_stack() == 0\n"
        "print('untouched')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().endswith("untouched"), proc.stderr[-2000:]
