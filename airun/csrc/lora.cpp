// Multi-LoRA update of one projection: out[t, off_i : off_i + rows_i] += (x[t] @ A[slot]) [i r : (i + 1) r] @ B_i[slot]
// for every row t of every segment (slot, first row, rows). A [slots, in, S r] and B_i [slots, r, rows_i] are float32
// or bfloat16 (both the same); the low-rank products are accumulated in float32 and each output element is rounded
// once, as PyTorch's out.add_(float32 update) does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace {

using airun::load16;
using airun::load16_masked;
using airun::store16;
using airun::tail_mask;


// h[0, sr) = x[0, in) @ a[in, sr], accumulated in NV registers (sr <= 16 NV).
template <int NV, typename T, typename W>
inline void shrink(const T* x, const W* a, int64_t in, int64_t sr, float* h) {
  __m512 acc[NV];
  __mmask16 mask[NV];
  for (int v = 0; v < NV; ++v) {
    acc[v] = _mm512_setzero_ps();
    mask[v] = tail_mask(sr - 16 * v);
  }
  constexpr int64_t kAhead = 32;  // rows of A: another adapter's weights per row come from DRAM, hide its latency
  for (int64_t k = 0; k < in; ++k) {
    const __m512 xv = _mm512_set1_ps(static_cast<float>(x[k]));
    const W* row = a + k * sr;
    if (k + kAhead < in) {
      const char* p = reinterpret_cast<const char*>(row + kAhead * sr);
      const int64_t bytes = sr * static_cast<int64_t>(sizeof(W));
      for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(p + line, _MM_HINT_T0);
    }
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(xv, load16_masked(row + 16 * v, mask[v]), acc[v]);
  }
  for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(h + 16 * v, mask[v], acc[v]);
}

template <typename T, typename W>
void shrink_any(const T* x, const W* a, int64_t in, int64_t sr, float* h) {
  switch ((sr + 15) / 16) {
    case 1: return shrink<1>(x, a, in, sr, h);
    case 2: return shrink<2>(x, a, in, sr, h);
    case 3: return shrink<3>(x, a, in, sr, h);
    case 4: return shrink<4>(x, a, in, sr, h);
    default:  // rank x slices > 64: a plain loop
      for (int64_t c = 0; c < sr; ++c) {
        float sum = 0.f;
        for (int64_t k = 0; k < in; ++k) sum += static_cast<float>(x[k]) * static_cast<float>(a[k * sr + c]);
        h[c] = sum;
      }
  }
}

// dst[0, n) = T(dst + h[0, rank) @ b[rank, n]), one rounding per element, 16 columns at a time in a register.
template <typename T, typename W>
inline void expand_add(T* dst, const float* h, const W* b, int64_t rank, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = tail_mask(n - c);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < rank; ++j) {
      if (c + 128 < n) _mm_prefetch(reinterpret_cast<const char*>(b + j * n + c + 128), _MM_HINT_T0);
      acc = _mm512_fmadd_ps(_mm512_set1_ps(h[j]), load16_masked(b + j * n + c, m), acc);
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

// (row, slot) of every adapter row, rows of slot 0 (no adapter) left out.
struct RowSlot {
  int64_t row, slot;
};

template <typename T, typename W>
void lora_rows(T* out, const T* x, const W* a, int64_t in, int64_t sr, const std::vector<const W*>& bs,
               const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets, const std::vector<int64_t>& cols,
               int64_t rank, const std::vector<RowSlot>& work, int64_t width, int64_t a_slot_stride,
               const std::vector<int64_t>& b_slot_stride) {
  at::parallel_for(0, static_cast<int64_t>(work.size()), 4, [&](int64_t begin, int64_t end) {
    std::vector<float> h(sr + 16);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = work[w].row, slot = work[w].slot;
      shrink_any(x + t * in, a + slot * a_slot_stride, in, sr, h.data());
      T* orow = out + t * width;
      for (size_t i = 0; i < bs.size(); ++i) {
        expand_add(orow + offsets[i], h.data() + cols[i] * rank, bs[i] + slot * b_slot_stride[i], rank, rows[i]);
      }
    }
  });
}

template <typename T, typename W>
void run(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, at::TensorList bs, const std::vector<int64_t>& cols,
         const std::vector<int64_t>& offs, const std::vector<RowSlot>& work, int64_t rank) {
  std::vector<const W*> bp;
  std::vector<int64_t> rows, bstride;
  for (const at::Tensor& b : bs) {
    bp.push_back(b.data_ptr<W>());
    rows.push_back(b.size(2));
    bstride.push_back(b.size(1) * b.size(2));
  }
  const int64_t in = x.size(1), sr = a.size(2);
  lora_rows(out.data_ptr<T>(), x.data_ptr<T>(), a.data_ptr<W>(), in, sr, bp, rows, offs, cols, rank, work, out.size(1),
            in * sr, bstride);
}

// segments: (slot, first row, rows) triples; slices: index of each updated slice (its columns of h); offsets: its first
// output column.
void lora_apply(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, at::TensorList bs, at::IntArrayRef slices,
                at::IntArrayRef offsets, at::IntArrayRef segments, int64_t rank) {
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && out.size(0) == x.size(0) && out.is_contiguous() && x.is_contiguous(),
              "out and x must be contiguous [T, *] with the same rows");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "out and x must be float32 or bfloat16");
  TORCH_CHECK(a.dim() == 3 && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) &&
                  a.is_contiguous() && a.size(1) == x.size(1),
              "A must be contiguous float32 or bfloat16 [slots, in, S r]");
  TORCH_CHECK(bs.size() == slices.size() && bs.size() == offsets.size(), "one slice index and offset per B");
  TORCH_CHECK(segments.size() % 3 == 0, "segments are (slot, first row, rows) triples");
  std::vector<int64_t> cols, offs;
  for (size_t i = 0; i < bs.size(); ++i) {
    const at::Tensor& b = bs[i];
    TORCH_CHECK(b.dim() == 3 && b.scalar_type() == a.scalar_type() && b.is_contiguous() && b.size(0) == a.size(0) &&
                    b.size(1) == rank,
                "B must be contiguous [slots, rank, rows] in A's dtype");
    TORCH_CHECK(slices[i] >= 0 && (slices[i] + 1) * rank <= a.size(2), "slice outside A's columns");
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + b.size(2) <= out.size(1), "slice outside the output");
    cols.push_back(slices[i]);
    offs.push_back(offsets[i]);
  }
  std::vector<RowSlot> work;
  for (size_t s = 0; s < segments.size(); s += 3) {
    const int64_t slot = segments[s], first = segments[s + 1], n = segments[s + 2];
    TORCH_CHECK(slot >= 0 && slot < a.size(0) && first >= 0 && n >= 0 && first + n <= x.size(0), "bad segment");
    if (slot == 0) continue;  // entry 0 is "no adapter": all zeros
    for (int64_t t = first; t < first + n; ++t) work.push_back({t, slot});
  }
  using BF = at::BFloat16;
  const bool bf_x = x.scalar_type() == at::kBFloat16, bf_w = a.scalar_type() == at::kBFloat16;
  if (!bf_x && !bf_w) run<float, float>(out, x, a, bs, cols, offs, work, rank);
  else if (!bf_x && bf_w) run<float, BF>(out, x, a, bs, cols, offs, work, rank);
  else if (bf_x && !bf_w) run<BF, float>(out, x, a, bs, cols, offs, work, rank);
  else run<BF, BF>(out, x, a, bs, cols, offs, work, rank);
}

}  // namespace

TORCH_LIBRARY(airun_lora, m) {
  m.def("apply(Tensor(a!) out, Tensor x, Tensor a, Tensor[] bs, int[] slices, int[] offsets, int[] segments, "
        "int rank) -> ()");
}

TORCH_LIBRARY_IMPL(airun_lora, CPU, m) { m.impl("apply", &lora_apply); }
