// Per-tile setup shared by the CUDA kernel and the CPU loop: which param a tile belongs to,
// which of its elements it covers, and that param's AdamWScalars for this step.
#pragma once

#include <cstdint>

#include "adamw_math.cuh"
#include "adamw_params.h"

namespace fused_adamw {

struct TileWork {
  int64_t row;      // the param's row in p.rows
  int64_t phase;    // the param's element offset inside its 16-byte vector
  int64_t u_begin;  // covered positions u = phase + i, i the element index: [u_begin, u_end)
  int64_t u_end;
  AdamWScalars s;
};

// The row whose tiles include `tile`: the last r with tile_starts[r] <= tile (rows with no
// tiles share their tile_starts value with the next row and are skipped by "last").
FUSED_ADAMW_HD int64_t row_of_tile(const int64_t* tile_starts, int64_t n_rows, int64_t tile) {
  int64_t lo = 0, hi = n_rows;  // invariant: tile_starts[lo] <= tile < tile_starts[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tile_starts[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Everything one tile of row `row` needs. `elem_size` is sizeof the storage type (4 or 2).
FUSED_ADAMW_HD TileWork tile_work_in_row(const AdamWParams& p, int64_t tile, int64_t row,
                                         int64_t elem_size) {
  TileWork w;
  w.row = row;
  const int64_t* r = p.rows + w.row * kRowCols;
  const int64_t j = tile - p.tile_starts[w.row];
  w.phase = static_cast<int64_t>(static_cast<uint64_t>(r[kRowParam]) & 15u) / elem_size;
  const int64_t numel = r[kRowNumel];
  const int64_t lo = j * kTileElems, hi = lo + kTileElems;
  w.u_begin = lo > w.phase ? lo : w.phase;
  w.u_end = hi < w.phase + numel ? hi : w.phase + numel;
  const float* hp = p.hparams + r[kRowGroup] * kHparamCols;
  const float step = *reinterpret_cast<const float*>(r[kRowStep]);
  w.s = adamw_scalars(hp[kHpLr], hp[kHpBeta1], hp[kHpBeta2], hp[kHpEps], hp[kHpWeightDecay],
                      hp[kHpMaxLr], step, hp[kHpMaximize] != 0.0f,
                      hp[kHpAmsgrad] != 0.0f && r[kRowMaxExpAvgSq] != 0,
                      hp[kHpDecayMode] != 0.0f);
  w.s.clip_coef = p.clip_coef != nullptr ? *p.clip_coef : 1.0f;  // issue #19 (adamw_clip)
  return w;
}

// The same, finding the row first (the CUDA kernel: one tile per block, in any order).
FUSED_ADAMW_HD TileWork tile_work(const AdamWParams& p, int64_t tile, int64_t elem_size) {
  return tile_work_in_row(p, tile, row_of_tile(p.tile_starts, p.n_rows, tile), elem_size);
}

// The master mode of row r (kMaster*, adamw_math.cuh): its group's kHpMasterMode for 16-bit
// tables; float32 params always step as they are.
FUSED_ADAMW_HD int master_mode_of(const AdamWParams& p, const int64_t* r) {
  if (p.dtype == DType::kFloat32) return kMasterNone;
  return static_cast<int>(p.hparams[r[kRowGroup] * kHparamCols + kHpMasterMode]);
}

// Whether every buffer of a row shares the param's 16-byte phase, so that whole 16-byte
// vectors of all of them line up (the CUDA kernel's vector path).
FUSED_ADAMW_HD bool row_vector_aligned(const int64_t* r, bool amsgrad) {
  const uint64_t a = static_cast<uint64_t>(r[kRowParam]);
  uint64_t x = (a ^ static_cast<uint64_t>(r[kRowGrad])) |
               (a ^ static_cast<uint64_t>(r[kRowExpAvg])) |
               (a ^ static_cast<uint64_t>(r[kRowExpAvgSq]));
  if (amsgrad) x |= a ^ static_cast<uint64_t>(r[kRowMaxExpAvgSq]);
  return (x & 15u) == 0;
}

// The low-precision kernel's form (buffers of several element sizes): whether element -phase
// of every buffer a row reads (grad and param of `size` bytes, the moments of `state_size`,
// max_exp_avg_sq with amsgrad, the master mode's extra buffer of `extra_size`, 0: none)
// would be 16-byte aligned, i.e. every buffer shares the param's 16-byte grid in elements, so
// that positions [k * G, (k + 1) * G) are whole 16-byte vectors of all of them for any G
// that is a multiple of 16 / each size. For one element size it is row_vector_aligned.
FUSED_ADAMW_HD bool row_group_aligned(const int64_t* r, int64_t phase, int64_t size,
                                      int64_t state_size, int64_t extra_size, bool amsgrad) {
  const int64_t p = phase * size, ps = phase * state_size;
  uint64_t x = static_cast<uint64_t>(r[kRowParam] - p) | static_cast<uint64_t>(r[kRowGrad] - p) |
               static_cast<uint64_t>(r[kRowExpAvg] - ps) |
               static_cast<uint64_t>(r[kRowExpAvgSq] - ps);
  if (amsgrad) x |= static_cast<uint64_t>(r[kRowMaxExpAvgSq] - ps);
  if (extra_size != 0) x |= static_cast<uint64_t>(r[kRowExtra] - phase * extra_size);
  return (x & 15u) == 0;
}

}  // namespace fused_adamw
