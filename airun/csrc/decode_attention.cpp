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

using airun::exp16;
using airun::load16;
using airun::store16;

constexpr int64_t kMinParallelMacs = 1 << 18;  // below this much work a step runs on one thread: forking costs more

// Softmax of sc[0, n) in place (float32, max-subtracted).
inline void softmax(float* sc, int64_t n) {
  const float mx = *std::max_element(sc, sc + n);
  __m512 sum16 = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 16 <= n; p += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + p), _mm512_set1_ps(mx)));
    _mm512_storeu_ps(sc + p, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  if (p < n) {
    const __mmask16 tail = airun::tail_mask(n - p);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sc + p), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(sc + p, tail, e);
    sum16 = _mm512_add_ps(sum16, _mm512_maskz_mov_ps(tail, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum16));
  for (p = 0; p + 16 <= n; p += 16) _mm512_storeu_ps(sc + p, _mm512_mul_ps(_mm512_loadu_ps(sc + p), inv));
  for (; p < n; ++p) sc[p] *= _mm512_cvtss_f32(inv);
}

// One head's key or value row (d elements of T: 32 to 512 bytes) into L2.
template <int NC, typename T>
inline void prefetch_row(const T* row) {
  constexpr int64_t bytes = NC * 16 * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T1);
}

// NC = d / 16 vectors per head row: a query and an output accumulator stay in registers.
template <int NC, typename T>
void decode(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, T* out, int64_t seqs,
            int64_t heads, int64_t kv_heads, int64_t block_size, int64_t max_blocks, float scale) {
  constexpr int64_t d = NC * 16;
  const int64_t g = heads / kv_heads, items = seqs * kv_heads;
  int64_t keys = 0;
  for (int64_t s = 0; s < seqs; ++s) keys += ctx[s];
  const int64_t grain = keys * heads * d < kMinParallelMacs ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    // element offsets of each key position's row for this item and for the next (prefetched while this one runs)
    std::vector<int64_t> rows, next_rows;
    auto fill_rows = [&](int64_t item, std::vector<int64_t>& r) {
      const int64_t s = item / kv_heads, kh = item % kv_heads, n = ctx[s];
      const int64_t* table = tables + s * max_blocks;
      r.resize(n);
      for (int64_t p0 = 0; p0 < n; p0 += block_size) {  // block by block: no division per position
        const int64_t first = table[p0 / block_size] * block_size, cnt = std::min(block_size, n - p0);
        for (int64_t j = 0; j < cnt; ++j) r[p0 + j] = ((first + j) * kv_heads + kh) * d;
      }
    };
    fill_rows(begin, rows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / kv_heads, kh = item % kv_heads, n = ctx[s];
      const int64_t next_n = item + 1 < end ? ctx[(item + 1) / kv_heads] : 0;
      if (next_n) fill_rows(item + 1, next_rows);
      scores.resize(g * n);
      for (int64_t gi = 0; gi < g; ++gi) {
        const T* src = q + (s * heads + kh * g + gi) * d;
        __m512 qv[NC];
        for (int c = 0; c < NC; ++c) qv[c] = _mm512_mul_ps(load16(src + 16 * c), _mm512_set1_ps(scale));
        float* sc = &scores[gi * n];
        const bool ahead = gi == 0;  // the first head's passes fetch the next item's rows into L2, one per key
        for (int64_t p = 0; p < n; ++p) {
          if (ahead && p < next_n) prefetch_row<NC>(kc + next_rows[p]);
          const T* kp = kc + rows[p];
          __m512 a = _mm512_mul_ps(qv[0], load16(kp));
          for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qv[c], load16(kp + 16 * c), a);
          sc[p] = _mm512_reduce_add_ps(a);
        }
        softmax(sc, n);
        __m512 acc[NC];
        for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t p = 0; p < n; ++p) {
          if (ahead && p < next_n) prefetch_row<NC>(vc + next_rows[p]);
          const T* vp = vc + rows[p];
          const __m512 w = _mm512_set1_ps(sc[p]);
          for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(w, load16(vp + 16 * c), acc[c]);
        }
        if (ahead) {
          for (int64_t p = n; p < next_n; ++p) {
            prefetch_row<NC>(kc + next_rows[p]);
            prefetch_row<NC>(vc + next_rows[p]);
          }
        }
        T* dst = out + (s * heads + kh * g + gi) * d;
        for (int c = 0; c < NC; ++c) store16(dst + 16 * c, acc[c]);
      }
      std::swap(rows, next_rows);
    }
  });
}

template <typename T>
void decode_dispatch(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, T* out,
                     int64_t seqs, int64_t heads, int64_t kv_heads, int64_t d, int64_t block_size, int64_t max_blocks,
                     float scale) {
  switch (d) {
    case 16: return decode<1>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
    case 32: return decode<2>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
    case 64: return decode<4>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
    case 128: return decode<8>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
    case 256: return decode<16>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
    default: TORCH_CHECK(false, "head_dim must be 16, 32, 64, 128 or 256");
  }
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
  TORCH_CHECK(k_cache.size(3) == d && heads % kv_heads == 0, "head dims do not match");
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
    decode_dispatch(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), bt.data_ptr<int64_t>(),
                    lens,
           out.data_ptr<float>(), seqs, heads, kv_heads, d, block_size, max_blocks, static_cast<float>(scale));
  } else {
    using BF = at::BFloat16;
    decode_dispatch(qc.data_ptr<BF>(), k_cache.data_ptr<BF>(), v_cache.data_ptr<BF>(), bt.data_ptr<int64_t>(), lens,
           out.data_ptr<BF>(), seqs, heads, kv_heads, d, block_size, max_blocks, static_cast<float>(scale));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(airun_attn, m) {
  m.def("decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor ctx_lens, float scale) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(airun_attn, CPU, m) { m.impl("decode", &decode_attention); }
