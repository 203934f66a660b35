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
   ``max_move_fraction < 1`` is a hard budget: the plan moves at most that share of the layer's
   bytes (the descent from ``previous`` only takes exchanges within it).

Every plan reports ``lower_bound`` (proven: no valid plan of the same problem is better),
``gap`` (percent above it) and ``optimal``.  In paired mode "the same problem" is the paired
one (pairs kept together).  The local search stops once within 0.01% of the bound, so a tiny
nonzero gap is by design.

**Redundant replicas** (``num_replicas=X``, DeepSeek EPLB's redundant experts): there are
``S = n + X`` physical slots, exactly ``k = S / R`` per rank.  An expert with ``c`` copies has
its tokens split evenly, so each copy costs ``loads[e] * sizes[e] / c`` compute and holds
``sizes[e]`` memory.  Copies start from EPLB's greedy rule (each extra copy to the expert with
the largest per-copy compute), which minimises the heaviest *copy*, not the heaviest *rank*:
with ``joint_counts`` (default) the counts are then searched together with the placement
(count moves inside the local search; on layers with ``S <= exact_max_experts`` branch and
bound over every choice of counts), never worse than the greedy counts.  At most one copy of an
expert per rank, unless ``stack_copies`` (EPLB's behaviour).  In paired mode (complementary
sizes, ``k`` even) copies are added and moved in complementary pairs, so memory stays exactly
equal, and ``X`` must be even.  ``lower_bound`` holds for every way of choosing the copy
counts, so ``optimal`` means no choice of counts and placement does better; ``method`` says
how the placement of the chosen copies was found ("branch-and-bound": exact for those copies,
and for every choice of counts when ``optimal``).  ``previous`` cannot be combined with
replicas yet.

Hierarchy trade-off: DeepSeek's EPLB packs experts to nodes first, then to GPUs, so per-GPU
balance pays for node balance; here max compute per rank is never raised for node balance.
With ``num_groups`` (EPLB's group-limited placement) every group of consecutive experts stays
on one node with all its copies: groups go to nodes first (by compute), then each node is planned
on its own; ``lower_bound`` is then the larger of the bound without groups and the group bound
(the heaviest node's compute over its ranks), so the gap includes what the groups cost.
Previous placements: the planner also descends from ``previous`` and relabels ranks (a
maximum-weight assignment of new rank contents to old ranks, per node first), so re-planning
with unchanged loads moves nothing.

Options (``balance``, ``move_slack``, ``num_replicas``, ...) are the fields of ``PlanOptions``
(options.py): pass ``options=PlanOptions(...)``, or any field as a keyword argument.

Nothing here imports torch; the C++ core is compiled once by ``pip install`` and imported on
first use, so this module (and ``MoDSEConfig``, which imports the placement package) loads
even where it is not built; planning there raises one line saying how to build it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .options import BALANCE_MODES, MAX_SLOTS, PlanOptions, resolve_options

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
    """Ranks holding a copy of each expert, ascending (distinct ranks unless ``stack_copies``,
    where a rank holding two copies appears twice)."""

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


# ----------------------------------------------------------------------------- the C++ core

_PLANNER: ModuleType | None = None


def _import_planner() -> ModuleType:
    from . import _planner

    return _planner


def _native() -> ModuleType:
    """The compiled planner (imported once); ImportError with the fix when it is unusable."""
    global _PLANNER
    if _PLANNER is None:
        try:
            _PLANNER = _import_planner()
        except ImportError as exc:
            why = " ".join(str(exc).split()) or type(exc).__name__
            raise ImportError(
                f"the C++ placement planner (modse_megatron.placement._planner) cannot be "
                f"imported ({why}): build it with `pip install -e .` in the repository root"
            ) from None
    return _PLANNER


def planner_unavailable_reason() -> str | None:
    """None when the C++ planner imports, else one line saying why and how to fix it."""
    try:
        _native()
    except ImportError as exc:
        return str(exc)
    return None


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
    previous: np.ndarray | None, options: PlanOptions,
) -> tuple[int, int]:
    """Checks everything the C++ core checks about the arrays and ranks (``PlanOptions`` checks
    itself), with messages naming the fix, except that an odd ``num_replicas`` with
    complementary sizes is left to the core (it detects the pairs); returns (R, g)."""
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
    if loads.shape[0] == 0:
        raise ValueError("loads has no layers: give one row of loads per MoE layer")
    X = options.num_replicas
    if X > n * (R - 1) and not options.stack_copies:
        raise ValueError(
            f"num_replicas={X} exceeds num_experts*(num_ranks-1)={n * (R - 1)}: "
            f"an expert has at most one copy per rank, so use fewer num_replicas or stack_copies"
        )
    if n + X > MAX_SLOTS:
        raise ValueError(
            f"num_experts={n} + num_replicas={X} = {n + X} slots exceeds the planner's limit of "
            f"{MAX_SLOTS} per layer: plan fewer experts per call"
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
    return R, g


# ----------------------------------------------------------------------------- public API


def plan_placement_batch(
    sizes: Any, loads: Any = None, num_ranks: int | None = None,
    ranks_per_node: int | None = None, previous: Any = None, *,
    options: PlanOptions | None = None, **overrides: Any,
) -> BatchPlacementPlan:
    """Plan many MoE layers in one C++ call (the GIL is released; layers run on threads).

    Args:
        sizes: ``[n]`` shared by all layers, or ``[L, n]`` per layer: expert widths or
            parameter counts (positive).
        loads: ``[L, n]`` measured tokens per expert (>= 0); ``None`` = uniform loads, one
            layer per row of ``sizes``.
        num_ranks: ``R``; must divide ``n`` (``n + num_replicas`` with replicas).
        ranks_per_node: GPUs per node; must divide ``R``.  Enables node inflow balancing.
        previous: ``[n]`` (all layers) or ``[L, n]`` rank of each expert in the current
            placement; the new plan moves the fewest bytes among equally good plans.
        options: a ``PlanOptions`` (default ``PlanOptions()``): ``balance``,
            ``bytes_per_param``, ``move_slack``, ``max_move_fraction``, ``exact_max_experts``,
            ``exact_node_budget``, ``num_threads``, ``num_replicas``, ``joint_counts``,
            ``stack_copies``, ``num_groups``; their meaning and defaults are documented there.
        **overrides: any ``PlanOptions`` field as a keyword (e.g. ``balance="compute"``),
            replacing that field of ``options``.
    """
    opts = resolve_options("plan_placement_batch", options, overrides)
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
    R, g = _validate(s, t, num_ranks, ranks_per_node, prev, opts)
    if prev is not None:
        if prev.ndim == 1:
            prev = np.broadcast_to(prev, t.shape)
        elif prev.shape[0] != t.shape[0]:
            raise ValueError(
                f"previous has {prev.shape[0]} layers but loads has {t.shape[0]}: "
                f"give one row per layer"
            )
        prev = np.ascontiguousarray(prev, dtype=np.int32)
    out = _native().plan_batch(
        np.ascontiguousarray(s.reshape(-1, s.shape[-1])), np.ascontiguousarray(t), prev,
        R, 0 if ranks_per_node is None else g, BALANCE_MODES.index(opts.balance),
        float(opts.bytes_per_param), float(opts.move_slack), opts.exact_max_experts,
        opts.exact_node_budget, opts.num_threads, opts.num_replicas, opts.joint_counts,
        opts.stack_copies, opts.num_groups, float(opts.max_move_fraction),
    )
    lb, mx = out["lower_bound"], out["max_compute"]
    gap = np.zeros_like(lb)
    open_ = ~out["optimal"] & (lb > 0)
    gap[open_] = 100.0 * (mx[open_] - lb[open_]) / lb[open_]
    return BatchPlacementPlan(gap=gap, num_ranks=R, ranks_per_node=g,
                              num_replicas=opts.num_replicas, **out)


def plan_placement(
    sizes: Any, loads: Any = None, num_ranks: int | None = None,
    ranks_per_node: int | None = None, previous: Any = None, *,
    options: PlanOptions | None = None, **overrides: Any,
) -> PlacementPlan:
    """Plan one MoE layer: ``sizes[n]``, optional ``loads[n]`` (default uniform), ``num_ranks``.

    See the module docstring for the goals and ``plan_placement_batch`` for the arguments
    (``options`` and keyword overrides alike); for many layers use ``plan_placement_batch``
    (one C++ call, no Python loop per layer).
    """
    opts = resolve_options("plan_placement", options, overrides)
    s = _matrix("sizes", sizes, (1,))
    t = None if loads is None else _matrix("loads", loads, (1,))
    p = None if previous is None else _matrix("previous", previous, (1,))
    return plan_placement_batch(
        s, None if t is None else t[None, :], num_ranks, ranks_per_node,
        None if p is None else p[None, :], options=opts,
    )[0]
