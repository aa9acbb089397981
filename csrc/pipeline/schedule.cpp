// dualpipe_schedule(kind, P, N): the pipeline schedule generators of
// dskernels/pipeline/schedule.py in host C++, the compiled oracle the Python ones are checked
// against (and a way for C++ users to get a schedule without Python).
//
// Output: int32 tensor [A, 6], one row per compute action, rows grouped by rank (rank 0 first)
// and in execution order within a rank:
//   (rank, kind, stage, mb, stage2, mb2)
//   kind 0 = F, 1 = B (full backward), 2 = I (input gradient), 3 = W (weight gradient):
//        stage2 = mb2 = -1;
//   kind 4 = OVERLAP_F_B: forward of (stage, mb) together with full backward of (stage2, mb2).
// dskernels.ops.pipeline.decode_schedule turns it back into torch.distributed.pipelining's
// action strings.
#include <torch/library.h>

#include <ATen/ATen.h>

#include <array>
#include <deque>
#include <string>
#include <vector>

namespace dskernels::pipeline {
namespace {

enum Kind : int32_t { kF = 0, kB = 1, kI = 2, kW = 3, kOverlapFB = 4 };
using Row = std::array<int32_t, 6>;

// The 8-phase DualPipe/DualPipeV rank program (see schedule.py's module docstring).
void dual_rank_program(std::vector<Row>& out, int32_t out_rank, int64_t R, int64_t h, int64_t C,
                       int32_t stage0, int32_t stage1, bool unoverlapped_first) {
  int32_t fwd[2] = {0, 0}, bwd[2] = {0, 0};
  const int32_t stage[2] = {stage0, stage1};
  std::deque<std::pair<int32_t, int32_t>> deferred;
  auto f = [&](int p) { out.push_back({out_rank, kF, stage[p], fwd[p]++, -1, -1}); };
  auto b = [&](int p, bool zb) {
    if (zb) deferred.emplace_back(stage[p], bwd[p]);
    out.push_back({out_rank, zb ? kI : kB, stage[p], bwd[p]++, -1, -1});
  };
  auto w = [&]() {
    TORCH_CHECK(!deferred.empty(), "dualpipe_schedule: internal error, W with nothing deferred");
    auto [s, m] = deferred.front();
    deferred.pop_front();
    out.push_back({out_rank, kW, s, m, -1, -1});
  };
  auto fb = [&](int fp, int bp) {
    out.push_back({out_rank, kOverlapFB, stage[fp], fwd[fp]++, stage[bp], bwd[bp]++});
  };
  for (int64_t i = 0; i < 2 * (R - h - 1); ++i) f(0);
  for (int64_t i = 0; i < h + 1; ++i) { f(0); f(1); }
  for (int64_t i = 0; i < R - h - 1; ++i) { b(1, true); w(); f(1); }
  for (int64_t i = 0; i < C - 2 * R + h + 1; ++i) {
    if (i == 0 && unoverlapped_first) { f(0); b(1, false); } else { fb(0, 1); }
    fb(1, 0);
  }
  for (int64_t i = 0; i < R - h - 1; ++i) { b(1, false); fb(1, 0); }
  bool zb = false;
  const int64_t steps = h + 1;
  for (int64_t i = 0; i < steps; ++i) {
    if (i == steps / 2 && h % 2 == 1) zb = true;
    b(1, zb);
    if (i == steps / 2 && h % 2 == 0) zb = true;
    b(0, zb);
  }
  for (int64_t i = 0; i < R - h - 1; ++i) { w(); b(0, true); }
  for (int64_t i = 0; i < h + 1; ++i) w();
  TORCH_CHECK(deferred.empty(), "dualpipe_schedule: internal error, W's left over");
}

void one_f_one_b(std::vector<Row>& out, int64_t P, int64_t N) {
  for (int32_t r = 0; r < P; ++r) {
    const int64_t warm = std::min<int64_t>(P - r - 1, N);
    int32_t fm = 0, bm = 0;
    for (; fm < warm; ++fm) out.push_back({r, kF, r, fm, -1, -1});
    for (; fm < N; ++fm, ++bm) {
      out.push_back({r, kF, r, fm, -1, -1});
      out.push_back({r, kB, r, bm, -1, -1});
    }
    for (; bm < N; ++bm) out.push_back({r, kB, r, bm, -1, -1});
  }
}

// ZB-H1 by the unit-step greedy of schedule.py's zb1p (same priorities, same tie-breaks, the same
// active set: only ranks that acted or whose neighbour acted are stepped, O(P * N) in all).
void zb1p(std::vector<Row>& out, int64_t P, int64_t N) {
  std::vector<std::vector<Row>> ranks(P);
  std::vector<int32_t> f_done(P, 0), i_done(P, 0);
  std::vector<std::deque<int32_t>> pending(P);
  int64_t left = 2 * P * N;  // I's and W's still to run
  std::vector<int32_t> active{0}, next;
  std::vector<int64_t> queued_at(P, -1);  // the step a rank was last queued for
  std::vector<std::pair<int32_t, int>> picks;
  for (int64_t step = 0; left > 0; ++step) {
    TORCH_CHECK(!active.empty(), "dualpipe_schedule: internal error, zb1p has no rank that can act");
    picks.clear();
    for (int32_t r : active) {
      const int64_t up_f = r == 0 ? N : f_done[r - 1];
      const int64_t down_i = r == P - 1 ? f_done[r] : i_done[r + 1];
      if (i_done[r] < f_done[r] && i_done[r] < down_i) picks.emplace_back(r, kI);
      else if (static_cast<int64_t>(pending[r].size()) > P - 1) picks.emplace_back(r, kW);
      else if (f_done[r] < up_f && f_done[r] - i_done[r] < P - r) picks.emplace_back(r, kF);
      else if (!pending[r].empty()) picks.emplace_back(r, kW);
    }
    next.clear();
    for (auto [r, pick] : picks) {
      if (pick == kI) {
        ranks[r].push_back({r, kI, r, i_done[r], -1, -1});
        pending[r].push_back(i_done[r]++);
        --left;
      } else if (pick == kF) {
        ranks[r].push_back({r, kF, r, f_done[r]++, -1, -1});
      } else {
        ranks[r].push_back({r, kW, r, pending[r].front(), -1, -1});
        pending[r].pop_front();
        --left;
      }
      for (int32_t t = r - 1; t <= r + 1; ++t) {
        if (t >= 0 && t < P && queued_at[t] != step) {
          queued_at[t] = step;
          next.push_back(t);
        }
      }
    }
    active.swap(next);
  }
  for (auto& rows : ranks) out.insert(out.end(), rows.begin(), rows.end());
}

at::Tensor dualpipe_schedule(c10::string_view kind_view, int64_t P, int64_t N) {
  // (one_f_one_b: the Python helper's name, schedule.one_f_one_b)
  const std::string kind = kind_view == "one_f_one_b" ? std::string("1f1b") : std::string(kind_view);
  TORCH_CHECK_VALUE(kind == "dualpipe" || kind == "dualpipev" || kind == "1f1b" || kind == "zb1p",
              "kind: expected one of dualpipe, dualpipev, 1f1b (or one_f_one_b), zb1p, got '", kind, "'");
  TORCH_CHECK_VALUE(P >= 1 && N >= 1, "P and N: expected at least 1, got P=", P, " N=", N);
  // A few rows per (rank, chunk): the bound keeps the table under ~100 MB (schedule.py: the same).
  TORCH_CHECK_VALUE(P <= (1 << 20) && N <= (1 << 20) && P * N <= (1 << 20),
                    "P and N: expected P * N <= 1048576, got P=", P, ", N=", N);
  std::vector<Row> rows;
  if (kind == "dualpipev") {
    TORCH_CHECK_VALUE(N >= 2 * P, "dualpipev: N (chunks) must be >= 2*P = ", 2 * P,
                " (number of stages), got N=", N);
    for (int32_t r = 0; r < P; ++r)
      dual_rank_program(rows, r, P, r, N, r, static_cast<int32_t>(2 * P - 1 - r), r == P - 1);
  } else if (kind == "dualpipe") {
    TORCH_CHECK_VALUE(P >= 2 && P % 2 == 0, "dualpipe: P (ranks) must be even, got P=", P);
    TORCH_CHECK_VALUE(N % 2 == 0, "dualpipe: N (chunks) must be even (N/2 per direction), got N=", N);
    TORCH_CHECK_VALUE(N >= 2 * P, "dualpipe: N (chunks) must be >= 2*P = ", 2 * P, ", got N=", N);
    for (int32_t r = 0; r < P; ++r) {
      const int64_t half = std::min<int64_t>(r, P - 1 - r);
      const int32_t fwd_stage = r, rev_stage = static_cast<int32_t>(2 * P - 1 - r);
      const bool first_half = r < P / 2;
      dual_rank_program(rows, r, P / 2, half, N / 2, first_half ? fwd_stage : rev_stage,
                        first_half ? rev_stage : fwd_stage, half == P / 2 - 1);
    }
  } else if (kind == "1f1b") {
    one_f_one_b(rows, P, N);
  } else {
    zb1p(rows, P, N);
  }
  auto out = at::empty({static_cast<int64_t>(rows.size()), 6}, at::TensorOptions().dtype(at::kInt));
  auto* p = out.data_ptr<int32_t>();
  for (const auto& row : rows)
    for (int32_t v : row) *p++ = v;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dskernels, CompositeExplicitAutograd, m) {
  m.impl("dualpipe_schedule", &dualpipe_schedule);
}

}  // namespace dskernels::pipeline
