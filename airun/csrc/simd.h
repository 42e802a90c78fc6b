// AVX-512 loads and stores of 16 lanes of float32 or bfloat16, shared by airun's CPU kernels.
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>

namespace airun {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const at::BFloat16* p) {  // bfloat16 is the high half of a float32
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }

inline void store16(at::BFloat16* dst, __m512 v) {  // round to nearest even, as PyTorch's float -> bfloat16
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(r));
}

}  // namespace airun
