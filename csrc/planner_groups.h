// Node-limited expert groups (DeepSeek EPLB's group-limited hierarchical placement).
//
// With num_groups = G the experts form G groups of n / G consecutive ids (DeepSeek-V3 routes a
// token to experts of at most a few groups, so keeping a group, with all its copies, inside one
// node bounds the nodes a token's activations travel to).  The plan is made in two stages:
//  1. groups to nodes, G / N per node, minimising the heaviest node's compute (the sum of its
//     experts' load x size): LPT and balanced differencing with swap descent, branch and bound
//     on small G (pack_groups);
//  2. every node's experts plus num_replicas / N copies of them onto its ranks_per_node ranks:
//     the whole single-node planner (memory, compute, joint copy counts), run per node and
//     stitched together (planner.h, solve_groups).
// Unlike EPLB, stage 1 balances compute rather than tokens (a node's ranks must absorb its
// compute), and node inflow is only reported.  Equal memory: when the sizes form complementary
// pairs (paired mode) every group must hold whole pairs by itself (then every node does, and
// each node keeps pairs together); validate_group_sizes refuses sizes where that fails, rather
// than silently giving up equal memory.
// Bounds: a node's ranks hold its whole compute, so some rank carries at least the heaviest
// node's compute / ranks_per_node, and no assignment of groups to nodes beats the cardinality
// bound of the group weights: group_lower_bound.  The planner's bounds without groups hold too
// (groups only restrict), so the reported bound is the larger of the two.
#pragma once

#include "planner_bounds.h"
#include "planner_exact.h"
#include "planner_heuristic.h"
#include "planner_pairs.h"

namespace modse_planner {

// Sum of v over each group of `per_group` consecutive entries.
inline std::vector<double> group_sums(const std::vector<double>& v, int per_group) {
  std::vector<double> out(v.size() / per_group, 0.0);
  for (size_t e = 0; e < v.size(); ++e) out[e / per_group] += v[e];
  return out;
}

// Lower bound on max compute per rank of every group-limited plan: the heaviest node holds at
// least the cardinality bound of the group weights (num_nodes bins of G / N groups), spread
// over ranks_per_node ranks at best.
inline double group_lower_bound(const std::vector<double>& group_w, int num_nodes,
                                int ranks_per_node) {
  const int G = static_cast<int>(group_w.size());
  return cardinality_lower_bound(group_w, num_nodes, G / num_nodes) / ranks_per_node;
}

// Node of every group: G / N groups per node, the heaviest node as light as we can make it.
inline std::vector<int> pack_groups(const std::vector<double>& group_w, int num_nodes,
                                    int exact_max, int64_t budget, int max_iters) {
  const int G = static_cast<int>(group_w.size()), per_node = G / num_nodes;
  const double lb = cardinality_lower_bound(group_w, num_nodes, per_node);
  double value = 0.0;
  std::vector<int> node_of = heuristic_partition(group_w, num_nodes, per_node, lb, max_iters,
                                                 &value);
  if (value > lb + eps_of(lb) && G <= exact_max) {
    BranchAndBound bnb(group_w, nullptr, 0.0, num_nodes, per_node, budget);
    bnb.run(node_of, value, lb);
  }
  return node_of;
}

// Paired mode with groups: every group must hold whole complementary pairs (pair_sum: the
// sizes' pair sum).  Then every node also gets an even number of copies: its experts are even
// in number and its slots g * k are even (k is even in paired mode).  ps_found: the sizes form
// pairs and paired mode applies (planner.h, pairs_if_paired).
inline void validate_group_sizes(const double* sizes, int n, const Options& o, bool ps_found,
                                 double pair_sum, const std::string& where) {
  if (o.num_groups == 0 || !ps_found) return;
  const int per_group = n / o.num_groups;
  std::vector<double> group(per_group);
  for (int q = 0; q < o.num_groups; ++q) {
    for (int i = 0; i < per_group; ++i) group[i] = sizes[q * per_group + i];
    std::sort(group.begin(), group.end());
    if (!pairs_up(group, pair_sum))
      fail(where + "num_groups=" + std::to_string(o.num_groups) + ": group " + std::to_string(q) +
           " (experts " + std::to_string(q * per_group) + ".." +
           std::to_string((q + 1) * per_group - 1) + ") does not hold whole complementary "
           "pairs, so equal memory per rank cannot be kept: choose num_groups so that every "
           "group holds whole pairs, or balance='compute'");
  }
}

}  // namespace modse_planner
