// Expert activations on one row of gate/up pre-activations (the decode and token-batch FFN steps).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

enum Activation { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kClampedSwiglu = 4, kLimitedSwiglu = 5 };

inline float act(float g, int64_t kind) {
  switch (kind) {
    case kSilu:
      return g / (1.f + std::exp(-g));
    case kGelu:
      return 0.5f * g * (1.f + std::erf(g * static_cast<float>(M_SQRT1_2)));
    case kGeluTanh: {
      const float c = std::sqrt(2.f / static_cast<float>(M_PI));
      return 0.5f * g * (1.f + std::tanh(c * (g + 0.044715f * g * g * g)));
    }
    default:
      return std::max(g, 0.f);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// e^x on 8 lanes (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, then 2^n), within 2 ulp of std::exp;
// inputs clamped to +-88.4, where float's e^x ends. A scalar exp per element would cost a token batch's activation
// several times what torch's vectorised SiLU does.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// silu(g) * u (u = nullptr: silu(g)) for 8 lanes from i on.
inline void silu8(const float* g, const float* u, float* a) {
  const __m256 gv = _mm256_loadu_ps(g);
  __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
  if (u) s = _mm256_mul_ps(s, _mm256_loadu_ps(u));
  _mm256_storeu_ps(a, s);
}
#endif

// a[i] = act(gate) * up (or GPT-OSS's clamped form, or DeepSeek-V4's limited SwiGLU) from the f-wide gate/up pre-activations h: concatenated
// [gate..., up...] or interleaved [g0, u0, g1, u1, ...]; ungated: a[i] = act(h[i]).
inline void activate(const float* h, float* a, int64_t f, bool gated, bool interleaved, int64_t kind, float alpha,
              float limit) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (kind == kSilu && !interleaved)  // the common case, eight at a time
    for (; i + 8 <= f; i += 8) silu8(h + i, gated ? h + f + i : nullptr, a + i);
#endif
  for (; i < f; ++i) {
    if (!gated) {
      a[i] = act(h[i], kind);
      continue;
    }
    float g = interleaved ? h[2 * i] : h[i], u = interleaved ? h[2 * i + 1] : h[f + i];
    if (kind == kClampedSwiglu) {
      g = std::min(g, limit);
      u = std::min(std::max(u, -limit), limit);
      a[i] = (u + 1.f) * (g / (1.f + std::exp(-alpha * g)));
    } else if (kind == kLimitedSwiglu) {  // DeepSeek-V4: SwiGLU of the clamped gate and up
      g = std::min(g, limit);
      u = std::min(std::max(u, -limit), limit);
      a[i] = g / (1.f + std::exp(-g)) * u;
    } else {
      a[i] = act(g, kind) * u;
    }
  }
}

