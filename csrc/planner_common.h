// Shared vocabulary of the expert placement planner: options, the per-layer plan, input
// validation and the small numeric helpers every algorithm header uses.
//
// The planner is torch-free C++17 so it can run inside the trainer, in a CLI, or offline on
// routing statistics without a GPU stack.  One header per algorithm; each includes only what
// it uses (arrows), all of them this one:
//   planner_bounds.h        proven lower bounds: cardinality, paired partner / matching
//   planner_exact.h         closed forms for k = 1 and k = 2, branch and bound
//   planner_local_search.h  bins with O(1) swaps, exchange moves, heaviest-bin descent
//   planner_heuristic.h     LPT, balanced differencing, best of starts   <- exact, local_search
//   planner_pairs.h         complementary pairs: detection, paired starts and descent
//                                                    <- bounds, exact, heuristic, local_search
//   planner_resplit.h       three-bin re-splits, the outlier start       <- local_search, pairs
//   planner_replicas.h      redundant copies: counts, placement          <- heuristic, pairs
//   planner_counts.h        copy counts chosen jointly with placement    <- exact, replicas
//   planner_groups.h        node-limited expert groups (DeepSeek)        <- bounds, exact, heuristic
//   planner_hierarchy.h     node inflow balance                          <- bounds, heuristic
//   planner_relabel.h       which physical rank each bin lands on (fewest bytes moved)
// planner.h composes them per layer and per batch (worker threads); bindings.cpp exposes
// planner.h to Python.
//
// Vocabulary used throughout:
//   expert e   : s[e] = size (parameter count or FFN width), t[e] = measured token load,
//                w[e] = t[e] * s[e] = compute the expert costs its rank.
//   bin        : an unlabelled group of exactly k items; a plan is a partition into R bins.
//                Which physical rank a bin lands on is decided last (relabel.h), because
//                permuting bins changes no quality measure, only the bytes moved.
//   item       : what an algorithm packs — an expert, a copy of an expert (with replicas,
//                replicas.h), or a complementary pair of them.
//
// Index checks: hot loops index bins and slots with plain ints; `assert`s guard them in debug
// and sanitizer builds (MODSE_SANITIZE=1, see setup.py) and cost nothing with NDEBUG.
#pragma once

#include <algorithm>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace modse_planner {

// What "balanced" means for a layer; the order of goals is memory, compute, node inflow, moves.
enum class Balance : int {
  // Equal memory per rank wherever the sizes allow it by construction (complementary pairs
  // and an even k: pairs are kept together), then minimal max compute.
  kMemoryThenCompute = 0,
  // Minimal max compute under the cardinality constraint only; memory is just reported.
  kCompute = 1,
};

// How a plan was obtained; decides whether `optimal` is a proof.
enum class Method : int {
  kOneExpertPerRank = 0,  // k = 1: all partitions are equal up to labels (exact)
  kExactPairing = 1,      // k = 2: largest with smallest, per size class when paired (exact)
  kBranchAndBound = 2,    // exhaustive search completed (exact)
  kHeuristic = 3,         // LPT / balanced differencing + swap descent
  kPrevious = 4,          // descent from the previous placement: as good, fewer bytes moved
};

// Largest exact_max_experts accepted.  Branch and bound (planner_exact.h) recurses once per
// item (expert, or copy with replicas) on a worker thread, whose stack can be small (512 KB
// for secondary threads on macOS); 256 frames of a few hundred bytes stay far below that, even
// in a sanitizer build.  Larger values would buy nothing anyway: exact_node_budget stops the
// search long before it can enumerate layers that big.
constexpr int kExactMaxExpertsCap = 256;

// Most physical slots (experts + replicas) per layer.  Keeps every int product of sizes in
// range (e.g. max_iters = 2 * n + 64); a layer this large would not fit in memory anyway.
constexpr int64_t kMaxSlots = int64_t{1} << 28;

struct Options {
  int num_ranks = 1;
  int ranks_per_node = 0;  // 0 = all ranks on one node (no hierarchy)
  Balance balance = Balance::kMemoryThenCompute;
  int exact_max_experts = 16;          // run branch and bound when n <= this (<= the cap above)
  int64_t exact_node_budget = 400000;  // nodes before branch and bound gives up (not a proof)
  double bytes_per_param = 1.0;        // moved_bytes = sum of sizes * bytes_per_param
  double move_slack = 0.0;             // accept a plan this much (relative) worse to move less
  // With `previous`: a plan moves at most this share of the layer's expert bytes (planner.h:
  // the descent from `previous` takes only moves that keep within it); 1 = no limit.
  double max_move_fraction = 1.0;
  // Local search stops within this relative distance of the lower bound: the last 0.01% costs
  // most of the iterations on near-uniform layers and is far below measurement noise.
  double good_enough = 1e-4;
  // Extra physical expert slots for copies of busy experts (planner_replicas.h); 0 = none.
  int num_replicas = 0;
  // Copy counts searched jointly with the placement (planner_counts.h); false = EPLB's greedy
  // counts only.
  bool joint_counts = true;
  // Copies of one expert may share a rank (EPLB does this); false = on distinct ranks.
  bool stack_copies = false;
  // Node-limited placement (planner_groups.h, DeepSeek EPLB's group-limited hierarchy): experts
  // form num_groups groups of consecutive ids, each kept within one node with all its copies;
  // 0 = off.
  int num_groups = 0;
};

struct LayerPlan {
  std::vector<int> rank_of_expert;  // with replicas: the rank of each expert's first copy
  std::vector<int> slot_expert;     // expert of each physical slot, rank-major (k per rank)
  std::vector<int> copies;          // copies of each expert (all 1 without replicas)
  std::vector<double> compute_per_rank, memory_per_rank, node_inflow;
  double max_compute = 0.0;
  double lower_bound = 0.0;  // proven: no valid plan of the same problem has a smaller max
  double node_inflow_bound = 0.0;
  double moved_bytes = 0.0;
  bool optimal = false;
  bool paired = false;  // complementary pairs kept together -> memory exactly equal
  Method method = Method::kHeuristic;
};

[[noreturn]] inline void fail(const std::string& message) { throw std::invalid_argument(message); }

inline std::string num_str(double x) {
  std::ostringstream os;
  os << x;
  return os.str();
}

// Node-limited groups (o.num_groups > 0): num_groups groups of n / num_groups consecutive
// experts, num_groups / N of them per node (N = num_ranks / ranks_per_node), and each node
// holding num_replicas / N copies of its own experts (a whole number: N divides n, since it
// divides num_groups, and n + num_replicas, since it divides num_ranks).
inline void validate_groups(int n, const Options& o) {
  const int G = o.num_groups;
  if (G == 0) return;
  if (G < 0) fail("num_groups=" + std::to_string(G) + " must be an integer >= 0 (0 = off)");
  if (n % G != 0)
    fail("num_groups=" + std::to_string(G) + " does not divide num_experts=" + std::to_string(n) +
         ": groups are num_experts / num_groups consecutive experts, so choose a divisor");
  const int g = o.ranks_per_node > 0 ? o.ranks_per_node : o.num_ranks;
  const int N = o.num_ranks / g;
  if (G % N != 0)
    fail("num_groups=" + std::to_string(G) + " is not a multiple of the " + std::to_string(N) +
         " nodes (num_ranks / ranks_per_node): every node must hold as many whole groups");
  const int64_t most = static_cast<int64_t>(n) * (g - 1);
  if (!o.stack_copies && o.num_replicas > most)
    fail("num_replicas=" + std::to_string(o.num_replicas) + " exceeds num_experts * "
         "(ranks_per_node - 1)=" + std::to_string(most) + ": with num_groups an expert's copies "
         "stay in its node, one per rank, so use fewer num_replicas or stack_copies");
}

// Validation mirrors the Python wrapper so the core is safe on its own: every message is one
// line that names the problem and the fix.
inline void validate_options(int n, const Options& o) {
  if (o.num_ranks <= 0)
    fail("num_ranks=" + std::to_string(o.num_ranks) + " must be a positive integer");
  if (n <= 0) fail("no experts given: pass at least one size per layer");
  if (o.num_replicas < 0)
    fail("num_replicas=" + std::to_string(o.num_replicas) + " must be an integer >= 0");
  const int64_t most = static_cast<int64_t>(n) * (o.num_ranks - 1);
  if (!o.stack_copies && o.num_replicas > most)
    fail("num_replicas=" + std::to_string(o.num_replicas) + " exceeds num_experts*(num_ranks-1)=" +
         std::to_string(most) + ": an expert has at most one copy per rank, so use fewer "
         "num_replicas or stack_copies");
  const int64_t slots = static_cast<int64_t>(n) + o.num_replicas;
  if (slots > kMaxSlots)
    fail("num_experts=" + std::to_string(n) + " + num_replicas=" + std::to_string(o.num_replicas) +
         " = " + std::to_string(slots) + " slots exceeds the planner's limit of " +
         std::to_string(kMaxSlots) + " per layer: plan fewer experts per call");
  if (slots % o.num_ranks != 0)
    fail(o.num_replicas == 0
             ? "num_experts=" + std::to_string(n) + " is not divisible by num_ranks=" +
                   std::to_string(o.num_ranks) + ": choose num_ranks that divides the expert count"
             : "num_experts=" + std::to_string(n) + " + num_replicas=" +
                   std::to_string(o.num_replicas) + " = " + std::to_string(slots) +
                   " slots is not divisible by num_ranks=" + std::to_string(o.num_ranks) +
                   ": choose num_replicas so that experts + replicas is a multiple of num_ranks");
  if (o.ranks_per_node < 0 || (o.ranks_per_node > 0 && o.num_ranks % o.ranks_per_node != 0))
    fail("ranks_per_node=" + std::to_string(o.ranks_per_node) + " does not divide num_ranks=" +
         std::to_string(o.num_ranks) + ": use a divisor of num_ranks (GPUs per node)");
  validate_groups(n, o);
  if (!(o.bytes_per_param > 0.0) || !std::isfinite(o.bytes_per_param))
    fail("bytes_per_param=" + num_str(o.bytes_per_param) + " must be a positive finite number");
  if (!(o.move_slack >= 0.0) || !std::isfinite(o.move_slack))
    fail("move_slack=" + num_str(o.move_slack) + " must be a finite number >= 0");
  if (!(o.max_move_fraction >= 0.0 && o.max_move_fraction <= 1.0))
    fail("max_move_fraction=" + num_str(o.max_move_fraction) +
         " must be in [0, 1]: the largest share of a layer's expert bytes a re-plan may move "
         "(1 = no limit)");
  if (o.exact_max_experts < 0 || o.exact_max_experts > kExactMaxExpertsCap)
    fail("exact_max_experts=" + std::to_string(o.exact_max_experts) + " must be in [0, " +
         std::to_string(kExactMaxExpertsCap) + "]: branch and bound recurses once per expert, " +
         "and larger layers exhaust exact_node_budget first");
  if (o.exact_node_budget < 0)
    fail("exact_node_budget=" + std::to_string(o.exact_node_budget) + " must be >= 0");
  if (!(o.good_enough >= 0.0) || !std::isfinite(o.good_enough))
    fail("good_enough=" + num_str(o.good_enough) + " must be a finite number >= 0");
}

// Weights for the packing helpers (cardinality_lower_bound, lpt_cardinality): exactly
// num_ranks * per_rank finite, non-negative numbers.
inline void validate_packing(const std::vector<double>& w, int num_ranks, int per_rank) {
  if (num_ranks <= 0)
    fail("num_ranks=" + std::to_string(num_ranks) + " must be a positive integer");
  if (per_rank <= 0) fail("per_rank=" + std::to_string(per_rank) + " must be a positive integer");
  if (w.empty()) fail("weights is empty: give num_ranks * per_rank weights");
  const int64_t want = static_cast<int64_t>(num_ranks) * per_rank;
  if (static_cast<int64_t>(w.size()) != want)
    fail("len(weights)=" + std::to_string(w.size()) + " but num_ranks * per_rank=" +
         std::to_string(want) + ": give exactly per_rank weights for every rank");
  for (size_t i = 0; i < w.size(); ++i)
    if (!std::isfinite(w[i]) || w[i] < 0.0)
      fail("weights[" + std::to_string(i) + "]=" + num_str(w[i]) +
           " is invalid: weights must be finite numbers >= 0");
}

inline void validate_layer(const double* sizes, const double* loads, const int* previous, int n,
                           const Options& o, const std::string& where) {
  if (previous && o.num_replicas > 0)
    fail("previous cannot be combined with num_replicas > 0 yet: plan replicas without previous");
  if (previous && o.num_groups > 0 && o.ranks_per_node > 0 && o.ranks_per_node < o.num_ranks)
    fail("previous cannot be combined with num_groups on several nodes yet: plan node-limited "
         "groups without previous");
  for (int e = 0; e < n; ++e) {
    if (!std::isfinite(sizes[e]) || sizes[e] <= 0.0)
      fail(where + "sizes[" + std::to_string(e) + "]=" + num_str(sizes[e]) +
           " is invalid: sizes must be positive finite numbers");
    if (!std::isfinite(loads[e]) || loads[e] < 0.0)
      fail(where + "loads[" + std::to_string(e) + "]=" + num_str(loads[e]) +
           " is invalid: loads must be finite numbers >= 0");
    if (previous && (previous[e] < 0 || previous[e] >= o.num_ranks))
      fail(where + "previous[" + std::to_string(e) + "]=" + std::to_string(previous[e]) +
           " is not a rank in [0, " + std::to_string(o.num_ranks) + ")");
  }
}

// Tolerance for "strictly better": sums of a few thousand doubles are exact to ~1e-13.
inline double eps_of(double scale) { return 1e-12 * std::max(std::fabs(scale), 1e-300); }

// Indices sorted by key (descending or ascending); ties in index order, i.e. a stable sort
// (deterministic plans, and the same order as numpy's stable argsort in the EPLB baseline),
// done with std::sort and an index tie-break because that is ~2x faster than stable_sort.
inline std::vector<int> order_by(const std::vector<double>& key, bool descending) {
  std::vector<int> idx(key.size());
  std::iota(idx.begin(), idx.end(), 0);
  if (descending)
    std::sort(idx.begin(), idx.end(),
              [&](int a, int b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
  else
    std::sort(idx.begin(), idx.end(),
              [&](int a, int b) { return key[a] < key[b] || (key[a] == key[b] && a < b); });
  return idx;
}

inline std::vector<int> order_desc(const std::vector<double>& w) { return order_by(w, true); }

// A layer sorts its weights once and passes the order down; callers without one get it computed.
inline const std::vector<int>& desc_or(const std::vector<double>& w, const std::vector<int>* desc,
                                       std::vector<int>& storage) {
  if (desc) return *desc;
  storage = order_desc(w);
  return storage;
}

inline std::vector<double> bin_sums(const std::vector<double>& w, const std::vector<int>& bin_of,
                                    int num_bins) {
  assert(bin_of.size() == w.size());
  std::vector<double> s(num_bins, 0.0);
  for (size_t i = 0; i < w.size(); ++i) {
    assert(bin_of[i] >= 0 && bin_of[i] < num_bins);
    s[bin_of[i]] += w[i];
  }
  return s;
}

inline double max_of(const std::vector<double>& v) {
  return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
}

// Sizes match up as complementary pairs — sorted ascending, s[i] + s[m-1-i] == pair_sum for
// every i (to 1e-9 relative) — the one test behind pair detection, a bin's validity in paired
// mode and the paired moves and branch and bound.  An odd count never pairs up.
inline bool pairs_up(const std::vector<double>& sorted_sizes, double pair_sum) {
  const size_t m = sorted_sizes.size();
  if (m % 2 != 0) return false;
  const double tol = 1e-9 * pair_sum;
  for (size_t i = 0; i < m / 2; ++i)
    if (std::fabs(sorted_sizes[i] + sorted_sizes[m - 1 - i] - pair_sum) > tol) return false;
  return true;
}

inline bool counts_are(const std::vector<int>& bin_of, int num_bins, int per_bin) {
  std::vector<int> c(num_bins, 0);
  for (int b : bin_of) {
    if (b < 0 || b >= num_bins) return false;
    ++c[b];
  }
  for (int x : c)
    if (x != per_bin) return false;
  return true;
}

}  // namespace modse_planner
