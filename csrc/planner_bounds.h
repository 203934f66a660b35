// Lower bounds on the best achievable max bin load, so every plan can state its own quality.
//
// Problem: partition n = R*k weights into R bins of exactly k items; minimise the largest bin
// sum.  Each bound below holds for *every* valid partition, so the plan's gap to it is an
// upper bound on how far the plan is from optimal.
#pragma once

#include <limits>
#include <queue>
#include <utility>

#include "planner_common.h"

namespace modse_planner {

// max of:
//  * average:     sum(w) / R                    — some bin is at least average;
//  * pigeonhole:  for j = 0..k-1, among the m = j*R + 1 largest items some bin holds j+1 of
//                 them (R bins, at most j each would hold only j*R), so that bin weighs at
//                 least the j+1 smallest of those m items plus the k-j-1 smallest items overall
//                 (any k-j-1 distinct items weigh at least the k-j-1 smallest).
//                 j = 0 is "largest item + the k-1 smallest"; j = 1 is "a[R-1] + a[R] + ...".
// Using exactly m = j*R + 1 is best for a given j: fewer items force nothing, more items only
// make the j+1 smallest of them lighter.
inline double cardinality_lower_bound(const std::vector<double>& w, int R, int k,
                                      const std::vector<int>* desc = nullptr) {
  const int n = static_cast<int>(w.size());
  if (n == 0 || R <= 0 || k <= 0 || n != R * k) return 0.0;
  std::vector<int> storage;
  const std::vector<int>& order = desc_or(w, desc, storage);
  std::vector<double> a(n);
  for (int i = 0; i < n; ++i) a[i] = w[order[i]];
  double total = 0.0;
  for (double x : a) total += x;
  // smallest[m] = sum of the m smallest items.
  std::vector<double> smallest(k + 1, 0.0);
  for (int m = 1; m <= k; ++m) smallest[m] = smallest[m - 1] + a[n - m];
  double lb = total / R;
  for (int j = 0; j < k; ++j) {
    const int m = j * R + 1;  // m <= (k-1)*R + 1 <= n
    double top = 0.0;
    for (int i = m - j - 1; i < m; ++i) top += a[i];
    lb = std::max(lb, top + smallest[k - j - 1]);
  }
  return lb;
}

// Extra bound when complementary pairs must share a rank (paired mode).  The rank holding
// expert e holds e, a partner f from e's complementary size class, and k/2 - 1 further
// complementary pairs disjoint from {e, f}.  So it weighs at least
//     w[e] + w[f*] + P(pool without e and f*)
// where f* is the lightest possible partner and P = the cheapest k/2 - 1 disjoint pairs.
//  * f* suffices: for any heavier partner f, the cheapest pair set avoiding f either avoids
//    f* too, or uses f* and can use f in its place at cost w[f] - w[f*].
//  * P: for one pair type (classes c, comp c) the j cheapest disjoint pairs are the j
//    lightest of each class (the 2j lightest for the middle class); the j-th increment is
//    nondecreasing in j, so across types the cheapest total takes the m smallest increments.
// cls[i] = size class of expert i, comp[c] = complementary class (the middle class: itself).
inline double paired_partner_bound(const std::vector<double>& w, const std::vector<int>& cls,
                                   const std::vector<int>& comp, int k,
                                   const std::vector<int>* desc = nullptr) {
  const int n = static_cast<int>(w.size());
  const int num_classes = static_cast<int>(comp.size());
  if (n == 0 || k < 2 || k % 2 != 0) return 0.0;
  std::vector<std::vector<int>> members(num_classes);  // lightest first
  std::vector<int> storage;
  const std::vector<int>& heavy_first = desc_or(w, desc, storage);
  for (auto it = heavy_first.rbegin(); it != heavy_first.rend(); ++it) members[cls[*it]].push_back(*it);
  const int m = k / 2 - 1;
  std::vector<int> first(num_classes), second(num_classes);  // cursors into members
  // Cheapest m disjoint complementary pairs, skipping the `skip` lightest of every class and
  // the experts x1, x2; +inf if there are not enough.
  auto cheapest_pairs = [&](int skip, int x1, int x2) {
    auto take = [&](int c, int& at) {
      while (at < static_cast<int>(members[c].size())) {
        const int x = members[c][at++];
        if (x != x1 && x != x2) return x;
      }
      return -1;
    };
    using Entry = std::pair<double, int>;  // (next increment of pair type c, c <= comp[c])
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    auto push_next = [&](int c) {
      const int x = take(c, first[c]);
      const int y = c == comp[c] ? take(c, first[c]) : take(comp[c], second[c]);
      if (x >= 0 && y >= 0) heap.emplace(w[x] + w[y], c);
    };
    for (int c = 0; c < num_classes && m > 0; ++c) {
      if (comp[c] < c) continue;
      first[c] = second[c] = skip;
      push_next(c);
    }
    double total = 0.0;
    for (int taken = 0; taken < m; ++taken) {
      if (heap.empty()) return std::numeric_limits<double>::infinity();
      const auto [inc, c] = heap.top();
      heap.pop();
      total += inc;
      push_next(c);
    }
    return total;
  };
  // Pruning: excluding e and its partner shifts each class by at most two, so skipping the two
  // lightest of every class bounds P from above; the partner is at most a class's 2nd lightest.
  double partner_upper = 0.0;
  for (const auto& list : members)
    if (!list.empty()) partner_upper = std::max(partner_upper, w[list[std::min<size_t>(1, list.size() - 1)]]);
  const double rest_upper = partner_upper + cheapest_pairs(2, -1, -1);
  // Any subset of experts e gives a valid bound; heaviest first, stop once none can raise it.
  // With very many size classes only the 64 heaviest are tried (O(64 n) instead of O(n^2)).
  std::vector<int> candidates = heavy_first;
  if (num_classes > 64 && n > 64) candidates.resize(64);
  double lb = 0.0;
  for (int e : candidates) {
    if (w[e] + rest_upper <= lb) break;
    const int cf = comp[cls[e]];
    int f = -1;
    for (int x : members[cf])
      if (x != e) {
        f = x;
        break;
      }
    if (f < 0) continue;  // no partner: cannot happen for a detected pair structure
    const double pairs = cheapest_pairs(0, e, f);
    if (pairs < std::numeric_limits<double>::infinity()) lb = std::max(lb, w[e] + w[f] + pairs);
  }
  return lb;
}

}  // namespace modse_planner
