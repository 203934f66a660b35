// MoDSE expert-pair allocation: detect complementary sizes and plan with pairs kept together.
//
// Sizes form complementary pairs when, sorted, s[i] + s[n-1-i] is one constant C (MoDSE ratios
// 4.5:0.5, 4:1, 3:2, 2.5:2.5 of a unit all sum to 5 units).  If every rank holds k/2 whole
// pairs, every rank holds k/2 * C parameters: memory is exactly equal by construction.
//
// "Paired mode" therefore solves: minimise max compute over partitions into R bins of k experts
// where each bin's sizes can be matched into complementary pairs.  Which small expert pairs
// with which big one is part of the decision (any member of the complementary size class
// works), so swapping two experts of equal size between ranks keeps the plan valid; the
// heuristic uses exactly those swaps after packing pair units.
#pragma once

#include "planner_bounds.h"
#include "planner_exact.h"
#include "planner_heuristic.h"
#include "planner_local_search.h"

namespace modse_planner {

struct PairStructure {
  bool found = false;
  double pair_sum = 0.0;
  int num_classes = 0;
  std::vector<int> cls;   // size class of each expert (equal sizes share a class), by size
  std::vector<int> comp;  // complementary class of each class (the middle class maps to itself)
  std::vector<int> by_size;  // experts by size ascending, ties by index
};

inline PairStructure detect_pairs(const std::vector<double>& s) {
  PairStructure ps;
  const int n = static_cast<int>(s.size());
  if (n < 2 || n % 2 != 0) return ps;
  const std::vector<int> asc = order_by(s, false);
  ps.by_size = asc;
  std::vector<double> sorted(n);
  for (int i = 0; i < n; ++i) sorted[i] = s[asc[i]];
  const double C = sorted[0] + sorted[n - 1];
  if (!pairs_up(sorted, C)) return ps;
  const double tol = 1e-9 * C;
  ps.cls.assign(n, 0);
  double representative = s[asc[0]];
  for (int i = 0; i < n; ++i) {
    if (s[asc[i]] - representative > tol) {
      ++ps.num_classes;
      representative = s[asc[i]];
    }
    ps.cls[asc[i]] = ps.num_classes;
  }
  ++ps.num_classes;
  ps.comp.assign(ps.num_classes, 0);
  for (int i = 0; i < n; ++i) ps.comp[ps.cls[asc[i]]] = ps.cls[asc[n - 1 - i]];
  ps.pair_sum = C;
  ps.found = true;
  return ps;
}

// True iff every bin's sizes can be matched into pairs summing to pair_sum.
inline bool bins_are_pairs(const std::vector<double>& s, const std::vector<int>& bin_of, int R,
                           int k, double pair_sum) {
  if (!counts_are(bin_of, R, k) || k % 2 != 0) return false;
  std::vector<std::vector<double>> per_bin(R);
  for (size_t e = 0; e < s.size(); ++e) per_bin[bin_of[e]].push_back(s[e]);
  for (auto& v : per_bin) {
    std::sort(v.begin(), v.end());
    if (!pairs_up(v, pair_sum)) return false;
  }
  return true;
}

// Pair units: unit u = experts first[u] + second[u] (complementary sizes), weight = sum.
struct Units {
  std::vector<int> first, second;
  std::vector<double> w;
};

// By size order, i-th smallest with i-th largest (ties by index): the obvious pairing, also the
// one the EPLB-style baseline uses, so a plan started from it is never worse than that baseline.
inline Units units_by_size(const PairStructure& ps, const std::vector<double>& w) {
  const int n = static_cast<int>(w.size());
  const std::vector<int>& asc = ps.by_size;
  Units u;
  for (int i = 0; i < n / 2; ++i) {
    u.first.push_back(asc[i]);
    u.second.push_back(asc[n - 1 - i]);
    u.w.push_back(w[asc[i]] + w[asc[n - 1 - i]]);
  }
  return u;
}

// Within each pair of complementary classes, the heaviest small expert goes with the lightest
// big one (the middle class pairs heaviest with lightest).  This minimises the heaviest unit
// (pair_extremes' exchange argument), so with k = 2 it is the exact answer.
inline Units units_balanced(const PairStructure& ps, const std::vector<double>& w,
                            const std::vector<int>* desc = nullptr) {
  std::vector<std::vector<int>> members(ps.num_classes);
  std::vector<int> storage;
  for (int e : desc_or(w, desc, storage)) members[ps.cls[e]].push_back(e);  // heaviest first
  Units u;
  for (int c = 0; c < ps.num_classes; ++c) {
    const int d = ps.comp[c];
    if (d < c) continue;
    const auto& heavy = members[c];
    const auto& partner = members[d];
    const int count = d == c ? static_cast<int>(heavy.size()) / 2 : static_cast<int>(heavy.size());
    for (int i = 0; i < count; ++i) {
      const int a = heavy[i], b = partner[partner.size() - 1 - i];
      u.first.push_back(a);
      u.second.push_back(b);
      u.w.push_back(w[a] + w[b]);
    }
  }
  return u;
}

inline std::vector<int> expand_units(const Units& u, const std::vector<int>& unit_bin, int n) {
  std::vector<int> bin_of(n, 0);
  for (size_t i = 0; i < u.first.size(); ++i) {
    bin_of[u.first[i]] = unit_bin[i];
    bin_of[u.second[i]] = unit_bin[i];
  }
  return bin_of;
}

// Local search for paired mode (planner_local_search.h) with moves that keep every bin a union
// of complementary pairs, hence memory exactly equal:
//  * singles between experts of equal size (this also re-pairs experts);
//  * k <= 4: any two-for-two exchange after which both bins still split into complementary
//    pairs (checked only for moves that would be accepted);
//  * k > 4: a complementary pair for a complementary pair (as good in measurements, and
//    cheaper than all two-for-two exchanges; removing one from a union of
//    complementary pairs leaves one: if x was matched to another copy y' of C-x, the removed
//    C-x was matched to a copy x' of x, and x' can take y').
// With replicas (expert_of), moves also keep an expert's copies on distinct bins.
inline double paired_descent(const std::vector<double>& w, const std::vector<double>& s,
                             const PairStructure& ps, Bins& bins, double target, int max_iters,
                             const std::vector<int>* expert_of = nullptr) {
  const int R = bins.R, k = bins.k;
  const double tol = 1e-9 * ps.pair_sum;  // sizes of the two sides of a double match
  struct Pair {
    int a, b;
    double w;
  };
  std::vector<std::vector<Pair>> pairs(k > 4 ? R : 0);  // complementary pairs inside each bin
  auto list_pairs = [&](int r) {
    pairs[r].clear();
    const int* row = &bins.items[static_cast<size_t>(r) * k];
    for (int i = 0; i < k; ++i)
      for (int j = i + 1; j < k; ++j)
        if (ps.comp[ps.cls[row[i]]] == ps.cls[row[j]])
          pairs[r].push_back(Pair{row[i], row[j], w[row[i]] + w[row[j]]});
  };
  for (int r = 0; r < static_cast<int>(pairs.size()); ++r) list_pairs(r);
  std::vector<double> buf(k);
  // Does bin r, with `out1`, `out2` replaced by `in1`, `in2`, split into complementary pairs?
  auto still_pairs = [&](int r, int out1, int out2, int in1, int in2) {
    const int* row = &bins.items[static_cast<size_t>(r) * k];
    for (int i = 0; i < k; ++i)
      buf[i] = row[i] == out1 ? s[in1] : row[i] == out2 ? s[in2] : s[row[i]];
    std::sort(buf.begin(), buf.end());
    return pairs_up(buf, ps.pair_sum);
  };
  auto same_class = [&](int x, int y) {
    return ps.cls[x] == ps.cls[y] && distinct_after_swap(bins, expert_of, x, y);
  };
  auto both_still_pairs = [&](int x1, int x2, int y1, int y2) {
    return std::fabs(s[x1] + s[x2] - s[y1] - s[y2]) <= tol &&
           still_pairs(bins.bin_of[x1], x1, x2, y1, y2) &&
           still_pairs(bins.bin_of[y1], y1, y2, x1, x2) &&
           distinct_after_double(bins, expert_of, x1, x2, y1, y2);
  };
  auto scan = [&](int h, int r, BestMove& mv, int level) {
    if (level == 0 || k <= 4) {
      scan_exchanges(w, bins, h, r, mv, level, same_class, both_still_pairs);
      return;
    }
    for (const Pair& p : pairs[h])
      for (const Pair& q : pairs[r])
        if (mv.worth(p.w - q.w) && distinct_after_double(bins, expert_of, p.a, p.b, q.a, q.b) &&
            bins.affordable(p.a, p.b, q.a, q.b))
          mv.take(p.w - q.w, p.a, q.a, p.b, q.b);
  };
  auto after_move = [&](int h, int r) {
    if (k > 4) {
      list_pairs(h);
      list_pairs(r);
    }
  };
  return descend(w, bins, target, max_iters, scan, after_move);
}

// Paired-mode starts: units (k/2 per bin) from both pairings, packed.
inline std::vector<Bins> paired_starts(const std::vector<double>& w, const PairStructure& ps, int R,
                                       int k, double target,
                                       const std::vector<int>* desc = nullptr) {
  const int n = static_cast<int>(w.size());
  std::vector<Bins> starts;
  for (int pairing = 0; pairing < 2; ++pairing) {
    const Units u = pairing == 0 ? units_by_size(ps, w) : units_balanced(ps, w, desc);
    // Starts only: exact for 1-2 units per bin, else LPT and differencing without unit-level
    // descent (the expert-level descent below subsumes unit swaps).
    const int m = k / 2;
    const std::vector<int> order = order_desc(u.w);
    if (m <= 2) {
      starts.emplace_back(
          w, expand_units(u, heuristic_partition(u.w, R, m, target, 0, nullptr, &order), n), R, k);
    } else {
      starts.emplace_back(w, expand_units(u, lpt_cardinality(u.w, R, m, &order), n), R, k);
      starts.emplace_back(w, expand_units(u, balanced_differencing(u.w, R, m, &order), n), R, k);
    }
  }
  return starts;
}

// Paired-mode heuristic for k >= 4: the paired starts, then equal size experts and
// complementary pairs swap between bins (paired_descent).
inline std::vector<int> paired_heuristic(const std::vector<double>& w, const PairStructure& ps,
                                         const std::vector<double>& s, int R, int k, double target,
                                         int max_iters, double* value,
                                         const std::vector<int>* desc = nullptr) {
  std::vector<Bins> starts = paired_starts(w, ps, R, k, target, desc);
  return best_of_starts(
      starts, target,
      [&](Bins& bins) { return paired_descent(w, s, ps, bins, target, max_iters); }, value);
}

// Paired k = 2: one unit per bin, balanced units are optimal.
inline std::vector<int> paired_exact_k2(const std::vector<double>& w, const PairStructure& ps,
                                        const std::vector<int>* desc = nullptr) {
  const Units u = units_balanced(ps, w, desc);
  std::vector<int> unit_bin(u.w.size());
  std::iota(unit_bin.begin(), unit_bin.end(), 0);
  return expand_units(u, unit_bin, static_cast<int>(w.size()));
}

}  // namespace modse_planner
