// Thin pybind11 layer over planner.h: numpy arrays in, a dict of numpy arrays out.
// Python-level types are checked in modse_megatron/placement/plan.py; every binding here also
// validates its own input (shapes, NaN/inf/negative values, sizes whose products overflow,
// ranks <= 0, counts that do not divide) before any work starts, and the C++ core throws
// std::invalid_argument with a one-line message naming the argument, which pybind11 raises as
// ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "planner.h"

namespace py = pybind11;
namespace mp = modse_planner;

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

namespace {

py::dict plan_batch(DoubleArray sizes, DoubleArray loads, std::optional<IntArray> previous,
                    int num_ranks, int ranks_per_node, int balance, double bytes_per_param,
                    double move_slack, int exact_max_experts, int64_t exact_node_budget,
                    int num_threads, int num_replicas, bool joint_counts, bool stack_copies,
                    int num_groups, double max_move_fraction) {
  if (loads.ndim() != 2)
    mp::fail("loads must be a 2-D array [layers, experts], got " + std::to_string(loads.ndim()) +
             "-D");
  if (loads.shape(0) < 1 || loads.shape(0) > INT_MAX)
    mp::fail("loads has " + std::to_string(loads.shape(0)) + " layers: give 1 to " +
             std::to_string(INT_MAX) + " rows [layers, experts]");
  if (loads.shape(1) > mp::kMaxSlots)
    mp::fail("loads has " + std::to_string(loads.shape(1)) + " experts per layer: at most " +
             std::to_string(mp::kMaxSlots) + " are supported");
  const int L = static_cast<int>(loads.shape(0));
  const int n = static_cast<int>(loads.shape(1));
  if (sizes.ndim() != 2 || sizes.shape(1) != n || (sizes.shape(0) != 1 && sizes.shape(0) != L))
    mp::fail("sizes must be [1 or layers, experts] matching loads [" + std::to_string(L) + ", " +
             std::to_string(n) + "]");
  if (previous && (previous->ndim() != 2 || previous->shape(0) != L || previous->shape(1) != n))
    mp::fail("previous must be [layers, experts] matching loads [" + std::to_string(L) + ", " +
             std::to_string(n) + "]");
  if (balance != 0 && balance != 1)
    mp::fail("balance=" + std::to_string(balance) + " must be 0 (memory_then_compute) or 1 "
             "(compute)");
  mp::Options o;
  o.num_ranks = num_ranks;
  o.ranks_per_node = ranks_per_node;
  o.balance = static_cast<mp::Balance>(balance);
  o.bytes_per_param = bytes_per_param;
  o.move_slack = move_slack;
  o.max_move_fraction = max_move_fraction;
  o.exact_max_experts = exact_max_experts;
  o.exact_node_budget = exact_node_budget;
  o.num_replicas = num_replicas;
  o.joint_counts = joint_counts;
  o.stack_copies = stack_copies;
  o.num_groups = num_groups;
  mp::validate_options(n, o);

  std::vector<mp::LayerPlan> plans;
  {
    py::gil_scoped_release release;  // pointers stay valid: the arrays are held by the caller
    plans = mp::solve_batch(sizes.data(), static_cast<int>(sizes.shape(0)), loads.data(),
                            previous ? previous->data() : nullptr, L, n, o, num_threads);
  }
  const int R = num_ranks;
  const int N = ranks_per_node > 0 ? R / ranks_per_node : 1;
  const int S = n + num_replicas;
  IntArray rank_of_expert({L, n}), copies({L, n}), slot_expert({L, S});
  py::array_t<double> compute({L, R}), memory({L, R}), inflow({L, N});
  py::array_t<double> max_compute(L), lower_bound(L), moved(L), inflow_bound(L);
  py::array_t<bool> optimal(L), paired(L);
  py::array_t<int32_t> method(L);
  auto roe = rank_of_expert.mutable_unchecked<2>();
  auto cpe = copies.mutable_unchecked<2>();
  auto sle = slot_expert.mutable_unchecked<2>();
  auto cpr = compute.mutable_unchecked<2>();
  auto mpr = memory.mutable_unchecked<2>();
  auto nin = inflow.mutable_unchecked<2>();
  for (int l = 0; l < L; ++l) {
    const mp::LayerPlan& p = plans[l];
    for (int e = 0; e < n; ++e) {
      roe(l, e) = p.rank_of_expert[e];
      cpe(l, e) = p.copies[e];
    }
    for (int i = 0; i < S; ++i) sle(l, i) = p.slot_expert[i];
    for (int r = 0; r < R; ++r) {
      cpr(l, r) = p.compute_per_rank[r];
      mpr(l, r) = p.memory_per_rank[r];
    }
    for (int q = 0; q < N; ++q) nin(l, q) = p.node_inflow[q];
    max_compute.mutable_at(l) = p.max_compute;
    lower_bound.mutable_at(l) = p.lower_bound;
    moved.mutable_at(l) = p.moved_bytes;
    inflow_bound.mutable_at(l) = p.node_inflow_bound;
    optimal.mutable_at(l) = p.optimal;
    paired.mutable_at(l) = p.paired;
    method.mutable_at(l) = static_cast<int32_t>(p.method);
  }
  py::dict out;
  out["rank_of_expert"] = rank_of_expert;
  out["copies_per_expert"] = copies;
  out["slot_expert"] = slot_expert;
  out["compute_per_rank"] = compute;
  out["memory_per_rank"] = memory;
  out["node_inflow"] = inflow;
  out["max_compute"] = max_compute;
  out["lower_bound"] = lower_bound;
  out["moved_bytes"] = moved;
  out["node_inflow_bound"] = inflow_bound;
  out["optimal"] = optimal;
  out["paired"] = paired;
  out["method"] = method;
  return out;
}

// Weights of the packing helpers, validated (1-D, num_ranks * per_rank finite values >= 0).
std::vector<double> packing_weights(const DoubleArray& a, int num_ranks, int per_rank) {
  if (a.ndim() != 1)
    mp::fail("weights must be a 1-D array, got " + std::to_string(a.ndim()) + "-D");
  std::vector<double> w(a.data(), a.data() + a.shape(0));
  mp::validate_packing(w, num_ranks, per_rank);
  return w;
}

}  // namespace

PYBIND11_MODULE(_planner, m) {
  m.doc() = "C++17 expert placement planner (torch-free); use modse_megatron.placement instead.";
  m.def("plan_batch", &plan_batch, py::arg("sizes"), py::arg("loads"), py::arg("previous"),
        py::arg("num_ranks"), py::arg("ranks_per_node"), py::arg("balance"),
        py::arg("bytes_per_param"), py::arg("move_slack"), py::arg("exact_max_experts"),
        py::arg("exact_node_budget"), py::arg("num_threads"), py::arg("num_replicas") = 0,
        py::arg("joint_counts") = true, py::arg("stack_copies") = false,
        py::arg("num_groups") = 0, py::arg("max_move_fraction") = 1.0,
        "Plan many layers; returns a dict of numpy arrays (see plan.py).");
  m.def(
      "cardinality_lower_bound",
      [](DoubleArray w, int num_ranks, int per_rank) {
        return mp::cardinality_lower_bound(packing_weights(w, num_ranks, per_rank), num_ranks,
                                           per_rank);
      },
      py::arg("weights"), py::arg("num_ranks"), py::arg("per_rank"),
      "Average / pigeonhole lower bound on max bin sum for R bins of exactly k items.");
  m.def(
      "balanced_packing",
      [](DoubleArray w, int num_ranks, int per_rank) {
        return mp::lpt_cardinality(packing_weights(w, num_ranks, per_rank), num_ranks, per_rank);
      },
      py::arg("weights"), py::arg("num_ranks"), py::arg("per_rank"),
      "LPT with cardinality (EPLB balanced_packing); bin of each item.");
  // Limits the Python wrapper mirrors (plan.py checks them before converting to C++ ints).
  m.attr("EXACT_MAX_EXPERTS_CAP") = mp::kExactMaxExpertsCap;
  m.attr("MAX_SLOTS") = mp::kMaxSlots;
}
