// What the VNNI kernels (int4_vnni.cpp, int8_vnni.cpp) share: per-block int8 quantization of activations, and the
// schedule of tiles and activation rows.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace airun {

constexpr int64_t kActBlock = 32;

// Activations per block of 32 in L int8 levels. L = 2: x ~= unit * (254 * hi + lo), hi = round(x / (254 unit)) with
// 254 unit = max|x| / 127, lo = round(x / unit - 254 hi) in [-127, 127]; the error is at most unit / 2 =
// max|x| / 64516, finer than bfloat16's. L = 1 (ggml's Q8_0): x ~= unit * hi, unit = max|x| / 127, error up to
// max|x| / 254, enough to flip near-tied greedy tokens; half the arithmetic.
// Row m's bytes: block b's hi at [32 L b, 32 L b + 32), its lo (L = 2) right after. cx = unit * sum of the levels.
// Blocks go 16 at a time: their maxima and sums are reduced across lanes by one transposing tree each, and the scales
// computed as vectors. For 32 rows of the demo's projection inputs this quantizes ~1.4x faster than reducing block by
// block, with identical results.
template <int L, typename T>
void quantize_activations(const T* x, int64_t m_rows, int64_t k, int8_t* xq, float* unit, float* cx) {
  const int64_t nb = k / kActBlock, groups = (nb + 15) / 16;
  constexpr float kSpan = L == 2 ? 127.f * 254.f : 127.f;
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const auto vmax = [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); };
  const auto vadd = [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); };
  at::parallel_for(0, m_rows * groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t m = idx / groups, b0 = idx % groups * 16, cnt = std::min<int64_t>(16, nb - b0);
      const T* src = x + m * k + b0 * kActBlock;
      __m512 part[16];
      for (int j = 0; j < 16; ++j) {
        part[j] = j < cnt ? _mm512_max_ps(_mm512_abs_ps(load16(src + j * kActBlock)),
                                          _mm512_abs_ps(load16(src + j * kActBlock + 16)))
                          : _mm512_setzero_ps();
      }
      const __m512 u = _mm512_div_ps(combine_lanes16(part, vmax), _mm512_set1_ps(kSpan));
      alignas(64) float inv[16];
      _mm512_store_ps(inv, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_GT_OQ),
                                               _mm512_set1_ps(1.f), u));
      for (int j = 0; j < 16; ++j) {
        if (j >= cnt) {
          part[j] = _mm512_setzero_ps();
          continue;
        }
        const __m512 v[2] = {load16(src + j * kActBlock), load16(src + j * kActBlock + 16)};
        const __m512 scale = _mm512_set1_ps(inv[j]);
        int8_t* hi = xq + m * L * k + (b0 + j) * L * kActBlock;
        __m512i sum = _mm512_setzero_si512();
        for (int half = 0; half < 2; ++half) {
          const __m512 f = _mm512_mul_ps(v[half], scale);  // in [-kSpan, kSpan]
          if constexpr (L == 2) {
            const __m512 hf = _mm512_roundscale_ps(_mm512_div_ps(f, _mm512_set1_ps(254.f)), kRound);
            const __m512 lf = _mm512_roundscale_ps(_mm512_fnmadd_ps(hf, _mm512_set1_ps(254.f), f), kRound);  // exact
            const __m512i h = _mm512_cvtps_epi32(hf);
            const __m512i l = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(lf), _mm512_set1_epi32(127)),
                                               _mm512_set1_epi32(-127));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + 16 * half), _mm512_cvtepi32_epi8(h));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + kActBlock + 16 * half), _mm512_cvtepi32_epi8(l));
            sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_mullo_epi32(h, _mm512_set1_epi32(254)), l));
          } else {
            const __m512i h = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvt_roundps_epi32(f, kRound),
                                               _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + 16 * half), _mm512_cvtepi32_epi8(h));
            sum = _mm512_add_epi32(sum, h);
          }
        }
        part[j] = _mm512_cvtepi32_ps(sum);  // exact: |sum| < 2^24, and so are the tree's partial sums
      }
      const __mmask16 mask = tail_mask(cnt);
      _mm512_mask_storeu_ps(unit + m * nb + b0, mask, u);
      _mm512_mask_storeu_ps(cx + m * nb + b0, mask, _mm512_mul_ps(u, combine_lanes16(part, vadd)));
    }
  });
}

constexpr int64_t kRowChunk = 64;  // activation rows a thread runs all its tiles over before the next rows

// What a pass over a group of tiles prefetches. The first row pass over the group runs ahead in each tile's own stream
// into L1 (`ahead`); with more passes to come, every pass also fetches its share of the next group into L2, spread over
// its blocks, so that the first pass over that group finds the weights in L2 instead of waiting on DRAM. At 8 to 32
// rows this made the demo's projections ~12-20% faster with each layer's weights coming from DRAM.
struct Prefetch {
  bool ahead = false;
  const uint8_t* next = nullptr;  // this pass's share of the next group: [next, next + bytes)
  int64_t bytes = 0;
  int64_t per_block = 0;  // bytes of it per block of the pass, a whole number of cache lines
  void next_share(int64_t b) const {
    for (int64_t off = b * per_block, end = std::min(bytes, off + per_block); off < end; off += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(next + off), _MM_HINT_T1);
    }
  }
};

// The plan for the pass over tiles [t, t + nt) (of `tiles`, each tile_bytes long and contiguous, in groups of up to
// MaxTiles) and rows [m0, m0 + MaxRows) of m_rows, with nb blocks per tile (for_each_tile_pass's schedule). The
// divisions are by compile-time constants where they can be, and it is inlined: a pass of a few rows is short (out of
// line, the plan cost ~4% of the demo's projections at 32 rows).
template <int64_t MaxRows, int64_t MaxTiles>
__attribute__((always_inline)) inline Prefetch plan_prefetch(const uint8_t* qdata, int64_t tile_bytes, int64_t tiles,
                                                             int64_t t, int64_t nt, int64_t m0, int64_t m_rows,
                                                             int64_t nb) {
  constexpr int64_t max_rows = MaxRows, max_tiles = MaxTiles;
  const int64_t r0 = m0 / kRowChunk * kRowChunk;
  const int64_t passes = (std::min(kRowChunk, m_rows - r0) + max_rows - 1) / max_rows, pass = (m0 - r0) / max_rows;
  Prefetch pf;
  pf.ahead = m0 == r0;
  if (passes > 1 && t + nt < tiles) {
    const int64_t group = std::min(max_tiles, tiles - t - nt) * tile_bytes, share = (group + passes - 1) / passes;
    pf.next = qdata + (t + nt) * tile_bytes + pass * share;
    pf.bytes = std::max<int64_t>(0, std::min(share, group - pass * share));
    pf.per_block = ((pf.bytes + nb - 1) / nb + 63) / 64 * 64;
  }
  return pf;
}

// Tiles [0, tiles) in groups of up to NT (the last group may be smaller), the groups split over the threads, `grain`
// groups at least each; per thread, activation rows in chunks of kRowChunk (kept in L2 across the thread's tiles), and
// each group in passes of up to MaxRows rows. pass(first tile, first row, rows, tiles) gets the pass's row and tile
// counts as std::integral_constant<int, ...>: one activation broadcast feeds all the group's tiles, one weight load
// all the pass's rows.
template <int MaxRows, int NT, typename Pass>
void for_each_tile_pass(int64_t tiles, int64_t m_rows, int64_t grain, const Pass& pass) {
  const int64_t groups = (tiles + NT - 1) / NT;
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t r0 = 0; r0 < m_rows; r0 += kRowChunk) {
      const int64_t r1 = std::min(m_rows, r0 + kRowChunk);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t t = g * NT;
        with_constant<NT>(std::min<int64_t>(NT, tiles - t), [&](auto nt) {
          for (int64_t m0 = r0; m0 < r1; m0 += MaxRows) {
            with_constant<MaxRows>(std::min<int64_t>(MaxRows, r1 - m0), [&](auto rows) { pass(t, m0, rows, nt); });
          }
        });
      }
    }
  });
}

}  // namespace airun
