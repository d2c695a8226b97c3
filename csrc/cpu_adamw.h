// The CPU loop over kernels/adamw_math.cuh: the same tables, the same per-element update.
#pragma once

#include "adamw_params.h"

namespace fused_adamw {

// One AdamW step over a whole table of host memory, on `num_threads` threads (<= 0: one):
// every row's step count advances by one, then the tiles are updated. Tiles are independent,
// so they are spread over the threads; within a tile the scalars are computed once and the
// element loop is vectorized.
void adamw_step_cpu(const AdamWParams& p, int num_threads);

// Which instruction set the element loop runs with on this machine ("x86-64-v4", ...).
const char* cpu_loop_isa();

}  // namespace fused_adamw
