"""Checkpoints beyond the training loop: loading that cannot run code (:mod:`.safe_load`),
integrity manifests (:mod:`.manifest`), one writer per save directory (:mod:`.lock`), the
export naming rule (:mod:`.names`) and ``modse-convert``."""
from modse_megatron.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
