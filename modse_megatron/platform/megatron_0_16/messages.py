"""Messages megatron-core 0.16.1 and torch print on every run that a user cannot act on
(the commands call :func:`quiet_megatron_warnings` first)."""
from __future__ import annotations

import warnings

# megatron-core's "Apex is not installed. Falling back to Torch Norm", "Transformer Engine and
# Apex are not installed. Falling back to Torch optimizers" (optimizer/__init__.py:24,
# optimizer.py:28, clip_grads.py:29, models/backends.py:21, megatron_fsdp/mixed_precision.py:114).
_GPU_LIBRARY_MISSING = r".*(Apex|apex|Transformer Engine|transformer_engine)"


def quiet_megatron_warnings() -> None:
    """Warnings megatron-core 0.16.1 triggers on every run that a user cannot act on."""
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)
    # megatron's dist_checkpointing still builds torch's ShardedTensor (deprecated in favour of DTensor)
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)


def hide_missing_gpu_library_warnings() -> None:
    """megatron-core warns, at import and when it builds layers and optimizers, that apex and
    TransformerEngine are missing and it falls back to torch. Under the CPU layer that fallback
    is the plan, so the warnings say nothing a user can act on; on a GPU machine they name a
    slow path and stay visible. Installed with the CPU layer only (before megatron-core imports
    when the layer is known to be wanted), and only for warnings raised in megatron's modules."""
    warnings.filterwarnings("ignore", message=_GPU_LIBRARY_MISSING, module=r"megatron")
