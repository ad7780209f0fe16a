// CPU kernels for codefill's serving graphs, called through MindSpore's ops.Custom(func_type="aot").
// Each function: params = inputs then the output, float32 row-major (ints are int32).
#include <immintrin.h>
#include <omp.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {
int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  return n;
}
}  // namespace

// A team of threads for one kernel call, one per core of the process's affinity mask (a tensor-parallel rank
// pinned to one core gets a team of one; CODEFILL_KERNEL_THREADS caps it). The calling thread, one of
// MindSpore's, runs part 0; helpers started on first use run the others. Between calls a helper spins for
// CODEFILL_KERNEL_SPIN_US (default 1000 µs: the gaps between a step's kernels are far shorter), then sleeps on
// a futex until the next call. Helpers are not OpenMP threads: an OpenMP team woken per kernel started 2-3 ms
// late behind MindSpore's spinning threads (docs/benchmarks/README.md).
namespace {

using PartFn = void (*)(const void *ctx, int part, int parts);

class Team {
 public:
  // This process's team; a forked child (whose parent's helpers did not survive the fork) makes its own.
  static Team &get() {
    static std::atomic<Team *> team{nullptr};
    Team *t = team.load(std::memory_order_acquire);
    if (t == nullptr || t->pid_ != getpid()) {
      Team *fresh = new Team();  // never freed: helpers may be asleep in it at exit
      team.store(fresh, std::memory_order_release);
      t = fresh;
    }
    return *t;
  }

  // fn(ctx, part, parts) for every part, parts = the team's size; a second caller while the team is busy
  // (another runner in another thread) runs all of its work itself, as one part.
  void run(PartFn fn, const void *ctx) {
    if (size_ == 1 || busy_.exchange(true, std::memory_order_acquire)) {
      fn(ctx, 0, 1);
      return;
    }
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    if (sleepers_.load(std::memory_order_acquire) > 0) generation_.notify_all();
    fn(ctx, 0, size_);
    while (done_.load(std::memory_order_acquire) != size_ - 1) _mm_pause();
    busy_.store(false, std::memory_order_release);
  }

 private:
  Team() : pid_(getpid()) {
    cpu_set_t set;
    CPU_ZERO(&set);
    int n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    if (const char *cap = std::getenv("CODEFILL_KERNEL_THREADS")) n = std::min(n, std::atoi(cap));
    size_ = std::max(n, 1);
    const char *spin = std::getenv("CODEFILL_KERNEL_SPIN_US");
    spin_ = std::chrono::microseconds(spin ? std::atol(spin) : 1000);
    for (int part = 1; part < size_; part++) std::thread([this, part] { help(part); }).detach();
  }

  void help(int part) {
    omp_set_num_threads(1);  // oneDNN called from here runs on this thread alone
    uint64_t seen = 0;
    for (;;) {
      auto since = std::chrono::steady_clock::now();
      uint64_t now;
      for (int polls = 0; (now = generation_.load(std::memory_order_acquire)) == seen; polls++) {
        _mm_pause();
        if ((polls & 63) == 63) sched_yield();  // a MindSpore thread waiting for this core gets it
        if ((polls & 255) == 255 && std::chrono::steady_clock::now() - since > spin_) {
          sleepers_.fetch_add(1, std::memory_order_acq_rel);
          generation_.wait(seen, std::memory_order_acquire);
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
          since = std::chrono::steady_clock::now();
        }
      }
      seen = now;
      fn_(ctx_, part, size_);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  pid_t pid_;
  int size_ = 1;
  std::chrono::microseconds spin_{1000};
  PartFn fn_ = nullptr;
  const void *ctx_ = nullptr;
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> done_{0};
  std::atomic<int> sleepers_{0};
};

// [begin, end) of `part` of `parts` over n items, in blocks of `align` items.
std::pair<int64_t, int64_t> share(int64_t n, int part, int parts, int64_t align = 1) {
  const int64_t blocks = (n + align - 1) / align;
  const int64_t begin = blocks * part / parts * align, end = blocks * (part + 1) / parts * align;
  return {std::min(begin, n), std::min(end, n)};
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
// Work is split over the team by (row, query head) in the first, (batch row, query head) in the second.
void attention_rows(const AttentionArgs &a, int part, int parts) {
  std::vector<float> w(static_cast<size_t>(a.S));
  const auto [first, last] = share(a.B * a.T * a.H, part, parts);
  for (int64_t item = first; item < last; item++) {
    const int64_t bt = item / a.H, h = item % a.H;
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

// Many queries (prefill chunks): per batch row, query head and block of queries, scores = q k^T and
// out = softmax(scores) v as two oneDNN GEMMs over the keys up to the block's furthest query, masked between.
constexpr int64_t kQueryBlock = 128;

void attention_gemm(const AttentionArgs &a, int part, int parts) {
  // oneDNN on this thread alone (it reads the calling thread's OpenMP setting; restored after): the team
  // gives the parallelism.
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  std::vector<float> w;
  const auto [first, last] = share(a.B * a.H, part, parts);
  for (int64_t item = first; item < last; item++) {
    const int64_t b = item / a.H, h = item % a.H;
    const int64_t row0 = (a.slots[b] * a.KV + h / a.R) * a.S;
    const int64_t ld = a.H * a.D;  // query / output rows of one head are a row of heads apart
    const float *qh = a.q + (b * a.T * a.H + h) * a.D;
    float *oh = a.out + (b * a.T * a.H + h) * a.D;
    // Blocks of queries, each over the keys up to its furthest query only: in a causal chunk the first
    // queries see fewer keys than the last.
    for (int64_t t0 = 0; t0 < a.T; t0 += kQueryBlock) {
      const int64_t t1 = std::min(a.T, t0 + kQueryBlock);
      int64_t n = 0;
      for (int64_t t = t0; t < t1; t++) n = std::max(n, a.visible(b, t));
      if (n == 0) {
        for (int64_t t = t0; t < t1; t++)
          for (int64_t d = 0; d < a.D; d++) oh[t * ld + d] = 0.f;
        continue;
      }
      w.resize(static_cast<size_t>((t1 - t0) * n));
      dnnl_sgemm('N', 'T', t1 - t0, n, a.D, a.scale, qh + t0 * ld, ld, a.ck + row0 * a.D, a.D, 0.f, w.data(), n);
      for (int64_t t = t0; t < t1; t++) softmax_prefix(w.data() + (t - t0) * n, a.visible(b, t), n);
      dnnl_sgemm('N', 'N', t1 - t0, a.D, n, 1.f, w.data(), n, a.cv + row0 * a.D, a.D, 0.f, oh + t0 * ld, ld);
    }
  }
  omp_set_num_threads(threads);
}

}  // namespace

namespace {
// 0 when every read of the attention lies inside the cache (cache_rows rows) and every position is a column.
int check_attention(AttentionArgs &a, int64_t cache_rows) {
  if (a.R <= 0 || a.H % a.R != 0) return 1;
  a.KV = a.H / a.R;
  a.scale = 1.0f / std::sqrt(static_cast<float>(a.D));
  for (int64_t b = 0; b < a.B; b++) {
    if (a.slots[b] < 0 || (a.slots[b] + 1) * a.KV * a.S > cache_rows) return 2;
    for (int64_t t = 0; t < a.T; t++)
      if (a.pos[b * a.T + t] < 0 || a.pos[b * a.T + t] >= a.S) return 2;
  }
  return 0;
}

void run_attention(const AttentionArgs &a) {
  Team::get().run(
      [](const void *ctx, int part, int parts) {
        const AttentionArgs &args = *static_cast<const AttentionArgs *>(ctx);
        if (args.T <= 8) attention_rows(args, part, parts);
        else attention_gemm(args, part, parts);
      },
      &a);
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
  if (shapes[1][1] != a.D) return 1;
  if (const int err = check_attention(a, shapes[1][0])) return err;
  run_attention(a);
  return 0;
}

// RMSNorm: x [..., C], weight [C], eps [1] -> x * rsqrt(mean(x^2) + eps) * weight.
namespace {
void rms_rows(const float *x, const float *wt, float eps, float *y, int64_t N, int64_t C) {
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
}
}  // namespace

extern "C" int rms_norm(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4) return 1;
  const int64_t C = shapes[0][ndims[0] - 1];
  rms_rows(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
           static_cast<const float *>(params[2])[0], static_cast<float *>(params[3]), numel(ndims[0], shapes[0]) / C, C);
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

// Projections: x [..., K] times weights [N, K] (the Hugging Face [out, in] layout), the output features split
// over the team. A few rows (decode, verifies) as dot products that read each weight row once for all of
// them: a decode step is bound by reading the weights. More rows (prefill chunks) as one oneDNN GEMM per part.
// Three of them: a plain projection; q, k and v in one call with the rotary embedding applied; and SwiGLU's
// silu(x w1^T) * (x w3^T). Fused, a layer's projections run one after another on the whole team: as separate
// ops MindSpore ran the independent ones (q, k, v; gate, up) at the same time, fighting over the cores.
namespace {
constexpr int64_t kDotRows = 16;  // up to this many rows, dot products; more, GEMM

// y[m * ldy + (n - n0)] = x[m, :] . w[n, :] for the rows m < M and the features n0 <= n < n1.
void project(const float *x, int64_t M, int64_t K, const float *w, int64_t n0, int64_t n1, float *y, int64_t ldy) {
  if (n0 >= n1) return;
  if (M > kDotRows) {
    const int threads = omp_get_max_threads();  // oneDNN on this thread alone, as in attention_gemm
    omp_set_num_threads(1);
    dnnl_sgemm('N', 'T', M, n1 - n0, K, 1.f, x, K, w + n0 * K, K, 0.f, y, ldy);
    omp_set_num_threads(threads);
    return;
  }
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {  // four weight rows at a time: four independent sums per x row
    const float *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    for (int64_t m = 0; m < M; m++) {
      const float *xm = x + m * K;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < K; k++) {
        s0 += w0[k] * xm[k];
        s1 += w1[k] * xm[k];
        s2 += w2[k] * xm[k];
        s3 += w3[k] * xm[k];
      }
      float *ym = y + m * ldy + (n - n0);
      ym[0] = s0, ym[1] = s1, ym[2] = s2, ym[3] = s3;
    }
  }
  for (; n < n1; n++) {
    const float *w0 = w + n * K;
    for (int64_t m = 0; m < M; m++) {
      const float *xm = x + m * K;
      float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
      for (int64_t k = 0; k < K; k++) s0 += w0[k] * xm[k];
      y[m * ldy + (n - n0)] = s0;
    }
  }
}

// Up to three weights whose outputs sit side by side in y [M, N]: weight s fills columns offset[s]...
struct Projection {
  const float *x;
  int64_t M, K, N;
  int count;
  const float *w[3];
  int64_t n[3], offset[3];
  float *y;
};

void project_part(const void *ctx, int part, int parts) {
  const Projection &p = *static_cast<const Projection *>(ctx);
  const auto [c0, c1] = share(p.N, part, parts, 16);  // 16 features: whole cache lines of y per part
  for (int s = 0; s < p.count; s++) {
    const int64_t lo = std::max(c0, p.offset[s]), hi = std::min(c1, p.offset[s] + p.n[s]);
    project(p.x, p.M, p.K, p.w[s], lo - p.offset[s], hi - p.offset[s], p.y + lo, p.N);
  }
}

// In place, half-split rotary on `heads` vectors of D at x (rows of ld), with this row's cos and sin [D].
void rotate(float *x, int64_t heads, int64_t D, const float *c, const float *s) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; h++) {
    float *v = x + h * D;
#pragma omp simd
    for (int64_t d = 0; d < half; d++) {
      const float a = v[d], b = v[d + half];
      v[d] = a * c[d] - b * s[d];
      v[d + half] = b * c[d + half] + a * s[d + half];
    }
  }
}

// Inputs 1..nweights are [rows, K] weights.
bool shapes_ok(int nweights, int *ndims, int64_t **shapes, int64_t K) {
  for (int i = 1; i <= nweights; i++)
    if (ndims[i] != 2 || shapes[i][1] != K) return false;
  return true;
}
}  // namespace

// x [..., K], w [N, K] -> [..., N].
extern "C" int linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t K = shapes[0][ndims[0] - 1];
  if (nparam != 3 || !shapes_ok(1, ndims, shapes, K)) return 1;
  Projection p{static_cast<const float *>(params[0]), numel(ndims[0], shapes[0]) / K, K, shapes[1][0], 1};
  p.w[0] = static_cast<const float *>(params[1]), p.n[0] = p.N, p.offset[0] = 0;
  p.y = static_cast<float *>(params[2]);
  Team::get().run(project_part, &p);
  return 0;
}

// Rows of a q | k | v projection: the rotary embedding on q and k, q to the output, k and v to the cache.
namespace {
struct QkvRows {
  float *qkv;
  int64_t N, nq, nk, D, KV, M;
  const int32_t *idx;
  const float *cos, *sin;
  float *cache_k, *cache_v, *q;
};

void qkv_rows_part(const void *ctx, int part, int parts) {
  const QkvRows &a = *static_cast<const QkvRows *>(ctx);
  const auto [m0, m1] = share(a.M, part, parts);
  for (int64_t m = m0; m < m1; m++) {
    float *row = a.qkv + m * a.N;
    rotate(row, (a.nq + a.nk) / a.D, a.D, a.cos + m * a.D, a.sin + m * a.D);
    std::copy(row, row + a.nq, a.q + m * a.nq);
    for (int64_t kv = 0; kv < a.KV; kv++) {
      const int64_t r = a.idx[m * a.KV + kv];
      std::copy(row + a.nq + kv * a.D, row + a.nq + (kv + 1) * a.D, a.cache_k + r * a.D);
      std::copy(row + a.nq + a.nk + kv * a.D, row + a.nq + a.nk + (kv + 1) * a.D, a.cache_v + r * a.D);
    }
  }
}
}  // namespace

// x [B, T, K], wq [H*D, K], wk, wv [KV*D, K], cos, sin [B, T, 1, D], cache_k, cache_v [rows, D],
// cache_idx [B, T, KV] -> q [B, T, H*D] with the rotary embedding; the new keys (with rotary) and values are
// written into the cache rows cache_idx names, in place (the op is marked as writing memory: kernels.py).
namespace {
// q, k and v of x [M, K], the rotary embedding on q and k, k and v written into the cache rows cache_idx names, q
// into q [M, H*D]. From params[0]: wq, wk, wv, cos, sin [.., D], cache_k, cache_v [rows, D], cache_idx [.., KV].
// 0, or an error code before anything is written.
int qkv_to_cache(const float *x, int64_t M, int64_t K, void **params, int *ndims, int64_t **shapes, float *q) {
  Projection p{x, M, K, 0, 3};
  for (int s = 0; s < 3; s++) {
    if (ndims[s] != 2 || shapes[s][1] != K) return 1;
    p.w[s] = static_cast<const float *>(params[s]);
    p.n[s] = shapes[s][0];
    p.offset[s] = p.N;
    p.N += p.n[s];
  }
  if (ndims[3] != 4 || ndims[5] != 2) return 1;
  const int64_t D = shapes[3][3], KV = p.n[1] / D, rows = shapes[5][0];
  const int32_t *idx = static_cast<const int32_t *>(params[7]);
  if (shapes[5][1] != D || p.n[1] != p.n[2] || numel(ndims[7], shapes[7]) != M * KV) return 2;
  for (int64_t i = 0; i < M * KV; i++)
    if (idx[i] < 0 || idx[i] >= rows) return 3;
  std::unique_ptr<float[]> qkv(new float[M * p.N]);  // [M, q | k | v], every element written first
  p.y = qkv.get();
  Team::get().run(project_part, &p);
  const QkvRows rows_args{qkv.get(), p.N, p.n[0], p.n[1], D, KV, M, idx,
                          static_cast<const float *>(params[3]), static_cast<const float *>(params[4]),
                          static_cast<float *>(params[5]), static_cast<float *>(params[6]), q};
  Team::get().run(qkv_rows_part, &rows_args);
  return 0;
}
}  // namespace

extern "C" int qkv_cache(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 10 || ndims[0] != 3) return 1;
  const int64_t K = shapes[0][2];
  return qkv_to_cache(static_cast<const float *>(params[0]), shapes[0][0] * shapes[0][1], K, params + 1, ndims + 1,
                      shapes + 1, static_cast<float *>(params[9]));
}

// A layer's attention up to the output projection: x [B, T, K], norm [K], eps [1], wq, wk, wv, cos, sin,
// cache_k, cache_v, cache_idx (as qkv_cache), slots [B], positions [B, T], meta [2] = {R, S} (as cache_attention)
// -> [B, T, H*D]: RMSNorm, q/k/v with the rotary embedding and the cache write, attention over the cache.
extern "C" int attention_block(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                               void *) {
  if (nparam != 15 || ndims[0] != 3 || ndims[8] != 2) return 1;
  const int64_t B = shapes[0][0], T = shapes[0][1], K = shapes[0][2], M = B * T, nq = shapes[3][0];
  std::unique_ptr<float[]> normed(new float[M * K]), q(new float[M * nq]);
  rms_rows(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
           static_cast<const float *>(params[2])[0], normed.get(), M, K);
  AttentionArgs a;
  a.q = q.get();
  a.ck = static_cast<const float *>(params[8]);
  a.cv = static_cast<const float *>(params[9]);
  a.slots = static_cast<const int32_t *>(params[11]);
  a.pos = static_cast<const int32_t *>(params[12]);
  const int32_t *meta = static_cast<const int32_t *>(params[13]);
  a.out = static_cast<float *>(params[14]);
  a.B = B, a.T = T, a.D = shapes[6][3], a.H = nq / a.D;
  a.R = meta[0], a.S = meta[1];
  if (const int err = check_attention(a, shapes[8][0])) return err;  // before the cache is written
  if (const int err = qkv_to_cache(normed.get(), M, K, params + 3, ndims + 3, shapes + 3, q.get())) return err;
  run_attention(a);
  return 0;
}

// x [..., K], w [N, K], residual [..., N] -> residual + x w^T.
namespace {
struct LinearAdd {
  Projection p;
  const float *residual;
};

void linear_add_part(const void *ctx, int part, int parts) {
  const LinearAdd &a = *static_cast<const LinearAdd *>(ctx);
  const Projection &p = a.p;
  const auto [c0, c1] = share(p.N, part, parts, 16);
  if (c0 >= c1) return;
  project(p.x, p.M, p.K, p.w[0], c0, c1, p.y + c0, p.N);
  for (int64_t m = 0; m < p.M; m++) {
    float *y = p.y + m * p.N;
    const float *r = a.residual + m * p.N;
#pragma omp simd
    for (int64_t c = c0; c < c1; c++) y[c] += r[c];
  }
}
}  // namespace

extern "C" int linear_add(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t K = shapes[0][ndims[0] - 1];
  if (nparam != 4 || !shapes_ok(1, ndims, shapes, K)) return 1;
  LinearAdd a{{static_cast<const float *>(params[0]), numel(ndims[0], shapes[0]) / K, K, shapes[1][0], 1},
              static_cast<const float *>(params[2])};
  if (numel(ndims[2], shapes[2]) != a.p.M * a.p.N) return 2;
  a.p.w[0] = static_cast<const float *>(params[1]);
  a.p.y = static_cast<float *>(params[3]);
  Team::get().run(linear_add_part, &a);
  return 0;
}

// x [..., K], w1, w3 [F, K] -> [..., F] = silu(x w1^T) * (x w3^T). Each part computes the gate into y and
// the up projection beside it for its own features, then combines them.
namespace {
struct Swiglu {
  const float *x, *w1, *w3;
  float *y, *up;  // y [M, F], up [M, F] scratch
  int64_t M, K, F;
};

void swiglu_part(const void *ctx, int part, int parts) {
  const Swiglu &a = *static_cast<const Swiglu *>(ctx);
  const auto [f0, f1] = share(a.F, part, parts, 16);
  if (f0 >= f1) return;
  project(a.x, a.M, a.K, a.w1, f0, f1, a.y + f0, a.F);
  project(a.x, a.M, a.K, a.w3, f0, f1, a.up + f0, a.F);
  for (int64_t m = 0; m < a.M; m++) {
    float *g = a.y + m * a.F;
    const float *u = a.up + m * a.F;
#pragma omp simd
    for (int64_t f = f0; f < f1; f++) g[f] = g[f] / (1.0f + std::exp(-g[f])) * u[f];
  }
}
}  // namespace

extern "C" int swiglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t K = shapes[0][ndims[0] - 1];
  if (nparam != 4 || !shapes_ok(2, ndims, shapes, K) || shapes[1][0] != shapes[2][0]) return 1;
  const int64_t M = numel(ndims[0], shapes[0]) / K, F = shapes[1][0];
  std::unique_ptr<float[]> up(new float[M * F]);  // every element written before it is read
  Swiglu a{static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
           static_cast<const float *>(params[2]), static_cast<float *>(params[3]), up.get(), M, K, F};
  Team::get().run(swiglu_part, &a);
  return 0;
}

// x [..., K], norm [K], eps [1], w1, w3 [F, K] -> swiglu(rms_norm(x)): a layer's feed-forward up to its down
// projection.
extern "C" int norm_swiglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t K = shapes[0][ndims[0] - 1];
  if (nparam != 6 || !shapes_ok(2, ndims + 2, shapes + 2, K) || shapes[3][0] != shapes[4][0]) return 1;
  const int64_t M = numel(ndims[0], shapes[0]) / K, F = shapes[3][0];
  std::unique_ptr<float[]> normed(new float[M * K]), up(new float[M * F]);
  rms_rows(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
           static_cast<const float *>(params[2])[0], normed.get(), M, K);
  Swiglu a{normed.get(), static_cast<const float *>(params[3]), static_cast<const float *>(params[4]),
           static_cast<float *>(params[5]), up.get(), M, K, F};
  Team::get().run(swiglu_part, &a);
  return 0;
}

// Shape and type inference, so the kernels also run in graphs with dynamic dimensions (the prefill graph):
// MindSpore calls NAMEInferShape / NAMEInferType (ops.Custom with out_shape and out_dtype None). Every
// kernel's output has its first input's type.
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
// The projections: the first input's shape with the last dimension the rows of the weight at input W.
#define CODEFILL_ROWS_OF(name, W)                                                          \
  extern "C" std::vector<int64_t> name##InferShape(int *ndims, int64_t **shapes, void *) { \
    std::vector<int64_t> out = first_shape(ndims, shapes);                                 \
    out.back() = shapes[W][0];                                                             \
    return out;                                                                            \
  }                                                                                        \
  extern "C" TypeId name##InferType(std::vector<TypeId> types, void *) { return types[0]; }
CODEFILL_ROWS_OF(linear, 1)          // [..., K] -> [..., N]
CODEFILL_ROWS_OF(qkv_cache, 1)       // [B, T, K] -> [B, T, q features]
CODEFILL_ROWS_OF(attention_block, 3)  // [B, T, K] -> [B, T, q features]
CODEFILL_ROWS_OF(swiglu, 1)          // [..., K] -> [..., F]
CODEFILL_ROWS_OF(norm_swiglu, 3)     // [..., K] -> [..., F]
extern "C" std::vector<int64_t> linear_addInferShape(int *ndims, int64_t **shapes, void *) {
  return std::vector<int64_t>(shapes[2], shapes[2] + ndims[2]);  // the residual's
}
extern "C" TypeId linear_addInferType(std::vector<TypeId> types, void *) { return types[0]; }
CODEFILL_SAME_AS_FIRST(cache_attention)
CODEFILL_SAME_AS_FIRST(rms_norm)
CODEFILL_SAME_AS_FIRST(rotary)
CODEFILL_SAME_AS_FIRST(silu_mul)
