// CPU kernels for codefill's serving graphs, called through MindSpore's ops.Custom(func_type="aot").
// Each function: params = inputs then the output, float32 row-major (ints are int32).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {
int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  return n;
}
}  // namespace

// oneDNN's single-precision GEMM, from the libdnnl MindSpore ships (kernels.py links it):
// C[M, N] = alpha * op(A) op(B) + beta * C, row-major.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                          int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

// Attention of new queries over a slot's cached keys/values, causal by position.
// q [B, T, H, D] (rotary applied), cache_k, cache_v [N, D] rows (slot * KV + kv) * S + position,
// slots [B], positions [B, T], meta [2] = {R, S} (query heads per kv head, cache columns); out [B, T, H, D].
// Query head h reads kv head h / R; a query at position p sees keys 0..p of its slot, read in place. The
// last column (S - 1) is the scratch column of idle decode rows: a query there attends to nothing (zeros).
namespace {

// Keys 0..m-1 of a query row: softmax of its scores in place, zeros after them up to n.
void softmax_prefix(float *w, int64_t m, int64_t n) {
  if (m > 0) {
    float mx = w[0];
    for (int64_t j = 1; j < m; j++) mx = w[j] > mx ? w[j] : mx;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < m; j++) {
      w[j] = std::exp(w[j] - mx);
      sum += w[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < m; j++) w[j] *= inv;
  }
  for (int64_t j = m; j < n; j++) w[j] = 0.f;
}

struct AttentionArgs {
  const float *q, *ck, *cv;
  const int32_t *slots, *pos;
  float *out;
  int64_t B, T, H, D, R, S, KV;
  float scale;
  int64_t visible(int64_t b, int64_t t) const {  // keys a query sees: p + 1, none at the scratch column
    const int64_t p = pos[b * T + t];
    return p >= S - 1 ? 0 : p + 1;
  }
};

// A few queries (decode, short verifies): per query head, dot products over the keys it sees.
void attention_rows(const AttentionArgs &a) {
  std::vector<float> w(static_cast<size_t>(a.S));
  for (int64_t bt = 0; bt < a.B * a.T; bt++) {
    for (int64_t h = 0; h < a.H; h++) {
      const int64_t b = bt / a.T, m = a.visible(b, bt % a.T);
      const int64_t row0 = (a.slots[b] * a.KV + h / a.R) * a.S;
      const float *key = a.ck + row0 * a.D, *val = a.cv + row0 * a.D;
      const float *qr = a.q + (bt * a.H + h) * a.D;
      float *o = a.out + (bt * a.H + h) * a.D;
      for (int64_t j = 0; j < m; j++) {
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < a.D; d++) acc += qr[d] * key[j * a.D + d];
        w[j] = acc * a.scale;
      }
      softmax_prefix(w.data(), m, m);
      for (int64_t d = 0; d < a.D; d++) o[d] = 0.f;
      for (int64_t j = 0; j < m; j++) {
        const float wj = w[j];
#pragma omp simd
        for (int64_t d = 0; d < a.D; d++) o[d] += wj * val[j * a.D + d];
      }
    }
  }
}

// Many queries (prefill chunks): per batch row and query head, scores = q k^T and out = softmax(scores) v
// as two oneDNN GEMMs over the keys up to the furthest query, masked between.
void attention_gemm(const AttentionArgs &a) {
  // One thread, like every kernel here: MindSpore's own threads hold the cores between ops, and waking
  // OpenMP threads onto them cost more than they saved (docs/benchmarks/README.md). oneDNN reads the
  // calling thread's OpenMP setting; restored after.
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  std::vector<float> w;
  for (int64_t b = 0; b < a.B; b++) {
    int64_t n = 0;
    for (int64_t t = 0; t < a.T; t++) n = a.visible(b, t) > n ? a.visible(b, t) : n;
    for (int64_t h = 0; h < a.H; h++) {
      const int64_t row0 = (a.slots[b] * a.KV + h / a.R) * a.S;
      const int64_t ld = a.H * a.D;  // query / output rows of one head are a row of heads apart
      const float *qh = a.q + (b * a.T * a.H + h) * a.D;
      float *oh = a.out + (b * a.T * a.H + h) * a.D;
      if (n == 0) {
        for (int64_t t = 0; t < a.T; t++)
          for (int64_t d = 0; d < a.D; d++) oh[t * ld + d] = 0.f;
        continue;
      }
      w.resize(static_cast<size_t>(a.T * n));
      dnnl_sgemm('N', 'T', a.T, n, a.D, a.scale, qh, ld, a.ck + row0 * a.D, a.D, 0.f, w.data(), n);
      for (int64_t t = 0; t < a.T; t++) softmax_prefix(w.data() + t * n, a.visible(b, t), n);
      dnnl_sgemm('N', 'N', a.T, a.D, n, 1.f, w.data(), n, a.cv + row0 * a.D, a.D, 0.f, oh, ld);
    }
  }
  omp_set_num_threads(threads);
}

}  // namespace

extern "C" int cache_attention(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 7 || ndims[0] != 4 || ndims[1] != 2) return 1;
  AttentionArgs a;
  a.q = static_cast<const float *>(params[0]);
  a.ck = static_cast<const float *>(params[1]);
  a.cv = static_cast<const float *>(params[2]);
  a.slots = static_cast<const int32_t *>(params[3]);
  a.pos = static_cast<const int32_t *>(params[4]);
  const int32_t *meta = static_cast<const int32_t *>(params[5]);
  a.out = static_cast<float *>(params[6]);
  a.B = shapes[0][0], a.T = shapes[0][1], a.H = shapes[0][2], a.D = shapes[0][3];
  a.R = meta[0], a.S = meta[1];
  if (a.R <= 0 || a.H % a.R != 0 || shapes[1][1] != a.D) return 1;
  a.KV = a.H / a.R;
  a.scale = 1.0f / std::sqrt(static_cast<float>(a.D));
  for (int64_t b = 0; b < a.B; b++) {  // every read inside the cache, every position a column
    if (a.slots[b] < 0 || (a.slots[b] + 1) * a.KV * a.S > shapes[1][0]) return 2;
    for (int64_t t = 0; t < a.T; t++)
      if (a.pos[b * a.T + t] < 0 || a.pos[b * a.T + t] >= a.S) return 2;
  }
  if (a.T <= 8) attention_rows(a);
  else attention_gemm(a);
  return 0;
}

// RMSNorm: x [..., C], weight [C], eps [1] -> x * rsqrt(mean(x^2) + eps) * weight.
extern "C" int rms_norm(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *wt = static_cast<const float *>(params[1]);
  const float eps = static_cast<const float *>(params[2])[0];
  float *y = static_cast<float *>(params[3]);
  const int64_t C = shapes[0][ndims[0] - 1], N = numel(ndims[0], shapes[0]) / C;
  for (int64_t i = 0; i < N; i++) {
    const float *xr = x + i * C;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < C; c++) ss += xr[c] * xr[c];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
    float *yr = y + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; c++) yr[c] = xr[c] * inv * wt[c];
  }
  return 0;
}

// Half-split rotary: x [B, T, heads, D], cos, sin [B, T, 1, D] -> x * cos + rotate_half(x) * sin,
// rotate_half(x) = cat(-x[D/2:], x[:D/2]).
extern "C" int rotary(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4 || ndims[0] != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *cs = static_cast<const float *>(params[1]);
  const float *sn = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t BT = shapes[0][0] * shapes[0][1], NH = shapes[0][2], D = shapes[0][3], half = D / 2;
  for (int64_t bt = 0; bt < BT; bt++) {
    const float *c = cs + bt * D, *s = sn + bt * D;
    for (int64_t h = 0; h < NH; h++) {
      const float *xr = x + (bt * NH + h) * D;
      float *yr = y + (bt * NH + h) * D;
#pragma omp simd
      for (int64_t d = 0; d < half; d++) yr[d] = xr[d] * c[d] - xr[d + half] * s[d];
#pragma omp simd
      for (int64_t d = half; d < D; d++) yr[d] = xr[d] * c[d] + xr[d - half] * s[d];
    }
  }
  return 0;
}

// SwiGLU's gate: a, b [..., F] -> silu(a) * b.
extern "C" int silu_mul(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 3) return 1;
  const float *a = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t N = numel(ndims[0], shapes[0]);
#pragma omp simd
  for (int64_t i = 0; i < N; i++) y[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];
  return 0;
}

// Shape and type inference, so the kernels also run in graphs with dynamic dimensions (the prefill graph):
// MindSpore calls NAMEInferShape / NAMEInferType (ops.Custom with out_shape and out_dtype None). Every
// kernel's output has its first input's shape and type.
enum TypeId : int {};  // MindSpore's type ids; only passed through
namespace {
std::vector<int64_t> first_shape(const int *ndims, int64_t *const *shapes) {
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
}  // namespace
#define CODEFILL_SAME_AS_FIRST(name)                                                       \
  extern "C" std::vector<int64_t> name##InferShape(int *ndims, int64_t **shapes, void *) { \
    return first_shape(ndims, shapes);                                                     \
  }                                                                                        \
  extern "C" TypeId name##InferType(std::vector<TypeId> types, void *) { return types[0]; }
CODEFILL_SAME_AS_FIRST(cache_attention)
CODEFILL_SAME_AS_FIRST(rms_norm)
CODEFILL_SAME_AS_FIRST(rotary)
CODEFILL_SAME_AS_FIRST(silu_mul)
