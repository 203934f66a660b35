// Heuristics for "R bins of exactly k items, minimise the heaviest bin" at any size.
//
//  * lpt_cardinality: largest item first into the lightest bin that still has room.  This is
//    exactly DeepSeek EPLB's balanced_packing, kept bit-identical (same order, same tie-break)
//    so that a plan started from it can never be worse than that baseline.
//  * balanced_differencing: Karmarkar-Karp style balanced largest differencing (BLDM):
//    k partial solutions of R one-item bins are merged pairwise, heaviest bins of one with the
//    lightest of the other; strong when k is large and items are similar.
// Both starts are then improved by local search (planner_local_search.h); the best result wins.
#pragma once

#include <queue>
#include <utility>

#include "planner_common.h"
#include "planner_exact.h"
#include "planner_local_search.h"

namespace modse_planner {

inline std::vector<int> lpt_cardinality(const std::vector<double>& w, int R, int k,
                                        const std::vector<int>* desc = nullptr) {
  std::vector<int> storage;
  using Entry = std::pair<double, int>;  // (load, bin): lightest first, lowest index on ties
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> open;
  for (int r = 0; r < R; ++r) open.emplace(0.0, r);
  std::vector<int> count(R, 0), bin_of(w.size(), 0);
  for (int i : desc_or(w, desc, storage)) {
    const auto [load, r] = open.top();
    open.pop();
    bin_of[i] = r;
    if (++count[r] < k) open.emplace(load + w[i], r);
  }
  return bin_of;
}

inline std::vector<int> balanced_differencing(const std::vector<double>& w, int R, int k,
                                              const std::vector<int>* desc = nullptr) {
  const int n = static_cast<int>(w.size());
  std::vector<int> storage;
  const std::vector<int>& order = desc_or(w, desc, storage);
  // Subsets are singly linked lists of items (head/tail/next) so merging is O(1).
  std::vector<int> head(n), tail(n), next(n, -1);
  std::vector<double> sum(n);
  struct Partial {
    std::vector<int> subsets;  // subset ids (= id of their first item), heaviest first
    double diff;
  };
  std::vector<Partial> partials(k);
  for (int p = 0; p < k; ++p) {
    for (int r = 0; r < R; ++r) {
      const int item = order[p * R + r];
      head[item] = tail[item] = item;
      sum[item] = w[item];
      partials[p].subsets.push_back(item);
    }
    partials[p].diff = sum[partials[p].subsets.front()] - sum[partials[p].subsets.back()];
  }
  auto by_diff = [&](int x, int y) { return partials[x].diff < partials[y].diff; };
  std::priority_queue<int, std::vector<int>, decltype(by_diff)> heap(by_diff);
  for (int p = 0; p < k; ++p) heap.push(p);
  while (heap.size() > 1) {
    const int a = heap.top();
    heap.pop();
    const int b = heap.top();
    heap.pop();
    auto& A = partials[a].subsets;
    const auto& B = partials[b].subsets;
    for (int r = 0; r < R; ++r) {  // heaviest of A with lightest of B
      const int x = A[r], y = B[R - 1 - r];
      next[tail[x]] = head[y];
      tail[x] = tail[y];
      sum[x] += sum[y];
    }
    std::stable_sort(A.begin(), A.end(), [&](int x, int y) { return sum[x] > sum[y]; });
    partials[a].diff = sum[A.front()] - sum[A.back()];
    heap.push(a);
  }
  std::vector<int> bin_of(n, 0);
  const auto& final_subsets = partials[heap.top()].subsets;
  for (int r = 0; r < R; ++r)
    for (int i = head[final_subsets[r]]; i >= 0; i = next[i]) bin_of[i] = r;
  return bin_of;
}

// Descend from several starts, the most promising (lowest initial max) first; a later start
// is descended only if it begins below the best result so far.  The result is never worse
// than any start — in particular never worse than LPT, i.e. EPLB's balanced packing.
template <class Descend>
std::vector<int> best_of_starts(std::vector<Bins>& starts, double target, Descend&& descend_fn,
                                double* value) {
  std::sort(starts.begin(), starts.end(),
            [](const Bins& x, const Bins& y) { return max_of(x.load) < max_of(y.load); });
  int best = -1;
  double best_value = 0.0;
  for (size_t i = 0; i < starts.size(); ++i) {
    if (best >= 0 && (best_value <= target + eps_of(target) ||
                      max_of(starts[i].load) >= best_value - eps_of(best_value)))
      break;  // sorted: no later start begins lower either
    const double v = descend_fn(starts[i]);
    if (best < 0 || v < best_value) {
      best = static_cast<int>(i);
      best_value = v;
    }
  }
  if (value) *value = best_value;
  return starts[best].bin_of;
}

// LPT and balanced-differencing starts improved by swap descent; k <= 2 solved exactly
// (planner_exact.h).  Also used on pair units in paired mode.
inline std::vector<int> heuristic_partition(const std::vector<double>& w, int R, int k,
                                            double target, int max_iters, double* value,
                                            const std::vector<int>* desc = nullptr) {
  if (k <= 2) {
    std::vector<int> exact = k == 1 ? one_per_bin(R) : exact_k2(w, desc);
    if (value) *value = max_of(bin_sums(w, exact, R));
    return exact;
  }
  std::vector<Bins> starts;
  std::vector<int> storage;
  const std::vector<int>& order = desc_or(w, desc, storage);
  starts.emplace_back(w, lpt_cardinality(w, R, k, &order), R, k);
  starts.emplace_back(w, balanced_differencing(w, R, k, &order), R, k);
  return best_of_starts(
      starts, target,
      [&](Bins& bins) { return swap_descent(w, bins, target, max_iters); }, value);
}

}  // namespace modse_planner
