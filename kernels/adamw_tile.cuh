// Per-tile setup shared by the CUDA kernel and the CPU loop: which range of which param a tile
// covers, whether that param takes part in this step, and its AdamWScalars.
#pragma once

#include <cstdint>

#include "adamw_math.cuh"
#include "adamw_params.h"

namespace fused_adamw {

struct TileWork {
  int64_t start;  // first element (a multiple of 16 / sizeof(dtype))
  int64_t end;    // one past the last element (likewise)
  AdamWScalars s;
};

// False when tile's param has no grad in this step (torch skips it: nothing is touched).
// has_max: the bucket has a max_exp_avg_sq buffer; only then can s.amsgrad be true.
FUSED_ADAMW_HD bool tile_work(const AdamWParams& p, int64_t tile, bool has_max, TileWork& w) {
  const int64_t param_index = p.tiles[3 * tile + 2];
  if (p.active[param_index] == 0) return false;
  w.start = p.tiles[3 * tile + 0];
  w.end = p.tiles[3 * tile + 1];
  const float* hp = p.hparams + static_cast<int64_t>(p.param_group[param_index]) * kHparamCols;
  w.s = adamw_scalars(hp[kHpLr], hp[kHpBeta1], hp[kHpBeta2], hp[kHpEps], hp[kHpWeightDecay],
                      p.steps[param_index], hp[kHpMaximize] != 0.0f,
                      has_max && hp[kHpAmsgrad] != 0.0f);
  return true;
}

}  // namespace fused_adamw
