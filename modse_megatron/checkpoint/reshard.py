"""Optimizer state across parallel layouts.

Model tensors in our checkpoints are layout-free (one global tensor per logical tensor). The
optimizer's are too in megatron's ``fully_reshardable`` format (one global tensor per parameter
and Adam moment), except for two things that depend on how many optimizers megatron chains:

* **tensor keys**: ``ChainedOptimizer`` prefixes them with ``chained_{i}.`` unless the save
  asked for ``chained_optim_avoid_prefix`` (megatron-core 0.16.1 optimizer.py:1190-1198). With
  EP > 1 megatron builds a dense and an expert optimizer (``chained_0``/``chained_1``), with
  EP = 1 often one, so a checkpoint's keys did not exist under the other layout
  (``KeyError: optimizer.state.param... not in state dict``). New checkpoints are saved without
  the prefix (:data:`OPTIMIZER_METADATA`); :func:`match_optimizer_keys` maps older ones.
* **the common part** (``param_groups`` with ``step``/``lr``, sharding type; the plain optimizer's
  ``state.common_step``) is stored per chained optimizer as ``{0: ..., 1: ...}`` or unindexed for
  one optimizer. :func:`adapt_optimizer_common` rebuilds it for the target's optimizers, matching
  groups by megatron's own identity keys (``param_group_identifier_keys``: wd_mult, lr_mult,
  is_expert_parallel, is_decoupled_lr).
"""
from __future__ import annotations

import re
from typing import Any

from modse_megatron.checkpoint.errors import CheckpointError

#: Saved with every optimizer: layout-free state (megatron's fully reshardable format, no
#: chained-optimizer key prefix).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}

_CHAINED = re.compile(r"^chained_\d+\.")


def unprefixed_key(key: str) -> str:
    return _CHAINED.sub("", key, count=1)


def match_optimizer_keys(optimizer_template: Any, checkpoint_keys: set[str]) -> None:
    """Rename (in place) the optimizer template's tensor keys to the checkpoint's spelling of
    the same tensor, with or without a ``chained_{i}.`` prefix."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory

    by_suffix: dict[str, str] = {}
    for key in checkpoint_keys:
        by_suffix.setdefault(unprefixed_key(key), key)
    for item in nested_values(optimizer_template):
        if not isinstance(item, (ShardedBase, ShardedTensorFactory)) or item.key in checkpoint_keys:
            continue
        stored = by_suffix.get(unprefixed_key(item.key))
        if stored is not None:
            item.key = stored


def _sub_states(common_optimizer: Any) -> list[dict]:
    """The per-optimizer common dicts of a checkpoint: ``{0: .., 1: ..}`` or one dict."""
    if isinstance(common_optimizer, dict) and common_optimizer and all(isinstance(k, int) for k in common_optimizer):
        return [common_optimizer[k] for k in sorted(common_optimizer)]
    return [common_optimizer]


def _identity(group: dict) -> tuple:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(group.get(key, group.get(f"pre_{key}")) for key in param_group_identifier_keys)


def adapt_optimizer_common(common_optimizer: Any, optimizer: Any) -> Any:
    """The checkpoint's optimizer common state in the structure ``optimizer`` (the target
    layout's megatron optimizer) loads: one entry per chained optimizer, each with the saved
    param groups it owns (hyper-parameters and ``step`` as saved)."""
    subs = _sub_states(common_optimizer)
    saved_groups: dict[tuple, dict] = {}
    for sub in subs:
        for group in sub.get("optimizer", {}).get("param_groups", []):
            saved_groups.setdefault(_identity(group), group)
    extras = {k: v for k, v in subs[0].items() if k != "optimizer"}
    # The plain (non-distributed) optimizer keeps Adam's step beside the tensors, as one
    # ``state.common_step`` per optimizer (megatron's MixedPrecisionOptimizer.sharded_state_dict);
    # every chained optimizer steps together, so any saved one serves all.
    steps = [sub.get("optimizer", {}).get("state", {}).get("common_step") for sub in subs]
    common_step = next((step for step in steps if step is not None), None)
    targets = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    adapted = []
    for target in targets:
        groups = []
        for group in target.optimizer.param_groups:
            identity = _identity(group)
            if identity not in saved_groups:
                raise CheckpointError(
                    f"the checkpoint has no optimizer state for parameter group {identity} (wd_mult, lr_mult, "
                    f"expert-parallel, decoupled-lr) of this model: resume with --finetune (weights only)")
            groups.append(dict(saved_groups[identity]))
        common = {"param_groups": groups}
        if common_step is not None:
            common["state"] = {"common_step": common_step}
        adapted.append({**extras, "optimizer": common})
    return adapted[0] if len(targets) == 1 else dict(enumerate(adapted))
