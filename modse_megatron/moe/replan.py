"""Load-aware re-planning of expert placement during training (pure Python + the C++ planner).

In MoDSE a rank's step time is the sum over its experts of tokens x width, and routing drifts
during training: a placement that balances memory can leave one EP rank doing far more compute
than the others. :class:`LoadStats` keeps an exponential moving average of the tokens routed to
every logical expert (the counts all EP ranks already agree on, see ``Trainer._moe_metrics``);
:func:`propose` asks the planner for a placement that keeps memory per rank equal, minimises
the slowest rank's compute for those loads and moves few bytes from the current placement, and
says whether it is worth migrating to (predicted max-rank compute better by more than
``min_gain``). ``policy="random"`` instead draws a random valid equal-memory placement (for
testing migration: placement is math-invariant, so training must not notice).

One placement serves every MoE layer (megatron builds all layers from one spec), so loads are
summed over the MoE layers before planning; per-layer loads stay in the metrics.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

POLICIES = ("planner", "random")


@dataclass
class LoadStats:
    """EMA of tokens per logical expert (summed over MoE layers); ``decay`` per update."""

    num_experts: int
    decay: float = 0.9
    ema: list[float] = field(default_factory=list)
    updates: int = 0

    def update(self, tokens_per_layer: dict[str, Sequence[float]]) -> None:
        total = [0.0] * self.num_experts
        for counts in tokens_per_layer.values():
            for e, c in enumerate(counts):
                total[e] += float(c)
        if not self.ema:
            self.ema = total
        else:
            self.ema = [self.decay * old + (1 - self.decay) * new for old, new in zip(self.ema, total)]
        self.updates += 1

    def state(self) -> dict:
        return {"num_experts": self.num_experts, "decay": self.decay, "ema": list(self.ema), "updates": self.updates}

    @classmethod
    def from_state(cls, state: dict | None, num_experts: int, decay: float) -> "LoadStats":
        if not state or state.get("num_experts") != num_experts or len(state.get("ema", [])) != num_experts:
            return cls(num_experts, decay)
        return cls(num_experts, decay, [float(x) for x in state["ema"]], int(state.get("updates", 0)))


def rank_compute(widths: Sequence[int], loads: Sequence[float], ranks: Sequence[int], ep: int) -> list[float]:
    """Sum of tokens x width on every EP rank."""
    out = [0.0] * ep
    for w, load, r in zip(widths, loads, ranks):
        out[r] += w * load
    return out


def imbalance(widths: Sequence[int], loads: Sequence[float], ranks: Sequence[int], ep: int) -> float:
    """max / mean of the ranks' compute (1.0 = perfectly balanced)."""
    compute = rank_compute(widths, loads, ranks, ep)
    mean = sum(compute) / ep
    return max(compute) / mean if mean > 0 else 1.0


def moved_params(widths: Sequence[int], old: Sequence[int], new: Sequence[int]) -> int:
    """Expert parameters (in width units x hidden x (G+1)) that change rank."""
    return sum(w for w, a, b in zip(widths, old, new) if a != b)


@dataclass
class Proposal:
    ranks: list[int]
    before: float  # max/mean compute of the current placement under the loads
    after: float
    moved_experts: int
    migrate: bool


def random_equal_memory(widths: Sequence[int], ep: int, rng: random.Random) -> list[int]:
    """A random placement with equal parameters per rank where the widths allow one:
    complementary pairs (sorted widths, largest with smallest) dealt to random ranks; otherwise
    a random placement with equal expert counts per rank (equal memory when widths are equal)."""
    n = len(widths)
    per_rank = n // ep
    order = sorted(range(n), key=lambda e: (widths[e], e))
    pairs = [(order[i], order[n - 1 - i]) for i in range(n // 2)]
    if n % 2 == 0 and per_rank % 2 == 0 and len({widths[a] + widths[b] for a, b in pairs}) == 1:
        rng.shuffle(pairs)
        ranks = [0] * n
        for i, (a, b) in enumerate(pairs):
            ranks[a] = ranks[b] = i // (per_rank // 2)
        return ranks
    slots = [r for r in range(ep) for _ in range(per_rank)]
    rng.shuffle(slots)
    return slots


def propose(widths: Sequence[int], loads: Sequence[float], ep: int, current: Sequence[int], *,
            policy: str = "planner", min_gain: float = 0.03, move_slack: float = 0.01,
            rng: random.Random | None = None) -> Proposal:
    """A placement for ``loads`` and whether to migrate to it (see the module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"moe_replan_policy={policy!r} is unknown: use one of {', '.join(POLICIES)}")
    before = imbalance(widths, loads, current, ep)
    if policy == "random":
        ranks = random_equal_memory(widths, ep, rng or random.Random(0))
    else:
        from modse_megatron.placement import plan_placement

        plan = plan_placement(list(widths), loads=[max(float(x), 1e-9) for x in loads], num_ranks=ep,
                              previous=list(current), move_slack=move_slack)
        ranks = list(plan.rank_of_expert)
    after = imbalance(widths, loads, ranks, ep)
    moved = sum(1 for a, b in zip(current, ranks) if a != b)
    gain = (before - after) / before if before > 0 else 0.0
    migrate = moved > 0 and (policy == "random" or gain > min_gain)
    return Proposal(ranks, before, after, moved, migrate)
