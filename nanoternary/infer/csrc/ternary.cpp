// The cpp backend's CPU decoding kernels: ternary_linear, decode_attention, head_tiled, and DecodeModel,
// a whole decode step in one call built from them.
//
// ternary_linear is the fused BitNet linear: [RMSNorm] -> per-token 8-bit absmax activations -> ternary
// matmul. y[m, n] = sum_g (sum_{k in g} q[m, k] * c[n, k]) * scale[n, g] / inv[m], q = round(x' * inv),
// inv = 127 / max|x'|, x' = rmsnorm(x[m]) * norm_w when a norm weight is given, else x[m]. The integer
// sums are exact; with AVX512-VNNI they run as u8 x s8 dot products on q + 128 (the +128 is removed with
// the group sums of c). One call replaces the ~12 small PyTorch ops of the same computation, which
// dominate small models.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define NT_VNNI 1
#endif

namespace {

// RMSNorm's 1 / sqrt(mean(x^2) + eps) for a row of K values, the squares summed in double.
inline float inverse_rms(const float* x, int64_t K, double eps) {
  double ss = 0.0;
  for (int64_t k = 0; k < K; ++k) ss += (double)x[k] * x[k];
  return 1.0f / std::sqrt((float)(ss / K) + (float)eps);
}

// q + 128 as u8 (VNNI wants unsigned activations) for one row; returns 127 / max|x'|.
float quantize_row(const float* x, const float* norm_w, double norm_eps, double act_eps, int64_t K,
                   float* scratch, uint8_t* q) {
  const float* src = x;
  if (norm_w != nullptr) {
    const float r = inverse_rms(x, K, norm_eps);
    for (int64_t k = 0; k < K; ++k) scratch[k] = x[k] * r * norm_w[k];
    src = scratch;
  }
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(src[k]));
  const float inv = 127.0f / std::max(amax, (float)act_eps);
  for (int64_t k = 0; k < K; ++k) q[k] = (uint8_t)((int32_t)std::nearbyint(src[k] * inv) + 128);
  return inv;
}

inline int32_t dot_u8s8(const uint8_t* a, const int8_t* b, int64_t K) {
#ifdef NT_VNNI
  __m512i acc = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(a + k), _mm512_loadu_si512(b + k));
  }
  int32_t sum = _mm512_reduce_add_epi32(acc);
  for (; k < K; ++k) sum += (int32_t)a[k] * b[k];
  return sum;
#else
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += (int32_t)a[k] * b[k];
  return sum;
#endif
}

// Dot products, over K values, of MB activation rows with four code rows (both ld apart): each code vector
// is loaded once for all MB rows, and each row's four sums are reduced together.
template <int MB>
inline void dot4_u8s8(const uint8_t* a, const int8_t* b, int64_t K, int64_t ld, int32_t* out, int64_t out_stride) {
#ifdef NT_VNNI
  if (K % 64 == 0) {
    __m512i c[MB][4];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < 4; ++j) c[i][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
      __m512i w[4];
      for (int j = 0; j < 4; ++j) w[j] = _mm512_loadu_si512(b + j * ld + k);
      for (int i = 0; i < MB; ++i) {
        const __m512i x = _mm512_loadu_si512(a + i * ld + k);
        for (int j = 0; j < 4; ++j) c[i][j] = _mm512_dpbusd_epi32(c[i][j], x, w[j]);
      }
    }
    for (int i = 0; i < MB; ++i) {
      const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(c[i][0], c[i][1]), _mm512_unpackhi_epi32(c[i][0], c[i][1]));
      const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(c[i][2], c[i][3]), _mm512_unpackhi_epi32(c[i][2], c[i][3]));
      const __m512i t2 = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
      const __m128i r = _mm_add_epi32(_mm_add_epi32(_mm512_extracti32x4_epi32(t2, 0), _mm512_extracti32x4_epi32(t2, 1)),
                                      _mm_add_epi32(_mm512_extracti32x4_epi32(t2, 2), _mm512_extracti32x4_epi32(t2, 3)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * out_stride), r);
    }
    return;
  }
#endif
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) out[i * out_stride + j] = dot_u8s8(a + i * ld, b + j * ld, K);
}

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

#ifdef __AVX512F__
inline __m512 load_half16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// a · b for float a and fp16 b (a KV-cache row).
inline float dot_f32_f16(const float* a, const uint16_t* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load_half16(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += a[i] * half_to_float(b[i]);
  return sum;
}

// Softmax numerators in place: scores[t] = exp(scores[t] - mx), returning their sum.
float exp_shifted(float* scores, int64_t L, float mx) {
  int64_t t = 0;
  float total = 0.f;
#ifdef __AVX512F__
  // e^x = 2^n * e^r, x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial (ln2 split in two parts
  // so r is exact); x is <= 0 here and below -87 the result flushes to 0, as expf's does.
  const __m512 shift = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (; t + 16 <= L; t += 16) {
    const __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(scores + t), shift), _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    const __m512 e = _mm512_scalef_ps(p, n);
    _mm512_storeu_ps(scores + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; t < L; ++t) total += (scores[t] = std::exp(scores[t] - mx));
  return total;
}

// out[d] = weight * sum_t p[t] * v[t * D + d] over fp16 rows v: 8 vectors of 16 output lanes stay in
// registers along t.
void weighted_rows(const float* p, const uint16_t* v, int64_t L, int64_t D, float weight, float* out) {
  int64_t d0 = 0;
#ifdef __AVX512F__
  while (d0 + 16 <= D) {
    const int nv = (int)std::min<int64_t>(8, (D - d0) / 16);
    __m512 acc[8];
    for (int j = 0; j < nv; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
      const __m512 pt = _mm512_set1_ps(p[t]);
      const uint16_t* row = v + t * D + d0;
      for (int j = 0; j < nv; ++j) acc[j] = _mm512_fmadd_ps(pt, load_half16(row + 16 * j), acc[j]);
    }
    for (int j = 0; j < nv; ++j) _mm512_storeu_ps(out + d0 + 16 * j, _mm512_mul_ps(acc[j], _mm512_set1_ps(weight)));
    d0 += 16 * nv;
  }
#endif
  for (int64_t d = d0; d < D; ++d) {
    float sum = 0.f;
    for (int64_t t = 0; t < L; ++t) sum += p[t] * half_to_float(v[t * D + d]);
    out[d] = weight * sum;
  }
}

}  // namespace

// x (M, K) float32; codes (N, K) int8 in {-1, 0, 1}; scale (N, G) float32, one per row and group of K / G
// consecutive inputs (G = 1: one per row); code_sums (N, G) int32 = the codes' sum over each group;
// norm_w (K,) float32 or empty. Returns (M, N) float32: y[m, n] = sum_g scale[n, g] * (integer sum over
// group g) / inv[m].
torch::Tensor ternary_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor code_sums, torch::Tensor scale,
                             torch::Tensor norm_w, double norm_eps, double act_eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous (M, K) float32");
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.is_contiguous(), "codes: contiguous int8");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = scale.numel() / std::max<int64_t>(N, 1);
  TORCH_CHECK(codes.size(1) == K, "codes and x disagree on in_features");
  TORCH_CHECK(scale.is_contiguous() && code_sums.is_contiguous() && scale.numel() == N * G &&
                  code_sums.numel() == N * G && G >= 1 && K % G == 0,
              "scale and code_sums: contiguous (N, groups), groups dividing in_features");
  const int64_t gk = K / G;
  const float* nw = norm_w.numel() ? norm_w.data_ptr<float>() : nullptr;
  std::vector<uint8_t> q(M * K);
  std::vector<float> inv(M), scratch(K);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    inv[m] = quantize_row(xp + m * K, nw, norm_eps, act_eps, K, scratch.data(), q.data() + m * K);
  }
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int8_t* cp = codes.data_ptr<int8_t>();
  const int32_t* sums = code_sums.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 64, [&](int64_t g0, int64_t g1) {
    int32_t acc[4 * 4];  // (row of the tile, code row)
    float total[4 * 4];
    for (int64_t t = g0; t < g1; ++t) {
      const int64_t n = 4 * t, width = std::min<int64_t>(4, N - n);
      for (int64_t m = 0; m < M;) {
        const int64_t rows = width == 4 && M - m >= 4 ? 4 : 1;
        auto group_sums = [&](int64_t g) {  // acc = integer sums of the tile over group g
          const uint8_t* a = q.data() + m * K + g * gk;
          const int8_t* c = cp + n * K + g * gk;
          if (rows == 4) {
            dot4_u8s8<4>(a, c, gk, K, acc, 4);
          } else if (width == 4) {
            dot4_u8s8<1>(a, c, gk, K, acc, 4);
          } else {
            for (int64_t j = 0; j < width; ++j) acc[j] = dot_u8s8(a, c + j * K, gk);
          }
        };
        if (G == 1) {  // the common case, and the decode hot path: no float accumulation across groups
          group_sums(0);
          for (int64_t i = 0; i < rows; ++i, ++m) {
            for (int64_t j = 0; j < width; ++j) {
              yp[m * N + n + j] = (float)(acc[i * 4 + j] - 128 * sums[n + j]) * sp[n + j] / inv[m];
            }
          }
          continue;
        }
        std::fill_n(total, 16, 0.f);
        for (int64_t g = 0; g < G; ++g) {
          group_sums(g);
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t j = 0; j < width; ++j) {
              const int64_t r = (n + j) * G + g;
              total[i * 4 + j] += (float)(acc[i * 4 + j] - 128 * sums[r]) * sp[r];
            }
          }
        }
        for (int64_t i = 0; i < rows; ++i, ++m) {
          for (int64_t j = 0; j < width; ++j) yp[m * N + n + j] = total[i * 4 + j] / inv[m];
        }
      }
    }
  });
  return y;
}

namespace {
// One sequence's fp16 KV cache rows of one layer: (Hkv, cap, D) keys and values, the new position `pos`.
struct CacheRows {
  uint16_t* keys;
  uint16_t* values;
  int64_t cap;
  int64_t pos;
};

inline uint16_t* half_data(const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::Half>()); }

// One decode position for each of B sequences. qkv (B, Hq + 2 Hkv, D) holds each sequence's new q|k|v
// heads; RoPE (rotate-half, tables cos/sin (context, D)) is applied to q and k at caches[b].pos, k and v
// are written into the cache at that position, and q attends over cache positions 0..pos. q is scratch
// (B, Hq, D); out receives (B, Hq, D). Reading the caches is this kernel's cost once they outgrow the CPU
// caches, and fp16 halves it (as in llama.cpp, whose KV cache is fp16 too); scores, softmax and sums are
// float32.
void attend_new_positions(const float* qkv, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, const float* cos,
                          const float* sin, const std::vector<CacheRows>& caches, float scale, float* q, float* out) {
  const int64_t H = Hq + 2 * Hkv, half = D / 2, group = Hq / Hkv;
  std::vector<float> rotated(D);
  for (int64_t b = 0; b < B; ++b) {
    const CacheRows& cache = caches[b];
    const float* c = cos + cache.pos * D;
    const float* sn = sin + cache.pos * D;
    for (int64_t h = 0; h < Hq + Hkv; ++h) {  // RoPE into q, or into the key cache
      const float* x = qkv + (b * H + h) * D;
      float* dst = h < Hq ? q + (b * Hq + h) * D : rotated.data();
      for (int64_t j = 0; j < D; ++j) dst[j] = x[j] * c[j] + (j < half ? -x[j + half] : x[j - half]) * sn[j];
      if (h >= Hq) {
        uint16_t* row = cache.keys + ((h - Hq) * cache.cap + cache.pos) * D;
        for (int64_t j = 0; j < D; ++j) row[j] = c10::detail::fp16_ieee_from_fp32_value(rotated[j]);
      }
    }
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* x = qkv + (b * H + Hq + Hkv + h) * D;
      uint16_t* row = cache.values + (h * cache.cap + cache.pos) * D;
      for (int64_t j = 0; j < D; ++j) row[j] = c10::detail::fp16_ieee_from_fp32_value(x[j]);
    }
  }
  at::parallel_for(0, B * Hq, 4, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hq, kvh = (i % Hq) / group, L = caches[b].pos + 1;
      const float* qp = q + i * D;
      const uint16_t* kp = caches[b].keys + kvh * caches[b].cap * D;
      const uint16_t* vp = caches[b].values + kvh * caches[b].cap * D;
      scores.resize(L);
      float mx = -INFINITY;
      for (int64_t t = 0; t < L; ++t) {
        scores[t] = dot_f32_f16(qp, kp + t * D, D) * scale;
        mx = std::max(mx, scores[t]);
      }
      const float total = exp_shifted(scores.data(), L, mx);
      weighted_rows(scores.data(), vp, L, D, 1.f / total, out + i * D);
    }
  });
}

void check_cache(const torch::Tensor& t, int64_t dims) {
  TORCH_CHECK(t.dim() == dims && t.is_contiguous() && t.scalar_type() == torch::kHalf,
              "caches must be contiguous float16");
}
}  // namespace

// The attention of one layer for one new position per sequence (see attend_new_positions); keys[b] /
// values[b] are the sequence's (Hkv, capacity, D) caches of this layer. Replaces ~15 PyTorch ops per
// layer (RoPE, copies, views, one SDPA per sequence) with one call.
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                               std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                               std::vector<int64_t> positions, int64_t Hq, int64_t Hkv, double scale) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat32,
              "qkv: contiguous (B, heads, D) float32");
  const int64_t B = qkv.size(0), D = qkv.size(2);
  TORCH_CHECK(qkv.size(1) == Hq + 2 * Hkv && (int64_t)keys.size() == B && (int64_t)values.size() == B &&
                  (int64_t)positions.size() == B,
              "shape mismatch");
  std::vector<CacheRows> caches(B);
  for (int64_t b = 0; b < B; ++b) {
    check_cache(keys[b], 3);
    check_cache(values[b], 3);
    caches[b] = {half_data(keys[b]), half_data(values[b]), keys[b].size(1), positions[b]};
    TORCH_CHECK(positions[b] < caches[b].cap && positions[b] < cos.size(0),
                "position beyond the cache or the RoPE table");
  }
  auto q = torch::empty({B, Hq, D}, qkv.options());
  auto out = torch::empty({B, Hq, D}, qkv.options());
  attend_new_positions(qkv.data_ptr<float>(), B, Hq, Hkv, D, cos.data_ptr<float>(), sin.data_ptr<float>(), caches,
                       (float)scale, q.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// Logits = h @ E^T for a tied embedding E (V, K), held as fp16 when that is exact (F16 GGUF embeddings:
// half the memory traffic, which dominates the LM head of a small model) or as float32. The weights come
// tile-major, wt (tiles, K, 64) with E zero-padded to whole tiles (kernels.head_tiles), so each tile is
// one contiguous block that stays in cache while every group of tokens reads it; read with a row stride
// of V instead, a tile's rows map to the same L1 sets and every group fetched it again. Groups of MB
// tokens x 64 vocab entries accumulate in 4 * MB registers along k, so no dot product needs a horizontal
// sum and each loaded weight vector serves MB tokens.
namespace {
constexpr int64_t HEAD_VB = 64;  // vocab entries per tile: 4 AVX-512 vectors

inline float to_float(uint16_t h) { return half_to_float(h); }
inline float to_float(float f) { return f; }

template <int MB, typename W>
void head_tile(const float* hp, const W* tile, float* op, int64_t K, int64_t out_stride) {
#ifdef __AVX512F__
  __m512 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const W* src = tile + k * HEAD_VB;
    __m512 w[4];
    for (int j = 0; j < 4; ++j) {
      if constexpr (std::is_same_v<W, uint16_t>) {
        w[j] = load_half16(src + 16 * j);
      } else {
        w[j] = _mm512_loadu_ps(src + 16 * j);
      }
    }
    for (int i = 0; i < MB; ++i) {
      const __m512 x = _mm512_set1_ps(hp[i * K + k]);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(x, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(op + i * out_stride + 16 * j, acc[i][j]);
#else
  for (int i = 0; i < MB; ++i) {
    for (int64_t v = 0; v < HEAD_VB; ++v) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += hp[i * K + k] * to_float(tile[k * HEAD_VB + v]);
      op[i * out_stride + v] = sum;
    }
  }
#endif
}

template <typename W>
void head_tiles_product(const float* hp, const W* wp, float* op, int64_t M, int64_t K, int64_t tiles) {
  const int64_t padded = tiles * HEAD_VB;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const W* tile = wp + t * K * HEAD_VB;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) head_tile<4>(hp + m * K, tile, op + m * padded + t * HEAD_VB, K, padded);
      for (; m < M; ++m) head_tile<1>(hp + m * K, tile, op + m * padded + t * HEAD_VB, K, padded);
    }
  });
}
}  // namespace

torch::Tensor head_tiled(torch::Tensor h, torch::Tensor wt, int64_t V) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == torch::kFloat32, "h: contiguous (M, K) float32");
  const int64_t M = h.size(0), K = h.size(1);
  const bool half = wt.scalar_type() == torch::kHalf;
  TORCH_CHECK(wt.dim() == 3 && wt.is_contiguous() && (half || wt.scalar_type() == torch::kFloat32) &&
                  wt.size(1) == K && wt.size(2) == HEAD_VB && V > (wt.size(0) - 1) * HEAD_VB &&
                  V <= wt.size(0) * HEAD_VB,
              "wt: contiguous (ceil(V / 64), K, 64) fp16 or float32 tiles");
  const int64_t tiles = wt.size(0), padded = tiles * HEAD_VB;
  auto out = torch::empty({M, padded}, h.options());
  if (half) {
    head_tiles_product(h.data_ptr<float>(), half_data(wt), out.data_ptr<float>(), M, K, tiles);
  } else {
    head_tiles_product(h.data_ptr<float>(), wt.data_ptr<float>(), out.data_ptr<float>(), M, K, tiles);
  }
  return V == padded ? out : out.narrow(1, 0, V).contiguous();
}

namespace {
// One mHC-lite residual (model/mhc.py, MHCLiteResidual) around a sub-layer, for one decode position per
// sequence: static logits pre_bias, post_bias (n,) and res_bias (n!,; empty: no stream mixing), plus,
// when proj is not empty (mode dynamic), gates * proj(RMSNorm(streams)); perms (n!, n * n) is the
// permutation table. Plain loops: with n = 2..4 streams the ~20 PyTorch ops of the same arithmetic cost
// far more than it does.
class StreamResidual {
 public:
  StreamResidual(const torch::Tensor* t, double eps)
      : pre_bias(t[0]), post_bias(t[1]), res_bias(t[2]), proj(t[3]), gates(t[4]), perms(t[5]), eps(eps),
        n(t[0].numel()), P(t[2].numel()) {}

  // h = H_pre · x, the sub-layer's input (B, C), from streams x (B, n, C); keeps H_post and H_res.
  torch::Tensor read(const torch::Tensor& x) {
    const int64_t B = x.size(0), C = x.size(2), E = 2 * n + P;
    const float* xp = x.data_ptr<float>();
    std::vector<float> d(B * E, 0.f);
    if (proj.numel() > 0) {
      auto normed = torch::empty({B, n * C}, x.options());
      float* np = normed.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        const float* row = xp + b * n * C;
        const float r = inverse_rms(row, n * C, eps);
        for (int64_t k = 0; k < n * C; ++k) np[b * n * C + k] = row[k] * r;
      }
      auto projected = at::linear(normed, proj).contiguous();
      std::copy_n(projected.data_ptr<float>(), B * E, d.data());
    }
    const float* g = proj.numel() > 0 ? gates.data_ptr<float>() : nullptr;
    const float* pb = pre_bias.data_ptr<float>();
    const float* qb = post_bias.data_ptr<float>();
    const float* rb = P ? res_bias.data_ptr<float>() : nullptr;
    const float* table = perms.data_ptr<float>();
    pre_.assign(B * n, 0.f);
    post_.assign(B * n, 0.f);
    mix_.assign(P ? B * n * n : 0, 0.f);
    std::vector<float> w(P);
    auto sigmoid = [](float z) { return 1.f / (1.f + std::exp(-z)); };
    for (int64_t b = 0; b < B; ++b) {
      const float* db = d.data() + b * E;
      for (int64_t j = 0; j < n; ++j) {
        pre_[b * n + j] = sigmoid(g ? g[0] * db[j] + pb[j] : pb[j]);
        post_[b * n + j] = 2.f * sigmoid(g ? g[1] * db[n + j] + qb[j] : qb[j]);
      }
      if (P) {  // H_res = sum_k softmax(logits)_k P_k
        float mx = -INFINITY, total = 0.f;
        for (int64_t k = 0; k < P; ++k) mx = std::max(mx, w[k] = g ? g[2] * db[2 * n + k] + rb[k] : rb[k]);
        for (int64_t k = 0; k < P; ++k) total += (w[k] = std::exp(w[k] - mx));
        float* H = mix_.data() + b * n * n;
        for (int64_t k = 0; k < P; ++k)
          for (int64_t e = 0; e < n * n; ++e) H[e] += w[k] / total * table[k * n * n + e];
      }
    }
    auto h = torch::zeros({B, C}, x.options());
    float* hp = h.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < n; ++j) {
        const float p = pre_[b * n + j];
        const float* row = xp + (b * n + j) * C;
        for (int64_t c = 0; c < C; ++c) hp[b * C + c] += p * row[c];
      }
    return h;
  }

  // x' = H_res · x + H_post ⊗ y for the sub-layer's output y (B, C).
  torch::Tensor write(const torch::Tensor& x, const torch::Tensor& y) {
    const int64_t B = x.size(0), C = x.size(2);
    auto out = torch::empty_like(x);
    const float* xp = x.data_ptr<float>();
    const float* yp = y.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n; ++i) {
        float* dst = op + (b * n + i) * C;
        const float post = post_[b * n + i];
        for (int64_t c = 0; c < C; ++c) dst[c] = post * yp[b * C + c];
        if (!P) {
          const float* src = xp + (b * n + i) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
          continue;
        }
        for (int64_t j = 0; j < n; ++j) {
          const float m = mix_[(b * n + i) * n + j];
          const float* src = xp + (b * n + j) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] += m * src[c];
        }
      }
    return out;
  }

 private:
  torch::Tensor pre_bias, post_bias, res_bias, proj, gates, perms;
  double eps;
  int64_t n, P;
  std::vector<float> pre_, post_, mix_;
};
}  // namespace

// A whole decode step of a SwiGLU model in one call: for a small model the ~40 (plain residual) to ~150
// (mHC-lite) PyTorch and kernel calls per step that Python would make cost more than their arithmetic.
// Per layer, around each sub-layer, either the plain residual x += f(x), or mHC-lite's
// x = H_res · x + H_post ⊗ f(H_pre · x) over n streams; the sub-layers are o(attention(qkv(.))) and
// down(silu(gate) * up) with gate|up = gate_up(.), each ternary linear carrying its RMSNorm (or none), as
// in Engine._forward. Then the stream sum, the final RMSNorm and the tied LM head (tiles as head_tiled
// reads them).
class DecodeModel {
 public:
  // layers[l]: codes, code_sums, scale, norm weight (empty: none) of qkv, o, gate_up, down; eps[l]: the
  // four norms' eps. residuals[l]: empty (plain residual) or the attention's then the FFN's pre_bias,
  // post_bias, res_bias, proj, gates, perms (empty tensors where absent); residual_eps[l]: their 2 eps.
  DecodeModel(torch::Tensor embed, std::vector<std::vector<torch::Tensor>> layers, std::vector<std::vector<double>> eps,
              std::vector<std::vector<torch::Tensor>> residuals, std::vector<std::vector<double>> residual_eps,
              int64_t n_streams, torch::Tensor final_norm, double final_eps, torch::Tensor head_tiles,
              torch::Tensor cos, torch::Tensor sin, int64_t Hq, int64_t Hkv, int64_t ffn_dim, double act_eps)
      : embed_(embed), layers_(layers), eps_(eps), n_streams_(n_streams), final_norm_(final_norm),
        final_eps_(final_eps), head_tiles_(head_tiles), cos_(cos), sin_(sin), Hq_(Hq), Hkv_(Hkv),
        ffn_dim_(ffn_dim), act_eps_(act_eps), vocab_(embed.size(0)) {
    TORCH_CHECK(layers.size() == eps.size() && residuals.size() == layers.size() && residual_eps.size() == layers.size(),
                "one entry per layer in every list");
    for (size_t l = 0; l < layers.size(); ++l) {
      TORCH_CHECK(layers[l].size() == 16 && eps[l].size() == 4, "a layer is 4 linears x (codes, sums, scale, norm)");
      TORCH_CHECK(residuals[l].size() == (n_streams > 1 ? 12u : 0u) && residual_eps[l].size() == residuals[l].size() / 6,
                  "a layer has 2 stream residuals x 6 tensors with n_streams > 1, none with 1");
      for (size_t r = 0; r < residuals[l].size() / 6; ++r) {
        residuals_.emplace_back(residuals[l].data() + 6 * r, residual_eps[l][r]);
      }
    }
  }

  // ids (B,) int64, one new token per sequence; keys[b] / values[b] (layers, Hkv, capacity, D) fp16 caches;
  // positions[b] the new token's position. Returns (B, vocab) float32 logits.
  torch::Tensor step(torch::Tensor ids, std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                     std::vector<int64_t> positions) {
    const int64_t B = ids.size(0), n_layers = (int64_t)layers_.size(), D = cos_.size(1);
    TORCH_CHECK((int64_t)keys.size() == B && (int64_t)values.size() == B && (int64_t)positions.size() == B,
                "one cache and position per token");
    std::vector<CacheRows> caches(B);
    std::vector<int64_t> layer_stride(B);
    for (int64_t b = 0; b < B; ++b) {
      check_cache(keys[b], 4);
      check_cache(values[b], 4);
      TORCH_CHECK(keys[b].size(0) == n_layers && keys[b].size(1) == Hkv_ && keys[b].size(3) == D &&
                      values[b].sizes() == keys[b].sizes(),
                  "cache shape");
      const int64_t cap = keys[b].size(2);
      TORCH_CHECK(positions[b] < cap && positions[b] < cos_.size(0), "position beyond the cache or the RoPE table");
      caches[b] = {half_data(keys[b]), half_data(values[b]), cap, positions[b]};
      layer_stride[b] = Hkv_ * cap * D;
    }
    auto x = embed_.index_select(0, ids);  // (B, C), or (B, n, C) streams below
    if (n_streams_ > 1) x = x.unsqueeze(1).repeat({1, n_streams_, 1});
    auto q = torch::empty({B, Hq_, D}, x.options());
    const float scale = 1.f / std::sqrt((float)D);
    auto attention = [&](int64_t l, const torch::Tensor& h) {
      auto qkv = linear(l, 0, h);
      auto attended = torch::empty({B, Hq_ * D}, h.options());
      attend_new_positions(qkv.data_ptr<float>(), B, Hq_, Hkv_, D, cos_.data_ptr<float>(), sin_.data_ptr<float>(),
                           caches, scale, q.data_ptr<float>(), attended.data_ptr<float>());
      return linear(l, 1, attended);
    };
    auto ffn = [&](int64_t l, const torch::Tensor& h) {
      auto gate_up = linear(l, 2, h);
      return linear(l, 3, at::silu(gate_up.narrow(1, 0, ffn_dim_)).mul_(gate_up.narrow(1, ffn_dim_, ffn_dim_)));
    };
    for (int64_t l = 0; l < n_layers; ++l) {
      if (n_streams_ > 1) {
        StreamResidual& around_attention = residuals_[2 * l];
        x = around_attention.write(x, attention(l, around_attention.read(x).contiguous()));
        StreamResidual& around_ffn = residuals_[2 * l + 1];
        x = around_ffn.write(x, ffn(l, around_ffn.read(x).contiguous()));
      } else {
        x.add_(attention(l, x));
        x.add_(ffn(l, x));
      }
      for (int64_t b = 0; b < B; ++b) {  // the next layer's rows of each cache
        caches[b].keys += layer_stride[b];
        caches[b].values += layer_stride[b];
      }
    }
    if (n_streams_ > 1) x = x.sum(1);
    auto h = at::rms_norm(x, {x.size(1)}, final_norm_, final_eps_);
    return head_tiled(h, head_tiles_, vocab_);
  }

 private:
  torch::Tensor linear(int64_t l, int64_t i, const torch::Tensor& x) const {
    const auto& t = layers_[l];
    return ternary_linear(x, t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3], eps_[l][i], act_eps_);
  }

  torch::Tensor embed_;
  std::vector<std::vector<torch::Tensor>> layers_;
  std::vector<std::vector<double>> eps_;
  std::vector<StreamResidual> residuals_;
  int64_t n_streams_;
  torch::Tensor final_norm_;
  double final_eps_;
  torch::Tensor head_tiles_, cos_, sin_;
  int64_t Hq_, Hkv_, ffn_dim_;
  double act_eps_;
  int64_t vocab_;
};

bool has_vnni() {
#ifdef NT_VNNI
  return true;
#else
  return false;
#endif
}

// The kernels run without the GIL (they touch no Python object once their arguments are converted), so
// a server's event loop can stream tokens on another core while a step computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using no_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("ternary_linear", &ternary_linear, "[rmsnorm] + 8-bit activations + ternary matmul", no_gil());
  m.def("decode_attention", &decode_attention, "KV-cache write + attention for one new position per sequence",
        no_gil());
  m.def("head_tiled", &head_tiled, "h @ E^T with E as fp16 or float32 tiles (kernels.head_tiles)", no_gil());
  m.def("has_vnni", &has_vnni, "compiled with AVX512-VNNI dot products");
  pybind11::class_<DecodeModel>(m, "DecodeModel")
      .def(pybind11::init<torch::Tensor, std::vector<std::vector<torch::Tensor>>, std::vector<std::vector<double>>,
                          std::vector<std::vector<torch::Tensor>>, std::vector<std::vector<double>>, int64_t,
                          torch::Tensor, double, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t,
                          int64_t, double>())
      .def("step", &DecodeModel::step, "one decode position per sequence through the whole model", no_gil());
}
