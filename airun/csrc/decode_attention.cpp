// Decode attention over a paged KV cache: one query token per sequence, grouped-query heads, read in place from the
// block tables (no gather), scores and softmax in float32.
//
//   q [D, H, d]; k_cache, v_cache [num_blocks, block_size, KVH, d]; block_tables [D, max_blocks] int64;
//   ctx_lens [D] int64 (keys at positions < ctx_lens[s] are visible); out [D, H * d] in q's dtype.
// Query head h reads KV head h / (H / KVH), as transformers' repeat_kv. Work items are (sequence, KV head) pairs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

using airun::load16;
using airun::store16;

template <typename T>
void decode(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, T* out, int64_t seqs,
            int64_t heads, int64_t kv_heads, int64_t d, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t g = heads / kv_heads;
  at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(g * d), acc(g * d), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / kv_heads, kh = item % kv_heads, n = ctx[s];
      const int64_t* table = tables + s * max_blocks;
      for (int64_t gi = 0; gi < g; ++gi) {
        const T* src = q + (s * heads + kh * g + gi) * d;
        for (int64_t c = 0; c < d; c += 16) {
          _mm512_storeu_ps(&qf[gi * d + c], _mm512_mul_ps(load16(src + c), _mm512_set1_ps(scale)));
        }
      }
      scores.assign(g * n, 0.f);
      for (int64_t p = 0; p < n; ++p) {
        const T* kp = kc + ((table[p / block_size] * block_size + p % block_size) * kv_heads + kh) * d;
        for (int64_t gi = 0; gi < g; ++gi) {
          __m512 a = _mm512_setzero_ps();
          for (int64_t c = 0; c < d; c += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[gi * d + c]), load16(kp + c), a);
          scores[gi * n + p] = _mm512_reduce_add_ps(a);
        }
      }
      for (int64_t gi = 0; gi < g; ++gi) {
        float* sc = &scores[gi * n];
        const float mx = *std::max_element(sc, sc + n);
        float sum = 0.f;
        for (int64_t p = 0; p < n; ++p) {
          sc[p] = std::exp(sc[p] - mx);
          sum += sc[p];
        }
        const float inv = 1.f / sum;
        for (int64_t p = 0; p < n; ++p) sc[p] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < n; ++p) {
        const T* vp = vc + ((table[p / block_size] * block_size + p % block_size) * kv_heads + kh) * d;
        for (int64_t c = 0; c < d; c += 16) {
          const __m512 v = load16(vp + c);
          for (int64_t gi = 0; gi < g; ++gi) {
            float* a = &acc[gi * d + c];
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[gi * n + p]), v, _mm512_loadu_ps(a)));
          }
        }
      }
      for (int64_t gi = 0; gi < g; ++gi) {
        T* dst = out + (s * heads + kh * g + gi) * d;
        for (int64_t c = 0; c < d; c += 16) store16(dst + c, _mm512_loadu_ps(&acc[gi * d + c]));
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad q or cache shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and caches must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t seqs = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && d % 16 == 0 && heads % kv_heads == 0, "head dims do not match");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == seqs && block_tables.scalar_type() == at::kLong,
              "block_tables must be int64 [D, max_blocks]");
  TORCH_CHECK(ctx_lens.dim() == 1 && ctx_lens.size(0) == seqs && ctx_lens.scalar_type() == at::kLong,
              "ctx_lens must be int64 [D]");
  const at::Tensor qc = q.contiguous(), bt = block_tables.contiguous(), cl = ctx_lens.contiguous();
  const int64_t max_blocks = bt.size(1);
  const int64_t* lens = cl.data_ptr<int64_t>();
  for (int64_t s = 0; s < seqs; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * block_size, "ctx_lens out of the block table's range");
  }
  at::Tensor out = at::empty({seqs, heads * d}, q.options());
  if (q.scalar_type() == at::kFloat) {
    decode(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), bt.data_ptr<int64_t>(), lens,
           out.data_ptr<float>(), seqs, heads, kv_heads, d, block_size, max_blocks, static_cast<float>(scale));
  } else {
    using BF = at::BFloat16;
    decode(qc.data_ptr<BF>(), k_cache.data_ptr<BF>(), v_cache.data_ptr<BF>(), bt.data_ptr<int64_t>(), lens,
           out.data_ptr<BF>(), seqs, heads, kv_heads, d, block_size, max_blocks, static_cast<float>(scale));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(airun_attn, m) {
  m.def("decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor ctx_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(airun_attn, CPU, m) { m.impl("decode", &decode_attention); }
