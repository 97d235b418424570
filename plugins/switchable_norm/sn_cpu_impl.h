// The CPU kernel's three phases, callable over index ranges so that any thread pool can drive
// them: the library's OpenMP driver (sn_cpu.cpp) and ONNX Runtime's intra-op pool (ort/).
#ifndef SN_CPU_IMPL_H
#define SN_CPU_IMPL_H

#include <vector>

#include "sn_kernels.h"
#include "sn_math.h"

namespace sn_cpu {

struct Plan {
  const SnParams* p = nullptr;
  const void* x = nullptr;
  void* y = nullptr;
  bool half = false, rank2 = false;
  int64_t runs = 0, run_len = 0;   // planes (N*C of length L), or rows (N of length C) for rank 2
  std::vector<double> mean, var;   // per run
  std::vector<float> shift;        // per run
  std::vector<sn::Affine> terms;   // per (n, c)
  sn::Mixing mx{};
  // onnxruntime's blocked NCHWc layout (float32): [N][ceil(C/block)][L][block], channels past C
  // are padding. 0: plain NCHW. Work units are then the N*ceil(C/block) channel groups.
  int64_t block = 0, groups = 0;
};

// Validates and sizes the plan; SN_OK or an error code (sn_kernels.h).
int prepare(Plan& plan, const SnParams* p, const void* x, void* y, bool half);
void moments(Plan& plan, int64_t run_begin, int64_t run_end);  // phase 1, over runs
void combine(Plan& plan, int64_t n_begin, int64_t n_end);      // phase 2, over samples
void apply(Plan& plan, int64_t run_begin, int64_t run_end);    // phase 3, over runs

// The same three phases on an NCHWc tensor (block 4, 8 or 16; float32, rank 4 or more): moments
// and apply over channel groups, combine (above) over samples.
int prepare_blocked(Plan& plan, const SnParams* p, int64_t block, const void* x, void* y);
void moments_blocked(Plan& plan, int64_t group_begin, int64_t group_end);
void apply_blocked(Plan& plan, int64_t group_begin, int64_t group_end);

}  // namespace sn_cpu

#endif  // SN_CPU_IMPL_H
