// The device table every fused_adamw backend reads: plain pointers, sizes and the
// hyperparameter table, passed by value to the kernel. No torch, no pybind.
//
// fused_adamw owns its state and nothing else: params and grads are read and written where they
// live (a user's tensor, a DDP or ZeRO bucket, an FSDP2 shard), through pointers in one table
// per (device, dtype). Python builds it (python/fused_adamw/_table.py) and this header is the
// contract:
//
//   rows          int64 [n_rows][kRowCols]: one row per param that steps now (it has a grad);
//                 columns kRow* below. Every pointer addresses numel elements laid out in the
//                 same order in memory (the param's storage order), at any element offset (a
//                 pointer need not be 16-byte aligned): param and grad of the table's dtype,
//                 the moments of its state_dtype, the extra buffer of its master mode's.
//   tile_starts   int64 [n_rows + 1]: the first tile of each row; tile_starts[n_rows] = n_tiles.
//                 Row r has tiles_of(phase, numel) tiles (below), where phase is the param's
//                 element offset inside its 16-byte vector.
//   hparams       float32 [n_groups][kHparamCols]: one row per param group, columns kHp*.
//   grad_scale, found_inf: GradScaler's values (below), or null.
//
// Tiles (kernels/adamw_tile.cuh): tile j of a row covers the elements whose position
// u = phase + i (i the element index) lies in [j * kTileElems, (j + 1) * kTileElems). Tile
// boundaries therefore fall on the param's 16-byte vector boundaries; a tile's body is whole
// 16-byte vectors and only the first and last tile of a param have a scalar head or tail.
// When grad or a state pointer has another 16-byte phase than the param (a fresh grad beside a
// param placed at an odd offset by vector_to_parameters), the tile runs scalar: each byte is
// still read and written once.
#pragma once

#include <cstdint>

namespace fused_adamw {

constexpr int64_t kTileElems = 16384;  // python/fused_adamw/_table.py TILE_ELEMS

// Columns of a row of the param table (python/fused_adamw/_table.py ROW_* mirrors them).
constexpr int kRowParam = 0;         // T*: the param, updated in place
constexpr int kRowGrad = 1;          // T*: this step's grad; written only with grad_scale
constexpr int kRowExpAvg = 2;        // T*: first moment
constexpr int kRowExpAvgSq = 3;      // T*: second moment
constexpr int kRowMaxExpAvgSq = 4;   // T*: amsgrad maxima; 0 when the row's group has no amsgrad
constexpr int kRowStep = 5;          // float*: the param's step count (0-d float32 tensor)
constexpr int kRowNumel = 6;         // int64: elements
constexpr int kRowGroup = 7;         // int64: the row of hparams
// Low-precision params (16-bit params with a master mode, hparams column kHpMasterMode):
constexpr int kRowExtra = 8;         // the mode's buffer, numel elements with the param's
                                     // layout: float* master (kMasterFp32), int16_t*
                                     // remainder (kMasterRemainder), T* compensation
                                     // (kMasterKahan); 0 for other modes and float32 tables
constexpr int kRowSeed = 9;          // int64: the param's stochastic rounding seed (its
                                     // state's "sr_seed"); 0 unless kMasterStochastic
constexpr int kRowCols = 10;         // 80 bytes per row

// Columns of the hparams table (python/fused_adamw/_table.py HP_* mirrors these names).
constexpr int kHpLr = 0;
constexpr int kHpBeta1 = 1;
constexpr int kHpBeta2 = 2;
constexpr int kHpEps = 3;
constexpr int kHpWeightDecay = 4;
constexpr int kHpMaximize = 5;    // 0.0 or 1.0
constexpr int kHpAmsgrad = 6;     // 0.0 or 1.0
constexpr int kHpDecayMode = 7;   // 0.0: decoupled decay (AdamW), 1.0: L2 added to the grad (Adam)
constexpr int kHpMaxLr = 8;       // decouple_lr: the group's max_lr (> 0); 0.0: torch's lr * wd
constexpr int kHpMasterMode = 9;  // master_weights of 16-bit params: kMaster* (adamw_math.cuh)
                                  // as a float; ignored by float32 tables
constexpr int kHparamCols = 16;   // 64-byte rows; columns 10-15 spare (0.0)

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// The number of tiles of a param of `numel` elements whose first element sits `phase`
// elements into its 16-byte vector.
inline int64_t tiles_of(int64_t phase, int64_t numel) {
  return numel <= 0 ? 0 : (phase + numel + kTileElems - 1) / kTileElems;
}

// torch.amp.GradScaler's sync-free path (optimizer.grad_scale / optimizer.found_inf, both
// float32 scalars on the table's device, or null):
//   grad_scale  non-null: every grad is divided by *grad_scale (torch's fused kernels divide;
//               the update uses the float quotient) and the quotient is written back to the
//               grad in its dtype, so p.grad holds the unscaled grad after a taken step.
//   found_inf   non-null and *found_inf != 0: the whole step is skipped: no step count,
//               param, moment or grad is written (the grads stay scaled, as torch leaves them).
//               Note != 0, not torch's == 1: infs on two devices sum to 2 and still skip.
// Both are read on the device, so nothing waits for the host.
struct AdamWParams {
  const int64_t* rows;         // [n_rows][kRowCols]
  const int64_t* tile_starts;  // [n_rows + 1]
  const float* hparams;        // [n_groups][kHparamCols]
  int64_t n_rows;
  int64_t n_tiles;
  int64_t n_groups;
  DType dtype;                // the params' (and grads') storage dtype
  DType state_dtype;          // exp_avg, exp_avg_sq, max_exp_avg_sq: dtype, or float32/bfloat16
                              // (state_dtype=...); supported pairs: state_pair_supported
  const float* grad_scale;    // null: grads are already unscaled
  const float* found_inf;     // null: the step is always taken
  // Issue #19 (python/fused_adamw/_clip.py), both null unless clipping or track_norms:
  const float* clip_coef;     // float32 scalar: the update reads grad * *clip_coef (adamw_clip)
  float* tile_norms;          // track_norms' partials, (adamw_math.cuh's order) of the sums
                              // of squares of the grad as used (unscaled, before clipping),
                              // the param after the step and (param after - param before), as
                              // stored: the CPU loop's per tile [n_tiles][3]; the CUDA
                              // kernels' per thread [n_tiles][3][kNormLanes] then per tile
                              // [n_tiles][3] (kernels/adamw_norm.cuh); reduced per row by
                              // the launchers
};

// The (param, state) dtype pairs the compiled loops take: the same dtype, 16-bit params with
// float32 moments (classic mixed precision), float32 params with bfloat16 moments (as torch's
// fused CUDA AdamW). float16 params with bfloat16 moments are refused (one more instantiation
// of every kernel for a pairing no recipe uses).
inline bool state_pair_supported(DType dtype, DType state_dtype) {
  return dtype == state_dtype || (dtype != DType::kFloat32 && state_dtype == DType::kFloat32) ||
         (dtype == DType::kFloat32 && state_dtype == DType::kBFloat16);
}

}  // namespace fused_adamw
