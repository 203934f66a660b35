"""Fixes for megatron-core 0.16.1 bugs on paths without apex/TransformerEngine.

These are not CPU-specific: they apply whenever megatron falls back to ``torch.optim`` (no apex,
no TE), which is always the case on CPU and possible on GPUs. Each fix names the line it answers.
"""
from __future__ import annotations

import torch

_installed = False


def _fix_fully_reshardable_optimizer_load() -> None:
    """``DistributedOptimizer.load_state_dict`` (distrib_optimizer.py:817-825) gives every torch
    Adam state a ``step`` entry, then ``load_parameter_state_from_fully_reshardable`` skips
    ``step`` in the loaded tensors (:2101) and ``_set_main_param_and_optimizer_states`` copies
    every destination key from them (:940) -> ``KeyError: 'step'``. Keep the state's own step."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state.get(main_param, {}).get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


def _fix_shared_adam_step_after_load() -> None:
    """``DistributedOptimizer.load_state_dict`` stores ONE ``step`` tensor object in every
    parameter's torch Adam state (distrib_optimizer.py:825 ``s["step"] = step``). torch Adam
    increments ``state["step"]`` in place per parameter, so after a resume the shared counter
    advances once per parameter per iteration and Adam's bias correction drifts: a resumed run
    no longer reproduces the uninterrupted one. Give every state its own copy."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    original = dopt.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()
        return result

    dopt.DistributedOptimizer.load_state_dict = load_state_dict


def install() -> None:
    """Apply the fixes once, only where megatron runs without apex/TE."""
    global _installed
    if _installed:
        return
    from megatron.core.optimizer import distrib_optimizer as dopt

    if not dopt.HAVE_APEX_OR_TE:
        _fix_fully_reshardable_optimizer_load()
        _fix_shared_adam_step_after_load()
    _installed = True
