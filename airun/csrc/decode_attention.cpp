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
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using airun::exp16;
using airun::load16;
using airun::store16;

constexpr int64_t kMinParallelMacs = 1 << 18;  // below this much work a step runs on one thread: forking costs more

// exp(sc - max) in place over sc[0, n); returns 1 / their sum (the caller scales the weighted sum of values by it).
inline float softmax_unnormalized(float* sc, int64_t n) {
  __m512 mx16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t p = 0; p < n; p += 16) {
    mx16 = _mm512_max_ps(mx16, _mm512_mask_loadu_ps(mx16, airun::tail_mask(n - p), sc + p));
  }
  const float mx = _mm512_reduce_max_ps(mx16);
  __m512 sum16 = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; p += 16) {
    const __mmask16 m = airun::tail_mask(n - p);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + p), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(sc + p, m, e);
    sum16 = _mm512_add_ps(sum16, _mm512_maskz_mov_ps(m, e));
  }
  return 1.f / _mm512_reduce_add_ps(sum16);
}

// Lane j of the result is the sum of v[j]'s 16 lanes.
inline __m512 sum_lanes16(const __m512 (&v)[16]) {
  return airun::combine_lanes16(v, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); });
}

// One head's key or value row (d elements of T: 32 to 512 bytes) into L2.
template <int NC, typename T>
inline void prefetch_row(const T* row) {
  constexpr int64_t bytes = NC * 16 * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T1);
}

// Everything from here to the matching pop may use AVX512-BF16; its instructions are issued only by the kBf16Dot
// instantiations, which run only where the CPU has the extension (use_bf16_dot checks). GCC builds this; the clang
// form is written to the same effect but has not been built here.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512bf16"))), apply_to = any(function))
#else
#pragma GCC push_options
#pragma GCC target("avx512bf16")
#endif

// A query row, and its dot product with a key row as 16 lanes of partial sums. kBf16Dot (bfloat16 rows of 32 or more):
// bfloat16 pairs through AVX512-BF16's dot product, products exact in float32; otherwise float32 multiply-adds.
template <int NC, typename T, bool kBf16Dot>
struct QueryRow {
  __m512 qv[kBf16Dot ? 1 : NC];
  __m512i qb[kBf16Dot ? NC / 2 : 1];
  explicit QueryRow(const T* q) {
    if constexpr (kBf16Dot) {
      for (int c = 0; c < NC / 2; ++c) qb[c] = _mm512_loadu_si512(q + 32 * c);
    } else {
      for (int c = 0; c < NC; ++c) qv[c] = load16(q + 16 * c);
    }
  }
  __m512 dot(const T* k) const {
    if constexpr (kBf16Dot) {
      __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)qb[0], (__m512bh)_mm512_loadu_si512(k));
      for (int c = 1; c < NC / 2; ++c) {
        a = _mm512_dpbf16_ps(a, (__m512bh)qb[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
      }
      return a;
    } else {
      __m512 a = _mm512_mul_ps(qv[0], load16(k));
      for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qv[c], load16(k + 16 * c), a);
      return a;
    }
  }
};

// Query heads [0, HC) of a work item: out[h] = inv[h] * sum_p sc[h][p] * v[p] (sc rows n apart). Prefetches the rows
// next_rows[0, next_n) of vc into L2.
template <int NC, int HC, typename T>
inline void weighted_values(const T* vc, const int64_t* rows, int64_t n, const float* sc, const float* inv,
                            const int64_t* next_rows, int64_t next_n, T* out) {
  __m512 acc[HC][NC] = {};
  for (int64_t p = 0; p < n; ++p) {
    if (p < next_n) prefetch_row<NC>(vc + next_rows[p]);
    const T* vp = vc + rows[p];
    __m512 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load16(vp + 16 * c);
    for (int h = 0; h < HC; ++h) {
      const __m512 w = _mm512_set1_ps(sc[h * n + p]);
      for (int c = 0; c < NC; ++c) acc[h][c] = _mm512_fmadd_ps(w, vv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < HC; ++h) {
    const __m512 s = _mm512_set1_ps(inv[h]);
    for (int c = 0; c < NC; ++c) store16(out + h * NC * 16 + 16 * c, _mm512_mul_ps(acc[h][c], s));
  }
}

// One work item: query heads q[0, g) (rows NC * 16 apart) against the keys and values at element offsets rows[0, n) of
// the caches; scores holds g * n floats, inv g. Each key row is read by every head's scores pass (from L1 after the
// first), each value row once per kHeadsPerPass heads. The next item's rows are prefetched into L2 meanwhile: its keys
// during the first head's scores, its values during the first pass over values.
template <int NC, typename T, bool kBf16Dot>
void attend_item(const T* q, const T* kc, const T* vc, const int64_t* rows, int64_t n, const int64_t* next_rows,
                 int64_t next_n, int64_t g, float scale, float* scores, float* inv, T* out) {
  for (int64_t gi = 0; gi < g; ++gi) {
    const QueryRow<NC, T, kBf16Dot> qr(q + gi * NC * 16);
    float* sc = scores + gi * n;
    const int64_t pf = gi == 0 ? next_n : 0;
    for (int64_t p0 = 0; p0 < n; p0 += 16) {
      const int64_t cnt = std::min<int64_t>(16, n - p0);
      __m512 part[16];
      for (int j = 0; j < 16; ++j) {
        if (j < cnt) {
          if (p0 + j < pf) prefetch_row<NC>(kc + next_rows[p0 + j]);
          part[j] = qr.dot(kc + rows[p0 + j]);
        } else {
          part[j] = _mm512_setzero_ps();
        }
      }
      _mm512_mask_storeu_ps(sc + p0, airun::tail_mask(cnt), _mm512_mul_ps(sum_lanes16(part), _mm512_set1_ps(scale)));
    }
    for (int64_t p = n; p < pf; ++p) prefetch_row<NC>(kc + next_rows[p]);
    inv[gi] = softmax_unnormalized(sc, n);
  }
  constexpr int kHeadsPerPass = NC >= 16 ? 1 : 16 / NC;  // HC * NC accumulators stay in registers
  for (int64_t h0 = 0; h0 < g; h0 += kHeadsPerPass) {
    const int64_t pf = h0 == 0 ? next_n : 0;
    airun::with_constant<kHeadsPerPass>(g - h0, [&](auto hc) {
      weighted_values<NC, decltype(hc)::value>(vc, rows, n, scores + h0 * n, inv + h0, next_rows, pf,
                                               out + h0 * NC * 16);
    });
  }
  for (int64_t p = n; p < next_n; ++p) prefetch_row<NC>(vc + next_rows[p]);
}

// NC = d / 16 vectors per head row. Work items are (sequence, KV head) pairs, split over the threads.
template <int NC, typename T, bool kBf16Dot>
void decode(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, T* out, int64_t seqs,
            int64_t heads, int64_t kv_heads, int64_t block_size, int64_t max_blocks, float scale) {
  constexpr int64_t d = NC * 16;
  const int64_t g = heads / kv_heads, items = seqs * kv_heads;
  int64_t keys = 0;
  for (int64_t s = 0; s < seqs; ++s) keys += ctx[s];
  const int64_t grain = keys * heads * d < kMinParallelMacs ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, inv(g);
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
      const int64_t head0 = (s * heads + kh * g) * d;
      attend_item<NC, T, kBf16Dot>(q + head0, kc, vc, rows.data(), n, next_rows.data(), next_n, g, scale,
                                   scores.data(), inv.data(), out + head0);
      std::swap(rows, next_rows);
    }
  });
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// Whether to use AVX512-BF16: the CPU has it, and AIRUN_BF16_DOT is not "0" (which runs the float32 path that CPUs
// without it take, for tests). Checked once per process.
bool use_bf16_dot() {
  static const bool use = [] {
    const char* env = std::getenv("AIRUN_BF16_DOT");
    return __builtin_cpu_supports("avx512bf16") && !(env && std::string(env) == "0");
  }();
  return use;
}

template <int NC, typename T>
void decode_any(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, T* out, int64_t seqs,
                int64_t heads, int64_t kv_heads, int64_t block_size, int64_t max_blocks, float scale) {
  if constexpr (std::is_same_v<T, at::BFloat16> && NC >= 2) {
    if (use_bf16_dot()) {
      return decode<NC, T, true>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
    }
  }
  decode<NC, T, false>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
}

template <typename T>
void decode_dispatch(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, T* out,
                     int64_t seqs, int64_t heads, int64_t kv_heads, int64_t d, int64_t block_size, int64_t max_blocks,
                     float scale) {
  switch (d) {
    case 16: return decode_any<1>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
    case 32: return decode_any<2>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
    case 64: return decode_any<4>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
    case 128: return decode_any<8>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
    case 256: return decode_any<16>(q, kc, vc, tables, ctx, out, seqs, heads, kv_heads, block_size, max_blocks, scale);
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
