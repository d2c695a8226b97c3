// The CPU loop over kernels/adamw_math.cuh: the same tables, the same per-element update.
#pragma once

#include "adamw_params.h"

namespace fused_adamw {

// One AdamW step over a whole table of host memory, on `num_threads` threads (<= 0: one):
// every row's step count advances by one, then the tiles are updated. Tiles are independent,
// so they are spread over the threads; within a tile the scalars are computed once and the
// element loop is vectorized.
// row_norms (track_norms, issue #19): null, or float [n_rows][3] that receives each row's sums
// of squares of the grad as used, the param after and the delta (adamw_math.cuh's order).
void adamw_step_cpu(const AdamWParams& p, int num_threads, float* row_norms = nullptr);

// The norm pass (issue #19): out[r] (double, n_rows + 1 entries) = row r's sum of squares of
// its grad / *grad_scale (inf: max |.|), out[n_rows] their total, in adamw_math.cuh's order.
void adamw_grad_norm_cpu(const AdamWParams& p, int num_threads, bool inf, double* out);

// Which instruction set the element loop runs with on this machine ("x86-64-v4", ...).
const char* cpu_loop_isa();

}  // namespace fused_adamw
