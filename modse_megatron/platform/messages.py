"""Messages megatron-core 0.16.1 and torch print on every run that a user cannot act on
(the commands call :func:`quiet_megatron_warnings` first)."""
from __future__ import annotations


def quiet_megatron_warnings() -> None:
    """Warnings megatron-core 0.16.1 triggers on every run that a user cannot act on."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)
    # megatron's dist_checkpointing still builds torch's ShardedTensor (deprecated in favour of DTensor)
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)
