// Local search for "R bins of exactly k items, minimise the heaviest bin".
//
// Moves exchange items between two bins, so every bin keeps exactly k items:
//  * singles: one item for one item;
//  * doubles: two items for two items (k <= 4, where this is every way to re-split the 8 items
//    of two bins, since exchanging 3 of 4 is exchanging the other 1; for larger k singles
//    already leave little to gain and doubles cost O(k^4)).
// A scanner enumerates the moves of one bin pair into a BestMove, singles at level 0 and the
// costlier doubles at level 1, which is only tried when no single helps (variable neighbourhood
// descent); paired mode plugs in a scanner whose moves keep every bin a union of complementary
// pairs.
//  * descend_heaviest: best move between the heaviest bin and any other, repeatedly;
//  * balance_sweep: when that is stuck, even out pairs of bins (all pairs for R <= 32, else
//    the i-th heaviest with the i-th lightest) to reshuffle, then descend again (a few rounds).
// No move ever raises the largest load, so the result is never worse than the start.
// With replicas (planner_replicas.h) every move also keeps the copies of one expert on distinct
// bins (distinct_after_swap / distinct_after_double; no-ops when expert_of is null).
#pragma once

#include <utility>

#include "planner_common.h"

namespace modse_planner {

// Bin contents with O(1) swaps: items[r*k + slot], bin_of/slot_of per item, load per bin.
struct Bins {
  int R = 0, k = 0;
  std::vector<int> items, bin_of, slot_of;
  std::vector<double> load;

  Bins(const std::vector<double>& w, const std::vector<int>& assignment, int R_, int k_)
      : R(R_), k(k_), items(static_cast<size_t>(R_) * k_, -1), bin_of(assignment),
        slot_of(assignment.size(), 0), load(R_, 0.0) {
    std::vector<int> fill(R, 0);
    assert(assignment.size() == w.size() && assignment.size() == items.size());
    for (size_t i = 0; i < assignment.size(); ++i) {
      const int b = assignment[i];
      assert(b >= 0 && b < R && fill[b] < k);  // exactly k items per bin
      slot_of[i] = fill[b];
      items[static_cast<size_t>(b) * k + fill[b]++] = static_cast<int>(i);
      load[b] += w[i];
    }
  }

  // Move budget (planner.h, warm start from `previous` with max_move_fraction < 1): `moved` is
  // the size of the items off their home bin; exchanges that would take it above `budget` are
  // not taken (scan_exchanges, paired_descent).  Off while home is null.
  const int* home = nullptr;
  const std::vector<double>* size = nullptr;
  double moved = 0.0, budget = 0.0;

  void set_budget(const int* home_bin, const std::vector<double>* sizes, double limit) {
    home = home_bin;
    size = sizes;
    budget = limit;
    moved = 0.0;
    for (size_t i = 0; i < bin_of.size(); ++i)
      if (bin_of[i] != home[i]) moved += (*size)[i];
  }
  // Change of `moved` when item x goes to bin `to`.
  double move_cost(int x, int to) const {
    return (*size)[x] * ((to != home[x] ? 1.0 : 0.0) - (bin_of[x] != home[x] ? 1.0 : 0.0));
  }
  bool affordable(double extra) const { return moved + extra <= budget * (1.0 + 1e-12); }
  bool affordable(int x, int y) const {
    return !home || affordable(move_cost(x, bin_of[y]) + move_cost(y, bin_of[x]));
  }
  bool affordable(int x1, int x2, int y1, int y2) const {
    return !home || affordable(move_cost(x1, bin_of[y1]) + move_cost(x2, bin_of[y1]) +
                               move_cost(y1, bin_of[x1]) + move_cost(y2, bin_of[x1]));
  }

  int heaviest() const {
    return static_cast<int>(std::max_element(load.begin(), load.end()) - load.begin());
  }

  void swap_items(int a, int b, const std::vector<double>& w) {
    assert(a >= 0 && a < static_cast<int>(bin_of.size()));
    assert(b >= 0 && b < static_cast<int>(bin_of.size()));
    const int ba = bin_of[a], bb = bin_of[b];
    assert(items[static_cast<size_t>(ba) * k + slot_of[a]] == a);
    assert(items[static_cast<size_t>(bb) * k + slot_of[b]] == b);
    const double d = w[a] - w[b];
    if (home) moved += move_cost(a, bb) + move_cost(b, ba);
    load[ba] -= d;
    load[bb] += d;
    std::swap(items[static_cast<size_t>(ba) * k + slot_of[a]],
              items[static_cast<size_t>(bb) * k + slot_of[b]]);
    std::swap(bin_of[a], bin_of[b]);
    std::swap(slot_of[a], slot_of[b]);
  }
};

// Replicas: does bin r hold a copy of `expert` other than the items skip1, skip2?
inline bool holds(const Bins& bins, int r, int expert, const std::vector<int>& expert_of,
                  int skip1 = -1, int skip2 = -1) {
  assert(r >= 0 && r < bins.R);
  const int* row = &bins.items[static_cast<size_t>(r) * bins.k];
  for (int i = 0; i < bins.k; ++i)
    if (row[i] != skip1 && row[i] != skip2 && expert_of[row[i]] == expert) return true;
  return false;
}

// Exchanging items x and y (in different bins) leaves no bin with two copies of one expert.
inline bool distinct_after_swap(const Bins& bins, const std::vector<int>* expert_of, int x, int y) {
  if (!expert_of) return true;
  const std::vector<int>& ex = *expert_of;
  if (ex[x] == ex[y]) return true;  // two copies of one expert trade places: nothing changes
  return !holds(bins, bins.bin_of[x], ex[y], ex) && !holds(bins, bins.bin_of[y], ex[x], ex);
}

// The same for exchanging x1, x2 (one bin) with y1, y2 (another bin).
inline bool distinct_after_double(const Bins& bins, const std::vector<int>* expert_of, int x1,
                                  int x2, int y1, int y2) {
  if (!expert_of) return true;
  const std::vector<int>& ex = *expert_of;
  const int a = bins.bin_of[x1], b = bins.bin_of[y1];
  return !holds(bins, a, ex[y1], ex, x1, x2) && !holds(bins, a, ex[y2], ex, x1, x2) &&
         !holds(bins, b, ex[x1], ex, y1, y2) && !holds(bins, b, ex[x2], ex, y1, y2);
}

// The best exchange seen so far that moves d from a heavier bin (load hi) to a lighter one
// (load lo): it helps iff 0 < d < hi - lo, and is better the smaller max(hi - d, lo + d) is.
struct BestMove {
  double hi = 0.0, lo = 0.0, eps = 0.0, value = 0.0;
  int r = -1, partner = -1;  // partner: the lighter bin of the best move
  int a1 = -1, b1 = -1, a2 = -1, b2 = -1;

  bool worth(double d) const {
    return d > eps && d < hi - lo - eps && std::max(hi - d, lo + d) < value;
  }
  void take(double d, int x1, int y1, int x2 = -1, int y2 = -1) {
    value = std::max(hi - d, lo + d);
    partner = r;
    a1 = x1, b1 = y1, a2 = x2, b2 = y2;
  }
  void apply(Bins& bins, const std::vector<double>& w) const {
    bins.swap_items(a1, b1, w);
    if (a2 >= 0) bins.swap_items(a2, b2, w);
  }
};

// Heaviest-bin descent.  Each accepted move lowers the sorted vector of bin loads
// lexicographically, so it terminates; max_iters bounds the work anyway.  The 8 lightest bins
// (likeliest partners) are scanned first and the rest only when they offer nothing, level by
// level, so a stop is still a local optimum over all bins and both levels.
// scan(h, r, mv, level) fills mv with moves from h to r; after_move(h, r) lets the scanner
// refresh its caches.
template <class Scan, class AfterMove>
double descend_heaviest(const std::vector<double>& w, Bins& bins, double target, int max_iters,
                        Scan&& scan, AfterMove&& after_move) {
  const int R = bins.R;
  constexpr int kFirst = 8;
  std::vector<int> order(R);
  for (int iter = 0; iter < max_iters; ++iter) {
    const int h = bins.heaviest();
    BestMove mv;
    mv.hi = mv.value = bins.load[h];
    if (mv.hi <= target + eps_of(target)) break;
    mv.eps = eps_of(mv.hi);
    mv.value -= mv.eps;
    std::iota(order.begin(), order.end(), 0);
    const int first = std::min(kFirst, R);
    auto lighter = [&](int x, int y) { return bins.load[x] < bins.load[y]; };
    if (first < R) std::nth_element(order.begin(), order.begin() + first, order.end(), lighter);
    for (int pass = 0; pass < 4 && mv.partner < 0; ++pass) {
      const bool near = pass % 2 == 0;  // passes: near singles, far singles, near/far doubles
      for (int i = near ? 0 : first; i < (near ? first : R); ++i) {
        mv.r = order[i];
        mv.lo = bins.load[mv.r];
        if (mv.r != h && mv.hi - mv.lo > mv.eps) scan(h, mv.r, mv, pass / 2);
      }
    }
    if (mv.partner < 0) break;
    mv.apply(bins, w);
    after_move(h, mv.partner);
  }
  return max_of(bins.load);
}

// One balancing pass over pairs of bins, each pair evened out by its best single: all pairs
// when R <= 32, else the i-th heaviest with the i-th lightest (O(R) pairs).  No load rises
// above its pair's old maximum, so the overall max never increases; the point is to reshuffle
// so the heaviest bin finds new partners.  Returns whether anything moved.
template <class Scan, class AfterMove>
bool balance_sweep(const std::vector<double>& w, Bins& bins, Scan&& scan, AfterMove&& after_move) {
  const int R = bins.R;
  std::vector<int> order(R);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int x, int y) { return bins.load[x] > bins.load[y]; });
  std::vector<std::pair<int, int>> pairs;
  if (R <= 32) {
    for (int i = 0; i < R; ++i)
      for (int j = R - 1; j > i; --j) pairs.emplace_back(order[i], order[j]);
  } else {
    for (int i = 0; i < R / 2; ++i) pairs.emplace_back(order[i], order[R - 1 - i]);
  }
  bool moved = false;
  for (auto [x, y] : pairs) {
    BestMove mv;
    const int hi = bins.load[x] >= bins.load[y] ? x : y;
    mv.r = x + y - hi;
    mv.hi = bins.load[hi];
    mv.lo = bins.load[mv.r];
    mv.eps = eps_of(mv.hi);
    mv.value = mv.hi - mv.eps;
    if (mv.hi - mv.lo <= mv.eps) continue;
    scan(hi, mv.r, mv, 0);  // singles only: doubles cost much and gained nothing measurable
    if (mv.partner < 0) continue;
    mv.apply(bins, w);
    after_move(hi, mv.r);
    moved = true;
  }
  return moved;
}

// Heaviest-bin descent; when stuck, a balancing sweep and descent again, for a few rounds (not
// under a move budget: sweeps spend moves without lowering the heaviest bin).
template <class Scan, class AfterMove>
double descend(const std::vector<double>& w, Bins& bins, double target, int max_iters, Scan&& scan,
               AfterMove&& after_move) {
  const int rounds = bins.home ? 0 : 4;
  double value = descend_heaviest(w, bins, target, max_iters, scan, after_move);
  for (int round = 0; round < rounds && value > target + eps_of(target); ++round) {
    if (!balance_sweep(w, bins, scan, after_move)) break;
    const double next = descend_heaviest(w, bins, target, max_iters, scan, after_move);
    const bool progress = next < value - eps_of(value);
    value = std::min(value, next);
    if (!progress) break;
  }
  return value;
}

// The exchanges between bins h and r at one level (0: one item for one, 1: two for two), the
// accepted ones filtered by the problem's rule: single_ok(x, y), double_ok(x1, x2, y1, y2)
// (x from h, y from r), checked only for moves that would be taken.
template <class SingleOk, class DoubleOk>
void scan_exchanges(const std::vector<double>& w, const Bins& bins, int h, int r, BestMove& mv,
                    int level, SingleOk&& single_ok, DoubleOk&& double_ok) {
  const int k = bins.k;
  assert(h >= 0 && h < bins.R && r >= 0 && r < bins.R && h != r);
  const int* x = &bins.items[static_cast<size_t>(h) * k];
  const int* y = &bins.items[static_cast<size_t>(r) * k];
  if (level == 0) {
    for (int i = 0; i < k; ++i)
      for (int j = 0; j < k; ++j) {
        const double d = w[x[i]] - w[y[j]];
        if (mv.worth(d) && single_ok(x[i], y[j]) && bins.affordable(x[i], y[j]))
          mv.take(d, x[i], y[j]);
      }
    return;
  }
  for (int i1 = 0; i1 < k; ++i1)
    for (int i2 = i1 + 1; i2 < k; ++i2) {
      const double out = w[x[i1]] + w[x[i2]];
      for (int j1 = 0; j1 < k; ++j1)
        for (int j2 = j1 + 1; j2 < k; ++j2) {
          const double d = out - w[y[j1]] - w[y[j2]];
          if (mv.worth(d) && double_ok(x[i1], x[i2], y[j1], y[j2]) &&
              bins.affordable(x[i1], x[i2], y[j1], y[j2]))
            mv.take(d, x[i1], y[j1], x[i2], y[j2]);
        }
    }
}

// Exchanges under the cardinality rule only (and, with expert_of, copies on distinct bins):
// singles always, doubles when k <= 4.
inline double swap_descent(const std::vector<double>& w, Bins& bins, double target, int max_iters,
                           const std::vector<int>* expert_of = nullptr) {
  const bool doubles = bins.k <= 4;
  auto single_ok = [&](int x, int y) { return distinct_after_swap(bins, expert_of, x, y); };
  auto double_ok = [&](int x1, int x2, int y1, int y2) {
    return distinct_after_double(bins, expert_of, x1, x2, y1, y2);
  };
  auto scan = [&](int h, int r, BestMove& mv, int level) {
    if (level == 0 || doubles) scan_exchanges(w, bins, h, r, mv, level, single_ok, double_ok);
  };
  return descend(w, bins, target, max_iters, scan, [](int, int) {});
}

}  // namespace modse_planner
