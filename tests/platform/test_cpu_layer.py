"""The CPU compatibility layer's own behaviour: each patch does what it claims, and only then."""
import re
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


def _in_thread(fn):
    """``fn()`` in a new thread: its result, or its exception raised here."""
    out = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as err:  # noqa: BLE001
            out["error"] = err

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_a_users_thread_runs_as_torch_has_it():
    assert threading.Thread.run is threading.Thread.__dict__["run"]
    assert threading.Thread.run.__module__ == "threading"
    assert _in_thread(torch._C._len_torch_function_stack) == 0
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        _in_thread(lambda: torch.zeros(1, device="cuda"))


def _device_of_a_cuda_request():
    return torch.zeros(1, device="cuda").device.type


def test_threads_megatron_starts_get_the_mode():
    # Imported here, after activation: the lazily imported modules are adjusted on import too.
    from megatron.core.datasets import blended_megatron_dataset_builder as datasets
    from megatron.core.inference.engines import dynamic_engine
    from megatron.core.inference.text_generation_controllers import text_generation_controller
    from megatron.core.utils import StragglerDetector

    executors = (
        datasets.ThreadPoolExecutor,  # blended_megatron_dataset_builder.py:357
        dynamic_engine.concurrent.futures.ThreadPoolExecutor,  # dynamic_engine.py:1433
        text_generation_controller.concurrent.futures.ThreadPoolExecutor,  # ...:1091
    )
    for executor in executors:
        with executor(max_workers=1) as pool:
            assert pool.submit(_device_of_a_cuda_request).result() == "cpu"
    # The modules megatron's names point into are untouched for everyone else.
    import concurrent.futures

    assert dynamic_engine.concurrent.futures.wait is concurrent.futures.wait
    assert concurrent.futures.ThreadPoolExecutor.__module__ == "concurrent.futures.thread"
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(torch._C._len_torch_function_stack).result() == 0

    class Detector:  # utils.py:1754 threading.Thread(target=self._handler)
        seen = []

        @property
        def rank(self):
            self.seen.append(torch._C._len_torch_function_stack())
            return 1  # not the controller rank: _handler returns

    _in_thread(lambda: StragglerDetector._handler(Detector()))
    assert Detector.seen == [1]


def _megatron_caller(fn):
    """``fn`` called from a (pretend) megatron-core module, as megatron's call sites are."""
    scope = {"__name__": "megatron.core.tensor_parallel.pretend", "fn": fn}
    exec(compile("def call(*a, **k):\n    return fn(*a, **k)\n", "<megatron>", "exec"), scope)
    return scope["call"]


def _error(fn, *args, **kwargs):
    """The exception type and message ``fn`` raises (object addresses left out), or None."""
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001
        return type(err), re.sub(r"0x[0-9a-f]+", "0x", str(err))
    return None


def test_a_users_unequal_all_gather_fails_as_torchs(one_rank):
    import torch.distributed as dist

    args = lambda: ([torch.empty(3, 2)], torch.ones(2, 2))  # noqa: E731
    torchs = _error(dist.all_gather.__wrapped__, *args())
    assert torchs is not None and torchs[0] is RuntimeError, "torch's gloo refuses unequal sizes"
    assert _error(dist.all_gather, *args()) == torchs
    # The same call from megatron's code is padded, gathered and trimmed (NCCL's behaviour).
    out, mine = args()
    _megatron_caller(dist.all_gather)(out, mine)
    assert torch.equal(out[0][:2], mine)


def test_a_users_all_to_all_with_tensor_splits_fails_as_torchs(one_rank):
    import torch.distributed as dist

    args = lambda: (torch.zeros(2), torch.ones(2), torch.tensor([2]), torch.tensor([2]))  # noqa: E731
    torchs = _error(dist.all_to_all_single.__wrapped__, *args())
    assert torchs is not None and torchs[0] is TypeError, "torch's gloo wants list[int] splits"
    assert _error(dist.all_to_all_single, *args()) == torchs
    out, x, splits_out, splits_in = args()
    _megatron_caller(dist.all_to_all_single)(out, x, splits_out, splits_in)
    assert torch.equal(out, x)


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
