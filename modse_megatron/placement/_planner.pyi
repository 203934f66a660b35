"""Type stub for the C++ planner extension (csrc/bindings.cpp); use plan.py's wrappers.

Every function validates its input and raises ValueError (one line naming the argument)."""
from typing import TypedDict

import numpy as np
import numpy.typing as npt

class _BatchResult(TypedDict):
    rank_of_expert: npt.NDArray[np.int32]  # [L, n]; with replicas: rank of the first copy
    copies_per_expert: npt.NDArray[np.int32]  # [L, n], each >= 1
    slot_expert: npt.NDArray[np.int32]  # [L, n + num_replicas], expert of each slot, rank-major
    compute_per_rank: npt.NDArray[np.float64]  # [L, R]
    memory_per_rank: npt.NDArray[np.float64]  # [L, R]
    node_inflow: npt.NDArray[np.float64]  # [L, N]
    max_compute: npt.NDArray[np.float64]  # [L]
    lower_bound: npt.NDArray[np.float64]  # [L]
    moved_bytes: npt.NDArray[np.float64]  # [L]
    node_inflow_bound: npt.NDArray[np.float64]  # [L]
    optimal: npt.NDArray[np.bool_]  # [L]
    paired: npt.NDArray[np.bool_]  # [L]
    method: npt.NDArray[np.int32]  # [L], index into plan.METHODS

def plan_batch(
    sizes: npt.ArrayLike,  # [1 or L, n] float64
    loads: npt.ArrayLike,  # [L, n] float64
    previous: npt.ArrayLike | None,  # [L, n] int32
    num_ranks: int,
    ranks_per_node: int,  # 0 = no hierarchy
    balance: int,  # 0 = memory_then_compute, 1 = compute
    bytes_per_param: float,
    move_slack: float,
    exact_max_experts: int,
    exact_node_budget: int,
    num_threads: int,  # 0 = automatic
    num_replicas: int = 0,  # extra physical slots for copies of busy experts
    joint_counts: bool = True,  # search copy counts with the placement (else EPLB's greedy)
    stack_copies: bool = False,  # copies of one expert may share a rank (EPLB)
    num_groups: int = 0,  # node-limited groups of consecutive experts (0 = off)
    max_move_fraction: float = 1.0,  # with previous: most of a layer's bytes a plan moves
) -> _BatchResult: ...
def cardinality_lower_bound(weights: npt.ArrayLike, num_ranks: int, per_rank: int) -> float: ...
def balanced_packing(weights: npt.ArrayLike, num_ranks: int, per_rank: int) -> list[int]: ...

EXACT_MAX_EXPERTS_CAP: int  # largest exact_max_experts accepted (options.py mirrors it)
MAX_SLOTS: int  # most experts + replicas per layer (options.py mirrors it)
