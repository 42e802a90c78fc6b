// Per-token elementwise work of a decoder layer fused into single passes: RMSNorm (with the residual add), rotary
// embedding of q and k together with the KV cache write, and the SwiGLU product; and the greedy argmax. The norms and
// the rotary op reproduce the roundings of the PyTorch ops they replace (transformers' Llama/Mistral code) in
// bfloat16: every intermediate that PyTorch stores in the model dtype is rounded to it here too; in float32 the math
// is the same up to summation order. The SwiGLU product differs only by its exp (see silu_mul_rows).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "simd.h"

namespace {

using airun::load16;
using airun::store16;

// v rounded to T's precision (a no-op for float32), as storing it in a T tensor would.
template <typename T>
inline __m512 rnd(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
}

// out = weight * T(x * rsqrt(mean(x^2) + eps)), with x = T(x + residual) first written back to residual when given.
template <typename T>
void rms_norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      T* res = residual ? residual + r * n : nullptr;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t c = 0; c < n; c += 16) {
        __m512 v = load16(xr + c);
        if (res) {
          v = rnd<T>(_mm512_add_ps(load16(res + c), v));
          store16(res + c, v);
        }
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps);
      const T* src = res ? res : xr;
      for (int64_t c = 0; c < n; c += 16) {
        const __m512 y = rnd<T>(_mm512_mul_ps(load16(src + c), _mm512_set1_ps(inv)));
        store16(out + r * n + c, _mm512_mul_ps(load16(weight + c), y));
      }
    }
  });
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 16 == 0, "x must be contiguous [T, n], n % 16 == 0");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type() &&
                  weight.is_contiguous(),
              "weight must be [n] in x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
}

at::Tensor norm_impl(const at::Tensor& x, at::Tensor* residual, const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->is_contiguous(),
                "residual must be like x");
  }
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0), n = x.size(1);
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows(x.data_ptr<float>(), residual ? residual->data_ptr<float>() : nullptr, weight.data_ptr<float>(),
                  out.data_ptr<float>(), rows, n, static_cast<float>(eps));
  } else {
    using BF = at::BFloat16;
    rms_norm_rows(x.data_ptr<BF>(), residual ? residual->data_ptr<BF>() : nullptr, weight.data_ptr<BF>(),
                  out.data_ptr<BF>(), rows, n, static_cast<float>(eps));
  }
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return norm_impl(x, nullptr, weight, eps);
}

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  return norm_impl(x, &residual, weight, eps);
}

// Rotate-half RoPE of one head in place of dst: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), each product and sum
// rounded to T as transformers' (q * cos) + (rotate_half(q) * sin) does.
template <typename T>
inline void rope_head(const T* src, const T* cos, const T* sin, T* dst, int64_t half) {
  for (int64_t c = 0; c < half; c += 16) {
    const __m512 x1 = load16(src + c), x2 = load16(src + half + c);
    const __m512 co = load16(cos + c), si = load16(sin + c);
    const __m512 a = rnd<T>(_mm512_mul_ps(x1, co)), b = rnd<T>(_mm512_mul_ps(x2, si));
    const __m512 e = rnd<T>(_mm512_mul_ps(x2, co)), f = rnd<T>(_mm512_mul_ps(x1, si));
    store16(dst + c, _mm512_sub_ps(a, b));
    store16(dst + half + c, _mm512_add_ps(e, f));
  }
}

template <typename T>
void rope_kv_rows(const T* qkv, const T* cos, const T* sin, T* kc, T* vc, const int64_t* slots, T* q_out, T* k_out,
                  int64_t rows, int64_t heads, int64_t kv_heads, int64_t d) {
  const int64_t width = (heads + 2 * kv_heads) * d, half = d / 2;
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t t = r0; t < r1; ++t) {
      const T* row = qkv + t * width;
      const T* co = cos + t * half;
      const T* si = sin + t * half;
      for (int64_t h = 0; h < heads; ++h) rope_head(row + h * d, co, si, q_out + (t * heads + h) * d, half);
      T* kslot = kc + slots[t] * kv_heads * d;
      T* vslot = vc + slots[t] * kv_heads * d;
      for (int64_t h = 0; h < kv_heads; ++h) {
        T* kdst = k_out + (t * kv_heads + h) * d;
        rope_head(row + (heads + h) * d, co, si, kdst, half);
        std::memcpy(kslot + h * d, kdst, d * sizeof(T));
        std::memcpy(vslot + h * d, row + (heads + kv_heads + h) * d, d * sizeof(T));
      }
    }
  });
}

// qkv [T, (H + 2 KVH) d]; cos, sin [T, d / 2] in qkv's dtype; caches [num_blocks, block_size, KVH, d]; slots [T].
// Writes rotated k and v into the cache slots; returns rotated q [T, H, d] and k [T, KVH, d].
std::tuple<at::Tensor, at::Tensor> rope_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                           at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                                           int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv must be contiguous [T, width]");
  const int64_t rows = qkv.size(0), d = k_cache.size(-1);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * d && d % 32 == 0, "qkv width does not match the heads");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type() && t->is_contiguous() && t->numel() == rows * d / 2,
                "cos and sin must be contiguous [T, d / 2] in qkv's dtype");
  }
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type() &&
                  k_cache.dim() == 4 && k_cache.size(2) == kv_heads,
              "caches must be contiguous [blocks, block_size, KVH, d] in qkv's dtype");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == rows && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots must be int64 [T]");
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < rows; ++t) TORCH_CHECK(sl[t] >= 0 && sl[t] < capacity, "slot out of the cache's range");
  at::Tensor q = at::empty({rows, heads, d}, qkv.options());
  at::Tensor k = at::empty({rows, kv_heads, d}, qkv.options());
  if (qkv.scalar_type() == at::kFloat) {
    rope_kv_rows(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache.data_ptr<float>(),
                 v_cache.data_ptr<float>(), sl, q.data_ptr<float>(), k.data_ptr<float>(), rows, heads, kv_heads, d);
  } else {
    using BF = at::BFloat16;
    rope_kv_rows(qkv.data_ptr<BF>(), cos.data_ptr<BF>(), sin.data_ptr<BF>(), k_cache.data_ptr<BF>(),
                 v_cache.data_ptr<BF>(), sl, q.data_ptr<BF>(), k.data_ptr<BF>(), rows, heads, kv_heads, d);
  }
  return {q, k};
}

// out[t, i] = T(T(silu(g)) * u) for g = gate_up[t, i], u = gate_up[t, I + i]: F.silu(gate) * up with its two
// roundings. silu(g) = g / (1 + exp(-g)) with exp16 (a few ulp from PyTorch's exp before the rounding to T).
template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / inter), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gu + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      for (int64_t c = 0; c < inter; c += 16) {
        const __mmask16 m = airun::tail_mask(inter - c);
        const __m512 gv = airun::load16_masked(g + c, m);
        const __m512 e = airun::exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        const __m512 s = rnd<T>(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
        const __m512 y = _mm512_mul_ps(s, airun::load16_masked(u + c, m));
        if (c + 16 <= inter) {
          store16(o + c, y);
        } else {
          alignas(64) T tmp[16];
          store16(tmp, y);
          std::memcpy(o + c, tmp, (inter - c) * sizeof(T));
        }
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.is_contiguous(),
              "gate_up must be contiguous [T, 2 I]");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "float32 or bfloat16 only");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_rows(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, inter);
  } else {
    silu_mul_rows(gate_up.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, inter);
  }
  return out;
}

// Index of each row's largest value, the first one on ties; a row with a NaN gives its first NaN (as torch.argmax).
void argmax_rows(const float* x, int64_t* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * n;
      const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __m512 mx = lowest;
      __mmask16 nan = 0;
      for (int64_t c = 0; c < n; c += 16) {
        const __m512 v = _mm512_mask_loadu_ps(lowest, airun::tail_mask(n - c), xr + c);  // lanes past n: -inf
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, v);
      }
      const float best = _mm512_reduce_max_ps(mx);
      const __m512 bv = _mm512_set1_ps(best);
      int64_t idx = 0;
      for (int64_t c = 0; c < n; c += 16) {  // the first position holding the max (or a NaN), from L1/L2
        const __mmask16 tail = airun::tail_mask(n - c);
        const __m512 v = _mm512_maskz_loadu_ps(tail, xr + c);
        const __mmask16 hit =
            tail & (nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, bv, _CMP_EQ_OQ));
        if (hit) {
          idx = c + __builtin_ctz(hit);
          break;
        }
      }
      out[r] = idx;
    }
  });
}

at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be contiguous float32 [M, N], N > 0");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  argmax_rows(x.data_ptr<float>(), out.data_ptr<int64_t>(), x.size(0), x.size(1));
  return out;
}

}  // namespace

TORCH_LIBRARY(airun_fused, m) {
  m.def("argmax(Tensor x) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("rope_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
        "int heads, int kv_heads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(airun_fused, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_kv", &rope_kv);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax", &argmax);
}
