"""Placement policies -> megatron's physical slot order (``modse_megatron.placement.layout``)."""
from __future__ import annotations

import pytest

from modse_megatron.placement import plan
from modse_megatron.placement.layout import (
    check_slot_order,
    paired_ranks,
    placement_ranks,
    resolve_ranks,
    slot_order,
)

PAPER8_F40 = [72, 8, 64, 16, 48, 32, 40, 40]  # the paper8 preset at moe_ffn_hidden_size=40


def without_planner(monkeypatch, why: str) -> None:
    """Make the C++ planner unimportable (as if not built) for one test: importing it raises
    ImportError(why)."""

    def missing():
        raise ImportError(why)

    monkeypatch.setattr(plan, "_PLANNER", None)
    monkeypatch.setattr(plan, "_import_planner", missing)


@pytest.mark.parametrize("ep", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["pairs", "auto", "contiguous"])
def test_placements_are_valid_slot_orders(mode, ep):
    ranks = resolve_ranks(mode, PAPER8_F40, ep)
    slots = slot_order(ranks, ep)
    assert sorted(slots) == list(range(8))
    per_rank = 8 // ep
    for r in range(ep):  # slots [r*L, (r+1)*L) are exactly the experts placed on rank r
        assert sorted(slots[r * per_rank : (r + 1) * per_rank]) == [e for e in range(8) if ranks[e] == r]
    params = [sum(PAPER8_F40[e] for e in range(8) if ranks[e] == r) for r in range(ep)]
    if mode != "contiguous" and per_rank > 1:  # whole complementary pairs: equal parameters
        assert len(set(params)) == 1, params


@pytest.mark.parametrize(
    "widths, ep, expected",
    [
        ([72, 8, 64, 16, 48, 32, 40, 40], 4, [0, 0, 1, 1, 2, 2, 3, 3]),
        ([8, 72, 16, 64], 2, [0, 0, 1, 1]),
        ([10, 20, 30, 40], 2, [0, 1, 1, 0]),  # 40+10 / 30+20
        ([30, 20, 10], 3, [0, 1, 2]),  # one expert per rank: megatron's order
        ([30, 20, 10, 5, 6, 7], 2, [0, 1, 1, 0, 1, 0]),  # odd per rank: greedy fill 36/37
    ],
)
def test_paired_ranks(widths, ep, expected):
    assert paired_ranks(widths, ep) == expected


def test_explicit_placement():
    assert placement_ranks("1,1,0,0", 4, 2) == [1, 1, 0, 0]
    assert placement_ranks("auto", 4, 2) is None
    assert slot_order(resolve_ranks("1,1,0,0", [8, 72, 16, 64], 2), 2) == [2, 3, 0, 1]
    with pytest.raises(ValueError, match="outside"):
        placement_ranks("0,3,1,1", 4, 2)


def test_slot_order_errors():
    assert check_slot_order((2, 0, 1), 3) == [2, 0, 1]
    with pytest.raises(ValueError, match="not a permutation"):
        check_slot_order([0, 0, 1], 3)
    with pytest.raises(ValueError, match="every rank needs 2"):
        slot_order([0, 0, 0, 1], 2)


def test_auto_is_the_planner_and_never_falls_back_silently(monkeypatch):
    """auto = the planner's plan; without the C++ planner it raises one line naming the fix
    instead of quietly using `pairs`."""
    assert resolve_ranks("auto", PAPER8_F40, 2) == plan.plan_placement(PAPER8_F40, num_ranks=2).rank_of_expert
    without_planner(monkeypatch, "No module named 'modse_megatron.placement._planner'")
    with pytest.raises(ImportError) as info:
        resolve_ranks("auto", PAPER8_F40, 2)
    message = str(info.value)
    assert "cannot be imported (No module named" in message and "pip install -e ." in message
    assert "\n" not in message
    assert plan.planner_unavailable_reason() == message
    assert resolve_ranks("pairs", PAPER8_F40, 2) == paired_ranks(PAPER8_F40, 2)  # still works
    assert resolve_ranks("auto", PAPER8_F40, 1) == [0] * 8  # one rank: nothing to plan


def test_per_layer_placements():
    from modse_megatron.placement.layout import format_layer_ranks, layer_spec, resolve_layer_ranks

    widths = [8, 72, 16, 64]
    assert resolve_layer_ranks("1,1,0,0;0,1,0,1", widths, 2, 2) == [[1, 1, 0, 0], [0, 1, 0, 1]]
    assert resolve_layer_ranks("1,1,0,0", widths, 2, 3) == [[1, 1, 0, 0]] * 3  # one list: every layer
    assert resolve_layer_ranks("pairs", widths, 2, 2) == [resolve_ranks("pairs", widths, 2)] * 2
    assert resolve_ranks("1,1,0,0;0,1,0,1", widths, 2, layer=1) == [0, 1, 0, 1]
    assert layer_spec("auto", 5) == "auto"
    assert format_layer_ranks([[1, 1, 0, 0], [0, 1, 0, 1]]) == "1,1,0,0;0,1,0,1"
    assert format_layer_ranks([[1, 1, 0, 0]] * 2) == "1,1,0,0"
    for spec, n, message in [
        ("1,1,0,0;0,1,0,1", 3, "gives 2 per-layer placements but the model has 3 MoE layers"),
        ("auto;1,1,0,0", 2, "mixes a named mode with per-layer lists"),
        ("1,1,0,0;0,1,0", 2, "lists 3 ranks but there are 4 experts"),
        ("1,1,0,0;0,0,0,1", 2, "puts 3 experts on EP rank 0"),
    ]:
        with pytest.raises(ValueError, match=message) as err:
            resolve_layer_ranks(spec, widths, 2, n)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="none for MoE layer 2"):
        layer_spec("1,1,0,0;0,1,0,1", 2)
