"""Deterministic tensors named by a string: the same on every rank, layout and placement.

Tests that compare layouts (TP/EP/ETP sizes, slot orders) load every logical weight from its
name, so a 1-way run and a sharded or permuted one hold the same model.
"""
from __future__ import annotations

import torch


def name_seed(name: str) -> int:
    """A seed from ``name`` alone (``hash()`` is salted per process, so it cannot be used)."""
    return sum(ord(c) * (i + 1) for i, c in enumerate(name)) % (2**31)


def seeded_randn(name: str, shape, scale: float = 1.0) -> torch.Tensor:
    """``randn(shape) * scale`` from a generator seeded by ``name`` (the global RNG untouched)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(name_seed(name))) * scale
