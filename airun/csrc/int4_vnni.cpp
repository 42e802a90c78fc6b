// Group-wise int4 weights times int8-quantized activations with AVX-512 VNNI, for decode-sized batches on CPU.
//
// Weight layout (built by airun/layers/int4_vnni.py): output rows in tiles of 16, inputs in blocks of 32, blocks in
// pairs. One uint8 tensor qdata[t][p][...] holds, for tile t and block pair p (blocks 2p and 2p + 1), contiguously:
//   codes of block 2p, codes of block 2p + 1 (256 bytes each), scales of both (2 x 16 float16), and only for weights
//   with mins, the mins of both (2 x 16 float16): 576 or 640 bytes, whole cache lines, one stream to read.
//   A block's codes: [j][r][i], j, i in 0..3, r in 0..15, low nibble = code(row 16t + r, input 32b + 4j + i), high
//   nibble = code(row 16t + r, input 32b + 16 + 4j + i). w = scale * code + min; without mins, w = scale * (code - 8)
//   (GGUF Q4_0).
// So one 64-byte load gives, per output row, 4 consecutive codes: a VNNI dot-4 with 4 broadcast activation bytes adds
// them into that row's int32 lane, and 16 rows are done per instruction.
//
// Activations are quantized per block of 32 to L int8 levels, two or one (vnni_common.h). Per block, with
// xq = 254 hi + lo (L = 2) or hi (L = 1):  sum_k w x = unit * (scale * sum(code * xq) + min * sum(xq)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vnni_common.h"
#include "simd.h"

namespace {

using airun::quantize_activations;
using airun::store16;

constexpr int64_t kRows = 16;
constexpr int64_t kBlock = airun::kActBlock;
constexpr int64_t kTileBlockBytes = kRows * kBlock / 2;
constexpr int64_t kPairCodeBytes = 2 * kTileBlockBytes;
constexpr int64_t kHalfBlockBytes = kRows * 2;  // one block's 16 float16 scales (or mins)

inline int64_t pair_bytes(bool asym) { return kPairCodeBytes + (asym ? 4 : 2) * kHalfBlockBytes; }

// Where block b of one tile lives in qdata (see the layout above); `base` is the tile's first pair.
struct TileBlocks {
  const uint8_t* base;
  int64_t pair;  // bytes per block pair
  const uint8_t* codes(int64_t b) const { return base + (b >> 1) * pair + (b & 1) * kTileBlockBytes; }
  const at::Half* scales(int64_t b) const {
    return reinterpret_cast<const at::Half*>(base + (b >> 1) * pair + kPairCodeBytes + (b & 1) * kHalfBlockBytes);
  }
  const at::Half* mins(int64_t b) const {
    return reinterpret_cast<const at::Half*>(base + (b >> 1) * pair + kPairCodeBytes + (2 + (b & 1)) * kHalfBlockBytes);
  }
};
constexpr int64_t kPrefetchPairs = 12;  // ~7 KiB ahead; 6..48 measured within noise of each other on 7B shapes

// Adds NT tiles (16 output rows each; tile i at w.base + i * tile_bytes) for MB activation rows over all nb blocks into
// acc[m][i]. Per block, one int32 chain per (level, row, tile) sums code * x-level over the block's 32
// inputs (exact: |sum| < 2^24); the float rescale then runs in the same order as ggml's dot products.
template <bool kAsym, int L, int MB, int NT>
inline void tile_dot(TileBlocks w, int64_t tile_bytes, int64_t nb, const int8_t* xq, const float* unit, const float* cx,
                     int64_t k, __m512 (&acc)[MB][NT], const airun::Prefetch& pf) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w.codes(b);
    // The hardware prefetcher alone leaves DRAM bandwidth unused on these streams: run ahead of it (vnni_common.h).
    if (pf.ahead && (b & 1) == 0) {
      for (int i = 0; i < NT; ++i) {
        const char* ahead = reinterpret_cast<const char*>(w.base + i * tile_bytes + (b / 2 + kPrefetchPairs) * w.pair);
        for (int64_t line = 0; line < w.pair; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
      }
    }
    pf.next_share(b);
    __m512i dot[L][MB][NT] = {};  // per block: the int32 chains start at 0
    for (int j = 0; j < 4; ++j) {
      __m512i lo[NT], hi[NT];
      for (int i = 0; i < NT; ++i) {
        const __m512i p = _mm512_loadu_si512(wb + i * tile_bytes + 64 * j);
        lo[i] = _mm512_and_si512(p, low4);
        hi[i] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low4);
      }
      for (int m = 0; m < MB; ++m) {
        for (int l = 0; l < L; ++l) {
          const int32_t* xb = reinterpret_cast<const int32_t*>(xq + m * L * k + (b * L + l) * kBlock);
          const __m512i xl = _mm512_set1_epi32(xb[j]), xh = _mm512_set1_epi32(xb[4 + j]);
          for (int i = 0; i < NT; ++i) {
            dot[l][m][i] = _mm512_dpbusd_epi32(dot[l][m][i], lo[i], xl);
            dot[l][m][i] = _mm512_dpbusd_epi32(dot[l][m][i], hi[i], xh);
          }
        }
      }
    }
    __m512 sv[NT], mv[NT];
    for (int i = 0; i < NT; ++i) {
      const TileBlocks wi{w.base + i * tile_bytes, w.pair};
      sv[i] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wi.scales(b))));
      if constexpr (kAsym) mv[i] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wi.mins(b))));
    }
    for (int m = 0; m < MB; ++m) {
      const float cm = cx[m * nb + b];  // w = scale * (code - 8) without mins: -8 * cx is exact
      const __m512 d = _mm512_set1_ps(unit[m * nb + b]), c = _mm512_set1_ps(kAsym ? cm : -8.f * cm);
      for (int i = 0; i < NT; ++i) {
        __m512 f = _mm512_cvtepi32_ps(dot[0][m][i]);
        if constexpr (L == 2) f = _mm512_fmadd_ps(f, _mm512_set1_ps(254.f), _mm512_cvtepi32_ps(dot[L - 1][m][i]));
        if constexpr (kAsym) {
          acc[m][i] = _mm512_fmadd_ps(_mm512_mul_ps(f, d), sv[i], acc[m][i]);
          acc[m][i] = _mm512_fmadd_ps(mv[i], c, acc[m][i]);
        } else {
          acc[m][i] = _mm512_fmadd_ps(_mm512_fmadd_ps(f, d, c), sv[i], acc[m][i]);
        }
      }
    }
  }
}

template <bool kAsym, int L, int MB, int NT, typename T>
inline void tile_pass(TileBlocks w, int64_t tile_bytes, int64_t nb, const int8_t* xq, const float* unit,
                      const float* cx, int64_t k, T* out, int64_t n, const airun::Prefetch& pf) {
  __m512 acc[MB][NT] = {};
  tile_dot<kAsym, L, MB, NT>(w, tile_bytes, nb, xq, unit, cx, k, acc, pf);
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < NT; ++i) store16(out + m * n + i * kRows, acc[m][i]);
}

// A pass: 4 rows x 3 tiles with one level keep 12 int32 chains (VNNI has a 4-cycle latency and issues 2 a cycle) and 12
// accumulators in registers; each activation broadcast feeds 3 tiles, each weight load 4 rows. On Zen 5, timed in one
// process with alternating builds on the demo's projections at 32 rows, it ran within ~2% of 5 x 3, 5 x 2 and 6 x 2
// and ~10% faster than 4 x 2 and 8 x 1; the loop runs within ~5% of the VNNI/FMA port bound when its data is in L1.
// Two levels need twice the chains.
template <int L>
constexpr int kPassRows = L == 1 ? 4 : 2;
constexpr int kPassTiles = 3;

template <bool kAsym, int L, typename T>
void gemm(const T* x, const uint8_t* qdata, int64_t m_rows, int64_t k, int64_t tiles, T* out) {
  const int64_t nb = k / kBlock, n = tiles * kRows, pair = pair_bytes(kAsym), tile_bytes = (nb / 2) * pair;
  std::vector<int8_t> xq(m_rows * L * k);
  std::vector<float> unit(m_rows * nb), cx(m_rows * nb);
  quantize_activations<L>(x, m_rows, k, xq.data(), unit.data(), cx.data());
  auto run = [&](auto max_tiles) {
    airun::for_each_tile_pass<kPassRows<L>, decltype(max_tiles)::value>(
        tiles, m_rows, 2, [&](int64_t t, int64_t m0, auto rows, auto nt) {
          const airun::Prefetch pf = airun::plan_prefetch<kPassRows<L>, decltype(max_tiles)::value>(
              qdata, tile_bytes, tiles, t, decltype(nt)::value, m0, m_rows, nb);
          const TileBlocks w{qdata + t * tile_bytes, pair};
          tile_pass<kAsym, L, decltype(rows)::value, decltype(nt)::value>(
              w, tile_bytes, nb, xq.data() + m0 * L * k, unit.data() + m0 * nb, cx.data() + m0 * nb, k,
              out + m0 * n + t * kRows, n, pf);
        });
  };
  // One or two rows are bound by DRAM: one weight stream per pass reads ~9% faster there (7B shapes)
  if (m_rows <= 2) run(std::integral_constant<int, 1>{});
  else run(std::integral_constant<int, kPassTiles>{});
}

void check_weight(const at::Tensor& qdata, bool asym) {
  TORCH_CHECK(qdata.dim() == 3 && qdata.size(2) == pair_bytes(asym) && qdata.scalar_type() == at::kByte &&
                  qdata.is_contiguous(),
              "qdata must be contiguous uint8 [tiles, block pairs, 576 (640 with mins)]");
}

template <typename T>
void dispatch_gemm(const T* x, const uint8_t* w, bool asym, int64_t levels, int64_t m_rows, int64_t k, int64_t tiles,
                   T* out) {
  if (asym) {
    if (levels == 2) gemm<true, 2>(x, w, m_rows, k, tiles, out);
    else gemm<true, 1>(x, w, m_rows, k, tiles, out);
  } else {
    if (levels == 2) gemm<false, 2>(x, w, m_rows, k, tiles, out);
    else gemm<false, 1>(x, w, m_rows, k, tiles, out);
  }
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qdata, bool asym, int64_t levels) {
  check_weight(qdata, asym);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == qdata.size(1) * 2 * kBlock, "x must be [M, block pairs * 64]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(levels == 1 || levels == 2, "activation levels must be 1 or 2");
  const at::Tensor xc = x.contiguous();
  const int64_t m_rows = xc.size(0), k = xc.size(1), tiles = qdata.size(0);
  at::Tensor out = at::empty({m_rows, tiles * kRows}, xc.options());
  if (m_rows == 0) return out;
  const auto* w = qdata.data_ptr<uint8_t>();
  if (xc.scalar_type() == at::kFloat) {
    dispatch_gemm(xc.data_ptr<float>(), w, asym, levels, m_rows, k, tiles, out.data_ptr<float>());
  } else {
    using BF = at::BFloat16;
    dispatch_gemm(xc.data_ptr<BF>(), w, asym, levels, m_rows, k, tiles, out.data_ptr<BF>());
  }
  return out;
}

// Transposes a tile-block's 4 packed vectors (vector j holds 4 bytes per row r) into 4 vectors of 4 rows each, a row's
// 16 bytes in (j, i) order: its low nibbles are inputs 0..15 of the block and its high nibbles inputs 16..31.
inline void block_rows(const uint8_t* wb, __m512i q[4]) {
  const __m512i p0 = _mm512_loadu_si512(wb), p1 = _mm512_loadu_si512(wb + 64);
  const __m512i p2 = _mm512_loadu_si512(wb + 128), p3 = _mm512_loadu_si512(wb + 192);
  const __m512i d_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i d_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i q_lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i q_hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i a_lo = _mm512_permutex2var_epi32(p0, d_lo, p1), a_hi = _mm512_permutex2var_epi32(p0, d_hi, p1);
  const __m512i b_lo = _mm512_permutex2var_epi32(p2, d_lo, p3), b_hi = _mm512_permutex2var_epi32(p2, d_hi, p3);
  q[0] = _mm512_permutex2var_epi64(a_lo, q_lo, b_lo);
  q[1] = _mm512_permutex2var_epi64(a_lo, q_hi, b_lo);
  q[2] = _mm512_permutex2var_epi64(a_hi, q_lo, b_hi);
  q[3] = _mm512_permutex2var_epi64(a_hi, q_hi, b_hi);
}

// Codes (16 uint8) -> 16 weights: (code - 8) * scale without mins (as ggml's Q4_0), code * scale + min with them.
inline __m512 dequant16(__m128i codes, float scale, const float* min) {
  __m512i c = _mm512_cvtepu8_epi32(codes);
  if (!min) return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c, _mm512_set1_epi32(8))), _mm512_set1_ps(scale));
  // a product then a sum, two roundings, as ggml and the gguf package compute Q4_1 (no fused multiply-add)
  return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(scale)), _mm512_set1_ps(*min));
}

template <typename T>
void dequant_tiles(const uint8_t* qdata, bool asym, int64_t nb, int64_t tile0, int64_t tile1, T* out) {
  const int64_t k = nb * kBlock, pair = pair_bytes(asym);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  at::parallel_for(tile0, tile1, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const TileBlocks w{qdata + t * (nb / 2) * pair, pair};
      for (int64_t b = 0; b < nb; ++b) {
        __m512i q[4];
        block_rows(w.codes(b), q);
        const at::Half* s = w.scales(b);
        const at::Half* mn = asym ? w.mins(b) : nullptr;
        alignas(64) uint8_t rows[kRows * 16];
        for (int g = 0; g < 4; ++g) _mm512_store_si512(rows + 64 * g, q[g]);
        for (int r = 0; r < kRows; ++r) {
          const __m128i row_bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(rows + 16 * r));
          const float sc = static_cast<float>(s[r]);
          const float mi = mn ? static_cast<float>(mn[r]) : 0.f;
          const float* min = mn ? &mi : nullptr;
          T* dst = out + ((t - tile0) * kRows + r) * k + b * kBlock;
          store16(dst, dequant16(_mm_and_si128(row_bytes, low4), sc, min));
          store16(dst + 16, dequant16(_mm_and_si128(_mm_srli_epi16(row_bytes, 4), low4), sc, min));
        }
      }
    }
  });
}

// The weight rows of tiles [tile0, tile1) as a dense [rows, K] tensor of `dtype` (float32 or bfloat16).
at::Tensor int4_dequant(const at::Tensor& qdata, bool asym, int64_t tile0, int64_t tile1, at::ScalarType dtype) {
  check_weight(qdata, asym);
  TORCH_CHECK(0 <= tile0 && tile0 <= tile1 && tile1 <= qdata.size(0), "tile range out of bounds");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequant writes float32 or bfloat16");
  const int64_t nb = qdata.size(1) * 2;
  at::Tensor out = at::empty({(tile1 - tile0) * kRows, nb * kBlock}, qdata.options().dtype(dtype));
  const auto* w = qdata.data_ptr<uint8_t>();
  if (dtype == at::kFloat) dequant_tiles(w, asym, nb, tile0, tile1, out.data_ptr<float>());
  else dequant_tiles(w, asym, nb, tile0, tile1, out.data_ptr<at::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY(airun_int4, m) {
  m.def("linear(Tensor x, Tensor qdata, bool asym, int levels=2) -> Tensor");
  m.def("dequant(Tensor qdata, bool asym, int tile0, int tile1, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(airun_int4, CPU, m) {
  m.impl("linear", &int4_linear);
  m.impl("dequant", &int4_dequant);
}
