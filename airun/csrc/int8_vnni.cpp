// Per-channel int8 weights times int8-quantized activations with AVX-512 VNNI, for decode-sized batches on CPU (the
// output head above all: the widest matrix of a small model).
//
// Weight layout (built by airun/layers/quant.py): output rows in tiles of 16, inputs in blocks of 32. One uint8 tensor
// qdata[t][b][j][r][i] (j in 0..7, r in 0..15, i in 0..3) holds q(row 16t + r, input 32b + 4j + i) + 128, so one
// 64-byte load gives, per output row, 4 consecutive weights: a VNNI dot-4 with 4 broadcast activation bytes adds them
// into that row's int32 lane, 16 rows per instruction. Per-row float32 scales are a separate tensor.
//
// With activations in L levels per block (vnni_common.h), per block sum_k (q + 128) xq = sum_k q xq + 128 sum_k xq, so
// y = scale * sum_b unit_b * (sum_k (q + 128) xq - 128 sum_k xq) = scale * (sum_b unit_b dot_b - 128 sum_b cx_b).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vnni_common.h"
#include "simd.h"

namespace {

using airun::kActBlock;
using airun::quantize_activations;
using airun::store16;

constexpr int64_t kRows = 16;
constexpr int64_t kBlockBytes = kRows * kActBlock;  // one tile-block: 512 bytes, 8 vectors
constexpr int64_t kPrefetchBlocks = 12;

// NT tiles (tile i at `tile + i * tile_bytes`) for MB activation rows: one int32 chain per (level, row, tile) per
// block, each activation broadcast feeding all NT tiles.
template <int L, int MB, int NT, typename T>
inline void tile_pass(const uint8_t* tile, int64_t tile_bytes, int64_t nb, const int8_t* xq, const float* unit,
                      const float* corr, const float* scales, int64_t k, T* out, int64_t n,
                      const airun::Prefetch& pf) {
  __m512 acc[MB][NT] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = tile + b * kBlockBytes;
    for (int i = 0; pf.ahead && i < NT; ++i) {  // see vnni_common.h
      const char* ahead = reinterpret_cast<const char*>(wb + i * tile_bytes + kPrefetchBlocks * kBlockBytes);
      for (int64_t line = 0; line < kBlockBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    pf.next_share(b);
    __m512i dot[L][MB][NT] = {};  // per block: the int32 chains start at 0
    for (int j = 0; j < 8; ++j) {
      __m512i w[NT];
      for (int i = 0; i < NT; ++i) w[i] = _mm512_loadu_si512(wb + i * tile_bytes + 64 * j);
      for (int m = 0; m < MB; ++m) {
        for (int l = 0; l < L; ++l) {
          const int32_t* xb = reinterpret_cast<const int32_t*>(xq + m * L * k + (b * L + l) * kActBlock);
          const __m512i xv = _mm512_set1_epi32(xb[j]);
          for (int i = 0; i < NT; ++i) dot[l][m][i] = _mm512_dpbusd_epi32(dot[l][m][i], w[i], xv);
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 d = _mm512_set1_ps(unit[m * nb + b]);
      for (int i = 0; i < NT; ++i) {
        __m512 f = _mm512_cvtepi32_ps(dot[0][m][i]);
        if constexpr (L == 2) f = _mm512_fmadd_ps(f, _mm512_set1_ps(254.f), _mm512_cvtepi32_ps(dot[L - 1][m][i]));
        acc[m][i] = _mm512_fmadd_ps(f, d, acc[m][i]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int i = 0; i < NT; ++i) {
      const __m512 scale = _mm512_loadu_ps(scales + i * kRows);
      store16(out + m * n + i * kRows, _mm512_mul_ps(scale, _mm512_sub_ps(acc[m][i], _mm512_set1_ps(corr[m]))));
    }
  }
}

// As in int4_vnni.cpp: 4 rows x 3 tiles with one level keep the int32 chains and accumulators in registers.
template <int L>
constexpr int kPassRows = L == 1 ? 4 : 2;
constexpr int kPassTiles = 3;

template <int L, typename T, typename TO>
void gemm(const T* x, const uint8_t* qdata, const float* scales, int64_t m_rows, int64_t k, int64_t tiles, TO* out) {
  const int64_t nb = k / kActBlock, n = tiles * kRows, tile_bytes = nb * kBlockBytes;
  std::vector<int8_t> xq(m_rows * L * k);
  std::vector<float> unit(m_rows * nb), cx(m_rows * nb), corr(m_rows);
  quantize_activations<L>(x, m_rows, k, xq.data(), unit.data(), cx.data());
  for (int64_t m = 0; m < m_rows; ++m) {
    float c = 0.f;
    for (int64_t b = 0; b < nb; ++b) c += cx[m * nb + b];
    corr[m] = 128.f * c;
  }
  auto run = [&](auto max_tiles) {
    airun::for_each_tile_pass<kPassRows<L>, decltype(max_tiles)::value>(
        tiles, m_rows, 8, [&](int64_t t, int64_t m0, auto rows, auto nt) {
          const airun::Prefetch pf = airun::plan_prefetch<kPassRows<L>, decltype(max_tiles)::value>(
              qdata, tile_bytes, tiles, t, decltype(nt)::value, m0, m_rows, nb);
          tile_pass<L, decltype(rows)::value, decltype(nt)::value>(
              qdata + t * tile_bytes, tile_bytes, nb, xq.data() + m0 * L * k, unit.data() + m0 * nb,
              corr.data() + m0, scales + t * kRows, k, out + m0 * n + t * kRows, n, pf);
        });
  };
  if (m_rows <= 2) run(std::integral_constant<int, 1>{});  // bound by DRAM: one weight stream per pass, as int4
  else run(std::integral_constant<int, kPassTiles>{});
}

template <typename T, typename TO>
void dispatch(const T* x, const uint8_t* w, const float* s, int64_t levels, int64_t m_rows, int64_t k, int64_t tiles,
              TO* out) {
  if (levels == 2) gemm<2>(x, w, s, m_rows, k, tiles, out);
  else gemm<1>(x, w, s, m_rows, k, tiles, out);
}

// float_out: float32 output whatever x's dtype (the head: logits without a bfloat16 rounding).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales, int64_t levels,
                       bool float_out) {
  TORCH_CHECK(qdata.dim() == 3 && qdata.size(2) == kBlockBytes && qdata.scalar_type() == at::kByte &&
                  qdata.is_contiguous(),
              "qdata must be contiguous uint8 [N / 16, K / 32, 512]");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == qdata.size(0) * kRows && scales.scalar_type() == at::kFloat &&
                  scales.is_contiguous(),
              "scales must be contiguous float32 [N]");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == qdata.size(1) * kActBlock, "x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(levels == 1 || levels == 2, "activation levels must be 1 or 2");
  const at::Tensor xc = x.contiguous();
  const int64_t m_rows = xc.size(0), k = xc.size(1), tiles = qdata.size(0);
  const bool f32_out = float_out || xc.scalar_type() == at::kFloat;
  at::Tensor out = at::empty({m_rows, tiles * kRows}, xc.options().dtype(f32_out ? at::kFloat : at::kBFloat16));
  if (m_rows == 0) return out;
  const auto* w = qdata.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  using BF = at::BFloat16;
  if (xc.scalar_type() == at::kFloat) {
    dispatch(xc.data_ptr<float>(), w, s, levels, m_rows, k, tiles, out.data_ptr<float>());
  } else if (f32_out) {
    dispatch(xc.data_ptr<BF>(), w, s, levels, m_rows, k, tiles, out.data_ptr<float>());
  } else {
    dispatch(xc.data_ptr<BF>(), w, s, levels, m_rows, k, tiles, out.data_ptr<BF>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(airun_int8, m) {
  m.def("linear(Tensor x, Tensor qdata, Tensor scales, int levels=2, bool float_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(airun_int8, CPU, m) { m.impl("linear", &int8_linear); }
