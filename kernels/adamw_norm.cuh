// The norm pass of gradient clipping (issue #19) on CUDA: included by adamw_kernel.cu inside
// its anonymous namespace (it uses Vec, load_one and kThreads from there).
//
// Four launches per table, in adamw_math.cuh's norm order, so that the result is bitwise the
// CPU loop's (csrc/cpu_adamw.cpp adamw_grad_norm_cpu; tests/test_kernel_emulation.py):
//   1. adamw_norm_lanes_kernel: one block per tile (grid-stride), thread t is lane t: it walks
//      the tile's vectors t, t + kNormLanes, ... element by element and accumulates |g/scale|^2
//      (or the NaN-sticky max of |g/scale|) in float; lanes[tile][t] = its partial. The only
//      pass over the grads (4 or 2 bytes per param read).
//   2. adamw_norm_tiles_kernel: one thread per tile: the pairwise tree over its lanes.
//   3. adamw_norm_rows_kernel: one thread per row: its tiles in order, in double.
//   4. adamw_norm_total_kernel: one thread: the rows in order, in double.
// No shared memory, barrier, warp intrinsic or atomic: partials go through a global scratch
// buffer between launches, so the emulation's execution model holds and the sum does not
// depend on the grid.
//
// track_norms (the per-row norms of the step itself) uses the same order: the step's NORMS
// kernels (adamw_kernel.cu adamw_norms_kernel, adamw_lowp_kernel<T, S, true>) leave each
// thread's three partials (lane t of its tile) in lanes [n_tiles][3][kNormLanes], then
//   5. adamw_step_norms_tiles_kernel: one thread per (tile, norm): the pairwise tree;
//   6. adamw_step_norms_rows_kernel: one thread per row: its tiles in order, in double, to
//      float, as csrc/cpu_adamw.cpp adamw_step_cpu. Both do nothing on a skipped step
//      (found_inf), which leaves row_norms as they were (as the CPU loop).
#pragma once

template <typename T, bool SCALED, bool INF>
__global__ void __launch_bounds__(kThreads)
    adamw_norm_lanes_kernel(const AdamWParams p, float* lanes) {
  static_assert(kThreads == kNormLanes, "one thread per lane of adamw_math.cuh's norm order");
  constexpr int64_t kSize = sizeof(typename Vec<T>::Scalar);
  constexpr int64_t N = Vec<T>::N;
  const float scale = SCALED ? *p.grad_scale : 1.0f;
  for (int64_t tile = blockIdx.x; tile < p.n_tiles; tile += gridDim.x) {
    const int64_t row = row_of_tile(p.tile_starts, p.n_rows, tile);
    const int64_t* r = p.rows + row * kRowCols;
    const int64_t phase = static_cast<int64_t>(static_cast<uint64_t>(r[kRowParam]) & 15u) / kSize;
    const int64_t base = (tile - p.tile_starts[row]) * kTileElems;
    const int64_t u_begin = base > phase ? base : phase;
    const int64_t u_end =
        base + kTileElems < phase + r[kRowNumel] ? base + kTileElems : phase + r[kRowNumel];
    const int64_t grad = r[kRowGrad];
    float acc = 0.0f;
    for (int64_t v = threadIdx.x; v * N < kTileElems; v += kNormLanes) {
      for (int64_t e = 0; e < N; ++e) {
        const int64_t u = base + v * N + e;
        if (u < u_begin || u >= u_end) continue;
        float g = load_one<T>(grad + (u - phase) * kSize);
        if (SCALED) g = adamw_unscale(g, scale);
        acc = INF ? adamw_norm_max(acc, g < 0 ? -g : g) : acc + g * g;
      }
    }
    lanes[tile * kNormLanes + threadIdx.x] = acc;
  }
}

__global__ void __launch_bounds__(kThreads)
    adamw_norm_tiles_kernel(float* lanes, int64_t n_tiles, bool inf, float* tiles) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < n_tiles;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    tiles[t] = adamw_norm_tree(lanes + t * kNormLanes, inf);
  }
}

__device__ __forceinline__ double norm_combine(double acc, double v, bool inf) {
  return inf ? ((v > acc || v != v) && acc == acc ? v : acc) : acc + v;
}

__global__ void __launch_bounds__(kThreads)
    adamw_norm_rows_kernel(const float* tiles, const int64_t* tile_starts, int64_t n_rows,
                           bool inf, double* out) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < n_rows;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    double acc = 0.0;
    for (int64_t t = tile_starts[r]; t < tile_starts[r + 1]; ++t) {
      acc = norm_combine(acc, static_cast<double>(tiles[t]), inf);
    }
    out[r] = acc;
  }
}

__global__ void __launch_bounds__(1) adamw_norm_total_kernel(double* out, int64_t n_rows,
                                                             bool inf) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double total = 0.0;
  for (int64_t r = 0; r < n_rows; ++r) total = norm_combine(total, out[r], inf);
  out[n_rows] = total;
}

__global__ void __launch_bounds__(kThreads)
    adamw_step_norms_tiles_kernel(float* lanes, int64_t n, const float* found_inf,
                                  float* tiles) {
  if (adamw_step_skipped(found_inf)) return;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    tiles[t] = adamw_norm_tree(lanes + t * kNormLanes, false);
  }
}

__global__ void __launch_bounds__(kThreads)
    adamw_step_norms_rows_kernel(const float* tiles, const int64_t* tile_starts, int64_t n_rows,
                                 const float* found_inf, float* row_norms) {
  if (adamw_step_skipped(found_inf)) return;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < n_rows;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    for (int c = 0; c < 3; ++c) {
      double acc = 0.0;
      for (int64_t t = tile_starts[r]; t < tile_starts[r + 1]; ++t) {
        acc += static_cast<double>(tiles[3 * t + c]);
      }
      row_norms[3 * r + c] = static_cast<float>(acc);
    }
  }
}

using NormLanesFn = void (*)(AdamWParams, float*);

template <typename T>
NormLanesFn norm_lanes_of(bool scaled, bool inf) {
  if (scaled) {
    return inf ? adamw_norm_lanes_kernel<T, true, true> : adamw_norm_lanes_kernel<T, true, false>;
  }
  return inf ? adamw_norm_lanes_kernel<T, false, true> : adamw_norm_lanes_kernel<T, false, false>;
}

NormLanesFn norm_lanes_for(DType dtype, bool scaled, bool inf) {
  switch (dtype) {
    case DType::kFloat32:
      return norm_lanes_of<float>(scaled, inf);
    case DType::kBFloat16:
      return norm_lanes_of<__nv_bfloat16>(scaled, inf);
    case DType::kFloat16:
      return norm_lanes_of<__half>(scaled, inf);
  }
  return nullptr;
}
