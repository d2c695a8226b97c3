// The flat-buffer layout every fused_adamw backend reads: plain pointers, sizes and the
// hyperparameter table, passed by value to the kernel. No torch, no pybind.
//
// A "bucket" holds the params of one (device, dtype) from every param group, each param's
// segment starting on a 16-byte boundary and zero-padded to the next one, so every tile is a
// whole number of 16-byte vectors. Python builds it (python/fused_adamw/_flat.py) and this
// header is the contract:
//
//   param, grad, exp_avg, exp_avg_sq   [numel] of the bucket dtype (fp32, bf16, fp16)
//   max_exp_avg_sq                     [numel], or nullptr when no group of the bucket uses amsgrad
//   tiles                              int64 [n_tiles][3] = {start, end, param_index}:
//                                      start and end are multiples of 16 / sizeof(dtype),
//                                      0 < end - start <= kTileElems; a tile never crosses
//                                      two params; size-0 params have no tile
//   param_group                        int32 [n_params]: the row of hparams for each param
//   steps                              float32 [n_params]: each param's step count, already
//                                      advanced for this step
//   active                             uint8 [n_params]: 0 = this param has no grad in this
//                                      step and must not be touched (torch skips it)
//   hparams                            float32 [n_groups][kHparamCols], columns below
#pragma once

#include <cstdint>

namespace fused_adamw {

constexpr int64_t kTileElems = 16384;  // upper bound of one tile; python/_flat.py TILE_ELEMS

// Columns of the hparams table (python/fused_adamw/_flat.py mirrors these names).
constexpr int kHpLr = 0;
constexpr int kHpBeta1 = 1;
constexpr int kHpBeta2 = 2;
constexpr int kHpEps = 3;
constexpr int kHpWeightDecay = 4;
constexpr int kHpMaximize = 5;  // 0.0 or 1.0
constexpr int kHpAmsgrad = 6;   // 0.0 or 1.0
constexpr int kHparamCols = 8;  // one spare column keeps rows 32-byte aligned

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct AdamWParams {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr when no group uses amsgrad
  const int64_t* tiles;
  const int32_t* param_group;
  const float* steps;
  const uint8_t* active;
  const float* hparams;
  int64_t numel;
  int64_t n_tiles;
  int64_t n_params;
  int64_t n_groups;
  DType dtype;
};

}  // namespace fused_adamw
