"""The target options of ``modse-convert reshard`` (in-process; the resharding itself runs in
tests/training/test_convert.py)."""
import pytest

from modse_megatron.checkpoint.errors import CheckpointError
from modse_megatron.checkpoint.relayout import _target_args
from modse_megatron.training.arguments import parse_args

BASE = ["--num-layers", "2", "--num-experts", "4", "--moe-expert-widths", "96,32,80,48", "--disable-bias-linear",
        "--expert-model-parallel-size", "2"]


def test_explicit_placements_follow_the_ep_size():
    """A re-planned checkpoint records explicit per-layer ranks for its EP size: at another EP
    size the target is planned afresh (auto) unless a placement is given; at the same EP size
    they are kept."""
    args = parse_args([*BASE, "--moe-expert-placement", "0,1,1,0;1,0,1,0"])
    assert _target_args(args, 1, 1, 1, None, None, None).modse.moe_expert_placement == "auto"
    assert _target_args(args, 1, 1, 2, None, None, None).modse.moe_expert_placement == "0,1,1,0;1,0,1,0"
    assert _target_args(args, 1, 1, 1, None, "contiguous", None).modse.moe_expert_placement == "contiguous"
    with pytest.raises(CheckpointError, match="gives 3 per-layer placements but the model has 2 MoE layers"):
        _target_args(args, 1, 1, 2, None, "0,1,1,0;1,0,1,0;0,0,1,1", None)
