// Multi-LoRA update of one projection for adapter rows laid out as U consecutive runs of m rows (the model runner's
// "block" batches): out[t, off_i : off_i + rows_i] += (x[t] @ A[slot]) [i r : (i + 1) r] @ B_i[slot] for every row t
// of run g, slot = slots[g]. A [S + 1, in, S r] and B_i [S + 1, r, rows_i] are float32; the low-rank products are
// accumulated in float32 and each output element is rounded once, as PyTorch's out.add_(float32 update) does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace {

using airun::load16;
using airun::store16;

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// h[0, sr) = x[0, in) @ a[in, sr], accumulated in NV registers (sr <= 16 NV).
template <int NV, typename T>
inline void shrink(const T* x, const float* a, int64_t in, int64_t sr, float* h) {
  __m512 acc[NV];
  __mmask16 mask[NV];
  for (int v = 0; v < NV; ++v) {
    acc[v] = _mm512_setzero_ps();
    mask[v] = tail_mask(sr - 16 * v);
  }
  for (int64_t k = 0; k < in; ++k) {
    const __m512 xv = _mm512_set1_ps(static_cast<float>(x[k]));
    const float* row = a + k * sr;
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mask[v], row + 16 * v), acc[v]);
  }
  for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(h + 16 * v, mask[v], acc[v]);
}

template <typename T>
void shrink_any(const T* x, const float* a, int64_t in, int64_t sr, float* h) {
  switch ((sr + 15) / 16) {
    case 1: return shrink<1>(x, a, in, sr, h);
    case 2: return shrink<2>(x, a, in, sr, h);
    case 3: return shrink<3>(x, a, in, sr, h);
    case 4: return shrink<4>(x, a, in, sr, h);
    default:  // rank x slices > 64: a plain loop
      for (int64_t c = 0; c < sr; ++c) {
        float sum = 0.f;
        for (int64_t k = 0; k < in; ++k) sum += static_cast<float>(x[k]) * a[k * sr + c];
        h[c] = sum;
      }
  }
}

// dst[0, n) = T(dst + h[0, rank) @ b[rank, n]), one rounding per element, 16 columns at a time in a register.
template <typename T>
inline void expand_add(T* dst, const float* h, const float* b, int64_t rank, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = tail_mask(n - c);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < rank; ++j) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(h[j]), _mm512_maskz_loadu_ps(m, b + j * n + c), acc);
    }
    if (m == 0xFFFF) {
      store16(dst + c, _mm512_add_ps(load16(dst + c), acc));
    } else {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, acc);
      for (int64_t i = 0; i < n - c; ++i) dst[c + i] = static_cast<T>(static_cast<float>(dst[c + i]) + tmp[i]);
    }
  }
}

template <typename T>
void lora_rows(T* out, const T* x, const float* a, int64_t in, int64_t sr, const std::vector<const float*>& bs,
               const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets, const std::vector<int64_t>& cols,
               int64_t rank, const std::vector<int64_t>& slot_of_row, int64_t row0, int64_t nrows, int64_t width,
               int64_t a_slot_stride, const std::vector<int64_t>& b_slot_stride) {
  at::parallel_for(0, nrows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> h(sr + 16);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slot_of_row[t];
      shrink_any(x + (row0 + t) * in, a + slot * a_slot_stride, in, sr, h.data());
      T* orow = out + (row0 + t) * width;
      for (size_t i = 0; i < bs.size(); ++i) {
        expand_add(orow + offsets[i], h.data() + cols[i] * rank, bs[i] + slot * b_slot_stride[i], rank, rows[i]);
      }
    }
  });
}

// slots: one per run; slices: index of each updated slice (its columns of h); offsets: its first output column.
void lora_block(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, at::TensorList bs, at::IntArrayRef slices,
                at::IntArrayRef offsets, at::IntArrayRef slots, int64_t start, int64_t m, int64_t rank) {
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && out.size(0) == x.size(0) && out.is_contiguous() && x.is_contiguous(),
              "out and x must be contiguous [T, *] with the same rows");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "out and x must be float32 or bfloat16");
  TORCH_CHECK(a.dim() == 3 && a.scalar_type() == at::kFloat && a.is_contiguous() && a.size(1) == x.size(1),
              "A must be contiguous float32 [slots, in, S r]");
  TORCH_CHECK(bs.size() == slices.size() && bs.size() == offsets.size(), "one slice index and offset per B");
  const int64_t u = static_cast<int64_t>(slots.size()), nrows = u * m;
  TORCH_CHECK(start >= 0 && m >= 1 && start + nrows <= x.size(0), "runs outside the batch");
  std::vector<const float*> bp;
  std::vector<int64_t> rows, offs, cols, bstride;
  for (size_t i = 0; i < bs.size(); ++i) {
    const at::Tensor& b = bs[i];
    TORCH_CHECK(b.dim() == 3 && b.scalar_type() == at::kFloat && b.is_contiguous() && b.size(0) == a.size(0) &&
                    b.size(1) == rank,
                "B must be contiguous float32 [slots, rank, rows]");
    TORCH_CHECK(slices[i] >= 0 && (slices[i] + 1) * rank <= a.size(2), "slice outside A's columns");
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + b.size(2) <= out.size(1), "slice outside the output");
    bp.push_back(b.data_ptr<float>());
    rows.push_back(b.size(2));
    offs.push_back(offsets[i]);
    cols.push_back(slices[i]);
    bstride.push_back(b.size(1) * b.size(2));
  }
  std::vector<int64_t> slot_of_row(nrows);
  for (int64_t g = 0; g < u; ++g) {
    TORCH_CHECK(slots[g] >= 0 && slots[g] < a.size(0), "slot out of range");
    for (int64_t i = 0; i < m; ++i) slot_of_row[g * m + i] = slots[g];
  }
  const int64_t in = x.size(1), sr = a.size(2), width = out.size(1), astride = in * sr;
  if (x.scalar_type() == at::kFloat) {
    lora_rows(out.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), in, sr, bp, rows, offs, cols, rank,
              slot_of_row, start, nrows, width, astride, bstride);
  } else {
    using BF = at::BFloat16;
    lora_rows(out.data_ptr<BF>(), x.data_ptr<BF>(), a.data_ptr<float>(), in, sr, bp, rows, offs, cols, rank,
              slot_of_row, start, nrows, width, astride, bstride);
  }
}

}  // namespace

TORCH_LIBRARY(airun_lora, m) {
  m.def("block(Tensor(a!) out, Tensor x, Tensor a, Tensor[] bs, int[] slices, int[] offsets, int[] slots, int start, "
        "int m, int rank) -> ()");
}

TORCH_LIBRARY_IMPL(airun_lora, CPU, m) { m.impl("block", &lora_block); }
