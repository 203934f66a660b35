// Copy counts chosen jointly with the placement (redundant replicas, planner_replicas.h).
//
// EPLB's greedy counts minimise the heaviest *copy*, not the heaviest *rank*: on sizes [1]*4,
// loads [26, 2, 23, 27], 2 ranks and 2 replicas they copy experts 3 and 0 (best plan 49.5),
// while copying the light expert 1 and expert 2 allows 39.5 (with exactly k slots per rank,
// copies of a light expert are cheap fillers).  So the greedy counts are only the start of:
//  * count_descent: local search whose moves are the placement's exchanges (the caller's swap /
//    paired descent, re-splits) plus count moves: one copy of an expert a (with >= 2 copies)
//    becomes, in the same slot, a copy of another expert b.  a's other copies get heavier (w_a / (c_a - 1)),
//    b's lighter (w_b / (c_b + 1)).  A count move is taken when it lowers the heaviest rank h and
//    leaves every rank it touches below h's old load (the rule of the exchanges, so the sorted
//    loads fall lexicographically and the search ends); of those, the one with the lowest
//    touched maximum, and only when the exchanges are stuck.  Candidates touch h: a copy on h
//    becomes any b (h sheds a's share), or a copy elsewhere becomes an expert b that h holds
//    (h's copy of b gets lighter).  Paired mode: a and b of one size class, so every rank keeps
//    its sizes (complementary pairs, equal memory).  Copies stay on distinct ranks unless they
//    may stack.  When stuck, a few perturbations (count moves that lower only h, kept if the
//    descent after them ends lower) escape local optima on skewed loads.
//  * exact_counts (small layers, n + num_replicas <= exact_max_experts): every count vector,
//    the most promising (lowest bound) first, branch and bound for each against the best plan so
//    far.  When it completes within the node budget the plan is optimal over every choice of
//    counts and placement, which proves it (the lower bound is raised to it).
#pragma once

#include <limits>
#include <tuple>
#include <utility>

#include "planner_exact.h"
#include "planner_replicas.h"

namespace modse_planner {

// Most count vectors exact_counts enumerates; with more it only solves the incumbent's counts
// exactly (n + extra <= exact_max_experts, so this limits many experts with few replicas each).
constexpr int kMaxCountVectors = 4000;

// The copies as mutable items: a count move changes an item's expert and the weights of every
// copy of the two experts involved, never an item's bin or slot.
struct CopySet {
  const std::vector<double>& ew;  // per expert: weight (load x size), size, load
  const std::vector<double>& es;
  const std::vector<double>& et;
  std::vector<int> count;                  // copies per expert
  std::vector<int> expert_of;              // per item
  std::vector<double> w, s, t;             // per item: ew / count, es, et / count
  std::vector<std::vector<int>> items_of;  // per expert

  // Items in expand_copies' order (an expert's copies consecutive), so a plan of those copies
  // is a plan of these items.
  CopySet(const std::vector<double>& w_e, const std::vector<double>& s_e,
          const std::vector<double>& t_e, const std::vector<int>& counts)
      : ew(w_e), es(s_e), et(t_e), count(counts), items_of(counts.size()) {
    for (size_t e = 0; e < counts.size(); ++e)
      for (int j = 0; j < counts[e]; ++j) {
        items_of[e].push_back(static_cast<int>(expert_of.size()));
        expert_of.push_back(static_cast<int>(e));
        s.push_back(es[e]);
        w.push_back(ew[e] / counts[e]);
        t.push_back(et[e] / counts[e]);
      }
  }

  // What count moves change, to undo a tried move.
  struct State {
    std::vector<int> count, expert_of;
    std::vector<double> w, s, t;
    std::vector<std::vector<int>> items_of;
  };
  State state() const { return State{count, expert_of, w, s, t, items_of}; }
  void restore(const State& x) {
    count = x.count;
    expert_of = x.expert_of;
    w = x.w;
    s = x.s;
    t = x.t;
    items_of = x.items_of;
  }

  // Bin of every copy in expand_copies' order for the current counts, from the items' bins.
  std::vector<int> canonical_bins(const std::vector<int>& bin_of) const {
    std::vector<int> out;
    out.reserve(bin_of.size());
    for (const auto& items : items_of)
      for (int x : items) out.push_back(bin_of[x]);
    return out;
  }
};

class CountSearch {
 public:
  // cap: most copies per expert; distinct: copies of one expert on distinct bins; cls (paired
  // mode): size class of each expert, count moves only inside a class (null: any two experts).
  CountSearch(CopySet& cs, Bins& bins, int cap, bool distinct, const std::vector<int>* cls)
      : cs_(cs), bins_(bins), cap_(cap), distinct_(distinct), cls_(cls), delta_(bins.R, 0.0),
        mark_(bins.R, 0), on_h_(cs.count.size(), 0) {}

  // The best count move for the heaviest bin (item x becomes a copy of expert `to`); false
  // when none helps.  kicks (when not null): instead, every move that lowers h whatever it does
  // to other bins, as (max touched load, item, expert), for count_descent's perturbations.
  bool find(int& item, int& to, std::vector<std::tuple<double, int, int>>* kicks = nullptr) {
    const int h = bins_.heaviest(), k = bins_.k;
    const double hi = bins_.load[h];
    double limit = hi - eps_of(hi);
    item = to = -1;
    kicks_ = kicks;
    if (kicks) kicks->clear();
    const int n = static_cast<int>(cs_.count.size());
    const int* row = &bins_.items[static_cast<size_t>(h) * k];
    for (int i = 0; i < k; ++i) ++on_h_[cs_.expert_of[row[i]]];
    for (int i = 0; i < k; ++i) {  // a copy on h becomes a copy of b
      const int x = row[i], a = cs_.expert_of[x];
      if (cs_.count[a] < 2 || first_on_h(row, i) != i) continue;  // one try per expert
      const int ca = cs_.count[a];
      const double wa = cs_.ew[a], grow = wa / (ca - 1) - wa / ca;
      const double h_without = hi - wa / ca + (on_h_[a] - 1) * grow;
      for (int b = 0; b < n; ++b) {
        if (!movable(a, b) || (distinct_ && on_h_[b] > 0)) continue;
        const int cb = cs_.count[b];
        const double wb = cs_.ew[b];
        // h's new load exactly; the full check (every touched bin) only when h alone passes.
        if (h_without + wb / (cb + 1) + on_h_[b] * (wb / (cb + 1) - wb / cb) >= limit) continue;
        consider(x, b, h, limit, item, to, hi);
      }
    }
    for (int i = 0; i < k; ++i) {  // a copy elsewhere becomes a copy of b, which h holds
      const int b = cs_.expert_of[row[i]];
      if (cs_.count[b] >= cap_ || first_on_h(row, i) != i) continue;
      const int cb = cs_.count[b];
      const double h_shrunk = hi + on_h_[b] * (cs_.ew[b] / (cb + 1) - cs_.ew[b] / cb);
      for (int a = 0; a < n; ++a) {
        if (cs_.count[a] < 2 || !movable(a, b)) continue;
        const int ca = cs_.count[a];
        const double grow = cs_.ew[a] / (ca - 1) - cs_.ew[a] / ca;
        if (h_shrunk + on_h_[a] * grow >= limit) continue;  // h's new load, whichever copy moves
        for (int x : cs_.items_of[a]) {
          const int r = bins_.bin_of[x];
          if (r == h || (distinct_ && holds(bins_, r, b, cs_.expert_of))) continue;
          consider(x, b, h, limit, item, to, hi);
        }
      }
    }
    for (int i = 0; i < k; ++i) on_h_[cs_.expert_of[row[i]]] = 0;
    return item >= 0;
  }

  // Item x (a copy of a) becomes a copy of b; weights and the touched bins' loads updated.
  void apply(int x, int b) {
    const int a = cs_.expert_of[x];
    auto& from = cs_.items_of[a];
    from.erase(std::find(from.begin(), from.end(), x));
    cs_.items_of[b].push_back(x);
    --cs_.count[a];
    ++cs_.count[b];
    cs_.expert_of[x] = b;
    cs_.s[x] = cs_.es[b];
    for (int e : {a, b})
      for (int y : cs_.items_of[e]) {
        cs_.w[y] = cs_.ew[e] / cs_.count[e];
        cs_.t[y] = cs_.et[e] / cs_.count[e];
      }
    for (int e : {a, b})  // exact sums for the touched bins (no drift from increments)
      for (int y : cs_.items_of[e]) reload(bins_.bin_of[y]);
  }

 private:
  // Index of the first item of row[i]'s expert on h (stacked copies: one pass per expert).
  int first_on_h(const int* row, int i) const {
    const int e = cs_.expert_of[row[i]];
    int j = 0;
    while (cs_.expert_of[row[j]] != e) ++j;
    return j;
  }

  bool movable(int a, int b) const {
    if (a == b || cs_.count[b] >= cap_) return false;
    return !cls_ || (*cls_)[a] == (*cls_)[b];
  }

  void add(int r, double d) {
    if (!mark_[r]) {
      mark_[r] = 1;
      touched_.push_back(r);
    }
    delta_[r] += d;
  }

  // Take x -> b if h is touched and every touched bin ends below `limit` (then the new limit).
  void consider(int x, int b, int h, double& limit, int& item, int& to, double hi) {
    const int a = cs_.expert_of[x];
    const int ca = cs_.count[a], cb = cs_.count[b];
    const double wa = cs_.ew[a], wb = cs_.ew[b];
    const double grow = wa / (ca - 1) - wa / ca, shrink = wb / (cb + 1) - wb / cb;
    for (int y : cs_.items_of[a]) add(bins_.bin_of[y], y == x ? -wa / ca : grow);
    add(bins_.bin_of[x], wb / (cb + 1));
    for (int z : cs_.items_of[b]) add(bins_.bin_of[z], shrink);
    double value = -std::numeric_limits<double>::infinity();
    for (int r : touched_) value = std::max(value, bins_.load[r] + delta_[r]);
    const bool h_touched = mark_[h] != 0;
    const double h_after = bins_.load[h] + delta_[h];
    for (int r : touched_) {
      delta_[r] = 0.0;
      mark_[r] = 0;
    }
    touched_.clear();
    if (kicks_) {
      if (h_touched && h_after < hi - eps_of(hi)) kicks_->emplace_back(value, x, b);
      return;
    }
    if (h_touched && value < limit) {
      limit = value;
      item = x;
      to = b;
    }
  }

  void reload(int r) {
    const int k = bins_.k;
    double sum = 0.0;
    for (int j = 0; j < k; ++j) sum += cs_.w[bins_.items[static_cast<size_t>(r) * k + j]];
    bins_.load[r] = sum;
  }

  CopySet& cs_;
  Bins& bins_;
  int cap_;
  bool distinct_;
  const std::vector<int>* cls_;
  std::vector<double> delta_;
  std::vector<char> mark_;
  std::vector<int> touched_, on_h_;  // on_h_: copies of each expert on h (inside find)
  std::vector<std::tuple<double, int, int>>* kicks_ = nullptr;
};

// Exchanges (descend_fn(bins) -> max load over cs.w) until stuck, then the best count move, and
// again, until neither helps, `target` is reached or max_iters count moves were made.  When no
// count move keeps every bin below the heaviest, perturbations: up to kKicks moves that only
// lower the heaviest bin (lowest touched maximum first), each followed by the descent and kept
// only if the result is better, else undone; kKickBudget tries per call, and only while the
// plan is more than kKickGap above the target (near-uniform layers gain nothing measurable
// there, measured: 0.06% -> 0.03% for 4x the time).  They matter on skewed loads, where a
// better count vector needs a bin to take a heavier copy first (Zipf 1.5, 256 experts, 64
// ranks, 64 replicas: gap to the bound 6.9% -> 2.2%).  Returns the max load; cs and bins hold
// the result.  Never worse than the start.
constexpr int kKicks = 4;
constexpr int kKickBudget = 16;
constexpr double kKickGap = 1e-3;

template <class Descend>
double count_descent(CopySet& cs, Bins& bins, int cap, bool distinct, const std::vector<int>* cls,
                     double target, int max_iters, Descend&& descend_fn) {
  int budget = kKickBudget;
  CountSearch search(cs, bins, cap, distinct, cls);
  double value = descend_fn(bins);
  int item = -1, to = -1;
  std::vector<std::tuple<double, int, int>> kicks;
  for (int iter = 0; iter < max_iters && value > target + eps_of(target); ++iter) {
    if (search.find(item, to)) {
      search.apply(item, to);
      value = descend_fn(bins);
      continue;
    }
    if (value <= target * (1.0 + kKickGap) || budget <= 0) break;
    search.find(item, to, &kicks);
    const int tries = std::min({kKicks, budget, static_cast<int>(kicks.size())});
    budget -= tries;
    std::partial_sort(kicks.begin(), kicks.begin() + tries, kicks.end());
    bool kept = false;
    for (int i = 0; i < tries && !kept; ++i) {
      const CopySet::State saved = cs.state();
      const Bins saved_bins = bins;
      search.apply(std::get<1>(kicks[i]), std::get<2>(kicks[i]));
      const double v = descend_fn(bins);
      if (v < value - eps_of(value)) {
        value = v;
        kept = true;
      } else {
        cs.restore(saved);
        bins = saved_bins;
      }
    }
    if (!kept) break;
  }
  return max_of(bins.load);
}

// Count vectors: 1..cap copies per expert summing to n + extra; false when there are more than
// kMaxCountVectors.  ps (paired mode, the experts' pair structure): only vectors whose class
// totals equal their complement's (the middle class's even), the condition for the copies to
// form complementary pairs again.
inline bool count_vectors(int n, int extra, int cap, const PairStructure* ps,
                          std::vector<std::vector<int>>& out) {
  std::vector<int> c(n, 1), total(ps ? ps->num_classes : 0, 0);
  bool overflow = false;
  auto balanced = [&]() {
    if (!ps) return true;
    std::fill(total.begin(), total.end(), 0);
    for (int e = 0; e < n; ++e) total[ps->cls[e]] += c[e];
    for (int x = 0; x < ps->num_classes; ++x) {
      const int y = ps->comp[x];
      if (y == x ? total[x] % 2 != 0 : total[x] != total[y]) return false;
    }
    return true;
  };
  auto rec = [&](auto&& self, int e, int left) -> void {
    if (overflow) return;
    if (e == n - 1) {
      if (left + 1 > cap) return;
      c[e] = 1 + left;
      if (balanced()) {
        if (static_cast<int>(out.size()) >= kMaxCountVectors) {
          overflow = true;
          return;
        }
        out.push_back(c);
      }
      c[e] = 1;
      return;
    }
    for (int add = 0; add <= left && add + 1 <= cap; ++add) {
      c[e] = 1 + add;
      self(self, e + 1, left - add);
    }
    c[e] = 1;
  };
  rec(rec, 0, extra);
  return !overflow;
}

enum class CountProof : int {
  kAllCounts = 0,   // no counts and placement beat the result: optimal
  kTheseCounts = 1,  // too many count vectors; optimal for the result's own counts
  kNone = 2,        // the node budget ran out
};

// Branch and bound against the incumbent (best_value, best_counts, best_bins: bin of every copy
// in expand_copies' order): over every count vector, lowest bound (average, pigeonhole of its
// copies) first, or, with more than kMaxCountVectors, over the incumbent's counts only.  ps:
// the experts' pair structure in paired mode (bins must be unions of complementary pairs).
// solved: counts whose placement is already proven optimal (skipped; may be null).  The
// incumbent is replaced whenever a search finds a better plan.
inline CountProof exact_counts(const std::vector<double>& w, const std::vector<double>& s,
                               const PairStructure* ps, int R, int k, int extra, int cap,
                               bool distinct, int64_t budget, const std::vector<int>* solved,
                               double& best_value, std::vector<int>& best_counts,
                               std::vector<int>& best_bins) {
  const int n = static_cast<int>(w.size());
  std::vector<std::vector<int>> vectors;
  const bool all = count_vectors(n, extra, cap, ps, vectors);
  if (!all) vectors.assign(1, best_counts);
  if (solved) vectors.erase(std::remove(vectors.begin(), vectors.end(), *solved), vectors.end());
  std::vector<double> bound(vectors.size());
  const std::vector<double> zero(n, 0.0);
  double total = 0.0;
  for (double x : w) total += x;
  for (size_t i = 0; i < vectors.size(); ++i)  // copies expanded again below, not kept: memory
    bound[i] = std::max(total / R,
                        cardinality_lower_bound(expand_copies(vectors[i], s, zero, w).w, R, k));
  std::vector<int> order(vectors.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return bound[x] < bound[y]; });
  const CountProof proof = all ? CountProof::kAllCounts : CountProof::kTheseCounts;
  for (int i : order) {
    if (bound[i] >= best_value - eps_of(best_value)) return proof;  // sorted: none can beat it
    if (budget <= 0) return CountProof::kNone;
    const Copies c = expand_copies(vectors[i], s, zero, w);
    BranchAndBound bnb(c.w, ps ? &c.s : nullptr, ps ? ps->pair_sum : 0.0, R, k, budget,
                       distinct ? &c.expert_of : nullptr);
    std::vector<int> bins(c.w.size(), 0);
    const bool complete = bnb.run(bins, best_value, bound[i]);
    budget -= bnb.nodes;
    if (bnb.improved) {
      best_value = max_of(bin_sums(c.w, bins, R));
      best_counts = vectors[i];
      best_bins = std::move(bins);
    }
    if (!complete) return CountProof::kNone;
  }
  return proof;
}

}  // namespace modse_planner
