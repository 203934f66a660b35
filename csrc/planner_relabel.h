// Which physical rank each finished bin lands on.
//
// Permuting bins (and, with a hierarchy, whole nodes) changes no quality measure, only which
// expert weights have to travel.  With a previous placement we pick the permutation that keeps
// the most bytes in place: a maximum-weight assignment (Hungarian, O(m^3), for m <= 128
// candidates; a greedy on the sparse kept-bytes entries above that).  With a hierarchy, node
// groups are first assigned to physical nodes, then bins to the ranks inside each node.
// Without a previous placement the labelling is canonical: ordered by smallest expert id.
#pragma once

#include <limits>

#include "planner_common.h"

namespace modse_planner {

// Maximum-weight perfect assignment on a dense m x m matrix (row -> column).
// Shortest augmenting path with potentials (Kuhn-Munkres), minimising -value.
inline std::vector<int> max_weight_assignment(const std::vector<double>& value, int m) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> u(m + 1, 0.0), v(m + 1, 0.0);
  std::vector<int> p(m + 1, 0), way(m + 1, 0);
  for (int i = 1; i <= m; ++i) {
    p[0] = i;
    int j0 = 0;
    std::vector<double> minv(m + 1, inf);
    std::vector<char> used(m + 1, 0);
    do {
      used[j0] = 1;
      const int i0 = p[j0];
      double delta = inf;
      int j1 = 0;
      for (int j = 1; j <= m; ++j) {
        if (used[j]) continue;
        const double cur = -value[static_cast<size_t>(i0 - 1) * m + (j - 1)] - u[i0] - v[j];
        if (cur < minv[j]) {
          minv[j] = cur;
          way[j] = j0;
        }
        if (minv[j] < delta) {
          delta = minv[j];
          j1 = j;
        }
      }
      for (int j = 0; j <= m; ++j) {
        if (used[j]) {
          u[p[j]] += delta;
          v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      j0 = j1;
    } while (p[j0] != 0);
    do {
      const int j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0);
  }
  std::vector<int> col_of_row(m, 0);
  for (int j = 1; j <= m; ++j) col_of_row[p[j] - 1] = j - 1;
  return col_of_row;
}

// Greedy for large m: take the largest kept-bytes entries first; leftovers in index order.
inline std::vector<int> greedy_assignment(const std::vector<double>& value, int m) {
  std::vector<std::pair<double, int64_t>> entries;
  const int64_t cells = static_cast<int64_t>(m) * m;
  assert(static_cast<int64_t>(value.size()) == cells);
  for (int64_t x = 0; x < cells; ++x)
    if (value[x] > 0.0) entries.emplace_back(-value[x], x);
  std::sort(entries.begin(), entries.end());
  std::vector<int> col_of_row(m, -1);
  std::vector<char> col_used(m, 0);
  for (const auto& [neg, x] : entries) {
    const int row = static_cast<int>(x / m), col = static_cast<int>(x % m);
    if (col_of_row[row] < 0 && !col_used[col]) {
      col_of_row[row] = col;
      col_used[col] = 1;
    }
  }
  int next_col = 0;
  for (int row = 0; row < m; ++row) {
    if (col_of_row[row] >= 0) continue;
    while (col_used[next_col]) ++next_col;
    col_of_row[row] = next_col;
    col_used[next_col] = 1;
  }
  return col_of_row;
}

inline std::vector<int> assign(const std::vector<double>& value, int m) {
  return m <= 128 ? max_weight_assignment(value, m) : greedy_assignment(value, m);
}

// rank_of_bin for R bins grouped into N = R / g nodes by node_of_bin.
inline std::vector<int> relabel_bins(const std::vector<int>& bin_of,
                                     const std::vector<int>& node_of_bin,
                                     const std::vector<double>& sizes, const int* previous, int R,
                                     int g) {
  const int n = static_cast<int>(bin_of.size());
  const int N = R / g;
  // Members of each node group, in bin index order; slot of each bin inside its group.
  std::vector<std::vector<int>> group_bins(N);
  for (int b = 0; b < R; ++b) group_bins[node_of_bin[b]].push_back(b);
  std::vector<int> slot_of_bin(R, 0);
  for (int q = 0; q < N; ++q) {
    assert(static_cast<int>(group_bins[q].size()) == g);  // every node group holds g bins
    for (int j = 0; j < g; ++j) slot_of_bin[group_bins[q][j]] = j;
  }

  std::vector<int> node_of_group(N), rank_of_bin(R);
  if (!previous) {
    // Canonical: groups by smallest expert id, bins inside a group likewise.
    std::vector<int> first_expert(R, n);
    for (int e = n - 1; e >= 0; --e) first_expert[bin_of[e]] = e;
    std::vector<int> group_first(N, n);
    for (int b = 0; b < R; ++b)
      group_first[node_of_bin[b]] = std::min(group_first[node_of_bin[b]], first_expert[b]);
    std::vector<int> groups(N);
    std::iota(groups.begin(), groups.end(), 0);
    std::sort(groups.begin(), groups.end(),
              [&](int a, int b) { return group_first[a] < group_first[b]; });
    for (int node = 0; node < N; ++node) {
      std::vector<int> bins = group_bins[groups[node]];
      std::sort(bins.begin(), bins.end(),
                [&](int a, int b) { return first_expert[a] < first_expert[b]; });
      for (int j = 0; j < g; ++j) rank_of_bin[bins[j]] = node * g + j;
    }
    return rank_of_bin;
  }
  if (N > 1) {
    std::vector<double> kept(static_cast<size_t>(N) * N, 0.0);
    for (int e = 0; e < n; ++e)
      kept[static_cast<size_t>(node_of_bin[bin_of[e]]) * N + previous[e] / g] += sizes[e];
    node_of_group = assign(kept, N);
  } else {
    node_of_group[0] = 0;
  }
  for (int q = 0; q < N; ++q) {
    const int node = node_of_group[q];
    std::vector<double> kept(static_cast<size_t>(g) * g, 0.0);
    for (int e = 0; e < n; ++e) {
      const int b = bin_of[e];
      if (node_of_bin[b] != q || previous[e] / g != node) continue;
      kept[static_cast<size_t>(slot_of_bin[b]) * g + previous[e] % g] += sizes[e];
    }
    const std::vector<int> local = assign(kept, g);
    for (int j = 0; j < g; ++j) rank_of_bin[group_bins[q][j]] = node * g + local[j];
  }
  return rank_of_bin;
}

}  // namespace modse_planner
