// Fused BitNet linear for CPU decoding: [RMSNorm] -> per-token 8-bit absmax activations -> ternary matmul.
//
// y[m, n] = (sum_k q[m, k] * c[n, k]) * scale[n] / inv[m],  q = round(x' * inv), inv = 127 / max|x'|,
// x' = rmsnorm(x[m]) * norm_w when a norm weight is given, else x[m]. The integer sums are exact; with
// AVX512-VNNI they run as u8 x s8 dot products on q + 128 (the +128 is removed with the row sums of c).
// One call replaces the ~12 small PyTorch ops of the same computation, which dominate small models.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define NT_VNNI 1
#endif

namespace {

// q + 128 as u8 (VNNI wants unsigned activations) for one row; returns 127 / max|x'|.
float quantize_row(const float* x, const float* norm_w, double norm_eps, double act_eps, int64_t K,
                   float* scratch, uint8_t* q) {
  const float* src = x;
  if (norm_w != nullptr) {
    double ss = 0.0;
    for (int64_t k = 0; k < K; ++k) ss += (double)x[k] * x[k];
    const float r = 1.0f / std::sqrt((float)(ss / K) + (float)norm_eps);
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

// Dot products of MB activation rows with four code rows: each code vector is loaded once for all MB rows,
// and each row's four sums are reduced together.
template <int MB>
inline void dot4_u8s8(const uint8_t* a, const int8_t* b, int64_t K, int32_t* out, int64_t out_stride) {
#ifdef NT_VNNI
  if (K % 64 == 0) {
    __m512i c[MB][4];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < 4; ++j) c[i][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
      __m512i w[4];
      for (int j = 0; j < 4; ++j) w[j] = _mm512_loadu_si512(b + j * K + k);
      for (int i = 0; i < MB; ++i) {
        const __m512i x = _mm512_loadu_si512(a + i * K + k);
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
    for (int j = 0; j < 4; ++j) out[i * out_stride + j] = dot_u8s8(a + i * K, b + j * K, K);
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

// x (M, K) float32; codes (N, K) int8 in {-1, 0, 1}; code_sums (N,) int32 = sum_k codes[n, k];
// scale (N,) float32; norm_w (K,) float32 or empty. Returns (M, N) float32.
torch::Tensor ternary_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor code_sums, torch::Tensor scale,
                             torch::Tensor norm_w, double norm_eps, double act_eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous (M, K) float32");
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.is_contiguous(), "codes: contiguous int8");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(codes.size(1) == K, "codes and x disagree on in_features");
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
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n = 4 * g, width = std::min<int64_t>(4, N - n);
      for (int64_t m = 0; m < M;) {
        const uint8_t* a = q.data() + m * K;
        const int64_t rows = width == 4 && M - m >= 4 ? 4 : 1;
        if (rows == 4) {
          dot4_u8s8<4>(a, cp + n * K, K, acc, 4);
        } else if (width == 4) {
          dot4_u8s8<1>(a, cp + n * K, K, acc, 4);
        } else {
          for (int64_t j = 0; j < width; ++j) acc[j] = dot_u8s8(a, cp + (n + j) * K, K);
        }
        for (int64_t i = 0; i < rows; ++i, ++m) {
          for (int64_t j = 0; j < width; ++j) {
            yp[m * N + n + j] = (float)(acc[i * 4 + j] - 128 * sums[n + j]) * sp[n + j] / inv[m];
          }
        }
      }
    }
  });
  return y;
}

// One decode position for each of B sequences. qkv (B, Hq + 2 Hkv, D) holds each sequence's new q|k|v
// heads; RoPE (rotate-half, tables cos/sin (context, D)) is applied to q and k at positions[b], k and v
// are written into that sequence's cache at positions[b], and q attends over cache positions
// 0..positions[b]. keys[b] / values[b] are the sequence's (Hkv, capacity, D) float32 caches of this layer.
// Replaces ~15 PyTorch ops per layer (RoPE, copies, views, one SDPA per sequence) with one call.
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                               std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                               std::vector<int64_t> positions, int64_t Hq, int64_t Hkv, double scale) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat32,
              "qkv: contiguous (B, heads, D) float32");
  const int64_t B = qkv.size(0), H = qkv.size(1), D = qkv.size(2), half = D / 2, group = Hq / Hkv;
  TORCH_CHECK(H == Hq + 2 * Hkv && (int64_t)keys.size() == B && (int64_t)positions.size() == B, "shape mismatch");
  auto q = torch::empty({B, Hq, D}, qkv.options());
  auto out = torch::empty({B, Hq, D}, qkv.options());
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(keys[b].is_contiguous() && values[b].is_contiguous(), "caches must be contiguous");
    const int64_t cap = keys[b].size(1), pos = positions[b];
    TORCH_CHECK(pos < cap && pos < cos.size(0), "position beyond the cache or the RoPE table");
    const float* c = cp + pos * D;
    const float* sn = sp + pos * D;
    for (int64_t h = 0; h < Hq + Hkv; ++h) {  // RoPE into q, or straight into the key cache
      const float* x = qkv.data_ptr<float>() + (b * H + h) * D;
      float* dst = h < Hq ? q.data_ptr<float>() + (b * Hq + h) * D
                          : keys[b].data_ptr<float>() + ((h - Hq) * cap + pos) * D;
      for (int64_t j = 0; j < D; ++j) dst[j] = x[j] * c[j] + (j < half ? -x[j + half] : x[j - half]) * sn[j];
    }
    for (int64_t h = 0; h < Hkv; ++h) {
      std::copy_n(qkv.data_ptr<float>() + (b * H + Hq + Hkv + h) * D, D,
                  values[b].data_ptr<float>() + (h * cap + pos) * D);
    }
  }
  at::parallel_for(0, B * Hq, 4, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hq, h = i % Hq, kvh = h / group, cap = keys[b].size(1), L = positions[b] + 1;
      const float* qp = q.data_ptr<float>() + i * D;
      const float* kp = keys[b].data_ptr<float>() + kvh * cap * D;
      const float* vp = values[b].data_ptr<float>() + kvh * cap * D;
      scores.resize(L);
      float mx = -INFINITY;
      for (int64_t t = 0; t < L; ++t) {
        scores[t] = dot_f32(qp, kp + t * D, D) * (float)scale;
        mx = std::max(mx, scores[t]);
      }
      float total = 0.f;
      for (int64_t t = 0; t < L; ++t) total += (scores[t] = std::exp(scores[t] - mx));
      float* op = out.data_ptr<float>() + i * D;
      std::fill_n(op, D, 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const float p = scores[t] / total;
        for (int64_t d = 0; d < D; ++d) op[d] += p * vp[t * D + d];
      }
    }
  });
  return out;
}

// Logits = h @ wt for a tied embedding stored transposed as fp16 wt (K, V) (exact when the GGUF holds F16
// embeddings): half the memory traffic of float32, which dominates the LM head of a small model. Tiles of
// MB tokens x 64 vocab entries accumulate in 4 * MB registers along k, so no dot product ever needs a
// horizontal sum and each converted weight vector serves MB tokens.
namespace {
constexpr int64_t HEAD_VB = 64;  // vocab entries per tile: 4 AVX-512 vectors

// One logit, h · wt[:, v]: the scalar path (no AVX-512, or vocabulary entries past the last whole tile).
inline float head_logit(const float* h, const uint16_t* wp, int64_t K, int64_t V, int64_t v) {
  float sum = 0.f;
  for (int64_t k = 0; k < K; ++k) sum += h[k] * c10::detail::fp16_ieee_to_fp32_value(wp[k * V + v]);
  return sum;
}

template <int MB>
void head_tile(const float* hp, const uint16_t* wp, float* op, int64_t K, int64_t V, int64_t v0) {
#ifdef __AVX512F__
  __m512 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* src = wp + k * V + v0;
    __m512 w[4];
    for (int j = 0; j < 4; ++j)
      w[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * j)));
    for (int i = 0; i < MB; ++i) {
      const __m512 x = _mm512_set1_ps(hp[i * K + k]);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(x, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(op + i * V + v0 + 16 * j, acc[i][j]);
#else
  for (int i = 0; i < MB; ++i)
    for (int64_t v = v0; v < v0 + HEAD_VB; ++v) op[i * V + v] = head_logit(hp + i * K, wp, K, V, v);
#endif
}
}  // namespace

torch::Tensor head_f16(torch::Tensor h, torch::Tensor wt) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == torch::kFloat32, "h: contiguous (M, K) float32");
  TORCH_CHECK(wt.is_contiguous() && wt.scalar_type() == torch::kHalf && wt.size(0) == h.size(1),
              "wt: contiguous (K, V) fp16");
  const int64_t M = h.size(0), K = h.size(1), V = wt.size(1);
  auto out = torch::empty({M, V}, h.options());
  const float* hp = h.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wt.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  const int64_t tiles = V / HEAD_VB;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t v0 = t * HEAD_VB;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) head_tile<4>(hp + m * K, wp, op + m * V, K, V, v0);
      for (; m < M; ++m) head_tile<1>(hp + m * K, wp, op + m * V, K, V, v0);
    }
  });
  for (int64_t v = tiles * HEAD_VB; v < V; ++v) {  // a vocabulary that is not a multiple of 64: the rest
    for (int64_t m = 0; m < M; ++m) op[m * V + v] = head_logit(hp + m * K, wp, K, V, v);
  }
  return out;
}

bool has_vnni() {
#ifdef NT_VNNI
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ternary_linear", &ternary_linear, "[rmsnorm] + 8-bit activations + ternary matmul");
  m.def("decode_attention", &decode_attention, "KV-cache write + attention for one new position per sequence");
  m.def("head_f16", &head_f16, "h @ wt with transposed fp16 weights");
  m.def("has_vnni", &has_vnni, "compiled with AVX512-VNNI dot products");
}
