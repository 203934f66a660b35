"""Typed Python API over the C++ expert placement planner (``_planner``).

Why a planner: MoDSE experts differ in width, so Megatron's contiguous expert blocks leave
some ranks with far more parameters and compute than others.  Per MoE layer (layers are
independent) the planner assigns each of ``n`` experts to one of ``R`` ranks, exactly
``k = n / R`` per rank, and optimises, in this order:

1. **memory** — equal parameters per rank where the sizes allow it by construction: when the
   sizes form complementary pairs (sorted, ``s[i] + s[n-1-i]`` constant, as MoDSE's
   4.5:0.5, 4:1, 3:2, 2.5:2.5 ratios do) and ``k`` is even, every rank receives whole pairs
   ("expert-pair allocation"), so memory is exactly equal.  Otherwise memory is only reported
   (``balance="compute"`` also switches pairing off).  Uniform sizes need no pairing.
2. **compute** — minimal ``max_r C_r`` with ``C_r = sum of loads[e] * sizes[e]`` on rank r.
   Exact for k = 1, k = 2 (largest with smallest) and small layers (branch and bound);
   LPT / balanced differencing + swap descent otherwise.  In paired mode also: an "outlier"
   start (an expert too heavy for any balanced plan gets its cheapest possible rank, the
   complementary pairs gathered from anywhere) and, for two pairs per rank, exact re-splits of
   the heaviest rank with two others when two-rank exchanges are stuck.
3. **node inflow** — with ``ranks_per_node``, token inflow per node is balanced without
   raising max compute (unlike DeepSeek EPLB, which balances nodes first).
4. **moves** — with ``previous``, among equally good plans (within ``move_slack``) the one that
   moves the fewest bytes; ``moved_bytes = sum(sizes[e] * bytes_per_param)`` over experts whose
   rank changed (so pass parameter counts as sizes to get bytes; 0 without ``previous``).

Every plan reports ``lower_bound`` (proven: no valid plan of the same problem is better),
``gap`` (percent above it) and ``optimal``.  In paired mode "the same problem" is the paired
one (pairs kept together).  The local search stops once within 0.01% of the bound, so a tiny
nonzero gap is by design.

**Redundant replicas** (``num_replicas=X``, DeepSeek EPLB's redundant experts): there are
``S = n + X`` physical slots, exactly ``k = S / R`` per rank.  An expert with ``c`` copies has
its tokens split evenly, so each copy costs ``loads[e] * sizes[e] / c`` compute and holds
``sizes[e]`` memory.  Copies go greedily to the expert with the largest per-copy compute (EPLB's
rule; it minimises the heaviest copy), at most one copy of an expert per rank; in paired mode
(complementary sizes, ``k`` even) they are added in complementary pairs, so memory stays exactly
equal, and ``X`` must be even.  The copies are then placed like experts, never two copies of an
expert on one rank.  ``lower_bound`` holds for every way of choosing the copy counts, so
``optimal`` means no choice of counts and placement does better; ``method`` says how the
placement of the chosen copies was found ("branch-and-bound": exact for those copies).
``previous`` cannot be combined with replicas yet.

Hierarchy trade-off: DeepSeek's EPLB packs experts to nodes first, then to GPUs, so per-GPU
balance pays for node balance; here max compute per rank is never raised for node balance.
Previous placements: the planner also descends from ``previous`` and relabels ranks (a
maximum-weight assignment of new rank contents to old ranks, per node first), so re-planning
with unchanged loads moves nothing.

Nothing here imports torch; the C++ core is compiled once by ``pip install``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import numpy as np

try:
    from . import _planner
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "modse_megatron.placement._planner is not built: run `pip install -e .` or "
        "`python setup.py build_ext --inplace` in the repository root"
    ) from exc

Balance = Literal["memory_then_compute", "compute"]
BALANCE_MODES: tuple[str, ...] = ("memory_then_compute", "compute")
METHODS: tuple[str, ...] = (
    "one-expert-per-rank",  # k = 1, exact
    "exact-pairing",  # k = 2, exact
    "branch-and-bound",  # small layers, exact
    "heuristic",  # LPT / balanced differencing + swap descent
    "previous",  # swap descent from the previous placement (as good, fewer bytes moved)
)


@dataclass(frozen=True)
class PlacementPlan:
    """Placement of one MoE layer's experts on ranks, with its own quality report."""

    rank_of_expert: list[int]
    """Rank of each expert (logical id -> rank); exactly ``experts_per_rank`` per rank.  With
    replicas: the rank of the expert's first copy (its lowest rank; see ``ranks_of_expert``)."""
    max_compute: float
    """max over ranks of sum(loads[e] * sizes[e]) — the step time proxy being minimised."""
    lower_bound: float
    """Proven lower bound on ``max_compute`` for any valid plan of the same problem."""
    gap: float
    """Percent above ``lower_bound`` (an upper bound on the distance to optimal)."""
    optimal: bool
    """True when ``max_compute`` reaches the bound or an exact method solved the layer."""
    moved_bytes: float
    """Bytes of experts whose rank differs from ``previous`` (0 without ``previous``)."""
    num_ranks: int
    ranks_per_node: int
    experts_per_rank: int
    """Physical slots per rank, ``k = (n + num_replicas) / num_ranks``."""
    compute_per_rank: list[float]
    memory_per_rank: list[float]
    node_inflow: list[float]
    """Sum of loads per node (one entry when there is no hierarchy)."""
    node_inflow_bound: float
    """Lower bound on the busiest node's inflow (balance is relative to this)."""
    paired: bool
    """Complementary pairs were kept together, so memory per rank is exactly equal."""
    method: str
    """How the plan was found; one of ``METHODS``."""
    num_replicas: int
    """Extra physical slots holding copies of busy experts (0: one slot per expert)."""
    copies_per_expert: list[int]
    """Copies of each expert (length n, each >= 1, summing to n + num_replicas)."""
    slot_expert: list[int]
    """Logical expert of each physical slot, rank-major: slot i lives on rank
    ``i // experts_per_rank`` (EPLB's phy2log); ascending inside a rank."""
    ranks_of_expert: list[list[int]]
    """Ranks holding a copy of each expert, ascending (distinct: one copy per rank)."""

    @property
    def experts_of_rank(self) -> list[list[int]]:
        """Logical expert ids held by each rank, ascending."""
        k = self.experts_per_rank
        return [self.slot_expert[r * k : (r + 1) * k] for r in range(self.num_ranks)]

    @property
    def slot_order(self) -> list[int]:
        """Physical slot order: experts listed rank by rank (Megatron puts slots
        ``[r*k, (r+1)*k)`` on rank r), i.e. the permutation the MoE layer is built in; the
        same as ``slot_expert``."""
        return list(self.slot_expert)

    @property
    def memory_balanced(self) -> bool:
        """All ranks hold the same number of parameters (up to rounding)."""
        hi, lo = max(self.memory_per_rank), min(self.memory_per_rank)
        return hi - lo <= 1e-9 * max(hi, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``modse-plan --json`` prints these)."""
        d = asdict(self)
        d["experts_of_rank"] = self.experts_of_rank
        d["memory_balanced"] = self.memory_balanced
        return d


@dataclass(frozen=True)
class BatchPlacementPlan:
    """Plans of many layers as arrays (one row per layer); ``plans[i]`` gives one layer."""

    rank_of_expert: np.ndarray  # [L, n] int32
    max_compute: np.ndarray  # [L]
    lower_bound: np.ndarray  # [L]
    gap: np.ndarray  # [L] percent
    optimal: np.ndarray  # [L] bool
    moved_bytes: np.ndarray  # [L]
    compute_per_rank: np.ndarray  # [L, R]
    memory_per_rank: np.ndarray  # [L, R]
    node_inflow: np.ndarray  # [L, N]
    node_inflow_bound: np.ndarray  # [L]
    paired: np.ndarray  # [L] bool
    method: np.ndarray  # [L] int32 index into METHODS
    copies_per_expert: np.ndarray  # [L, n] int32
    slot_expert: np.ndarray  # [L, S] int32, S = n + num_replicas, rank-major
    num_ranks: int
    ranks_per_node: int
    num_replicas: int

    def __len__(self) -> int:
        return int(self.rank_of_expert.shape[0])

    def __getitem__(self, layer: int) -> PlacementPlan:
        i = range(len(self))[layer]  # bounds check + negative indices
        n, S = self.rank_of_expert.shape[1], self.slot_expert.shape[1]
        k = S // self.num_ranks
        slots = self.slot_expert[i].tolist()
        ranks_of_expert: list[list[int]] = [[] for _ in range(n)]
        for slot, e in enumerate(slots):
            ranks_of_expert[e].append(slot // k)
        return PlacementPlan(
            rank_of_expert=self.rank_of_expert[i].tolist(),
            max_compute=float(self.max_compute[i]),
            lower_bound=float(self.lower_bound[i]),
            gap=float(self.gap[i]),
            optimal=bool(self.optimal[i]),
            moved_bytes=float(self.moved_bytes[i]),
            num_ranks=self.num_ranks,
            ranks_per_node=self.ranks_per_node,
            experts_per_rank=k,
            compute_per_rank=self.compute_per_rank[i].tolist(),
            memory_per_rank=self.memory_per_rank[i].tolist(),
            node_inflow=self.node_inflow[i].tolist(),
            node_inflow_bound=float(self.node_inflow_bound[i]),
            paired=bool(self.paired[i]),
            method=METHODS[int(self.method[i])],
            num_replicas=self.num_replicas,
            copies_per_expert=self.copies_per_expert[i].tolist(),
            slot_expert=slots,
            ranks_of_expert=ranks_of_expert,
        )


# ----------------------------------------------------------------------------- sizes helpers


def parse_ratios(text: str) -> list[tuple[float, float]]:
    """Parse ``"4.5:0.5,4.0:1.0"`` into ``[(4.5, 0.5), (4.0, 1.0)]`` (same parser and errors as
    ``MoDSEConfig``'s ``moe_expert_size_ratios``)."""
    from modse_megatron.config import parse_ratio_pairs

    return [(float(a), float(b)) for a, b in parse_ratio_pairs(text)]


def widths_from_ratios(
    ratios: str | Sequence[tuple[float, float]], unit: int, repeat: int = 1
) -> list[int]:
    """Expert widths of MoDSE pairs: each ``a:b`` is two experts of widths ``a*unit``, ``b*unit``.

    ``widths_from_ratios("4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5", 256)`` ->
    ``[1152, 128, 1024, 256, 768, 512, 640, 640]``; ``repeat`` repeats the whole list (e.g. 64
    experts from the 4 pairs with ``repeat=8``).  Widths must come out as positive integers.
    """
    pairs = parse_ratios(ratios) if isinstance(ratios, str) else [tuple(p) for p in ratios]
    if isinstance(unit, bool) or not isinstance(unit, (int, np.integer)) or unit <= 0:
        raise ValueError(f"unit={unit!r} must be a positive integer width (e.g. 256)")
    if isinstance(repeat, bool) or not isinstance(repeat, (int, np.integer)) or repeat <= 0:
        raise ValueError(f"repeat={repeat!r} must be a positive integer")
    widths: list[int] = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"ratio {pair!r} is not a pair (a, b)")
        for r in pair:
            x = float(r) * unit
            if not math.isfinite(x) or x <= 0:
                raise ValueError(f"ratio {r} gives width {x}: ratios must be positive numbers")
            if abs(x - round(x)) > 1e-9 * max(1.0, abs(x)):
                raise ValueError(
                    f"ratio {r} x unit {unit} = {x:g} is not an integer width: "
                    f"choose a unit that makes every ratio*unit whole"
                )
            widths.append(int(round(x)))
    if not widths:
        raise ValueError("no ratios given: write pairs like 4.5:0.5,4.0:1.0")
    return widths * int(repeat)


# ----------------------------------------------------------------------------- validation


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def _matrix(name: str, value: Any, ndim_ok: tuple[int, ...]) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers (a list or array of floats)") from None
    if a.ndim not in ndim_ok:
        want = " or ".join(f"{d}-D" for d in ndim_ok)
        raise ValueError(f"{name} must be {want}, got shape {a.shape}")
    return a


def _where(name: str, a: np.ndarray, idx: tuple[int, ...]) -> str:
    """``loads[5]`` for one layer, ``layer 3: loads[5]`` when there are several."""
    if a.ndim == 2 and a.shape[0] > 1:
        return f"layer {idx[0]}: {name}[{idx[1]}]"
    return f"{name}[{idx[-1]}]"


def _check_values(name: str, a: np.ndarray, positive: bool) -> None:
    low = a.min()  # NaN propagates; one reduction each on the common, valid path
    if np.isfinite(a.max()) and (low > 0 if positive else low >= 0):
        return
    bad = ~np.isfinite(a) | ((a <= 0) if positive else (a < 0))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        rule = "positive finite numbers" if positive else "finite numbers >= 0"
        raise ValueError(f"{_where(name, a, idx)}={a[idx]} is invalid: {name} must be {rule}")


def _validate(
    sizes: np.ndarray, loads: np.ndarray, num_ranks: Any, ranks_per_node: Any,
    previous: np.ndarray | None, balance: str, bytes_per_param: float, move_slack: float,
    num_replicas: Any,
) -> tuple[int, int, int]:
    """Checks everything the C++ core checks, with messages naming the fix, except that an odd
    ``num_replicas`` with complementary sizes is left to the core (it detects the pairs);
    returns (R, g, num_replicas)."""
    if num_ranks is None:
        raise ValueError("num_ranks is required: the number of expert-parallel ranks")
    R = _positive_int("num_ranks", num_ranks)
    n = sizes.shape[-1]
    if n == 0:
        raise ValueError("sizes is empty: give one size per expert")
    if loads.shape[-1] != n:
        raise ValueError(
            f"loads has {loads.shape[-1]} entries per layer but sizes has {n}: "
            f"give one load per expert"
        )
    X = num_replicas
    if isinstance(X, bool) or not isinstance(X, (int, np.integer)) or X < 0:
        raise ValueError(f"num_replicas={X!r} must be an integer >= 0")
    X = int(X)
    if X > n * (R - 1):
        raise ValueError(
            f"num_replicas={X} exceeds num_experts*(num_ranks-1)={n * (R - 1)}: "
            f"an expert has at most one copy per rank"
        )
    if X == 0 and n % R:
        raise ValueError(
            f"num_experts={n} is not divisible by num_ranks={R}: "
            f"choose num_ranks that divides the expert count"
        )
    if (n + X) % R:
        raise ValueError(
            f"num_experts={n} + num_replicas={X} = {n + X} slots is not divisible by "
            f"num_ranks={R}: choose num_replicas so that experts + replicas is a multiple of "
            f"num_ranks"
        )
    if X and previous is not None:
        raise ValueError(
            "previous cannot be combined with num_replicas > 0 yet: plan replicas without previous"
        )
    g = R if ranks_per_node is None else _positive_int("ranks_per_node", ranks_per_node)
    if R % g:
        raise ValueError(
            f"ranks_per_node={g} does not divide num_ranks={R}: "
            f"use a divisor of num_ranks (GPUs per node)"
        )
    _check_values("sizes", sizes, positive=True)
    _check_values("loads", loads, positive=False)
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance={balance!r} is unknown: use one of {', '.join(BALANCE_MODES)}")
    if not (isinstance(bytes_per_param, (int, float)) and math.isfinite(bytes_per_param)
            and bytes_per_param > 0):
        raise ValueError(f"bytes_per_param={bytes_per_param!r} must be a positive number")
    if not (isinstance(move_slack, (int, float)) and math.isfinite(move_slack) and move_slack >= 0):
        raise ValueError(f"move_slack={move_slack!r} must be a number >= 0")
    if previous is not None:
        if previous.shape[-1] != n:
            raise ValueError(
                f"previous has {previous.shape[-1]} entries but there are {n} experts: "
                f"give the previous rank of every expert"
            )
        if not np.all(np.isfinite(previous)) or np.any(previous != np.round(previous)):
            raise ValueError("previous must hold integer rank ids")
        bad = (previous < 0) | (previous >= R)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{_where('previous', previous, idx)}={int(previous[idx])} is not a rank in "
                f"[0, {R}): previous placements must use the same num_ranks"
            )
    return R, g, X


# ----------------------------------------------------------------------------- public API


def plan_placement_batch(
    sizes: Any,
    loads: Any = None,
    num_ranks: int | None = None,
    ranks_per_node: int | None = None,
    previous: Any = None,
    *,
    balance: Balance = "memory_then_compute",
    bytes_per_param: float = 1.0,
    move_slack: float = 0.0,
    exact_max_experts: int = 16,
    exact_node_budget: int = 400_000,
    num_threads: int = 0,
    num_replicas: int = 0,
) -> BatchPlacementPlan:
    """Plan many MoE layers in one C++ call (the GIL is released; layers run on threads).

    Args:
        sizes: ``[n]`` shared by all layers, or ``[L, n]`` per layer: expert widths or
            parameter counts (positive).
        loads: ``[L, n]`` measured tokens per expert (>= 0); ``None`` = uniform loads, one
            layer per row of ``sizes``.
        num_ranks: ``R``; must divide ``n``.
        ranks_per_node: GPUs per node; must divide ``R``.  Enables node inflow balancing.
        previous: ``[n]`` (all layers) or ``[L, n]`` rank of each expert in the current
            placement; the new plan moves the fewest bytes among equally good plans.
        balance: ``"memory_then_compute"`` (pairs kept together when the sizes allow it) or
            ``"compute"`` (ignore memory, minimise max compute only).
        bytes_per_param: bytes per unit of size for ``moved_bytes`` (default 1).
        move_slack: accept a plan up to this fraction worse in max compute if it moves fewer
            bytes (default 0: only exact ties).
        exact_max_experts: run branch and bound for layers with at most this many experts.
        exact_node_budget: search nodes before branch and bound stops (then not a proof).
        num_threads: worker threads over layers; 0 = automatic.
        num_replicas: extra physical slots for copies of busy experts (module docstring);
            ``n + num_replicas`` must be a multiple of ``num_ranks``, at most
            ``n * (num_ranks - 1)``, even in paired mode; not with ``previous``.
    """
    s = _matrix("sizes", sizes, (1, 2))
    if loads is None:
        t = np.ones((1 if s.ndim == 1 else s.shape[0], s.shape[-1]))
    else:
        t = _matrix("loads", loads, (1, 2))
        if t.ndim == 1:
            t = t[None, :]
    if s.ndim == 2 and s.shape[0] not in (1, t.shape[0]):
        raise ValueError(
            f"sizes has {s.shape[0]} layers but loads has {t.shape[0]}: give one row per layer "
            f"or a single shared row"
        )
    prev = None if previous is None else _matrix("previous", previous, (1, 2))
    R, g, X = _validate(s, t, num_ranks, ranks_per_node, prev, balance, bytes_per_param,
                        move_slack, num_replicas)
    if prev is not None:
        if prev.ndim == 1:
            prev = np.broadcast_to(prev, t.shape)
        elif prev.shape[0] != t.shape[0]:
            raise ValueError(
                f"previous has {prev.shape[0]} layers but loads has {t.shape[0]}: "
                f"give one row per layer"
            )
        prev = np.ascontiguousarray(prev, dtype=np.int32)
    out = _planner.plan_batch(
        np.ascontiguousarray(s.reshape(-1, s.shape[-1])), np.ascontiguousarray(t), prev,
        R, 0 if ranks_per_node is None else g, BALANCE_MODES.index(balance),
        float(bytes_per_param), float(move_slack), int(exact_max_experts),
        int(exact_node_budget), int(num_threads), X,
    )
    lb, mx = out["lower_bound"], out["max_compute"]
    gap = np.zeros_like(lb)
    open_ = ~out["optimal"] & (lb > 0)
    gap[open_] = 100.0 * (mx[open_] - lb[open_]) / lb[open_]
    return BatchPlacementPlan(gap=gap, num_ranks=R, ranks_per_node=g, num_replicas=X, **out)


def plan_placement(
    sizes: Any,
    loads: Any = None,
    num_ranks: int | None = None,
    ranks_per_node: int | None = None,
    previous: Any = None,
    *,
    balance: Balance = "memory_then_compute",
    bytes_per_param: float = 1.0,
    move_slack: float = 0.0,
    exact_max_experts: int = 16,
    exact_node_budget: int = 400_000,
    num_replicas: int = 0,
) -> PlacementPlan:
    """Plan one MoE layer: ``sizes[n]``, optional ``loads[n]`` (default uniform), ``num_ranks``.

    See the module docstring for the goals and ``plan_placement_batch`` for the arguments;
    for many layers use ``plan_placement_batch`` (one C++ call, no Python loop per layer).
    """
    s = _matrix("sizes", sizes, (1,))
    t = None if loads is None else _matrix("loads", loads, (1,))
    p = None if previous is None else _matrix("previous", previous, (1,))
    return plan_placement_batch(
        s, None if t is None else t[None, :], num_ranks, ranks_per_node,
        None if p is None else p[None, :], balance=balance, bytes_per_param=bytes_per_param,
        move_slack=move_slack, exact_max_experts=exact_max_experts,
        exact_node_budget=exact_node_budget, num_threads=1, num_replicas=num_replicas,
    )[0]
