// The CPU loop over kernels/adamw_math.cuh: CI runs the header's exact arithmetic with it, and
// the "cpu" backend steps CPU buckets with it.
//
// Same table and tiles as the CUDA kernel (params and grads where they live, pointers in the
// rows): tiles are spread over threads; per tile the param's scalars are computed once
// (adamw_scalars), then the element loop calls adamw_update in float.
// bf16/fp16 are converted with torch's own bit-level routines (c10/util/BFloat16.h
// round_to_nearest_even, c10/util/Half.h fp16_ieee_{from,to}_fp32_value), so stores round
// exactly as torch's do, NaN included (bf16 NaN -> 0x7FC0).
//
// NOTE on vectorization: the loop is specialized on (dtype, amsgrad, maximize, weight decay
// form: none, decoupled or L2) so that no branch is left in it, and compiled three times (x86-64-v4, x86-64-v3, baseline) with
// target_clones: a portable wheel that uses AVX-512/AVX2+FMA where the CPU has them. fmaf is
// a single instruction only with FMA; on the baseline clone it is glibc's correctly rounded
// fmaf (same result, slower). Built with -ffp-contract=off (the fp16 conversion relies on
// separate roundings) and -fno-math-errno (lets sqrtf vectorize; results are unchanged).

#include "cpu_adamw.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#else
#include <algorithm>
#include <thread>
#include <vector>
#endif

#include "adamw_math.cuh"
#include "adamw_tile.cuh"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12 && \
    !defined(FUSED_ADAMW_NO_CLONES)
#define FUSED_ADAMW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSED_ADAMW_CLONES
#endif

#if defined(__GNUC__)
#define FUSED_ADAMW_INLINE inline __attribute__((always_inline))
#else
#define FUSED_ADAMW_INLINE inline
#endif

namespace fused_adamw {
namespace {

FUSED_ADAMW_INLINE uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

FUSED_ADAMW_INLINE float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ------------------------------------------------------------------------------------------
// storage <-> float, bit-exact with torch
// ------------------------------------------------------------------------------------------

struct F32 {
  using Storage = float;
  static FUSED_ADAMW_INLINE float load(float x) { return x; }
  static FUSED_ADAMW_INLINE float store(float f) { return f; }
  static FUSED_ADAMW_INLINE float stochastic(float f, uint32_t) { return f; }  // never used
};

struct BF16 {
  using Storage = uint16_t;
  static FUSED_ADAMW_INLINE float load(uint16_t b) { return float_of(uint32_t(b) << 16); }
  // c10::detail::round_to_nearest_even
  static FUSED_ADAMW_INLINE uint16_t store(float f) {
    const uint32_t u = bits_of(f);
    const uint32_t rounding_bias = ((u >> 16) & 1u) + 0x7FFFu;
    const uint16_t rounded = static_cast<uint16_t>((u + rounding_bias) >> 16);
    return f != f ? uint16_t(0x7FC0) : rounded;
  }
  static FUSED_ADAMW_INLINE float stochastic(float f, uint32_t r) {
    return round_bf16_stochastic(f, r);
  }
};

struct F16 {
  using Storage = uint16_t;
  // c10::detail::fp16_ieee_to_fp32_value (exact)
  static FUSED_ADAMW_INLINE float load(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = 0x1.0p-112f;
    const float normalized = float_of((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized = float_of((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    return float_of(sign | (two_w < denormalized_cutoff ? bits_of(denormalized)
                                                        : bits_of(normalized)));
  }
  // c10::detail::fp16_ieee_from_fp32_value (round to nearest even)
  static FUSED_ADAMW_INLINE uint16_t store(float f) {
    const float scale_to_inf = float_of(239u << 23);
    const float scale_to_zero = float_of(17u << 23);
    float base = ((f < 0 ? -f : f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = bits_of(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits_of(base);
    const uint32_t exp_bits = (b >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = b & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
  static FUSED_ADAMW_INLINE float stochastic(float f, uint32_t r) {
    return round_f16_stochastic(f, r);
  }
};

// ------------------------------------------------------------------------------------------
// one tile: no branch left in the element loop
// ------------------------------------------------------------------------------------------

// The weight decay form of a tile (the header's s.l2 and weight_decay != 0, made constant).
enum class Decay { kNone, kDecoupled, kL2 };

// D: the param's storage, DS: the moments' (state_dtype; D itself by default).
// Element i's grad as the update reads it: under GradScaler (SCALED) divided by the scale
// (adamw_unscale) and stored back, as the CUDA kernel does. Shared by the plain and the
// master-mode loops.
// Then times the clip coefficient (adamw_clip; 1.0f without clipping), not written back.
template <typename D, bool SCALED>
FUSED_ADAMW_INLINE float grad_of(typename D::Storage* __restrict__ grad, int64_t i, float scale,
                                 float coef) {
  float gf = D::load(grad[i]);
  if (SCALED) {
    gf = adamw_unscale(gf, scale);
    grad[i] = D::store(gf);
  }
  return adamw_clip(gf, coef);
}

// SCALED: GradScaler's grad_scale is set: the grad is divided by `scale` (adamw_unscale) and
// the quotient stored back, as the CUDA kernel does.
template <typename D, typename DS, bool AMSGRAD, bool MAXIMIZE, Decay DECAY, bool SCALED>
FUSED_ADAMW_INLINE void tile_loop(const int64_t* r, int64_t first, int64_t n, AdamWScalars s,
                                  float scale, float coef) {
  using T = typename D::Storage;
  using S = typename DS::Storage;
  T* __restrict__ param = reinterpret_cast<T*>(r[kRowParam]) + first;
  T* __restrict__ grad = reinterpret_cast<T*>(r[kRowGrad]) + first;
  S* __restrict__ exp_avg = reinterpret_cast<S*>(r[kRowExpAvg]) + first;
  S* __restrict__ exp_avg_sq = reinterpret_cast<S*>(r[kRowExpAvgSq]) + first;
  S* __restrict__ max_exp_avg_sq =
      AMSGRAD ? reinterpret_cast<S*>(r[kRowMaxExpAvgSq]) + first : nullptr;
  s.amsgrad = AMSGRAD;
  s.maximize = MAXIMIZE;
  s.l2 = DECAY == Decay::kL2;  // folds the header's "s.l2" test away
  if (DECAY == Decay::kNone) s.weight_decay = 0.0f;  // and its "weight_decay != 0" test
  // With kDecoupled the test is true for the whole tile; gcc unswitches it out of the loop.
  for (int64_t i = 0; i < n; ++i) {
    float pf = D::load(param[i]);
    float mf = DS::load(exp_avg[i]);
    float vf = DS::load(exp_avg_sq[i]);
    float xf = AMSGRAD ? DS::load(max_exp_avg_sq[i]) : 0.0f;
    const float gf = grad_of<D, SCALED>(grad, i, scale, coef);
    adamw_update(pf, gf, mf, vf, xf, s);
    param[i] = D::store(pf);
    exp_avg[i] = DS::store(mf);
    exp_avg_sq[i] = DS::store(vf);
    if (AMSGRAD) max_exp_avg_sq[i] = DS::store(xf);
  }
}

// A 16-bit param under a master mode (adamw_math.cuh, "Low-precision params"): the same
// adamw_update, from and to the mode's values. Maximize and the decay form stay runtime tests
// of the header here (one loop per mode, not 6 per mode: these loops are memory-bound on the
// extra buffer anyway). SCALED as in tile_loop: the grad is unscaled and written back first;
// a skipped step (found_inf) never gets here, so masters, remainders, Kahan buffers and the
// stochastic key's step all stay as they were.
template <typename D, typename DS, bool AMSGRAD, int MODE, bool SCALED>
FUSED_ADAMW_INLINE void tile_loop_master(const int64_t* r, int64_t first, int64_t n,
                                         AdamWScalars s, float scale, float coef) {
  using T = typename D::Storage;
  using S = typename DS::Storage;
  T* __restrict__ param = reinterpret_cast<T*>(r[kRowParam]) + first;
  T* __restrict__ grad = reinterpret_cast<T*>(r[kRowGrad]) + first;
  S* __restrict__ exp_avg = reinterpret_cast<S*>(r[kRowExpAvg]) + first;
  S* __restrict__ exp_avg_sq = reinterpret_cast<S*>(r[kRowExpAvgSq]) + first;
  S* __restrict__ max_exp_avg_sq =
      AMSGRAD ? reinterpret_cast<S*>(r[kRowMaxExpAvgSq]) + first : nullptr;
  float* __restrict__ master =
      MODE == kMasterFp32 ? reinterpret_cast<float*>(r[kRowExtra]) + first : nullptr;
  int16_t* __restrict__ rem =
      MODE == kMasterRemainder ? reinterpret_cast<int16_t*>(r[kRowExtra]) + first : nullptr;
  T* __restrict__ comp = MODE == kMasterKahan ? reinterpret_cast<T*>(r[kRowExtra]) + first
                                              : nullptr;
  const uint32_t key = MODE == kMasterStochastic
                           ? sr_key(r[kRowSeed], *reinterpret_cast<const float*>(r[kRowStep]))
                           : 0u;
  s.amsgrad = AMSGRAD;
  for (int64_t i = 0; i < n; ++i) {
    float pf;
    if constexpr (MODE == kMasterFp32) {
      const float m = master[i];
      pf = D::store(m) == param[i] ? m : D::load(param[i]);  // a written param wins
    } else if constexpr (MODE == kMasterRemainder) {
      pf = remainder_join(param[i], rem[i]);
    } else {
      pf = D::load(param[i]);
    }
    const float p0 = pf;
    float mf = DS::load(exp_avg[i]);
    float vf = DS::load(exp_avg_sq[i]);
    float xf = AMSGRAD ? DS::load(max_exp_avg_sq[i]) : 0.0f;
    const float gf = grad_of<D, SCALED>(grad, i, scale, coef);
    adamw_update(pf, gf, mf, vf, xf, s);
    if constexpr (MODE == kMasterFp32) {
      master[i] = pf;
      param[i] = D::store(pf);
    } else if constexpr (MODE == kMasterRemainder) {
      remainder_split(pf, param[i], rem[i]);
    } else if constexpr (MODE == kMasterKahan) {
      float y;
      const T ps = D::store(kahan_sum(p0, pf, D::load(comp[i]), y));
      param[i] = ps;
      comp[i] = D::store(kahan_residual(y, p0, D::load(ps)));
    } else {  // kMasterStochastic
      param[i] = D::store(D::stochastic(pf, sr_bits(key, first + i)));
    }
    exp_avg[i] = DS::store(mf);
    exp_avg_sq[i] = DS::store(vf);
    if (AMSGRAD) max_exp_avg_sq[i] = DS::store(xf);
  }
}

template <typename D, typename DS, bool AMSGRAD, bool SCALED>
FUSED_ADAMW_INLINE void tile_dispatch_master(const int64_t* r, int64_t first, int64_t n,
                                             const AdamWScalars& s, int mode, float scale,
                                             float coef) {
  switch (mode) {
    case kMasterFp32:
      return tile_loop_master<D, DS, AMSGRAD, kMasterFp32, SCALED>(r, first, n, s, scale, coef);
    case kMasterRemainder:
      if constexpr (std::is_same<D, BF16>::value) {
        return tile_loop_master<D, DS, AMSGRAD, kMasterRemainder, SCALED>(r, first, n, s,
                                                                          scale, coef);
      }
      return;  // refused for float16 by the optimizer (_table checks it too)
    case kMasterKahan:
      return tile_loop_master<D, DS, AMSGRAD, kMasterKahan, SCALED>(r, first, n, s, scale, coef);
    case kMasterStochastic:
      return tile_loop_master<D, DS, AMSGRAD, kMasterStochastic, SCALED>(r, first, n, s, scale, coef);
  }
}

template <typename D, typename DS, bool AMSGRAD, bool SCALED>
FUSED_ADAMW_INLINE void tile_dispatch(const int64_t* r, int64_t first, int64_t n,
                                      const AdamWScalars& s, int mode, float scale,
                                      float coef) {
  if constexpr (!std::is_same<D, F32>::value) {
    if (mode != kMasterNone) {
      return tile_dispatch_master<D, DS, AMSGRAD, SCALED>(r, first, n, s, mode, scale, coef);
    }
  }
  const Decay decay = s.l2 ? Decay::kL2
                           : (s.weight_decay != 0.0f ? Decay::kDecoupled : Decay::kNone);
  if (s.maximize) {
    switch (decay) {
      case Decay::kNone:
        return tile_loop<D, DS, AMSGRAD, true, Decay::kNone, SCALED>(r, first, n, s, scale, coef);
      case Decay::kDecoupled:
        return tile_loop<D, DS, AMSGRAD, true, Decay::kDecoupled, SCALED>(r, first, n, s, scale, coef);
      case Decay::kL2:
        return tile_loop<D, DS, AMSGRAD, true, Decay::kL2, SCALED>(r, first, n, s, scale, coef);
    }
  } else {
    switch (decay) {
      case Decay::kNone:
        return tile_loop<D, DS, AMSGRAD, false, Decay::kNone, SCALED>(r, first, n, s, scale, coef);
      case Decay::kDecoupled:
        return tile_loop<D, DS, AMSGRAD, false, Decay::kDecoupled, SCALED>(r, first, n, s,
                                                                           scale, coef);
      case Decay::kL2:
        return tile_loop<D, DS, AMSGRAD, false, Decay::kL2, SCALED>(r, first, n, s, scale, coef);
    }
  }
}

// ------------------------------------------------------------------------------------------
// norms (issue #19): adamw_math.cuh's lane order, so that the CUDA kernel can match it
// ------------------------------------------------------------------------------------------

// One whole lane round (N * kNormLanes consecutive positions, the first at a multiple of that):
// position l * N + e of the round goes to lane l, in increasing e. One affine loop over lanes,
// vectorized across lanes (each SIMD lane its own accumulator; gcc loads N vectors and
// deinterleaves them with permutes), so the order is adamw_math.cuh's exactly.
template <int N, bool INF, typename F>
FUSED_ADAMW_INLINE void round_reduce(float* __restrict__ lanes, F f) {
  for (int l = 0; l < kNormLanes; ++l) {
    float a = lanes[l];
    for (int e = 0; e < N; ++e) {
      const float x = f(l * N + e);
      a = INF ? adamw_norm_max(a, x) : a + x;
    }
    lanes[l] = a;
  }
}

// Accumulates f(u) for the positions u in [u0, u1) of tile-local lane space into lanes: u goes
// to lane (u / N) % kNormLanes, in increasing u (sum, or INF: the NaN-sticky max).
// NOTE on partial rounds (a row's first and last round in a tile, and every tile of a row that
// is not a multiple of N * kNormLanes long): the round is copied into a zero-padded buffer and
// reduced by the same vector loop, instead of one element at a time (that scalar tail was half
// of the norm pass's time with 5,000 params of 10,000 elements). Padding is exact: a lane only
// ever holds +0, a positive number, +inf or NaN (it starts at +0 and takes squares, or |g|),
// and for those a + 0.0f == a and adamw_norm_max(a, 0.0f) == a, bit for bit.
template <int N, bool INF, typename F>
FUSED_ADAMW_INLINE void lanes_reduce(float* __restrict__ lanes, int64_t u0, int64_t u1, F f) {
  constexpr int64_t kRound = int64_t(N) * kNormLanes;
  for (int64_t rb = u0 / kRound * kRound; rb < u1; rb += kRound) {
    if (rb >= u0 && rb + kRound <= u1) {
      round_reduce<N, INF>(lanes, [&](int64_t i) { return f(rb + i); });
      continue;
    }
    float buf[kRound];
    for (int64_t i = 0; i < kRound; ++i) buf[i] = 0.0f;
    const int64_t a = std::max(u0, rb), b = std::min(u1, rb + kRound);
    for (int64_t u = a; u < b; ++u) buf[u - rb] = f(u);
    round_reduce<N, INF>(lanes, [&buf](int64_t i) { return buf[i]; });
  }
}

// The norm pass over one tile: the partial of |grad / scale| (squares, or the max).
template <typename D, bool SCALED, bool INF>
FUSED_ADAMW_INLINE float norm_tile(const AdamWParams& p, int64_t t, int64_t row) {
  constexpr int N = 16 / sizeof(typename D::Storage);
  const int64_t* r = p.rows + row * kRowCols;
  const int64_t j = t - p.tile_starts[row];
  const int64_t phase =
      static_cast<int64_t>(static_cast<uint64_t>(r[kRowParam]) & 15u) / sizeof(typename D::Storage);
  const int64_t base = j * kTileElems;  // the tile's first position
  const int64_t u_begin = std::max(base, phase);
  const int64_t u_end = std::min(base + kTileElems, phase + r[kRowNumel]);
  const typename D::Storage* __restrict__ g =
      reinterpret_cast<const typename D::Storage*>(r[kRowGrad]) + (base - phase);
  const float scale = SCALED ? *p.grad_scale : 1.0f;
  float lanes[kNormLanes] = {};
  auto value = [&](int64_t u) {  // u relative to the tile's first position
    const float gf = SCALED ? adamw_unscale(D::load(g[u]), scale) : D::load(g[u]);
    return INF ? (gf < 0 ? -gf : gf) : gf * gf;
  };
  lanes_reduce<N, INF>(lanes, u_begin - base, u_end - base, value);
  return adamw_norm_tree(lanes, INF);
}

template <typename D>
FUSED_ADAMW_INLINE void norm_tiles_impl(const AdamWParams& p, int64_t t0, int64_t t1, bool inf,
                                        float* out) {
  if (t0 >= t1) return;
  int64_t row = row_of_tile(p.tile_starts, p.n_rows, t0);
  for (int64_t t = t0; t < t1; ++t) {
    while (p.tile_starts[row + 1] <= t) ++row;
    const bool scaled = p.grad_scale != nullptr;
    out[t] = inf ? (scaled ? norm_tile<D, true, true>(p, t, row)
                           : norm_tile<D, false, true>(p, t, row))
                 : (scaled ? norm_tile<D, true, false>(p, t, row)
                           : norm_tile<D, false, false>(p, t, row));
  }
}

FUSED_ADAMW_CLONES void norm_tiles_f32(const AdamWParams& p, int64_t t0, int64_t t1, bool inf,
                                       float* out) {
  norm_tiles_impl<F32>(p, t0, t1, inf, out);
}
FUSED_ADAMW_CLONES void norm_tiles_bf16(const AdamWParams& p, int64_t t0, int64_t t1, bool inf,
                                        float* out) {
  norm_tiles_impl<BF16>(p, t0, t1, inf, out);
}
FUSED_ADAMW_CLONES void norm_tiles_f16(const AdamWParams& p, int64_t t0, int64_t t1, bool inf,
                                       float* out) {
  norm_tiles_impl<F16>(p, t0, t1, inf, out);
}

void norm_tiles(const AdamWParams& p, int64_t t0, int64_t t1, bool inf, float* out) {
  switch (p.dtype) {
    case DType::kFloat32:
      return norm_tiles_f32(p, t0, t1, inf, out);
    case DType::kBFloat16:
      return norm_tiles_bf16(p, t0, t1, inf, out);
    case DType::kFloat16:
      return norm_tiles_f16(p, t0, t1, inf, out);
  }
}

// A tile's update with track_norms: in chunks of whole lane rounds, the grads as used (before
// clipping) and the params as stored are kept, the ordinary loop runs on the chunk, then the
// three lanes take grad^2, param_after^2 and (param_after - param_before)^2 (a second,
// cache-hot pass over the chunk: the update loop itself stays as it is).
template <typename D, typename DS, bool AMSGRAD, bool SCALED>
FUSED_ADAMW_INLINE void tile_with_norms(const int64_t* r, const TileWork& w, int64_t tile_base,
                                        int mode, float scale, float coef, float* out) {
  using T = typename D::Storage;
  constexpr int N = 16 / sizeof(T);
  constexpr int64_t kChunk = int64_t(N) * kNormLanes;
  T* const param = reinterpret_cast<T*>(r[kRowParam]);
  const T* const grad = reinterpret_cast<const T*>(r[kRowGrad]);
  float lanes[3][kNormLanes] = {};
  float g_used[kChunk], p_before[kChunk];
  for (int64_t u0 = w.u_begin; u0 < w.u_end;) {
    // chunk [u0, u1): up to the next lane-round boundary of the tile
    const int64_t rel = u0 - tile_base;
    const int64_t u1 = std::min(w.u_end, tile_base + (rel / kChunk + 1) * kChunk);
    const int64_t first = u0 - w.phase, n = u1 - u0;
    for (int64_t i = 0; i < n; ++i) {
      const float gf = D::load(grad[first + i]);
      g_used[i] = SCALED ? adamw_unscale(gf, scale) : gf;
      p_before[i] = D::load(param[first + i]);
    }
    tile_dispatch<D, DS, AMSGRAD, SCALED>(r, first, n, w.s, mode, scale, coef);
    const int64_t c0 = rel;  // chunk positions relative to the tile
    auto at = [&](int64_t u) { return u - c0; };
    lanes_reduce<N, false>(lanes[0], c0, c0 + n, [&](int64_t u) { const float g = g_used[at(u)]; return g * g; });
    lanes_reduce<N, false>(lanes[1], c0, c0 + n, [&](int64_t u) {
      const float a = D::load(param[first + at(u)]);
      return a * a;
    });
    lanes_reduce<N, false>(lanes[2], c0, c0 + n, [&](int64_t u) {
      const float d = D::load(param[first + at(u)]) - p_before[at(u)];
      return d * d;
    });
    u0 = u1;
  }
  for (int c = 0; c < 3; ++c) out[c] = adamw_norm_tree(lanes[c], false);
}

// Tiles [t0, t1), in the CUDA kernel's tiling (kernels/adamw_tile.cuh). The CPU has no vector
// phase to respect, so each tile is one loop over its elements.
template <typename D, typename DS>
FUSED_ADAMW_INLINE void run_tiles_impl(const AdamWParams& p, int64_t t0, int64_t t1) {
  if (t0 >= t1) return;
  const float coef = p.clip_coef != nullptr ? *p.clip_coef : 1.0f;
  // Tiles in order: the row is searched once, then followed (rows with no tile are skipped).
  int64_t row = row_of_tile(p.tile_starts, p.n_rows, t0);
  for (int64_t t = t0; t < t1; ++t) {
    while (p.tile_starts[row + 1] <= t) ++row;
    const TileWork w = tile_work_in_row(p, t, row, sizeof(typename D::Storage));
    const int64_t* r = p.rows + w.row * kRowCols;
    const int64_t first = w.u_begin - w.phase, n = w.u_end - w.u_begin;
    const int mode = master_mode_of(p, r);
    if (p.tile_norms != nullptr) {
      const int64_t base = (t - p.tile_starts[row]) * kTileElems;
      float* out = p.tile_norms + 3 * t;
      if (p.grad_scale != nullptr) {
        const float scale = *p.grad_scale;
        w.s.amsgrad ? tile_with_norms<D, DS, true, true>(r, w, base, mode, scale, coef, out)
                    : tile_with_norms<D, DS, false, true>(r, w, base, mode, scale, coef, out);
      } else {
        w.s.amsgrad ? tile_with_norms<D, DS, true, false>(r, w, base, mode, 1.0f, coef, out)
                    : tile_with_norms<D, DS, false, false>(r, w, base, mode, 1.0f, coef, out);
      }
      continue;
    }
    if (p.grad_scale != nullptr) {
      const float scale = *p.grad_scale;
      w.s.amsgrad ? tile_dispatch<D, DS, true, true>(r, first, n, w.s, mode, scale, coef)
                  : tile_dispatch<D, DS, false, true>(r, first, n, w.s, mode, scale, coef);
    } else {
      w.s.amsgrad ? tile_dispatch<D, DS, true, false>(r, first, n, w.s, mode, 1.0f, coef)
                  : tile_dispatch<D, DS, false, false>(r, first, n, w.s, mode, 1.0f, coef);
    }
  }
}

// The entry points each ISA clone is made of (target_clones wants plain functions): one per
// supported (param, state) dtype pair (adamw_params.h state_pair_supported).
FUSED_ADAMW_CLONES void run_tiles_f32(const AdamWParams& p, int64_t t0, int64_t t1) {
  run_tiles_impl<F32, F32>(p, t0, t1);
}
FUSED_ADAMW_CLONES void run_tiles_bf16(const AdamWParams& p, int64_t t0, int64_t t1) {
  run_tiles_impl<BF16, BF16>(p, t0, t1);
}
FUSED_ADAMW_CLONES void run_tiles_f16(const AdamWParams& p, int64_t t0, int64_t t1) {
  run_tiles_impl<F16, F16>(p, t0, t1);
}
FUSED_ADAMW_CLONES void run_tiles_f32_bf16(const AdamWParams& p, int64_t t0, int64_t t1) {
  run_tiles_impl<F32, BF16>(p, t0, t1);
}
FUSED_ADAMW_CLONES void run_tiles_bf16_f32(const AdamWParams& p, int64_t t0, int64_t t1) {
  run_tiles_impl<BF16, F32>(p, t0, t1);
}
FUSED_ADAMW_CLONES void run_tiles_f16_f32(const AdamWParams& p, int64_t t0, int64_t t1) {
  run_tiles_impl<F16, F32>(p, t0, t1);
}

void run_tiles(const AdamWParams& p, int64_t t0, int64_t t1) {
  const bool f32_state = p.state_dtype == DType::kFloat32 && p.dtype != DType::kFloat32;
  switch (p.dtype) {
    case DType::kFloat32:
      return p.state_dtype == DType::kBFloat16 ? run_tiles_f32_bf16(p, t0, t1)
                                                : run_tiles_f32(p, t0, t1);
    case DType::kBFloat16:
      return f32_state ? run_tiles_bf16_f32(p, t0, t1) : run_tiles_bf16(p, t0, t1);
    case DType::kFloat16:
      return f32_state ? run_tiles_f16_f32(p, t0, t1) : run_tiles_f16(p, t0, t1);
  }
}

// Below this many elements one thread does the table: waking a pool costs more.
constexpr int64_t kMinElemsPerThread = 1 << 15;

// Runs fn(t0, t1) over contiguous ranges of [0, n_tiles), one per thread: tiles are at most
// kTileElems, so ranges of equal tile count are close to equal work.
template <typename Fn>
void parallel_tiles(int64_t n_tiles, int64_t numel, int num_threads, const Fn& fn) {
  int64_t threads = num_threads > 0 ? num_threads : 1;
  if (threads > n_tiles) threads = n_tiles;
  if (threads > 1 && numel / threads < kMinElemsPerThread) {
    threads = numel / kMinElemsPerThread > 1 ? numel / kMinElemsPerThread : 1;
  }
  if (threads <= 1) {
    fn(int64_t(0), n_tiles);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t id = omp_get_thread_num();
    fn(n_tiles * id / nt, n_tiles * (id + 1) / nt);
  }
#else
  std::vector<std::thread> pool;
  for (int64_t id = 1; id < threads; ++id) {
    pool.emplace_back([&fn, n_tiles, id, threads] {
      fn(n_tiles * id / threads, n_tiles * (id + 1) / threads);
    });
  }
  fn(int64_t(0), n_tiles / threads);
  for (auto& t : pool) t.join();
#endif
}

int64_t total_numel(const AdamWParams& p) {
  int64_t numel = 0;
  for (int64_t i = 0; i < p.n_rows; ++i) numel += p.rows[i * kRowCols + kRowNumel];
  return numel;
}

}  // namespace

void adamw_step_cpu(const AdamWParams& p, int num_threads, float* row_norms) {
  // GradScaler found an inf: nothing moves (as the CUDA kernels).
  if (adamw_step_skipped(p.found_inf)) return;
  // The step counts first (as the CUDA launcher's first kernel), then the update reads them.
  for (int64_t i = 0; i < p.n_rows; ++i) {
    float* step = reinterpret_cast<float*>(p.rows[i * kRowCols + kRowStep]);
    *step = *step + 1.0f;
  }
  const int64_t n_tiles = p.n_tiles;
  std::vector<float> tile_norms;
  AdamWParams q = p;
  if (row_norms != nullptr) {
    tile_norms.assign(static_cast<size_t>(3 * (n_tiles > 0 ? n_tiles : 0)), 0.0f);
    q.tile_norms = tile_norms.data();
  }
  if (n_tiles > 0) {
    parallel_tiles(n_tiles, total_numel(p), num_threads,
                   [&q](int64_t t0, int64_t t1) { run_tiles(q, t0, t1); });
  }
  if (row_norms == nullptr) return;
  // Per row, its tiles in order, in double (adamw_math.cuh, the norms' order).
  for (int64_t r = 0; r < p.n_rows; ++r) {
    for (int c = 0; c < 3; ++c) {
      double acc = 0.0;
      for (int64_t t = p.tile_starts[r]; t < p.tile_starts[r + 1]; ++t) acc += tile_norms[3 * t + c];
      row_norms[3 * r + c] = static_cast<float>(acc);
    }
  }
}

void adamw_grad_norm_cpu(const AdamWParams& p, int num_threads, bool inf, double* out) {
  const int64_t n_tiles = p.n_tiles;
  std::vector<float> tiles(static_cast<size_t>(n_tiles > 0 ? n_tiles : 0), 0.0f);
  if (n_tiles > 0) {
    float* t = tiles.data();
    parallel_tiles(n_tiles, total_numel(p), num_threads,
                   [&p, inf, t](int64_t t0, int64_t t1) { norm_tiles(p, t0, t1, inf, t); });
  }
  double total = 0.0;
  for (int64_t r = 0; r < p.n_rows; ++r) {
    double acc = 0.0;
    for (int64_t t = p.tile_starts[r]; t < p.tile_starts[r + 1]; ++t) {
      const double v = tiles[t];
      acc = inf ? ((v > acc || v != v) && acc == acc ? v : acc) : acc + v;
    }
    out[r] = acc;
    total = inf ? ((acc > total || acc != acc) && total == total ? acc : total) : total + acc;
  }
  out[p.n_rows] = total;
}

const char* cpu_loop_isa() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12 && \
    !defined(FUSED_ADAMW_NO_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
  return "x86-64 baseline";
#else
  return "compiler default (no multiversioning)";
#endif
}

}  // namespace fused_adamw
