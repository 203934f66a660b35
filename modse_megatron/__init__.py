"""modse-megatron: Mixture of Diverse Size Experts (MoDSE) on Megatron-Core.

Importing the package arranges that megatron-core, whenever it is imported, is version-checked
and, on a machine without CUDA, runs through the CPU/gloo compatibility layer
(:mod:`modse_megatron.platform`). Nothing else is needed for megatron-core to work on CPU.
Torch-free parts (the placement planner) do not import megatron-core and stay fast to load.
"""
import warnings as _warnings

# megatron-core warns at import time about optional GPU libraries (apex, TE) that a CPU run
# does not use; the CPU layer is the documented fallback.
_warnings.filterwarnings("ignore", message=r".*(Apex|apex|Transformer Engine|transformer_engine).*")

from .platform import PlatformError, activate_when_megatron_imports  # noqa: E402

activate_when_megatron_imports()

__version__ = "0.1.0"
__all__ = ["PlatformError", "__version__"]
