// Redundant expert replicas (DeepSeek EPLB's "redundant experts"): num_replicas extra physical
// slots, S = n + num_replicas of them, exactly k = S / R per rank.  An expert with c copies has
// its tokens split evenly, so every copy costs w / c compute and holds the expert's full size.
//
// Two decisions, in this order:
//  1. copies per expert: greedy on the largest per-copy weight (replica_counts; in paired mode
//     in complementary pairs, paired_replica_counts);
//  2. placement of the S copies by the planner's usual machinery, the copies being items of
//     weight w / c and size s, with one more rule: no two copies of an expert on one rank (a
//     second copy there would split nothing).  Starts that ignore the rule are repaired by swaps
//     (separate_copies); every local-search move checks it (planner_local_search.h).
// With joint_counts the greedy counts are only a start: planner_counts.h then changes counts
// and placement together.  When copies may stack (stack_copies, EPLB's behaviour) the
// distinct-rank rule is dropped: `distinct` below is the expert of every copy when the rule applies and null when
// copies may stack, and an expert may then have up to num_replicas + 1 copies (cap).
// The lower bound (replica_lower_bound) holds for every choice of counts, so a plan's gap
// compares it with every way of spending the replicas, not only with the chosen counts.
#pragma once

#include <queue>
#include <tuple>

#include "planner_heuristic.h"
#include "planner_pairs.h"

namespace modse_planner {

// Copies per expert: one each, then every extra copy to the expert with the largest per-copy
// weight w[e] / c[e] among those with fewer than cap copies (ties: lowest id; cap = R, or
// extra + 1 when copies may stack, i.e. no cap).  This is EPLB's replicate_experts (argmax of
// weight / logcnt), the D'Hondt (Jefferson) highest-averages rule.  It minimises the largest
// per-copy weight M = max_e w[e] / c[e] over all counts 1 <= c <= cap summing to S:
//  * if M = w[e] / cap for an expert with cap copies, no counts do better (c[e] <= cap);
//  * else M = w[e] / c[e] with c[e] < cap.  When any f got its last copy, w[f] / (c[f] - 1) was
//    the largest per-copy weight of the experts below cap copies, e included, and e's has only
//    fallen since, so w[f] / (c[f] - 1) >= M.  Counts c' with a max below M need c'[e] > c[e]
//    and c'[f] >= c[f] for every other f: more than S copies.
// The heaviest copy is not the heaviest rank, though (planner_counts.h), so with joint_counts
// these counts are only the start.
inline std::vector<int> replica_counts(const std::vector<double>& w, int cap, int extra) {
  const int n = static_cast<int>(w.size());
  std::vector<int> c(n, 1);
  std::priority_queue<std::pair<double, int>> heap;  // (per-copy weight, -expert)
  for (int e = 0; e < n && cap > 1; ++e) heap.emplace(w[e], -e);
  for (int left = extra; left > 0 && !heap.empty(); --left) {
    const int e = -heap.top().second;
    heap.pop();
    if (++c[e] < cap) heap.emplace(w[e] / c[e], -e);
  }
  return c;
}

// Can the middle class (its own complement, e.g. 2.5:2.5) with these copy counts be placed?
// Its T copies form U = T/2 units; dealt evenly (deal_paired_copies), bins get 2f or 2f + 2
// middle slots, U = f*R + r.  By Gale-Ryser the copies fit on distinct bins iff for every j the
// j largest counts sum to at most sum_b min(slots_b, j); that holds for j <= 2f (counts <= R)
// and j >= 2f + 2 (the total), so only j = 2f + 1 binds: the 2f + 1 largest sum to <= T - r.
// hist[v] = middle experts with v copies.
inline bool middle_fits(const std::vector<int>& hist, int T, int R) {
  const int U = T / 2, f = U / R, r = U % R;
  int take = 2 * f + 1, top = 0;
  for (int v = R; v >= 1 && take > 0; --v) {
    const int m = std::min(take, hist[v]);
    top += m * v;
    take -= m;
  }
  return top <= T - r;
}

// Paired mode: copies come in complementary pairs, so the slot sizes still form complementary
// pairs and every rank can hold k/2 whole pairs (memory exactly equal): the expert e with the
// largest per-copy weight, as above, plus the member of its complementary class with the largest
// per-copy weight.  In the middle class the partner is the best other member whose extra copy
// keeps the class placeable (middle_fits), else e itself; if none fits, e waits until another
// middle step changes the class.  An expert whose complementary class is full gets no more
// copies.  Non-middle classes always fit (a class and its complement have equally many members,
// so equal room, and an even deal puts at most R copies per class on distinct bins).  Returns
// fewer than the requested copies only if the middle class cannot take them.  ps: the experts'
// pair structure; cap: most copies per expert (R; with stacking, `distinct` false, extra + 1
// and the middle class always fits).
inline std::vector<int> paired_replica_counts(const std::vector<double>& w, const PairStructure& ps,
                                              int R, int extra, int cap, bool distinct = true) {
  const int n = static_cast<int>(w.size());
  std::vector<int> c(n, 1), version(n, 0), waiting, passed;
  using Entry = std::tuple<double, int, int>;  // (per-copy weight, -expert, version): lazy heaps
  using Heap = std::priority_queue<Entry>;
  Heap all;
  std::vector<Heap> by_class(ps.num_classes);
  auto push = [&](int e) {
    if (c[e] >= cap) return;
    const Entry x(w[e] / c[e], -e, version[e]);
    all.push(x);
    by_class[ps.cls[e]].push(x);
  };
  auto best = [&](Heap& heap) {  // current best expert of a heap, stale entries dropped
    while (!heap.empty() && std::get<2>(heap.top()) != version[-std::get<1>(heap.top())])
      heap.pop();
    return heap.empty() ? -1 : -std::get<1>(heap.top());
  };
  // The middle class, its copies and their histogram (middle_fits; only for distinct copies,
  // whose counts stay <= R).
  int middle = -1, T = 0;
  std::vector<int> hist(distinct ? R + 2 : 0, 0);
  auto add_copy = [&](int x, int delta) {
    if (distinct && ps.cls[x] == middle) {
      --hist[c[x]];
      ++hist[c[x] + delta];
      T += delta;
    }
    c[x] += delta;
  };
  auto fits_with = [&](int a, int b) {  // is the middle class placeable with a and b added?
    add_copy(a, 1);
    add_copy(b, 1);
    const bool ok = c[a] <= cap && (!distinct || middle_fits(hist, T, R));
    add_copy(b, -1);
    add_copy(a, -1);
    return ok;
  };
  for (int e = 0; e < n; ++e) {
    if (ps.comp[ps.cls[e]] == ps.cls[e]) {
      middle = ps.cls[e];
      if (distinct) ++hist[1];
      ++T;
    }
    push(e);
  }
  for (int left = extra; left >= 2;) {
    const int e = best(all);
    if (e < 0) break;
    ++version[e];  // e's entries are stale now: it is its own partner only as a last resort
    const int d = ps.comp[ps.cls[e]];
    int f = best(by_class[d]);
    if (d == middle) {
      passed.clear();
      for (; f >= 0 && !fits_with(e, f); f = best(by_class[d])) {
        passed.push_back(f);
        by_class[d].pop();
      }
      for (int x : passed) by_class[d].emplace(w[x] / c[x], -x, version[x]);
      if (f < 0 && fits_with(e, e)) f = e;
      if (f < 0) {
        waiting.push_back(e);  // until the middle class changes
        continue;
      }
    }
    if (f < 0) continue;  // the complementary class is full: e stays as it is
    add_copy(e, 1);
    add_copy(f, 1);
    ++version[f];
    push(e);
    if (f != e) push(f);
    left -= 2;
    if (d == middle) {
      for (int x : waiting) push(x);
      waiting.clear();
    }
  }
  return c;
}

// Lower bound on max compute valid for EVERY choice of counts (1 <= c <= R, sum S) and every
// placement with k copies per rank on distinct ranks:
//  * average: an expert's copies weigh c * w / c = w together, whatever c, so some rank holds
//    at least sum(w) / R;
//  * heaviest copy: some copy weighs at least M*, the smallest possible max per-copy weight,
//    which replica_counts attains; its rank holds k - 1 copies of k - 1 other, distinct experts
//    f, each weighing w[f] / c[f] >= w[f] / R, so at least the k - 1 smallest w[f] / R.
// With stacking (distinct false) counts go up to extra + 1 and the other k - 1 copies may be of
// one expert, so they weigh at least k - 1 times the smallest w[f] / (extra + 1).
inline double replica_lower_bound(const std::vector<double>& w, int R, int k, int extra,
                                  bool distinct = true) {
  const int n = static_cast<int>(w.size());
  const int cap = distinct ? R : extra + 1;
  const std::vector<int> c = replica_counts(w, cap, extra);
  double total = 0.0, heaviest = 0.0;
  std::vector<double> least(n);
  for (int e = 0; e < n; ++e) {
    total += w[e];
    heaviest = std::max(heaviest, w[e] / c[e]);
    least[e] = w[e] / cap;
  }
  if (distinct) {
    const int m = std::min(k - 1, n);
    std::partial_sort(least.begin(), least.begin() + m, least.end());
    for (int i = 0; i < m; ++i) heaviest += least[i];
  } else {
    heaviest += (k - 1) * *std::min_element(least.begin(), least.end());
  }
  return std::max(total / R, heaviest);
}

// The S copies as items, in expert order (an expert's copies are consecutive).
struct Copies {
  std::vector<int> expert_of;
  std::vector<double> s, t, w;
};

inline Copies expand_copies(const std::vector<int>& count, const std::vector<double>& s,
                            const std::vector<double>& t, const std::vector<double>& w) {
  Copies c;
  for (size_t e = 0; e < count.size(); ++e)
    for (int j = 0; j < count[e]; ++j) {
      c.expert_of.push_back(static_cast<int>(e));
      c.s.push_back(s[e]);
      c.t.push_back(t[e] / count[e]);
      c.w.push_back(w[e] / count[e]);
    }
  return c;
}

// LPT over copies, skipping bins that already hold a copy of the item's expert; when every bin
// with room does (rare, near the end), the last one left anyway, for separate_copies to fix.
inline std::vector<int> distinct_lpt(const std::vector<double>& w,
                                     const std::vector<int>& expert_of, int R, int k,
                                     const std::vector<int>& desc) {
  using Entry = std::pair<double, int>;  // (load, bin): lightest first, lowest index on ties
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> open;
  for (int r = 0; r < R; ++r) open.emplace(0.0, r);
  std::vector<int> count(R, 0), bin_of(w.size(), 0);
  std::vector<std::vector<int>> bins_of_expert(expert_of.back() + 1);
  std::vector<Entry> skipped;
  for (int i : desc) {
    const auto& held = bins_of_expert[expert_of[i]];
    auto holds_top = [&]() {
      return std::find(held.begin(), held.end(), open.top().second) != held.end();
    };
    skipped.clear();
    while (open.size() > 1 && holds_top()) {
      skipped.push_back(open.top());
      open.pop();
    }
    const auto [load, r] = open.top();
    open.pop();
    for (const Entry& x : skipped) open.push(x);
    bin_of[i] = r;
    bins_of_expert[expert_of[i]].push_back(r);
    if (++count[r] < k) open.emplace(load + w[i], r);
  }
  return bin_of;
}

// Swaps until no bin holds two copies of one expert: a copy x whose bin A holds another copy
// trades places with an item y of a bin B that holds no copy of x's expert while A holds none of
// y's, so every swap removes a duplicate and creates none; among those, the swap leaving the
// lower max(load A, load B).  allowed(x, y): which items may trade (paired mode: equal sizes, so
// every bin keeps its sizes, i.e. its complementary pairs).  Passes repeat while they help;
// returns whether all duplicates are gone.
template <class Allowed>
bool separate_copies(const std::vector<double>& w, const std::vector<int>& expert_of, Bins& bins,
                     Allowed&& allowed) {
  const int R = bins.R, k = bins.k;
  std::vector<char> in_a(expert_of.back() + 1, 0);  // experts of bin a, for O(1) checks
  for (bool progress = true; progress;) {
    progress = false;
    bool stuck = false;
    for (int a = 0; a < R; ++a)
      for (int i = 0; i < k; ++i) {
        const int* row_a = &bins.items[static_cast<size_t>(a) * k];
        const int x = row_a[i];
        if (!holds(bins, a, expert_of[x], expert_of, x)) continue;
        for (int j = 0; j < k; ++j) in_a[expert_of[row_a[j]]] = 1;
        double best = std::numeric_limits<double>::infinity();
        int partner = -1;
        for (int b = 0; b < R; ++b) {
          if (b == a || holds(bins, b, expert_of[x], expert_of)) continue;
          for (int j = 0; j < k; ++j) {
            const int y = bins.items[static_cast<size_t>(b) * k + j];
            if (!allowed(x, y) || in_a[expert_of[y]]) continue;
            const double d = w[x] - w[y];
            const double v = std::max(bins.load[a] - d, bins.load[b] + d);
            if (v < best) {
              best = v;
              partner = y;
            }
          }
        }
        for (int j = 0; j < k; ++j) in_a[expert_of[row_a[j]]] = 0;
        if (partner < 0) {
          stuck = true;
          continue;
        }
        bins.swap_items(x, partner, w);
        progress = true;
      }
    if (!stuck) return true;
  }
  return false;
}

// Unpaired start that is always valid: copies in expert order dealt to bins 0, 1, ..., R - 1,
// 0, ...; an expert's copies are consecutive and at most R, so they land on distinct bins.
inline std::vector<int> deal_copies(int S, int R) {
  std::vector<int> bin_of(S);
  for (int i = 0; i < S; ++i) bin_of[i] = i % R;
  return bin_of;
}

// Paired start that obeys both rules whenever any plan can.  Pair units are dealt to bins round
// robin (unit j to bin j mod R), so every bin gets k/2 units and every class a near-equal quota
// on every bin (its complement the same quota).  Then, class by class, experts with the most
// copies first each take the bins with the most quota left: the Gale-Ryser construction, which
// puts every copy on a distinct bin iff the quotas allow it at all; near-equal quotas are the
// most permissive ones (sum_b min(quota_b, j) is largest when quotas are even), so this fails
// only when no plan keeps both rules.  Ties are free, so they serve balance: heavier classes
// and, among equal counts, heavier experts first, each onto the lightest of the bins with
// equal quota.  ps: the copies' pair structure.
inline bool deal_paired_copies(const std::vector<double>& w, const PairStructure& ps,
                               const std::vector<int>& expert_of, int R,
                               std::vector<int>& bin_of) {
  const int S = static_cast<int>(expert_of.size());
  const int C = ps.num_classes;
  std::vector<int> in_class(C, 0);
  std::vector<double> class_weight(C, 0.0);
  for (int i = 0; i < S; ++i) {
    ++in_class[ps.cls[i]];
    class_weight[ps.cls[i]] += w[i];
  }
  std::vector<std::vector<int>> quota(C, std::vector<int>(R, 0));
  int unit = 0;
  for (int c = 0; c < C; ++c) {
    const int d = ps.comp[c];
    if (d < c) continue;
    const int units = d == c ? in_class[c] / 2 : in_class[c];
    for (int u = 0; u < units; ++u, ++unit) {
      ++quota[c][unit % R];
      ++quota[d][unit % R];
    }
  }
  // Experts as runs of consecutive copies [first, last): heavier classes first, then most
  // copies, then heaviest copies.
  std::vector<std::pair<int, int>> runs;
  for (int first = 0, last = 0; first < S; first = last) {
    while (last < S && expert_of[last] == expert_of[first]) ++last;
    runs.emplace_back(first, last);
  }
  std::stable_sort(runs.begin(), runs.end(), [&](auto x, auto y) {
    const int cx = ps.cls[x.first], cy = ps.cls[y.first];
    if (cx != cy) return class_weight[cx] > class_weight[cy] || (class_weight[cx] ==
                                                                 class_weight[cy] && cx < cy);
    if (x.second - x.first != y.second - y.first) return x.second - x.first > y.second - y.first;
    return w[x.first] > w[y.first];
  });
  bin_of.assign(S, -1);
  std::vector<double> load(R, 0.0);
  std::vector<int> bins(R);
  for (auto [first, last] : runs) {
    std::vector<int>& q = quota[ps.cls[first]];
    std::iota(bins.begin(), bins.end(), 0);
    std::sort(bins.begin(), bins.end(), [&](int x, int y) {
      return q[x] > q[y] || (q[x] == q[y] && (load[x] < load[y] || (load[x] == load[y] && x < y)));
    });
    for (int j = 0; j < last - first; ++j) {
      const int b = bins[j];
      if (q[b] == 0) return false;
      --q[b];
      bin_of[first + j] = b;
      load[b] += w[first + j];
    }
  }
  return true;
}

// The S copies into R bins of k: starts (LPT skipping bins that hold the expert and balanced
// differencing, or in paired mode the paired unit starts), repaired by separate_copies, plus the
// always-valid dealt start; then the best descent under both rules.  ps (paired mode): the
// copies' pair structure.  distinct: expert_of when copies must sit on distinct bins, null when
// they may stack (then every start is valid as it is).  Throws when no start keeps both rules
// (paired mode only).
inline std::vector<int> place_copies(const std::vector<double>& w, const std::vector<double>& s,
                                     const PairStructure* ps, const std::vector<int>& expert_of,
                                     const std::vector<int>* distinct, int R, int k, double target,
                                     int max_iters, double* value, const std::vector<int>& desc) {
  const int S = static_cast<int>(w.size());
  std::vector<Bins> starts, valid;
  if (ps) {
    starts = paired_starts(w, *ps, R, k, target, &desc);
  } else {
    starts.emplace_back(w, distinct ? distinct_lpt(w, expert_of, R, k, desc)
                                    : lpt_cardinality(w, R, k, &desc), R, k);
    starts.emplace_back(w, balanced_differencing(w, R, k, &desc), R, k);
  }
  auto allowed = [&](int x, int y) { return !ps || ps->cls[x] == ps->cls[y]; };
  for (Bins& b : starts)
    if (!distinct || separate_copies(w, expert_of, b, allowed)) valid.push_back(std::move(b));
  std::vector<int> dealt;
  if (!ps)
    valid.emplace_back(w, deal_copies(S, R), R, k);
  else if (distinct && deal_paired_copies(w, *ps, expert_of, R, dealt))
    valid.emplace_back(w, dealt, R, k);
  if (valid.empty())
    fail("the copies cannot be placed with complementary pairs on every rank and an expert's "
         "copies on distinct ranks: use fewer num_replicas or balance='compute'");
  return best_of_starts(
      valid, target,
      [&](Bins& bins) {
        return ps ? paired_descent(w, s, *ps, bins, target, max_iters, distinct)
                  : swap_descent(w, bins, target, max_iters, distinct);
      },
      value);
}

// Experts of each physical slot, rank by rank, ascending inside a rank (items are in expert
// order); expert_of null: every item is its own expert.
inline std::vector<int> slot_experts(const std::vector<int>& rank_of_item,
                                     const std::vector<int>* expert_of, int R) {
  const int S = static_cast<int>(rank_of_item.size());
  const int k = S / R;
  std::vector<int> slots(S), fill(R, 0);
  for (int i = 0; i < S; ++i) {
    const int r = rank_of_item[i];
    assert(r >= 0 && r < R && fill[r] < k);  // exactly k slots per rank
    slots[static_cast<size_t>(r) * k + fill[r]++] = expert_of ? (*expert_of)[i] : i;
  }
  return slots;
}

}  // namespace modse_planner
