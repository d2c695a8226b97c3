// Host-side entry points of kernels/adamw_kernel.cu, callable from code that never sees a
// CUDA header (csrc/bindings.cpp is compiled by the host compiler alone). Errors come back as
// a non-empty string; the binding turns them into RuntimeError.
#pragma once

#include <cstdint>
#include <string>

#include "adamw_params.h"

namespace fused_adamw {

// One AdamW step over a whole table: two launches on `stream` (a cudaStream_t as an integer,
// 0 = the legacy default stream) of the device `device`: the step counts, then the update.
// Every pointer in `p` (and in its rows) is a device pointer of that device. has_max: some row
// uses amsgrad. The previous current device is restored when it has a context (a restore
// must not create one). Returns "" on success. p.grad_scale / p.found_inf: GradScaler's
// device scalars or null (kernels/adamw_params.h).
// master_modes: some group of the table may have a master mode (hparams column
// kHpMasterMode != 0; the hparams live on the device, so the caller says so): 16-bit tables
// then run the low-precision kernel, which reads each row's mode. A table with a mode and
// master_modes false would step that row as mode none: python/fused_adamw/backends/cuda.py
// passes it from the host copy of the hparams.
// Issue #19: p.clip_coef (device float or null) scales every grad the update reads; row_norms
// (device float [n_rows][3], or null) receives each row's sums of squares of the grad as used
// (unscaled, before clipping), the param after and (param after - param before), as stored,
// bitwise the CPU loop's adamw_step_cpu row_norms; it needs p.tile_norms, a device scratch of
// float [n_tiles * 3 * (kNormLanes + 1)] (both null or both set). Either runs the NORMS
// kernels (more launches: the tiles' and rows' reductions after the update).
std::string launch_adamw_cuda(const AdamWParams& p, bool has_max, int device,
                              std::uintptr_t stream, bool master_modes = false,
                              float* row_norms = nullptr);

// The norm pass of gradient clipping (issue #19) over a table, on `stream` of `device`:
// out (double [n_rows + 1], device memory) receives each row's sum of squares of
// grad / *p.grad_scale (inf: max |.|) and their total, in kernels/adamw_math.cuh's norm order
// (bitwise the CPU loop's adamw_grad_norm_cpu). scratch: float [n_tiles * (kNormLanes + 1)].
std::string launch_grad_norm_cuda(const AdamWParams& p, int device, std::uintptr_t stream,
                                  bool inf, float* scratch, double* out);

// Caps the update's grid (<= 0: no cap beyond the hardware's), so that tests make the tile
// loop stride. Process-wide; for tests only.
void set_grid_cap_for_testing(int64_t cap);

// "" when the kernel can run on `device` (a driver new enough and a kernel image, SASS or PTX,
// for its compute capability), else the reason.
std::string cuda_device_error(int device);

// cudaRuntimeGetVersion / cudaDriverGetVersion (e.g. 13000); 0 for the driver when none.
int cuda_runtime_version();
int cuda_driver_version();

}  // namespace fused_adamw
