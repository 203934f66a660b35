// Exact re-split of three bins: a large neighbourhood for when two-bin exchanges are stuck.
//
// Swap descent (planner_local_search.h) stops at plans where no exchange between *two* bins
// lowers the heaviest.  In paired mode that is often far from optimal: lowering the heaviest
// bin may need a complementary pair assembled from experts that sit in two different bins
// (measured: 2-bin local optima up to 8% above the optimum on 32 experts, 8 ranks, k = 4).
// resplit_descent takes the heaviest bin h and two other bins, pools their experts and
// re-partitions them optimally (branch and bound, atoms heaviest first, bins interchangeable,
// a node budget per try), keeping the cardinality of every bin and the validity rule of the
// problem; whenever the three bins' new maximum is below h's load, it applies the split and
// lets the caller's two-bin descent continue.
//
// Used for k = 4 (two pairs per rank, the common MoDSE layout): 12 experts, at most 5775
// splits.  The max load never rises, so the plan is never worse than the descent's.  For the
// heaviest experts the outlier start (paired_outlier_plan) builds what no local move reaches.
#pragma once

#include <algorithm>
#include <array>

#include "planner_local_search.h"
#include "planner_pairs.h"

namespace modse_planner {

// Optimal split of atoms (weights aw, size classes ac) into 3 bins of `per_bin` atoms each,
// minimising the heaviest, every full bin a union of complementary pairs (comp: the
// complementary class of each class).  Returns true and fills bin_of_atom if a split with
// max < bound was found (the best one found within `budget` nodes).  With `ae` (replicas: the
// expert of each atom) no bin takes two copies of one expert.
class ThreeWaySplit {
 public:
  ThreeWaySplit(const std::vector<double>& aw, const std::vector<int>& ac,
                const std::vector<int>& comp, int per_bin, int64_t budget,
                const std::vector<int>* ae = nullptr)
      : aw_(aw), ac_(ac), comp_(comp), ae_(ae), per_bin_(per_bin), budget_(budget),
        order_(order_desc(aw)), slot_(aw.size(), -1) {
    counts_.assign(3, std::vector<int>(comp_.size(), 0));
    suffix_.assign(aw.size() + 1, 0.0);
    for (int i = static_cast<int>(aw.size()) - 1; i >= 0; --i)
      suffix_[i] = suffix_[i + 1] + aw_[order_[i]];
  }

  bool run(double bound, std::vector<int>& bin_of_atom, double& value) {
    best_ = bound;
    found_ = false;
    dfs(0);
    if (!found_) return false;
    bin_of_atom = best_bins_;
    value = best_;
    return true;
  }

  int64_t nodes() const { return nodes_; }

 private:
  // Can a bin with these class counts and `free` open slots still become a union of pairs?
  bool pairable(const std::vector<int>& cnt, int free) const {
    int need = 0;
    for (size_t c = 0; c < comp_.size(); ++c) {
      const int d = comp_[c];
      if (d == static_cast<int>(c)) {
        need += cnt[c] & 1;
      } else if (d > static_cast<int>(c)) {
        need += std::abs(cnt[c] - cnt[d]);
      }
    }
    return need <= free;
  }

  bool has_expert(int b, int atom) const {
    if (!ae_) return false;
    for (size_t a = 0; a < slot_.size(); ++a)
      if (slot_[a] == b && (*ae_)[a] == (*ae_)[atom]) return true;
    return false;
  }

  void dfs(int depth) {
    if (++nodes_ > budget_) return;
    const int total = static_cast<int>(order_.size());
    if (depth == total) {
      const double v = std::max({load_[0], load_[1], load_[2]});
      if (v < best_) {
        best_ = v;
        found_ = true;
        best_bins_ = slot_;
      }
      return;
    }
    // The heaviest final bin weighs at least the mean of the three final loads: prune if even
    // that cannot beat the incumbent.
    const double mean_final = (load_[0] + load_[1] + load_[2] + suffix_[depth]) / 3.0;
    if (mean_final >= best_) return;
    const int atom = order_[depth];
    std::array<int, 3> tries{0, 1, 2};
    std::sort(tries.begin(), tries.end(), [&](int x, int y) { return load_[x] < load_[y]; });
    bool tried_empty = false;
    for (int b : tries) {
      if (count_[b] == per_bin_) continue;
      if (count_[b] == 0) {  // empty bins are interchangeable: try one of them
        if (tried_empty) continue;
        tried_empty = true;
      }
      if (load_[b] + aw_[atom] >= best_ || has_expert(b, atom)) continue;
      load_[b] += aw_[atom];
      ++count_[b];
      ++counts_[b][ac_[atom]];
      if (pairable(counts_[b], per_bin_ - count_[b])) {
        slot_[atom] = b;
        dfs(depth + 1);
      }
      slot_[atom] = -1;
      --counts_[b][ac_[atom]];
      --count_[b];
      load_[b] -= aw_[atom];
      if (nodes_ > budget_) return;
    }
  }

  const std::vector<double>& aw_;
  const std::vector<int>& ac_;
  const std::vector<int>& comp_;
  const std::vector<int>* ae_;
  int per_bin_;
  int64_t budget_, nodes_ = 0;
  std::vector<int> order_, slot_, best_bins_;
  std::vector<double> suffix_;
  std::vector<std::vector<int>> counts_;
  std::array<double, 3> load_{0.0, 0.0, 0.0};
  std::array<int, 3> count_{0, 0, 0};
  double best_ = 0.0;
  bool found_ = false;
};

// Paired mode, two complementary pairs per rank (k = 4): alternate three-bin re-splits of the
// heaviest bin with the caller's two-bin descent (`descend_fn(bins)` -> max load) until neither
// helps or `target` is reached.  Partners: every pair of the 8 lightest other bins,
// lightest pairs first.  (For k > 4 the re-split of 3k experts is too costly for what it
// gained in measurements; the outlier start below covers the cases that matter there.)
template <class Descend>
double resplit_descent(const std::vector<double>& w, const PairStructure& ps, Bins& bins,
                       double target, int max_rounds, Descend&& descend_fn,
                       const std::vector<int>* expert_of = nullptr) {
  const int R = bins.R, k = bins.k;
  double value = max_of(bins.load);
  if (R < 3 || k != 4) return value;
  constexpr int kPartners = 8;            // 28 partner pairs; 16 gained nothing measurable
  constexpr int64_t kBudget = 20000;      // nodes per three-bin search (5775 leaves at most)
  constexpr int64_t kTotal = 2000000;     // nodes per call: a few ms at worst
  int64_t spent = 0;
  std::vector<int> others, atoms, ac, ae, split;
  std::vector<double> aw;
  std::vector<std::pair<int, int>> tries;
  for (int round = 0; round < max_rounds && value > target + eps_of(target) && spent < kTotal;
       ++round) {
    const int h = bins.heaviest();
    const double hi = bins.load[h];
    others.clear();
    for (int r = 0; r < R; ++r)
      if (r != h) others.push_back(r);
    const int m = std::min<int>(kPartners, static_cast<int>(others.size()));
    std::partial_sort(others.begin(), others.begin() + m, others.end(),
                      [&](int x, int y) { return bins.load[x] < bins.load[y]; });
    tries.clear();
    for (int i = 0; i < m; ++i)
      for (int j = i + 1; j < m; ++j) tries.emplace_back(others[i], others[j]);
    std::stable_sort(tries.begin(), tries.end(), [&](auto x, auto y) {
      return bins.load[x.first] + bins.load[x.second] < bins.load[y.first] + bins.load[y.second];
    });
    bool moved = false;
    for (auto [r1, r2] : tries) {
      const int trio[3] = {h, r1, r2};
      atoms.clear();
      aw.clear();
      ac.clear();
      ae.clear();
      for (int b : trio)
        for (int slot = 0; slot < k; ++slot) {
          const int e = bins.items[static_cast<size_t>(b) * k + slot];
          atoms.push_back(e);
          aw.push_back(w[e]);
          ac.push_back(ps.cls[e]);
          if (expert_of) ae.push_back((*expert_of)[e]);
        }
      ThreeWaySplit solver(aw, ac, ps.comp, k, kBudget, expert_of ? &ae : nullptr);
      double v = 0.0;
      const bool found = solver.run(hi - eps_of(hi), split, v);
      spent += solver.nodes();
      if (!found) {
        if (spent >= kTotal) break;
        continue;
      }
      std::vector<int> assignment = bins.bin_of;  // atom a goes to trio[split[a]]
      for (size_t a = 0; a < atoms.size(); ++a) assignment[atoms[a]] = trio[split[a]];
      bins = Bins(w, assignment, R, k);
      moved = true;
      break;
    }
    if (!moved) break;
    value = descend_fn(bins);
  }
  return max_of(bins.load);
}

// Paired two-bin descent, then three-bin re-splits while they help.
inline double paired_improve(const std::vector<double>& w, const std::vector<double>& s,
                             const PairStructure& ps, Bins& bins, double target, int max_iters) {
  auto descend_fn = [&](Bins& b) { return paired_descent(w, s, ps, b, target, max_iters); };
  const double v = descend_fn(bins);
  if (v <= target + eps_of(target)) return v;
  return resplit_descent(w, ps, bins, target, max_iters, descend_fn);
}

// A plan from paired_heuristic, improved by three-bin re-splits; *value updated.  With replicas
// (expert_of) both kinds of move keep an expert's copies on distinct bins.
inline void paired_resplit(const std::vector<double>& w, const std::vector<double>& s,
                           const PairStructure& ps, int R, int k, double target, int max_iters,
                           std::vector<int>& bin_of, double& value,
                           const std::vector<int>* expert_of = nullptr) {
  if (value <= target + eps_of(target)) return;
  Bins bins(w, bin_of, R, k);
  auto descend_fn = [&](Bins& b) {
    return paired_descent(w, s, ps, b, target, max_iters, expert_of);
  };
  const double v = resplit_descent(w, ps, bins, target, max_iters, descend_fn, expert_of);
  if (v < value) {
    value = v;
    bin_of = bins.bin_of;
  }
}

// Outlier start.  When one expert is so heavy that even its cheapest possible bin (its
// lightest complement plus the m - 1 cheapest further complementary pairs, the partner bound
// of planner_bounds.h) weighs at least the average of the other bins, that bin is optimal for
// it: give it exactly that, and repeat on the rest.  The remaining experts (a union of
// complementary pairs still) are planned by paired_heuristic and the whole plan improved by
// paired_improve.  Swap descent rarely finds such plans: assembling the cheapest pairs for the
// heaviest expert takes experts from many bins at once.  Returns false if no bin was fixed.
inline bool paired_outlier_plan(const std::vector<double>& w, const std::vector<double>& s,
                                const PairStructure& ps, int R, int k, double target,
                                int max_iters, std::vector<int>& bin_of, double& value) {
  const int n = static_cast<int>(w.size());
  const int m = k / 2;
  if (k < 4 || R < 3) return false;
  const std::vector<int> heavy = order_desc(w);
  std::vector<int> out(n, -1), live;
  double rest_total = 0.0;
  for (double x : w) rest_total += x;
  int fixed = 0;
  std::vector<std::pair<int, int>> pairs;
  while (R - fixed > 2) {
    live.clear();
    for (int e : heavy)
      if (out[e] < 0) live.push_back(e);
    const int e = live.front();
    const auto members = class_members(w, ps.cls, ps.num_classes, live);
    const int f = lightest_partner(members, ps.cls, ps.comp, e);
    if (f < 0) break;
    pairs.clear();
    const double rest = cheapest_pairs(w, members, ps.comp, m - 1, 0, e, f, &pairs)[m - 1];
    if (!(rest < std::numeric_limits<double>::infinity())) break;
    const double bin = w[e] + w[f] + rest;
    if (bin < (rest_total - bin) / (R - fixed - 1)) break;  // not an outlier
    out[e] = out[f] = fixed;
    for (auto [x, y] : pairs) out[x] = out[y] = fixed;
    rest_total -= bin;
    ++fixed;
  }
  if (fixed == 0) return false;
  std::vector<int> idx;
  std::vector<double> w2, s2;
  for (int e = 0; e < n; ++e)
    if (out[e] < 0) {
      idx.push_back(e);
      w2.push_back(w[e]);
      s2.push_back(s[e]);
    }
  const PairStructure ps2 = detect_pairs(s2);
  if (!ps2.found) return false;
  double v2 = 0.0;
  const std::vector<int> sub = paired_heuristic(w2, ps2, s2, R - fixed, k, target, max_iters, &v2);
  for (size_t i = 0; i < idx.size(); ++i) out[idx[i]] = fixed + sub[i];
  Bins bins(w, out, R, k);
  value = paired_improve(w, s, ps, bins, target, max_iters);
  bin_of = bins.bin_of;
  return true;
}

}  // namespace modse_planner
