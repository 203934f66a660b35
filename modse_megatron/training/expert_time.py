"""Per-rank expert busy time: how long each rank spends in its MoE layers' expert computation.

With expert parallelism every MoE layer waits for its slowest EP rank, and in MoDSE a rank's
expert work is Σ tokens x width of the experts it holds, so placement decides who waits.
:class:`ExpertTimer` hooks the forward of every MoE layer's ``experts`` module (the grouped
GEMMs of this rank's experts, nothing of the token exchange) and sums the seconds per step;
the trainer gathers every rank's value into the ``expert_seconds_per_rank`` metrics column.
On CUDA the time comes from CUDA events (read once per step, after the step), on CPU from the
wall clock. Forward only: the backward's expert GEMMs follow the same tokens and widths.
"""
from __future__ import annotations

import time

import torch


class ExpertTimer:
    """Seconds this rank spent in expert forward passes since the last :meth:`take`."""

    def __init__(self, model: torch.nn.Module):
        self._handles: list = []
        self._open: dict[int, object] = {}
        self._done: list = []  # CUDA (start, end) event pairs, or CPU seconds
        self.attach(model)

    def attach(self, model: torch.nn.Module) -> None:
        """Time ``model``'s experts (again after a rebuild, e.g. a placement migration)."""
        from megatron.core.transformer.moe.moe_layer import MoELayer

        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in model.modules():
            if isinstance(module, MoELayer):
                self._handles += [module.experts.register_forward_pre_hook(self._start),
                                  module.experts.register_forward_hook(self._stop)]

    def _start(self, module, args) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open[id(module)] = event
        else:
            self._open[id(module)] = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        start = self._open.pop(id(module), None)
        if isinstance(start, float):
            self._done.append(time.perf_counter() - start)
        elif start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._done.append((start, end))

    def take(self) -> float:
        """The seconds since the last call (waits for CUDA events to complete)."""
        total = 0.0
        for item in self._done:
            if isinstance(item, float):
                total += item
            else:
                item[1].synchronize()
                total += item[0].elapsed_time(item[1]) / 1000.0
        self._done = []
        return total
