// Hierarchy: balance token inflow per node (groups of ranks sharing a fast interconnect).
//
// DeepSeek's EPLB balances nodes first and GPUs second.  Our goals are ordered the other way
// (memory, then max compute per rank, then node inflow), so the node stage never touches what
// ranks hold in a way that raises max compute:
//   1. group the R finished bins into N nodes of g bins, balancing sum(t) per node — a pure
//      relabelling, so memory and compute per rank are unchanged;
//   2. swap experts between bins on different nodes when that lowers the busiest node's inflow
//      and keeps both bins at or below the plan's max compute (and, in paired mode, swaps only
//      equal-size experts so memory stays equal).
// Trade-off: node inflow can end above what a nodes-first packing reaches when the compute
// optimum leaves little freedom; max compute never pays for node balance.
#pragma once

#include "planner_bounds.h"
#include "planner_heuristic.h"

namespace modse_planner {

// Node balance is the third goal: searching stops within 0.1% of its lower bound, which keeps
// the node stage cheaper than the rank plan it refines.
constexpr double kNodeGoodEnough = 1e-3;

// Node of every bin.  `initial` (optional, e.g. the previous placement's grouping) is kept when
// it is at least as balanced after descent as a fresh grouping, so re-planning moves less.
inline std::vector<int> group_bins_into_nodes(const std::vector<double>& bin_inflow, int N, int g,
                                              const std::vector<int>* initial, int max_iters) {
  const int R = static_cast<int>(bin_inflow.size());
  if (N <= 1) return std::vector<int>(R, 0);
  const double target = cardinality_lower_bound(bin_inflow, N, g) * (1.0 + kNodeGoodEnough);
  double fresh_value = 0.0;
  std::vector<int> fresh = heuristic_partition(bin_inflow, N, g, target, max_iters, &fresh_value);
  if (initial && counts_are(*initial, N, g)) {
    Bins kept(bin_inflow, *initial, N, g);
    const double v = swap_descent(bin_inflow, kept, target, max_iters);
    if (v <= fresh_value + eps_of(fresh_value)) return kept.bin_of;
  }
  return fresh;
}

// Step 2 above: swaps experts between the busiest node A and another node B under the compute
// cap.  For expert a on A the best partner b has t[b] closest to t[a] - (I_A - I_B) / 2 (the
// result max(I_A - dt, I_B + dt) is V-shaped in t[b]), so B's experts are sorted by load and
// walked outward from that point until one satisfies the cap (and, paired, the size class).
// The 2 least busy nodes are tried first and the rest only when they offer nothing (as in
// descend_heaviest), so a stop is still a local optimum.  With replicas (expert_of: the expert of
// each item) a swap never puts two copies of one expert on one bin.
inline void refine_node_inflow(const std::vector<double>& t, const std::vector<double>& w,
                               const std::vector<int>* cls, std::vector<int>& bin_of,
                               const std::vector<int>& node_of_bin, int R, int N, double cap,
                               double target, int max_iters,
                               const std::vector<int>* expert_of = nullptr) {
  if (N <= 1) return;
  const int n = static_cast<int>(t.size());
  std::vector<double> inflow(N, 0.0), load(R, 0.0);
  std::vector<std::vector<int>> bins_of_expert(expert_of ? expert_of->back() + 1 : 0);
  for (int e = 0; e < n; ++e) {
    inflow[node_of_bin[bin_of[e]]] += t[e];
    load[bin_of[e]] += w[e];
    if (expert_of) bins_of_expert[(*expert_of)[e]].push_back(bin_of[e]);
  }
  auto held = [&](int item, int bin) {  // does `bin` hold a copy of item's expert?
    const auto& bins = bins_of_expert[(*expert_of)[item]];
    return std::find(bins.begin(), bins.end(), bin) != bins.end();
  };
  auto move_copy = [&](int item, int from, int to) {
    auto& bins = bins_of_expert[(*expert_of)[item]];
    *std::find(bins.begin(), bins.end(), from) = to;
  };
  const double cap_tol = cap + eps_of(cap);
  std::vector<std::vector<int>> members(N);
  std::vector<int> nodes(N);
  auto by_load = [&](int x, int y) { return t[x] < t[y] || (t[x] == t[y] && x < y); };
  for (int iter = 0; iter < max_iters; ++iter) {
    const int A = static_cast<int>(std::max_element(inflow.begin(), inflow.end()) - inflow.begin());
    const double IA = inflow[A];
    if (IA <= target + eps_of(target)) break;
    const double eps = eps_of(IA);
    for (auto& m : members) m.clear();
    for (int e = 0; e < n; ++e) members[node_of_bin[bin_of[e]]].push_back(e);
    std::iota(nodes.begin(), nodes.end(), 0);
    std::sort(nodes.begin(), nodes.end(), [&](int x, int y) { return inflow[x] < inflow[y]; });
    double best = IA - eps;
    int best_a = -1, best_b = -1;
    const int first = std::min(2, N);
    for (int pass = 0; pass < 2 && best_a < 0; ++pass) {
      for (int i = pass == 0 ? 0 : first; i < (pass == 0 ? first : N); ++i) {
        const int B = nodes[i];
        const double IB = inflow[B];
        if (B == A || IA - IB <= eps) continue;
        std::vector<int>& mb = members[B];
        std::sort(mb.begin(), mb.end(), by_load);
        for (int a : members[A]) {
          const double ideal = t[a] - 0.5 * (IA - IB);
          auto below = [&](int x, double v) { return t[x] < v; };
          int right =
              static_cast<int>(std::lower_bound(mb.begin(), mb.end(), ideal, below) - mb.begin());
          int left = right - 1;
          while (left >= 0 || right < static_cast<int>(mb.size())) {
            const bool go_left = right >= static_cast<int>(mb.size()) ||
                                 (left >= 0 && ideal - t[mb[left]] <= t[mb[right]] - ideal);
            const int b = go_left ? mb[left--] : mb[right++];
            const double dt = t[a] - t[b];
            const double value = std::max(IA - dt, IB + dt);
            if (value >= best) break;  // farther candidates are no better
            if (dt <= eps) continue;
            if (cls && (*cls)[a] != (*cls)[b]) continue;
            if (expert_of && (held(a, bin_of[b]) || held(b, bin_of[a]))) continue;
            const double dw = w[a] - w[b];
            if (load[bin_of[a]] - dw > cap_tol || load[bin_of[b]] + dw > cap_tol) continue;
            best = value;
            best_a = a;
            best_b = b;
            break;  // the nearest feasible partner is the best one for this a
          }
        }
      }
    }
    if (best_a < 0) break;
    const int ra = bin_of[best_a], rb = bin_of[best_b];
    const double dt = t[best_a] - t[best_b], dw = w[best_a] - w[best_b];
    inflow[node_of_bin[ra]] -= dt;
    inflow[node_of_bin[rb]] += dt;
    load[ra] -= dw;
    load[rb] += dw;
    if (expert_of) {
      move_copy(best_a, ra, rb);
      move_copy(best_b, rb, ra);
    }
    std::swap(bin_of[best_a], bin_of[best_b]);
  }
}

}  // namespace modse_planner
