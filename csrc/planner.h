// The planner: one MoE layer at a time (layers are independent), many layers per call.
//
// Per layer, goals in order (see planner_common.h for the vocabulary):
//   1. memory:   paired mode keeps complementary pairs together -> equal memory per rank;
//   2. compute:  minimise max_r sum_{e on r} t[e] * s[e] (exact for k <= 2 and small n;
//                paired mode adds an outlier start and three-bin re-splits, resplit.h);
//   3. nodes:    balance token inflow per node without raising max compute (hierarchy.h);
//   4. moves:    among plans equally good on 1-3, move the fewest bytes from `previous`
//                (warm start from it + relabelling, relabel.h).
// With num_replicas > 0 the items placed are copies of experts (replicas.h): greedy counts, the
// same stages on the copies (on distinct ranks unless stack_copies), then with joint_counts a
// search over counts and placement together (counts.h); `previous` is not supported.
// With num_groups (groups.h) groups of experts go to nodes first, then every node is planned as
// above on its own ranks.
#pragma once

#include <atomic>
#include <exception>
#include <mutex>
#include <thread>

#include "planner_bounds.h"
#include "planner_counts.h"
#include "planner_exact.h"
#include "planner_groups.h"
#include "planner_heuristic.h"
#include "planner_hierarchy.h"
#include "planner_pairs.h"
#include "planner_relabel.h"
#include "planner_replicas.h"
#include "planner_resplit.h"

namespace modse_planner {

inline LayerPlan solve_layer(const double* sizes, const double* loads, const int* previous, int n,
                             const Options& o, const std::string& where,
                             const PairStructure* shared_pairs);

namespace detail {

struct Candidate {
  std::vector<int> bin_of;
  double value = 0.0;
  Method method = Method::kHeuristic;
};

// The pair structure of expert sizes s when paired mode applies with k slots per rank (else
// found = false).  shared: the structure of these sizes when the caller already knows it
// (batched layers sharing one size row detect it once).
inline PairStructure pairs_if_paired(const Options& o, int k, const std::vector<double>& s,
                                     const PairStructure* shared) {
  const bool all_equal = *std::max_element(s.begin(), s.end()) ==
                         *std::min_element(s.begin(), s.end());
  // Equal sizes need no pairing: memory is equal whatever the plan, so don't constrain it.
  if (o.balance != Balance::kMemoryThenCompute || k % 2 != 0 || all_equal) return PairStructure();
  return shared ? *shared : detect_pairs(s);
}

// One layer's placement problem: n items, k per rank.  Items are the experts, or with replicas
// the copies (expert_of: the expert of each copy; ps then is the copies' pair structure;
// distinct: expert_of when copies must sit on distinct bins, null when they may stack).
struct Layer {
  const Options& o;
  int n, R, k, g, N;
  std::vector<double> s, t, w;
  std::vector<int> desc;  // items by compute, heaviest first: sorted once, shared
  const int* previous;
  PairStructure ps;
  bool paired = false;
  const std::vector<int>* cls = nullptr;
  const std::vector<int>* expert_of;
  const std::vector<int>* distinct;
  int max_iters;

  Layer(const Options& opt, std::vector<double> sizes, std::vector<double> loads,
        std::vector<double> weights, const int* prev, PairStructure pairs,
        const std::vector<int>* copies_of = nullptr, bool copies_distinct = true)
      : o(opt), n(static_cast<int>(sizes.size())), R(opt.num_ranks), k(n / opt.num_ranks),
        g(opt.ranks_per_node > 0 ? opt.ranks_per_node : opt.num_ranks), N(R / g),
        s(std::move(sizes)), t(std::move(loads)), w(std::move(weights)), previous(prev),
        ps(std::move(pairs)), paired(ps.found), expert_of(copies_of),
        distinct(copies_distinct ? copies_of : nullptr), max_iters(2 * n + 64) {
    desc = order_desc(w);
    if (paired) cls = &ps.cls;
  }

  double lower_bound() const {
    double lb = cardinality_lower_bound(w, R, k, &desc);
    if (paired) lb = std::max(lb, paired_lower_bound(w, ps.cls, ps.comp, R, k, &desc));
    return lb;
  }

  // The best plan we can find from scratch; `proven` = its value is the optimum (with
  // replicas: for these copies; largest-with-smallest is not exact once copies must part).
  Candidate fresh(double lb, bool& proven) const {
    Candidate c;
    proven = true;
    if (k == 1) {
      c.bin_of = one_per_bin(n);
      c.method = Method::kOneExpertPerRank;
    } else if (k == 2 && !distinct) {
      c.bin_of = paired ? paired_exact_k2(w, ps, &desc) : exact_k2(w, &desc);
      c.method = Method::kExactPairing;
    } else {
      double v = 0.0;
      const double target = lb * (1.0 + o.good_enough);
      if (expert_of)
        c.bin_of = place_copies(w, s, paired ? &ps : nullptr, *expert_of, distinct, R, k, target,
                                max_iters, &v, desc);
      else
        c.bin_of = paired ? paired_heuristic(w, ps, s, R, k, target, max_iters, &v, &desc)
                          : heuristic_partition(w, R, k, target, max_iters, &v, &desc);
      if (paired) {
        paired_resplit(w, s, ps, R, k, target, max_iters, c.bin_of, v, distinct);
        std::vector<int> alt;
        double alt_value = 0.0;
        if (!expert_of && v > target + eps_of(target) &&
            paired_outlier_plan(w, s, ps, R, k, target, max_iters, alt, alt_value) &&
            alt_value < v) {
          c.bin_of = std::move(alt);
          v = alt_value;
        }
      }
      c.method = Method::kHeuristic;
      proven = v <= lb + eps_of(lb);
      if (!proven && n <= o.exact_max_experts) {
        BranchAndBound bnb(w, paired ? &s : nullptr, paired ? ps.pair_sum : 0.0, R, k,
                           o.exact_node_budget, distinct);
        proven = bnb.run(c.bin_of, v, lb);
        if (proven) c.method = Method::kBranchAndBound;
      }
    }
    c.value = max_of(bin_sums(w, c.bin_of, R));
    return c;
  }

  // Sizes this plan may move from `previous` (max_move_fraction of the layer; inf = no limit).
  double move_budget() const {
    if (!previous || o.max_move_fraction >= 1.0) return std::numeric_limits<double>::infinity();
    double total = 0.0;
    for (double x : s) total += x;
    return o.max_move_fraction * total;
  }

  // Swap descent from the previous placement, if that placement is a valid plan here.  Under a
  // move budget only exchanges that keep within it are taken, and no three-bin re-splits.
  bool warm(double lb, Candidate& c) const {
    if (!previous) return false;
    std::vector<int> prev(previous, previous + n);
    if (!counts_are(prev, R, k)) return false;
    if (paired && !bins_are_pairs(s, prev, R, k, ps.pair_sum)) return false;
    Bins bins(w, prev, R, k);
    const double budget = move_budget();
    if (budget < std::numeric_limits<double>::infinity()) bins.set_budget(previous, &s, budget);
    const double target = lb * (1.0 + o.good_enough);
    c.value = !paired    ? swap_descent(w, bins, target, max_iters)
              : bins.home ? paired_descent(w, s, ps, bins, target, max_iters)
                          : paired_improve(w, s, ps, bins, target, max_iters);
    c.bin_of = bins.bin_of;
    c.method = Method::kPrevious;
    return true;
  }

  // Node stage, rank labels and all reported numbers for one candidate.  keep_bins (a warm
  // candidate under a move budget whose node stage or relabelling moved too much): no node
  // stage, bin b stays on rank b.
  LayerPlan finish(Candidate c, bool keep_bins = false) const {
    LayerPlan p;
    std::vector<int> node_of_bin(R);
    for (int b = 0; b < R; ++b) node_of_bin[b] = b / g;  // a warm candidate's bins are old ranks
    if (N > 1) {
      p.node_inflow_bound = cardinality_lower_bound(t, N, k * g);
    } else {
      for (double x : t) p.node_inflow_bound += x;
    }
    if (N > 1 && !keep_bins) {
      const std::vector<int> initial = node_of_bin;
      node_of_bin = group_bins_into_nodes(bin_sums(t, c.bin_of, R), N, g,
                                          c.method == Method::kPrevious ? &initial : nullptr,
                                          max_iters);
      refine_node_inflow(t, w, cls, c.bin_of, node_of_bin, R, N, c.value,
                         p.node_inflow_bound * (1.0 + kNodeGoodEnough), max_iters, distinct);
    }
    std::vector<int> rank_of_bin(R);
    if (keep_bins)
      std::iota(rank_of_bin.begin(), rank_of_bin.end(), 0);
    else
      rank_of_bin = relabel_bins(c.bin_of, node_of_bin, s, previous, R, g);
    std::vector<int> rank_of_item(n);
    for (int i = 0; i < n; ++i) {
      assert(c.bin_of[i] >= 0 && c.bin_of[i] < R);
      rank_of_item[i] = rank_of_bin[c.bin_of[i]];
      assert(rank_of_item[i] >= 0 && rank_of_item[i] < R);
    }
    p.compute_per_rank = bin_sums(w, rank_of_item, R);
    p.memory_per_rank = bin_sums(s, rank_of_item, R);
    p.node_inflow.assign(N, 0.0);
    for (int i = 0; i < n; ++i) p.node_inflow[rank_of_item[i] / g] += t[i];
    p.max_compute = max_of(p.compute_per_rank);
    for (int i = 0; i < n && previous; ++i)
      if (rank_of_item[i] != previous[i]) p.moved_bytes += s[i] * o.bytes_per_param;
    p.slot_expert = slot_experts(rank_of_item, expert_of, R);
    const int experts = expert_of ? expert_of->back() + 1 : n;
    p.rank_of_expert.assign(experts, -1);  // the rank of each expert's first slot
    p.copies.assign(experts, 0);
    for (int slot = 0; slot < n; ++slot) {
      const int e = p.slot_expert[slot];
      if (p.copies[e]++ == 0) p.rank_of_expert[e] = slot / k;
    }
    p.paired = paired;
    p.method = c.method;
    return p;
  }
};

// Joint counts (planner_counts.h) from the greedy-count plan c of `layer`: count moves between
// the layer's exchanges (paired: with three-bin re-splits), then for small layers branch and
// bound over every count vector.  count and c become the result; lb is raised to the result when
// that is proven optimal over every choice of counts.  expert_pairs: the experts' pair structure
// (found iff the layer is paired); cap: most copies per expert; greedy_proven: c is optimal for
// the greedy counts (no need to search them again).
inline void search_counts(const Layer& layer, const std::vector<double>& s,
                          const std::vector<double>& t, const std::vector<double>& w,
                          const PairStructure& expert_pairs, int cap, const Options& o,
                          bool greedy_proven, std::vector<int>& count, Candidate& c,
                          double& lb) {
  const int R = layer.R, k = layer.k, S = layer.n;
  const bool distinct = !o.stack_copies;
  const std::vector<int> greedy = count;
  CopySet cs(w, s, t, count);
  Bins bins(cs.w, c.bin_of, R, k);
  const double target = lb * (1.0 + o.good_enough);
  const std::vector<int>* dist = distinct ? &cs.expert_of : nullptr;
  const PairStructure* ps = layer.paired ? &layer.ps : nullptr;  // per copy: unchanged by moves
  auto exchanges = [&](Bins& b) {
    return ps ? paired_descent(cs.w, cs.s, *ps, b, target, layer.max_iters, dist)
              : swap_descent(cs.w, b, target, layer.max_iters, dist);
  };
  auto descend_fn = [&](Bins& b) {
    const double v = exchanges(b);
    if (!ps || v <= target + eps_of(target)) return v;
    return resplit_descent(cs.w, *ps, b, target, layer.max_iters, exchanges, dist);
  };
  const double v = count_descent(cs, bins, cap, distinct, ps ? &expert_pairs.cls : nullptr,
                                 target, layer.max_iters, descend_fn);
  if (v < c.value - eps_of(c.value)) {
    count = cs.count;
    c.bin_of = cs.canonical_bins(bins.bin_of);
    c.value = v;
  }
  CountProof proof = CountProof::kNone;
  if (S <= o.exact_max_experts && c.value > lb + eps_of(lb))
    proof = exact_counts(w, s, ps ? &expert_pairs : nullptr, R, k, o.num_replicas, cap, distinct,
                         o.exact_node_budget, greedy_proven ? &greedy : nullptr, c.value, count,
                         c.bin_of);
  if (count != greedy) c.method = Method::kHeuristic;
  if (proof != CountProof::kNone) c.method = Method::kBranchAndBound;
  if (proof == CountProof::kAllCounts) lb = std::max(lb, c.value);
}

// Replicas: copy counts, then the copies planned like experts (previous is refused up front),
// then with joint_counts counts and placement searched together.  The bound is
// replica_lower_bound, valid for every choice of counts, raised only by an exact search over
// every count vector (exactness for the chosen counts does not raise it).
inline LayerPlan solve_copies(const std::vector<double>& s, const std::vector<double>& t,
                              const std::vector<double>& w, const Options& o,
                              const std::string& where, const PairStructure* shared) {
  const int n = static_cast<int>(s.size()), R = o.num_ranks, extra = o.num_replicas;
  const int k = (n + extra) / R;
  const bool distinct = !o.stack_copies;
  const int cap = distinct ? R : extra + 1;
  const PairStructure expert_pairs = pairs_if_paired(o, k, s, shared);
  std::vector<int> count = expert_pairs.found
                               ? paired_replica_counts(w, expert_pairs, R, extra, cap, distinct)
                               : replica_counts(w, cap, extra);
  Copies copies = expand_copies(count, s, t, w);
  // Every added pair of copies has complementary sizes, so the copies form pairs again.
  PairStructure copy_pairs = expert_pairs.found ? detect_pairs(copies.s) : PairStructure();
  if (static_cast<int>(copies.w.size()) != n + extra || expert_pairs.found != copy_pairs.found)
    fail(where + "cannot add num_replicas=" + std::to_string(extra) +
         " copies in complementary pairs: use balance='compute'");
  double lb = replica_lower_bound(w, R, k, extra, distinct);
  Layer layer(o, std::move(copies.s), std::move(copies.t), std::move(copies.w), nullptr,
              std::move(copy_pairs), &copies.expert_of, distinct);
  bool proven = false;
  LayerPlan p;
  try {
    Candidate c = layer.fresh(lb, proven);
    const std::vector<int> greedy = count;
    if (o.joint_counts)
      search_counts(layer, s, t, w, expert_pairs, cap, o, proven, count, c, lb);
    if (count == greedy) {
      p = layer.finish(std::move(c));
    } else {  // the copies of the new counts, in the same (expert) order as c.bin_of
      Copies chosen = expand_copies(count, s, t, w);
      PairStructure pairs = layer.paired ? detect_pairs(chosen.s) : PairStructure();
      assert(pairs.found == layer.paired);
      Layer final_layer(o, std::move(chosen.s), std::move(chosen.t), std::move(chosen.w),
                        nullptr, std::move(pairs), &chosen.expert_of, distinct);
      p = final_layer.finish(std::move(c));
    }
  } catch (const std::invalid_argument& e) {
    fail(where + e.what());
  }
  p.lower_bound = lb;
  p.optimal = p.max_compute <= lb + eps_of(lb) + 1e-300;
  return p;
}

// Node-limited groups (planner_groups.h): groups to nodes, then every node's experts (and its
// num_replicas / N copies) planned on its ranks by solve_layer and stitched together.  The bound
// is the larger of the group bound and the planner's bound without groups.
inline LayerPlan solve_groups(const double* sizes, const double* loads, int n, const Options& o,
                              const std::string& where, const PairStructure* shared) {
  const int R = o.num_ranks, g = o.ranks_per_node, N = R / g, G = o.num_groups;
  const int per_group = n / G, X = o.num_replicas, k = (n + X) / R;
  std::vector<double> s(sizes, sizes + n), t(loads, loads + n), w(n);
  for (int e = 0; e < n; ++e) w[e] = t[e] * s[e];
  const PairStructure pairs = pairs_if_paired(o, k, s, shared);
  const std::vector<double> group_w = group_sums(w, per_group);
  const std::vector<int> node_of_group =
      pack_groups(group_w, N, o.exact_max_experts, o.exact_node_budget, 2 * G + 64);
  Options sub = o;
  sub.num_ranks = g;
  sub.ranks_per_node = 0;
  sub.num_groups = 0;
  sub.num_replicas = X / N;
  if (!pairs.found) sub.balance = Balance::kCompute;  // memory only reported, as without groups
  LayerPlan p;
  p.slot_expert.assign(static_cast<size_t>(n) + X, -1);
  p.compute_per_rank.assign(R, 0.0);
  p.memory_per_rank.assign(R, 0.0);
  p.node_inflow.assign(N, 0.0);
  p.paired = pairs.found;
  std::vector<int> experts;
  std::vector<double> ss, ts;
  for (int q = 0; q < N; ++q) {
    experts.clear();
    ss.clear();
    ts.clear();
    for (int grp = 0; grp < G; ++grp)
      if (node_of_group[grp] == q)
        for (int e = grp * per_group; e < (grp + 1) * per_group; ++e) {
          experts.push_back(e);
          ss.push_back(s[e]);
          ts.push_back(t[e]);
          p.node_inflow[q] += t[e];
        }
    const LayerPlan sp =
        solve_layer(ss.data(), ts.data(), nullptr, static_cast<int>(experts.size()), sub, where,
                    nullptr);
    const size_t first = static_cast<size_t>(q) * g * k;
    for (size_t i = 0; i < sp.slot_expert.size(); ++i)
      p.slot_expert[first + i] = experts[sp.slot_expert[i]];
    for (int j = 0; j < g; ++j) {
      p.compute_per_rank[q * g + j] = sp.compute_per_rank[j];
      p.memory_per_rank[q * g + j] = sp.memory_per_rank[j];
    }
    // Groups hold whole pairs (validate_group_layer), so every node pairs up; a node of one
    // size (middle-class experts only) keeps its pairs whatever it does.
    assert(!pairs.found || sp.paired ||
           *std::max_element(ss.begin(), ss.end()) == *std::min_element(ss.begin(), ss.end()));
    p.method = q == 0 || sp.method == p.method ? sp.method : Method::kHeuristic;
  }
  p.max_compute = max_of(p.compute_per_rank);
  p.rank_of_expert.assign(n, -1);
  p.copies.assign(n, 0);
  for (size_t slot = 0; slot < p.slot_expert.size(); ++slot) {
    const int e = p.slot_expert[slot];
    assert(e >= 0 && e < n);
    if (p.copies[e]++ == 0) p.rank_of_expert[e] = static_cast<int>(slot) / k;
  }
  double lb = X > 0 ? replica_lower_bound(w, R, k, X, !o.stack_copies)
                    : cardinality_lower_bound(w, R, k);
  if (X == 0 && pairs.found) lb = std::max(lb, paired_lower_bound(w, pairs.cls, pairs.comp, R, k));
  p.lower_bound = std::max(lb, group_lower_bound(group_w, N, g));
  p.node_inflow_bound = cardinality_lower_bound(group_sums(t, per_group), N, G / N);
  p.optimal = p.max_compute <= p.lower_bound + eps_of(p.lower_bound) + 1e-300;
  return p;
}

// With groups on more than one node, in paired mode every group must hold whole complementary
// pairs (validate_group_sizes).
inline void validate_group_layer(const double* sizes, int n, const Options& o,
                                 const std::string& where) {
  const int g = o.ranks_per_node > 0 ? o.ranks_per_node : o.num_ranks;
  if (o.num_groups == 0 || o.num_ranks / g == 1) return;
  const int k = (n + o.num_replicas) / o.num_ranks;
  const PairStructure ps = pairs_if_paired(o, k, std::vector<double>(sizes, sizes + n), nullptr);
  validate_group_sizes(sizes, n, o, ps.found, ps.pair_sum, where);
}

// Paired mode adds copies two at a time, so an odd num_replicas would break equal memory
// (asked with k = 2: would these sizes and options pair off at all?).
inline void validate_replica_pairs(const double* sizes, int n, const Options& o,
                                   const std::string& where) {
  if (o.num_replicas % 2 == 0) return;
  if (!pairs_if_paired(o, 2, std::vector<double>(sizes, sizes + n), nullptr).found) return;
  fail(where + "num_replicas=" + std::to_string(o.num_replicas) +
       " is odd but the sizes form complementary pairs: balance='memory_then_compute' adds "
       "copies in complementary pairs, so use an even num_replicas or balance='compute'");
}

}  // namespace detail

inline LayerPlan solve_layer(const double* sizes, const double* loads, const int* previous, int n,
                             const Options& o, const std::string& where = "",
                             const PairStructure* shared_pairs = nullptr) {
  validate_options(n, o);
  validate_layer(sizes, loads, previous, n, o, where);
  detail::validate_replica_pairs(sizes, n, o, where);
  detail::validate_group_layer(sizes, n, o, where);
  if (o.num_groups > 0 && o.ranks_per_node > 0 && o.ranks_per_node < o.num_ranks)
    return detail::solve_groups(sizes, loads, n, o, where, shared_pairs);
  std::vector<double> s(sizes, sizes + n), t(loads, loads + n), w(n);
  for (int e = 0; e < n; ++e) w[e] = t[e] * s[e];
  if (o.num_replicas > 0) return detail::solve_copies(s, t, w, o, where, shared_pairs);
  const int k = n / o.num_ranks;
  PairStructure pairs = detail::pairs_if_paired(o, k, s, shared_pairs);
  detail::Layer layer(o, std::move(s), std::move(t), std::move(w), previous, std::move(pairs));
  double lb = layer.lower_bound();
  bool proven = false;
  std::vector<detail::Candidate> candidates{layer.fresh(lb, proven)};
  if (proven) lb = std::max(lb, candidates[0].value);  // exactness proves opt >= value
  detail::Candidate warm;
  if (layer.warm(lb, warm)) candidates.push_back(std::move(warm));

  // Finished plans within the move budget (the warm one always is: its descent kept to it, and
  // without node stage and relabelling it moves nothing else).  If `previous` is not a valid plan
  // here (no warm candidate) no plan may be within it: then the budget is not applied.
  const double budget = layer.move_budget() * o.bytes_per_param;
  auto within = [&](const LayerPlan& p) { return p.moved_bytes <= budget * (1.0 + 1e-12); };
  std::vector<LayerPlan> plans;
  for (const auto& c : candidates) {
    LayerPlan p = layer.finish(c);
    if (!within(p) && c.method == Method::kPrevious) p = layer.finish(c, true);
    plans.push_back(std::move(p));
  }
  const bool any_within = std::any_of(plans.begin(), plans.end(), within);
  auto eligible = [&](const LayerPlan& p) { return !any_within || within(p); };
  double best_value = std::numeric_limits<double>::infinity();
  for (const auto& p : plans)
    if (eligible(p)) best_value = std::min(best_value, p.max_compute);
  const double accept = best_value * (1.0 + o.move_slack) + eps_of(best_value);
  LayerPlan best;
  bool have = false;
  for (auto& p : plans) {
    if (!eligible(p) || p.max_compute > accept) continue;
    const bool better = !have || p.moved_bytes < best.moved_bytes ||
                        (p.moved_bytes == best.moved_bytes && p.max_compute < best.max_compute);
    if (better) {
      best = std::move(p);
      have = true;
    }
  }
  best.lower_bound = lb;
  best.optimal = best.max_compute <= lb + eps_of(lb) + 1e-300;
  return best;
}

// Plans L layers.  sizes has 1 row (shared) or L rows; loads and previous (optional) L rows.
// Inputs are validated up front so worker threads never throw on bad input.
inline std::vector<LayerPlan> solve_batch(const double* sizes, int size_rows, const double* loads,
                                          const int* previous, int L, int n, const Options& o,
                                          int num_threads) {
  validate_options(n, o);
  if (L <= 0) fail("loads has no layers: give one row of loads per MoE layer");
  if (size_rows != 1 && size_rows != L)
    fail("sizes has " + std::to_string(size_rows) + " rows but there are " + std::to_string(L) +
         " layers: give one shared row or one row per layer");
  if (num_threads < 0)
    fail("num_threads=" + std::to_string(num_threads) + " must be >= 0 (0 = automatic)");
  auto where = [&](int l) { return L > 1 ? "layer " + std::to_string(l) + ": " : std::string(); };
  auto row = [&](int l) { return sizes + static_cast<size_t>(size_rows == 1 ? 0 : l) * n; };
  auto prev = [&](int l) { return previous ? previous + static_cast<size_t>(l) * n : nullptr; };
  for (int l = 0; l < L; ++l) {
    validate_layer(row(l), loads + static_cast<size_t>(l) * n, prev(l), n, o, where(l));
    if (size_rows > 1 || l == 0) {  // a shared size row is one check, for all layers
      detail::validate_replica_pairs(row(l), n, o, size_rows > 1 ? where(l) : std::string());
      detail::validate_group_layer(row(l), n, o, size_rows > 1 ? where(l) : std::string());
    }
  }

  const bool shared = size_rows == 1 && L > 1;
  const PairStructure pairs = shared ? detect_pairs(std::vector<double>(sizes, sizes + n))
                                     : PairStructure();
  std::vector<LayerPlan> plans(L);
  std::atomic<int> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&]() {
    for (int l = next++; l < L; l = next++) {
      try {
        plans[l] = solve_layer(row(l), loads + static_cast<size_t>(l) * n, prev(l), n, o, where(l),
                               shared ? &pairs : nullptr);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  };
  if (num_threads <= 0) {  // threads only pay off when there is real work to split
    const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    num_threads = static_cast<int64_t>(L) * n >= 4096 ? std::min(hw, L) : 1;
  }
  num_threads = std::max(1, std::min(num_threads, L));
  std::vector<std::thread> pool;
  for (int i = 1; i < num_threads; ++i) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
  return plans;
}

}  // namespace modse_planner
