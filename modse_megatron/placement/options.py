"""``PlanOptions``: how to plan, one set of fields and defaults for every entry point.

``plan_placement``, ``plan_placement_batch`` and ``modse-plan`` all read their planner
keywords from this dataclass (the functions still accept each field as a keyword and build a
``PlanOptions`` from it), so a new option or a changed default is one edit here.  Fields are
validated on construction with one-line ``ValueError``s naming the fix.  Pure Python.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Literal

Balance = Literal["memory_then_compute", "compute"]
BALANCE_MODES: tuple[str, ...] = ("memory_then_compute", "compute")

#: Largest ``exact_max_experts`` (csrc/planner_common.h ``kExactMaxExpertsCap``): branch and
#: bound recurses once per expert on worker threads, and bigger layers exhaust
#: ``exact_node_budget`` long before they could be proven anyway.
EXACT_MAX_EXPERTS_CAP = 256
#: Most physical slots (experts + replicas) per layer (csrc ``kMaxSlots``).
MAX_SLOTS = 1 << 28
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class PlanOptions:
    """Planner options shared by every layer of a call (see ``plan.py`` for the goals)."""

    balance: Balance = "memory_then_compute"
    """``"memory_then_compute"`` (complementary pairs kept together when the sizes allow it,
    so memory per rank is equal) or ``"compute"`` (ignore memory, minimise max compute)."""
    bytes_per_param: float = 1.0
    """Bytes per unit of size, for ``moved_bytes``."""
    move_slack: float = 0.0
    """Accept a plan up to this fraction worse in max compute if it moves fewer bytes from
    ``previous`` (0: only exact ties)."""
    max_move_fraction: float = 1.0
    """With ``previous``: the plan moves at most this share of each layer's expert bytes (the
    descent from ``previous`` only takes exchanges that stay within it; repeated re-plans keep
    converging a little at a time).  1 = no limit.  Ignored when ``previous`` is not itself a
    valid plan under these options."""
    exact_max_experts: int = 16
    """Run branch and bound on layers with at most this many experts (0 to
    ``EXACT_MAX_EXPERTS_CAP``)."""
    exact_node_budget: int = 400_000
    """Search nodes before branch and bound stops (its result is then not a proof)."""
    num_threads: int = 0
    """Worker threads over layers; 0 = automatic (one thread for small batches)."""
    num_replicas: int = 0
    """Extra physical slots holding copies of busy experts (EPLB's redundant experts):
    ``n + num_replicas`` must be a multiple of ``num_ranks``, at most ``n * (num_ranks - 1)``
    (unless ``stack_copies``), even in paired mode; not with ``previous``."""
    joint_counts: bool = True
    """With replicas: choose how many copies each expert gets together with the placement
    (count moves in the local search, and an exact search over every choice of counts on small
    layers), instead of only EPLB's greedy counts, which minimise the heaviest copy rather than
    the heaviest rank.  Never worse than ``False``; slower."""
    stack_copies: bool = False
    """With replicas: copies of one expert may share a rank (EPLB's behaviour: such a rank holds
    the expert's memory twice and splits nothing), so ``num_replicas`` may exceed
    ``n * (num_ranks - 1)``.  ``False``: every copy of an expert on a distinct rank."""
    num_groups: int = 0
    """Node-limited placement (DeepSeek EPLB's group-limited hierarchy): the experts form
    ``num_groups`` groups of consecutive ids, and every group, with all its copies, stays on one
    node (``ranks_per_node`` ranks); groups go to nodes first (heaviest node as light as
    possible), then each node is planned on its own.  A multiple of the node count dividing the
    expert count; in paired mode every group must hold whole complementary pairs; not with
    ``previous``.  0 = off."""

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_MODES:
            raise ValueError(
                f"balance={self.balance!r} is unknown: use one of {', '.join(BALANCE_MODES)}"
            )
        if not _positive_number(self.bytes_per_param):
            raise ValueError(
                f"bytes_per_param={self.bytes_per_param!r} must be a positive number"
            )
        if not (_number(self.move_slack) and self.move_slack >= 0):
            raise ValueError(f"move_slack={self.move_slack!r} must be a number >= 0")
        if not (_number(self.max_move_fraction) and 0 <= self.max_move_fraction <= 1):
            raise ValueError(f"max_move_fraction={self.max_move_fraction!r} must be a number in [0, 1] "
                             f"(the largest share of a layer's expert bytes a plan may move; 1 = no limit)")
        self._set_int("exact_max_experts", EXACT_MAX_EXPERTS_CAP,
                      "branch and bound recurses once per expert; larger layers exhaust "
                      "exact_node_budget first")
        self._set_int("exact_node_budget", _INT64_MAX)
        self._set_int("num_threads", _INT32_MAX, "0 = automatic")
        self._set_int("num_replicas", _INT32_MAX)
        self._set_int("num_groups", _INT32_MAX, "0 = off")
        for name in ("joint_counts", "stack_copies"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be True or False")

    def _set_int(self, name: str, high: int, why: str = "") -> None:
        """Check an integer field in [0, high] and store it as a plain int."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if value > high:
            hint = f": {why}" if why else ""
            raise ValueError(f"{name}={value!r} must be at most {high}{hint}")
        object.__setattr__(self, name, int(value))

    def with_overrides(self, caller: str, overrides: dict[str, Any]) -> PlanOptions:
        """These options with some fields replaced (keywords of ``caller``; ``None`` = keep)."""
        names = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in names:
                raise TypeError(
                    f"{caller}() got an unexpected keyword argument {key!r}: planner options "
                    f"are {', '.join(sorted(names))}"
                )
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self


def resolve_options(caller: str, options: PlanOptions | None, overrides: dict[str, Any]) -> PlanOptions:
    """``options`` (default ``PlanOptions()``) with the caller's keyword arguments applied."""
    if options is None:
        options = PlanOptions()
    elif not isinstance(options, PlanOptions):
        raise ValueError(f"options={options!r} must be a PlanOptions (or None for the defaults)")
    return options.with_overrides(caller, overrides)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _positive_number(x: Any) -> bool:
    return _number(x) and x > 0


__all__ = ["BALANCE_MODES", "Balance", "EXACT_MAX_EXPERTS_CAP", "MAX_SLOTS", "PlanOptions",
           "resolve_options"]
