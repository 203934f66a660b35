"""modse-megatron: Mixture of Diverse Size Experts (MoDSE) on Megatron-Core.

Importing the package arranges that megatron-core, whenever it is imported, is version-checked
and, on a machine without CUDA (or with ``MODSE_CPU_LAYER=1``), runs through the CPU/gloo
compatibility layer (:mod:`modse_megatron.platform`), which also hides megatron's apex/TE-missing
warnings. Nothing else is needed for megatron-core to work on CPU.
Torch-free parts (the placement planner) do not import megatron-core and stay fast to load.
"""
from .platform import PlatformError, activate_when_megatron_imports

activate_when_megatron_imports()

__version__ = "0.1.0"
__all__ = ["PlatformError", "__version__"]
