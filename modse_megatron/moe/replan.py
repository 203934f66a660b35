"""Load-aware re-planning of expert placement during training (pure Python + the C++ planner).

In MoDSE a rank's step time is the sum over its experts of tokens x width, and routing drifts
during training: a placement that balances memory can leave one EP rank doing far more compute
than the others.  Every MoE layer waits for its slowest EP rank (the token exchange after the
experts is a collective), so each layer has its own placement and is planned on its own loads.
:class:`LoadStats` keeps, per MoE layer, an exponential moving average of the tokens routed to
every logical expert (the counts all EP ranks already agree on, see ``Trainer._moe_metrics``);
:func:`propose` asks the planner for a layer's placement that keeps memory per rank equal,
minimises the slowest rank's compute for those loads and moves at most ``max_move_fraction`` of
the layer's expert bytes from the current placement, and says whether it is worth migrating to
(predicted max-rank compute better by more than ``min_gain``); :func:`propose_layers` does it for
every layer.  ``policy="random"`` instead draws a random valid equal-memory placement (for
testing migration: placement is math-invariant, so training must not notice).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

POLICIES = ("planner", "random")


@dataclass
class LoadStats:
    """Per MoE layer (keyed like ``tokens_per_expert``: the 1-based layer number as a string), an
    EMA of the tokens per logical expert; ``decay`` per update."""

    num_experts: int
    decay: float = 0.5
    layers: dict[str, list[float]] = field(default_factory=dict)
    updates: int = 0

    def update(self, tokens_per_layer: Mapping[str, Sequence[float]]) -> None:
        for layer, counts in tokens_per_layer.items():
            new = [float(c) for c in counts]
            old = self.layers.get(layer)
            self.layers[layer] = new if old is None else [
                self.decay * a + (1 - self.decay) * b for a, b in zip(old, new)]
        self.updates += 1

    def state(self) -> dict:
        return {"num_experts": self.num_experts, "decay": self.decay,
                "layers": {k: list(v) for k, v in self.layers.items()}, "updates": self.updates}

    @classmethod
    def from_state(cls, state: dict | None, num_experts: int, decay: float) -> "LoadStats":
        """The stats a checkpoint recorded; empty for another model, or for a checkpoint written
        before loads were kept per layer (its sum over layers cannot be split again)."""
        layers = (state or {}).get("layers")
        if (not isinstance(layers, dict) or state.get("num_experts") != num_experts
                or any(len(v) != num_experts for v in layers.values())):
            return cls(num_experts, decay)
        return cls(num_experts, decay, {str(k): [float(x) for x in v] for k, v in layers.items()},
                   int(state.get("updates", 0)))


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
            policy: str = "planner", min_gain: float = 0.02, move_slack: float = 0.01,
            max_move_fraction: float = 1.0, rng: random.Random | None = None) -> Proposal:
    """A placement of one layer for ``loads`` and whether to migrate to it (see the module
    docstring).  ``max_move_fraction`` does not apply to ``policy="random"``."""
    if policy not in POLICIES:
        raise ValueError(f"moe_replan_policy={policy!r} is unknown: use one of {', '.join(POLICIES)}")
    before = imbalance(widths, loads, current, ep)
    if policy == "random":
        ranks = random_equal_memory(widths, ep, rng or random.Random(0))
    else:
        from modse_megatron.placement import plan_placement

        plan = plan_placement(list(widths), loads=[max(float(x), 1e-9) for x in loads], num_ranks=ep,
                              previous=list(current), move_slack=move_slack,
                              max_move_fraction=max_move_fraction)
        ranks = list(plan.rank_of_expert)
    after = imbalance(widths, loads, ranks, ep)
    moved = sum(1 for a, b in zip(current, ranks) if a != b)
    gain = (before - after) / before if before > 0 else 0.0
    migrate = moved > 0 and (policy == "random" or gain > min_gain)
    return Proposal(ranks, before, after, moved, migrate)


@dataclass
class LayerProposals:
    ranks: list[list[int]]  # every MoE layer's placement after the migration (unchanged ones kept)
    changed: dict[int, Proposal]  # MoE layer index (0-based, model order) -> its proposal, if it migrates

    @property
    def migrate(self) -> bool:
        return bool(self.changed)


def propose_layers(widths: Sequence[int], loads: Sequence[Sequence[float] | None], ep: int,
                   current: Sequence[Sequence[int]], **kw) -> LayerProposals:
    """:func:`propose` for every MoE layer (``loads[i]`` None: no statistics yet, kept as is)."""
    ranks, changed = [list(r) for r in current], {}
    for i, (layer_loads, layer_ranks) in enumerate(zip(loads, current)):
        if not layer_loads:
            continue
        p = propose(widths, layer_loads, ep, layer_ranks, **kw)
        if p.migrate:
            ranks[i], changed[i] = list(p.ranks), p
    return LayerProposals(ranks, changed)


def summed_imbalance(widths: Sequence[int], tokens: Sequence[Sequence[float]], ranks: Sequence[Sequence[int]],
                     ep: int) -> float:
    """max / mean over EP ranks of each rank's compute summed over MoE layers (blind to layers
    that wait on different ranks; see :func:`layer_imbalance`)."""
    summed = [0.0] * ep
    for layer_tokens, layer_ranks in zip(tokens, ranks):
        for r, c in enumerate(rank_compute(widths, layer_tokens, layer_ranks, ep)):
            summed[r] += c
    mean = sum(summed) / ep
    return max(summed) / mean if mean > 0 else 1.0


def layer_imbalance(widths: Sequence[int], tokens: Sequence[Sequence[float]], ranks: Sequence[Sequence[int]],
                    ep: int) -> float:
    """Sum over MoE layers of the slowest EP rank's compute / sum of the mean rank's: the step's
    imbalance when every layer waits for its slowest rank (1.0 = balanced)."""
    slowest = mean = 0.0
    for layer_tokens, layer_ranks in zip(tokens, ranks):
        compute = rank_compute(widths, layer_tokens, layer_ranks, ep)
        slowest += max(compute)
        mean += sum(compute) / ep
    return slowest / mean if mean > 0 else 1.0
