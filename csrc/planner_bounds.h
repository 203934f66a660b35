// Lower bounds on the best achievable max bin load, so every plan can state its own quality.
//
// Problem: partition n = R*k weights into R bins of exactly k items; minimise the largest bin
// sum.  Each bound below holds for *every* valid partition, so the plan's gap to it is an
// upper bound on how far the plan is from optimal.
#pragma once

#include <limits>
#include <queue>
#include <tuple>
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
  if (n == 0 || R <= 0 || k <= 0 || n != static_cast<int64_t>(R) * k) return 0.0;
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

// ---- paired mode: every rank is a union of complementary pairs ----------------------------
// cls[i] = size class of expert i (classes numbered by size), comp[c] = complementary class
// (the middle class, e.g. 2.5:2.5, is its own complement).

// Members of every class, lightest first.
inline std::vector<std::vector<int>> class_members(const std::vector<double>& w,
                                                   const std::vector<int>& cls, int num_classes,
                                                   const std::vector<int>& heavy_first) {
  std::vector<std::vector<int>> members(num_classes);
  for (auto it = heavy_first.rbegin(); it != heavy_first.rend(); ++it)
    members[cls[*it]].push_back(*it);
  return members;
}

// The lightest expert of e's complementary class other than e itself (members: lightest
// first, as class_members gives them), or -1 when the class has no other member.
inline int lightest_partner(const std::vector<std::vector<int>>& members,
                            const std::vector<int>& cls, const std::vector<int>& comp, int e) {
  for (int x : members[comp[cls[e]]])
    if (x != e) return x;
  return -1;
}

// prefix[j] = cheapest total of j disjoint complementary pairs (j = 0..m), skipping the `skip`
// lightest of every class and the experts x1, x2; +inf where there are not enough pairs.
// For one pair type (c, comp c) the j cheapest disjoint pairs are the j lightest of each class
// (the 2j lightest for the middle class); the j-th increment is nondecreasing in j, so across
// types the cheapest total takes the m smallest increments (a k-way merge).
// `chosen`, when given, receives the pairs taken (for the m-th prefix).
inline std::vector<double> cheapest_pairs(const std::vector<double>& w,
                                          const std::vector<std::vector<int>>& members,
                                          const std::vector<int>& comp, int m, int skip = 0,
                                          int x1 = -1, int x2 = -1,
                                          std::vector<std::pair<int, int>>* chosen = nullptr) {
  const int num_classes = static_cast<int>(comp.size());
  std::vector<int> first(num_classes, skip), second(num_classes, skip);  // cursors
  auto take = [&](int c, int& at) {
    while (at < static_cast<int>(members[c].size())) {
      const int x = members[c][at++];
      if (x != x1 && x != x2) return x;
    }
    return -1;
  };
  // (next increment of pair type c, c <= comp[c], its two experts)
  using Entry = std::tuple<double, int, int, int>;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  auto push_next = [&](int c) {
    const int x = take(c, first[c]);
    const int y = c == comp[c] ? take(c, first[c]) : take(comp[c], second[c]);
    if (x >= 0 && y >= 0) heap.emplace(w[x] + w[y], c, x, y);
  };
  for (int c = 0; c < num_classes && m > 0; ++c)
    if (comp[c] >= c) push_next(c);
  std::vector<double> prefix(m + 1, std::numeric_limits<double>::infinity());
  prefix[0] = 0.0;
  for (int j = 1; j <= m && !heap.empty(); ++j) {
    const auto [inc, c, x, y] = heap.top();
    heap.pop();
    prefix[j] = prefix[j - 1] + inc;
    if (chosen) chosen->emplace_back(x, y);
    push_next(c);
  }
  return prefix;
}

// Partner bound: the rank holding expert e holds e, a partner f from e's complementary class,
// and k/2 - 1 further complementary pairs disjoint from {e, f}, so it weighs at least
//     w[e] + w[f*] + P_{k/2-1}(pool without e and f*)
// with f* the lightest possible partner.  f* suffices: for a heavier partner f, the cheapest
// pair set avoiding f either avoids f* too, or uses f* and can use f instead at cost
// w[f] - w[f*].
inline double paired_partner_bound(const std::vector<double>& w,
                                   const std::vector<std::vector<int>>& members,
                                   const std::vector<int>& cls, const std::vector<int>& comp,
                                   int k, const std::vector<int>& heavy_first) {
  const int n = static_cast<int>(w.size());
  const int num_classes = static_cast<int>(comp.size());
  if (n == 0 || k < 2 || k % 2 != 0) return 0.0;
  const int m = k / 2 - 1;
  // Pruning: excluding e and f* shifts each class by at most two, so skipping the two lightest
  // of every class bounds P from above; f* is at most its class's second lightest.
  double partner_upper = 0.0;
  for (const auto& list : members)
    if (!list.empty())
      partner_upper = std::max(partner_upper, w[list[std::min<size_t>(1, list.size() - 1)]]);
  const double rest_upper = partner_upper + cheapest_pairs(w, members, comp, m, 2)[m];
  // Any subset of experts e gives a valid bound; heaviest first, stop once none can raise it.
  // With very many size classes only the 64 heaviest are tried (O(64 n) instead of O(n^2)).
  const int tries = (num_classes > 64 && n > 64) ? 64 : n;
  double lb = 0.0;
  for (int i = 0; i < tries; ++i) {
    const int e = heavy_first[i];
    if (w[e] + rest_upper <= lb) break;
    const int f = lightest_partner(members, cls, comp, e);
    if (f < 0) continue;  // no partner: cannot happen for a detected pair structure
    const double pairs = cheapest_pairs(w, members, comp, m, 0, e, f)[m];
    if (pairs < std::numeric_limits<double>::infinity()) lb = std::max(lb, w[e] + w[f] + pairs);
  }
  return lb;
}

// Matching bound for two pairs per rank (k = 4), the common MoDSE layout.  With M = 2R pair
// units sorted u_1 >= ... >= u_M, every rank holding two units has max >= u_i + u_{M+1-i} for
// each i <= R: otherwise each of the i largest units would need a partner below u_{M+1-i}, and
// only i - 1 units are.  Units are not fixed (the pairing is free), so lower bounds are used:
//  * u_i >= V_i, V = sorted lower bounds per unit: every non-middle unit holds one expert x of
//    a larger-than-half class (and one of a smaller one), weighing >= w[x] + lightest of
//    comp(x); middle units' heavier members dominate the 1st, 3rd, 5th... heaviest middle
//    experts.  Either side gives a valid sorted vector; their elementwise max is used.
//  * u_{M+1-i} >= max(V_{M+1-i}, P_i / i): the i smallest units are i disjoint pairs.
inline double paired_matching_bound(const std::vector<double>& w,
                                    const std::vector<std::vector<int>>& members,
                                    const std::vector<int>& comp, int R) {
  const int num_classes = static_cast<int>(comp.size());
  std::vector<double> big, small;  // unit lower bounds via the big / the small member
  for (int c = 0; c < num_classes; ++c) {
    if (members[c].empty()) continue;
    const int d = comp[c];
    if (d == c) {  // middle: pairs within the class, members lightest first
      const auto& mid = members[c];
      for (size_t j = mid.size(); j >= 2; j -= 2) {
        const double v = w[mid[j - 1]] + w[mid[0]];  // 1st, 3rd, ... heaviest + lightest
        big.push_back(v);
        small.push_back(v);
      }
      continue;
    }
    if (members[d].empty()) return 0.0;
    auto& side = c > d ? big : small;  // classes are numbered by size
    for (int x : members[c]) side.push_back(w[x] + w[members[d][0]]);
  }
  const int M = 2 * R;
  if (static_cast<int>(big.size()) != M || static_cast<int>(small.size()) != M) return 0.0;
  std::sort(big.begin(), big.end(), std::greater<double>());
  std::sort(small.begin(), small.end(), std::greater<double>());
  std::vector<double> v(M);
  for (int i = 0; i < M; ++i) v[i] = std::max(big[i], small[i]);
  const std::vector<double> P = cheapest_pairs(w, members, comp, R);
  double lb = 0.0;
  for (int i = 1; i <= R; ++i) {
    const double tail = std::max(v[M - i], P[i] / i);
    if (tail < std::numeric_limits<double>::infinity()) lb = std::max(lb, v[i - 1] + tail);
  }
  return lb;
}

// All paired-mode bounds (valid only for the paired problem).
inline double paired_lower_bound(const std::vector<double>& w, const std::vector<int>& cls,
                                 const std::vector<int>& comp, int R, int k,
                                 const std::vector<int>* desc = nullptr) {
  std::vector<int> storage;
  const std::vector<int>& heavy_first = desc_or(w, desc, storage);
  const auto members = class_members(w, cls, static_cast<int>(comp.size()), heavy_first);
  double lb = paired_partner_bound(w, members, cls, comp, k, heavy_first);
  if (k == 4) lb = std::max(lb, paired_matching_bound(w, members, comp, R));
  return lb;
}

}  // namespace modse_planner
