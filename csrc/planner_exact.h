// Exact solvers: closed forms for k = 1 and k = 2, branch and bound for small n.
#pragma once

#include "planner_common.h"

namespace modse_planner {

// k = 1: one item per bin; every partition has the same bin loads up to labels.
inline std::vector<int> one_per_bin(int n) {
  std::vector<int> bin_of(n);
  std::iota(bin_of.begin(), bin_of.end(), 0);
  return bin_of;
}

// k = 2: pairing the i-th largest with the i-th smallest minimises the largest pair sum
// (exchange argument: if a1 >= a2 and b1 <= b2, {a1+b1, a2+b2} has a max no larger than
// {a1+b2, a2+b1}).  Used on the whole set in compute mode and per size class in paired mode.
inline void pair_extremes(const std::vector<int>& heavy_first, const std::vector<int>& light_first,
                          int count, int first_bin, std::vector<int>& bin_of) {
  for (int i = 0; i < count; ++i) {
    bin_of[heavy_first[i]] = first_bin + i;
    bin_of[light_first[i]] = first_bin + i;
  }
}

inline std::vector<int> exact_k2(const std::vector<double>& w,
                                 const std::vector<int>* order = nullptr) {
  const int n = static_cast<int>(w.size());
  std::vector<int> storage;
  const std::vector<int>& desc = desc_or(w, order, storage);
  std::vector<int> asc(desc.rbegin(), desc.rend());
  std::vector<int> bin_of(n, 0);
  pair_extremes(desc, asc, n / 2, 0, bin_of);
  return bin_of;
}

// Branch and bound over items in decreasing weight.  Prunes a branch when the bin's load plus
// the item plus the lightest items that must still fill the bin reaches the incumbent; skips
// bins that are interchangeable with an earlier one (same count and load; in paired mode only
// empty bins, whose contents are trivially the same).  Stops at the lower bound.
// Paired mode (pair_sum > 0): a bin must end as a union of complementary pairs — sorted sizes
// satisfy s[i] + s[k-1-i] == pair_sum — which is the constraint that makes memory equal.
// Replicas (expert_of): no bin takes two copies of one expert, and only empty bins count as
// interchangeable (equal loads no longer mean equal futures).
struct BranchAndBound {
  const std::vector<double>& w;
  const std::vector<double>* sizes;
  double pair_sum;
  const std::vector<int>* expert_of;
  int n, R, k;
  int64_t budget;

  std::vector<int> order, bin_of_sorted, best_bin_of_sorted, expert_sorted;
  std::vector<double> ws, ss, load, mem, tail;
  std::vector<int> count, members;  // members[r*k + slot] = sorted index
  double best = 0.0, lower = 0.0, size_tol = 0.0, size_min = 0.0, size_max = 0.0;
  int64_t nodes = 0;
  bool aborted = false, improved = false;

  BranchAndBound(const std::vector<double>& w_, const std::vector<double>* sizes_, double pair_sum_,
                 int R_, int k_, int64_t budget_, const std::vector<int>* expert_of_ = nullptr)
      : w(w_), sizes(sizes_), pair_sum(pair_sum_), expert_of(expert_of_),
        n(static_cast<int>(w_.size())), R(R_), k(k_), budget(budget_) {}

  // Returns true iff the search completed, i.e. the result is proven optimal.
  bool run(std::vector<int>& bin_of, double incumbent, double lower_bound) {
    order = order_desc(w);
    ws.resize(n);
    ss.assign(n, 0.0);
    expert_sorted.assign(n, -1);
    for (int i = 0; i < n; ++i) {
      ws[i] = w[order[i]];
      if (sizes) ss[i] = (*sizes)[order[i]];
      if (expert_of) expert_sorted[i] = (*expert_of)[order[i]];
    }
    tail.assign(k + 1, 0.0);  // tail[m] = sum of the m lightest items
    for (int m = 1; m <= k; ++m) tail[m] = tail[m - 1] + ws[n - m];
    if (sizes) {
      size_min = *std::min_element(ss.begin(), ss.end());
      size_max = *std::max_element(ss.begin(), ss.end());
      size_tol = 1e-9 * pair_sum;
    }
    load.assign(R, 0.0);
    mem.assign(R, 0.0);
    count.assign(R, 0);
    members.assign(static_cast<size_t>(R) * k, -1);
    bin_of_sorted.assign(n, -1);
    best = incumbent;
    lower = lower_bound;
    if (best <= lower + eps_of(lower)) return true;
    dfs(0);
    if (improved)
      for (int i = 0; i < n; ++i) bin_of[order[i]] = best_bin_of_sorted[i];
    return !aborted;
  }

  bool bin_is_pairs(int r) const {
    std::vector<double> s(k);
    for (int j = 0; j < k; ++j) s[j] = ss[members[static_cast<size_t>(r) * k + j]];
    std::sort(s.begin(), s.end());
    return pairs_up(s, pair_sum);
  }

  bool bin_has_expert(int r, int i) const {
    for (int j = 0; j < count[r]; ++j)
      if (expert_sorted[members[static_cast<size_t>(r) * k + j]] == expert_sorted[i]) return true;
    return false;
  }

  void dfs(int i) {
    if (aborted) return;
    if (i == n) {
      const double value = max_of(load);
      if (value < best) {
        best = value;
        best_bin_of_sorted = bin_of_sorted;
        improved = true;
      }
      return;
    }
    if (++nodes > budget) {
      aborted = true;
      return;
    }
    const double wi = ws[i];
    const double target_mem = pair_sum * (k / 2);
    for (int r = 0; r < R; ++r) {
      if (count[r] == k) continue;
      const int left = k - count[r] - 1;  // slots still to fill after this item
      if (load[r] + wi + tail[left] >= best - eps_of(best)) continue;  // best shrinks as we go
      if (sizes) {
        const double m = mem[r] + ss[i];
        if (m + left * size_min > target_mem + size_tol) continue;
        if (m + left * size_max < target_mem - size_tol) continue;
      }
      if (expert_of && bin_has_expert(r, i)) continue;
      const bool only_empty_alike = sizes || expert_of;
      bool duplicate = false;
      for (int q = 0; q < r && !duplicate; ++q)
        duplicate = count[q] == count[r] && load[q] == load[r] &&
                    (!only_empty_alike || count[q] == 0);
      if (duplicate) continue;
      const double saved_load = load[r], saved_mem = mem[r];  // restore exactly, no drift
      assert(count[r] < k);
      members[static_cast<size_t>(r) * k + count[r]] = i;
      ++count[r];
      load[r] += wi;
      mem[r] += ss[i];
      bin_of_sorted[i] = r;
      if (!sizes || count[r] < k || bin_is_pairs(r)) dfs(i + 1);
      --count[r];
      load[r] = saved_load;
      mem[r] = saved_mem;
      if (aborted || best <= lower + eps_of(lower)) return;
    }
  }
};

}  // namespace modse_planner
