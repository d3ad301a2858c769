// moeserve's CPU experts kernel: `torch.ops.moeserve.experts_group`, which runs a group of routed experts of one MoE
// layer and adds their routing-weighted outputs into an fp32 accumulator (`experts_routed`: the same from a layer's
// [T, k] routing and stacked weights, grouped in C++), and `torch.ops.moeserve.dense`, one dense
// projection on the same row paths (torch's bf16 one-row products run far below RAM speed on these machines), and
// `torch.ops.moeserve.decode_attention`, attention of one new token per request over its context (below), and
// `torch.ops.moeserve.rms_norm`, a few rows' RMSNorm in one call (engine.norms), and `route_topk`, a router's
// softmax and top-k selection (engine.routers).
//
// Why it exists: decode is memory-bound, and torch's per-expert matmuls over few tokens stream the weights far
// below RAM speed on AVX2 machines (and bf16 ones worse). Here each weight row is read once for all of an
// expert's tokens: at 1-2 tokens (decode) several runs of rows side by side, so every thread keeps several lines in
// flight (the bf16 pair products also at 3-4); else a row or a block of 2 rows at a time (32 columns for transposed
// weights). Weights are widened to fp32 and multiplied into the tokens while they sit in registers/L1 (or, on
// AVX-512 BF16 with bf16 inputs, multiplied in bf16 pairs, exact in fp32). Accumulation is fp32 (FMA);
// weights may be fp32, bf16 or fp16. Work is split into small chunks claimed from an atomic ticket by the calling
// thread and a pool of at::get_num_threads() - 1 workers (ChunkPool), so a thread slowed by a busy core stalls no
// other. benchmarks/experts_kernel.py measures the kernel against the RAM stream rate.
//
// Per expert e of the group (tokens tok[s], routing weights rw[s] for s in its slice):
//   x  = float(hidden[tok])                                   [n, H]
//   h  = x @ gate_up^T (+ gate_up_bias)                       [n, 2I]   (x @ gate_up when transposed)
//   g  = gate(h)                                              [n, I]
//   out[tok] += rw * (g @ down^T (+ down_bias))               [n, H]    (g @ down when transposed)
// gate kinds: 0 = silu(h[:, :I]) * h[:, I:]                   (Mixtral, Qwen-MoE, OLMoE, DeepSeek)
//             1 = GPT-OSS clamped swiglu on interleaved columns: g = h[:, 0::2], u = h[:, 1::2],
//                 g = min(g, limit), u = clamp(u, -limit, limit), (u + 1) * g * sigmoid(alpha * g)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <thread>
#include <cmath>
#include <vector>

namespace {

using at::Tensor;

// ---- loads: 8 weights widened to fp32 ----
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- row-major weights [N, K]: y[t][r] = dot(x[t], w[r]) for R rows, TB tokens ----
// Each step reads U vectors of 8 weights per row (U = 4: a 64-byte line of bf16) into TB * R * U independent
// accumulators: 8 or more, or one token is bound by FMA latency rather than by memory. With at least as many
// tokens as bytes per weight (bf16/fp16: 2+, fp32: 4+), where arithmetic rather than memory sets the pace, the loop
// also asks for the line kPrefetchBytes ahead in each row; rows are contiguous, so near a row's end that is the
// next rows' start, across the 4 KiB page boundaries hardware prefetchers stop at. (Measured on Zen 4: faster
// there; slower for 1 token, and for 2 tokens of fp32 weights.)
constexpr int64_t kPrefetchBytes = 2048;

// ---- several runs of rows side by side (1-2 tokens; bf16 pair products 1-4) ----
// At 1-2 tokens a projection streams its weights, and a core reading one sequential run of memory keeps too few
// lines in flight to reach RAM speed: on Zen 4 (2 vCPUs, a plain read loop) 29 GB/s over one run per core,
// 45-58 GB/s over 8 runs per core with each line asked into L2 2 KiB ahead, while STREAM triad gave 51-55 in the
// same minutes (when the host's neighbours were busy, 33-36 for both). So at 1-2 tokens a chunk's rows are read
// as `runs` runs of L = rows / runs side by side (rows c, c + L, c + 2L, ...), the rest a row or two at a time.
// The bf16 pair products read 4 runs at 3-4 tokens too (Zen 4: 5-8 % faster, whatever the host's bandwidth; the
// widening path at 4 tokens, bound by arithmetic, was 14 % slower that way and keeps its pairs of rows).
// experts_runs(k) sets how many: 1 (one run per chunk, the paths before), 4 or kRuns (the default).
constexpr int kRuns = 8;
std::atomic<int64_t> g_runs{kRuns};
constexpr int64_t kRunsMaxTokens = 2;
constexpr int64_t kRunPrefetchBytes = 2048;

template <int N>
using Const = std::integral_constant<int, N>;

// Rows [c0, c0 + R * L) of n tokens as R runs of L = (c1 - c0) / R rows read side by side: block(Const<R>,
// Const<TB>, c, L) computes rows c, c + L, ..., c + (R - 1) L for TB = n tokens, for each c in [c0, c0 + L). R is
// `runs` at 1-2 tokens and at most 4 at 3-MaxTokens (R * TB accumulators must fit the registers). Returns the first
// row after the runs: c0 where reading several runs is off, n is out of range, or the chunk has fewer rows than R.
template <int MaxTokens = kRunsMaxTokens, typename Block>
inline int64_t run_rows(int64_t n, int64_t c0, int64_t c1, const Block& block) {
  const int64_t chosen = g_runs.load(std::memory_order_relaxed);
  const int64_t runs = n <= 2 ? chosen : std::min<int64_t>(chosen, 4);
  if (n < 1 || n > MaxTokens || runs <= 1) return c0;
  const int64_t L = (c1 - c0) / runs;
  for (int64_t c = c0; c < c0 + L; ++c) {
    if (runs == 8 && n == 1) block(Const<8>{}, Const<1>{}, c, L);
    else if (runs == 8) block(Const<8>{}, Const<2>{}, c, L);
    else if (n == 1) block(Const<4>{}, Const<1>{}, c, L);
    else if (n == 2) block(Const<4>{}, Const<2>{}, c, L);
    else if constexpr (MaxTokens >= 4) {
      if (n == 3) block(Const<4>{}, Const<3>{}, c, L);
      else block(Const<4>{}, Const<4>{}, c, L);
    }
  }
  return c0 + runs * L;
}

template <int R, typename W>
inline void prefetch_ahead(const W* w, int64_t ldw, int64_t k, int64_t step_bytes) {
  for (int r = 0; r < R; ++r) {
    const char* p = reinterpret_cast<const char*>(w + r * ldw + k) + kPrefetchBytes;
    for (int64_t b = 0; b < step_bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  }
}

// RUNS: the R rows are rs rows apart (row r at w + r * rs * ldw, its output at column r * rs), and each of their
// lines is asked into L2 kRunPrefetchBytes ahead (several runs side by side, above).
template <int R, int TB, int U, typename W, bool RUNS = false>
inline void dot_block(const float* x, int64_t K, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t rs = 1) {
  __m256 acc[TB][R][U];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[t][r][u] = _mm256_setzero_ps();
  constexpr int64_t kStepBytes = 8 * U * sizeof(W);
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    if constexpr (RUNS) {
      for (int r = 0; r < R; ++r)  // each line once: steps of kStepBytes (<= 64) cover whole lines in turn
        if ((reinterpret_cast<uintptr_t>(w + r * rs * ldw + k) & 63) < kStepBytes)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * rs * ldw + k) + kRunPrefetchBytes, _MM_HINT_T1);
    } else if constexpr (TB >= static_cast<int>(sizeof(W))) {
      prefetch_ahead<R>(w, ldw, k, kStepBytes);
    }
    __m256 wv[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) wv[r][u] = load8(w + r * rs * ldw + k + 8 * u);
    for (int t = 0; t < TB; ++t)
      for (int u = 0; u < U; ++u) {
        const __m256 xv = _mm256_loadu_ps(x + t * K + k + 8 * u);
        for (int r = 0; r < R; ++r) acc[t][r][u] = _mm256_fmadd_ps(xv, wv[r][u], acc[t][r][u]);
      }
  }
  for (; k + 8 <= K; k += 8)
    for (int r = 0; r < R; ++r) {
      const __m256 wv = load8(w + r * rs * ldw + k);
      for (int t = 0; t < TB; ++t) acc[t][r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * K + k), wv, acc[t][r][0]);
    }
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < R; ++r) {
      for (int u = 1; u < U; ++u) acc[t][r][0] = _mm256_add_ps(acc[t][r][0], acc[t][r][u]);
      float s = hsum(acc[t][r][0]);
      for (int64_t kk = k; kk < K; ++kk) s += x[t * K + kk] * static_cast<float>(w[r * rs * ldw + kk]);
      y[t * ldy + r * rs] = s;
    }
}

// The AVX2 rows of `run_rows`: 8 runs of 2 tokens as 4 + 4 (16 accumulators would spill 16 ymm registers), 4
// runs of one token two vectors a step.
template <typename W>
int64_t dot_runs(const float* x, int64_t n, int64_t K, const W* w, int64_t ldw, int64_t c0, int64_t c1, float* y,
                 int64_t ldy) {
  return run_rows(n, c0, c1, [&](auto runs, auto tokens, int64_t c, int64_t L) {
    constexpr int R = decltype(runs)::value, TB = decltype(tokens)::value;
    if constexpr (R == 8 && TB == 2) {
      for (int64_t h = 0; h < 2; ++h)
        dot_block<4, 2, 1, W, true>(x, K, w + (c + 4 * h * L) * ldw, ldw, y + c + 4 * h * L, ldy, L);
    } else {
      dot_block<R, TB, (R == 4 && TB == 1) ? 2 : 1, W, true>(x, K, w + c * ldw, ldw, y + c, ldy, L);
    }
  });
}

// All n tokens against R rows, TB tokens at a time (TB * R * U accumulators + R * U weights <= 16 ymm).
template <int R, int TB, int U, typename W>
inline void dot_rows(const float* x, int64_t n, int64_t K, const W* w, int64_t ldw, float* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + TB <= n; t += TB) dot_block<R, TB, U>(x + t * K, K, w, ldw, y + t * ldy, ldy);
  switch (n - t) {
    case 5: if constexpr (TB > 5) dot_block<R, 5, U>(x + t * K, K, w, ldw, y + t * ldy, ldy); break;
    case 4: if constexpr (TB > 4) dot_block<R, 4, U>(x + t * K, K, w, ldw, y + t * ldy, ldy); break;
    case 3: if constexpr (TB > 3) dot_block<R, 3, U>(x + t * K, K, w, ldw, y + t * ldy, ldy); break;
    case 2: if constexpr (TB > 2) dot_block<R, 2, U>(x + t * K, K, w, ldw, y + t * ldy, ldy); break;
    case 1: if constexpr (TB > 1) dot_block<R, 1, U>(x + t * K, K, w, ldw, y + t * ldy, ldy); break;
    default: break;
  }
}

// Rows [c0, c1) one at a time (few tokens, decode): each thread reads one sequential stream.
template <int TB, int U, typename W>
inline void dot_each_row(const float* x, int64_t K, const W* w, int64_t ldw, int64_t c0, int64_t c1, float* y,
                         int64_t ldy) {
  for (int64_t c = c0; c < c1; ++c) dot_block<1, TB, U>(x, K, w + c * ldw, ldw, y + c, ldy);
}

// ---- transposed weights [K, N]: y[t][c] = sum_k x[t][k] * w[k][c] for 8V columns, TB tokens ----
template <int V, int TB, typename W>
inline void axpy_block(const float* x, int64_t K, const W* w, int64_t ldw, float* y, int64_t ldy) {
  __m256 acc[TB][V];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v) acc[t][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = load8(w + k * ldw + 8 * v);
    for (int t = 0; t < TB; ++t) {
      __m256 xb = _mm256_broadcast_ss(x + t * K + k);
      for (int v = 0; v < V; ++v) acc[t][v] = _mm256_fmadd_ps(xb, wv[v], acc[t][v]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(y + t * ldy + 8 * v, acc[t][v]);
}

template <int V, typename W>
inline void axpy_cols(const float* x, int64_t n, int64_t K, const W* w, int64_t ldw, float* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + 2 <= n; t += 2) axpy_block<V, 2>(x + t * K, K, w, ldw, y + t * ldy, ldy);
  if (n - t == 1) axpy_block<V, 1>(x + t * K, K, w, ldw, y + t * ldy, ldy);
}

template <typename W>
inline void axpy_scalar_col(const float* x, int64_t n, int64_t K, const W* w, int64_t ldw, float* y, int64_t ldy) {
  for (int64_t t = 0; t < n; ++t) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += x[t * K + k] * static_cast<float>(w[k * ldw]);
    y[t * ldy] = s;
  }
}

// y[t][c] for c in [c0, c1): outputs c0..c1 of x @ W^T (row-major W) or x @ W (transposed W), all n tokens.
template <typename W>
void project(const float* x, int64_t n, int64_t K, const W* w, int64_t ldw, bool transposed, int64_t c0,
             int64_t c1, float* y, int64_t ldy) {
  int64_t c = c0;
  if (!transposed) {
    c0 = c = dot_runs(x, n, K, w, ldw, c0, c1, y, ldy);
    switch (n) {  // 1-4 tokens: a row at a time, U vectors per step so that TB * U >= 8 accumulators
      case 1: return dot_each_row<1, 8>(x, K, w, ldw, c0, c1, y, ldy);
      case 2:
        if constexpr (sizeof(W) < 4) return dot_each_row<2, 4>(x, K, w, ldw, c0, c1, y, ldy);
        break;  // fp32 weights: measured faster 4 rows at a time, below
      case 3: return dot_each_row<3, 4>(x, K, w, ldw, c0, c1, y, ldy);
      case 4: return dot_each_row<4, 2>(x, K, w, ldw, c0, c1, y, ldy);
      default: break;
    }
    if (n == 2) {
      for (; c + 4 <= c1; c += 4) dot_rows<4, 2, 1>(x, n, K, w + c * ldw, ldw, y + c, ldy);
    } else {  // more tokens: 2 rows x 6 tokens, 12 accumulators, fewer weight conversions per FMA (compute-bound)
      for (; c + 2 <= c1; c += 2) dot_rows<2, 6, 1>(x, n, K, w + c * ldw, ldw, y + c, ldy);
    }
    for (; c < c1; ++c) dot_rows<1, 6, 1>(x, n, K, w + c * ldw, ldw, y + c, ldy);
    return;
  }
  for (; c + 32 <= c1; c += 32) axpy_cols<4>(x, n, K, w + c, ldw, y + c, ldy);
  for (; c + 8 <= c1; c += 8) axpy_cols<1>(x, n, K, w + c, ldw, y + c, ldy);
  for (; c < c1; ++c) axpy_scalar_col(x, n, K, w + c, ldw, y + c, ldy);
}

// ---- AVX-512 (where the CPU has it): the path for bf16 weight rows ----
// At 1-4 tokens a projection is a stream over its weights, and what limits it on a core is how many lines are in
// flight. Measured on a 2-core Sapphire Rapids VM (benchmarks/experts_kernel.py, one token): the AVX2 path streams
// bf16 rows at 0.62 of STREAM triad against 0.84 for fp32 weights; 16-wide widening FMAs over two rows at a time,
// with every line asked into L2 kAvx512PrefetchBytes ahead (prefetcht1: further than the L2 streamer runs by
// itself; into L1 it evicts lines still in use), stream bf16 rows at 0.80-0.84 of triad. More tokens pass over a pair of rows in blocks of 8, the first block streaming the rows
// and the others finding them in L1. Same arithmetic as the AVX2 path: weights widened to fp32, fp32 inputs, fp32
// FMA accumulation.
#define MOESERVE_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

enum Isa : int64_t { kIsaAvx2 = 0, kIsaAvx512 = 1, kIsaAvx512Bf16 = 2 };

Isa best_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (!avx512) return kIsaAvx2;
  return __builtin_cpu_supports("avx512bf16") ? kIsaAvx512Bf16 : kIsaAvx512;
}

std::atomic<int64_t> g_isa{best_isa()};

constexpr int64_t kAvx512MaxTokens = 64;  // at most this many tokens per expert take the AVX-512 path
constexpr int64_t kAvx512TokenBlock = 8;  // tokens per pass over a pair of rows (16 accumulators)
constexpr int64_t kAvx512PrefetchBytes = 8192;

// Whether n tokens against bf16 weight rows take the AVX-512 path.
inline bool use_avx512(int64_t n) {
  return n <= kAvx512MaxTokens && g_isa.load(std::memory_order_relaxed) >= kIsaAvx512;
}

inline __mmask16 tail_mask16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// 16 bf16 weights widened to fp32 (masked lanes read as zero).
MOESERVE_AVX512_TARGET inline __m512 widen16(const uint16_t* w, __mmask16 mask) {
  const __m256i raw = _mm256_maskz_loadu_epi16(mask, w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// y[t * ldy + r * rs] = dot(x[t], w[r]) over K for R rows rs rows apart (w[r] at w + r * rs * ldw) and TB tokens
// (x[t] at x + t * K); PF: ask for the rows' lines PFB bytes ahead (the first pass over the rows; later token blocks
// find them in L1).
template <int R, int TB, bool PF, int64_t PFB = kAvx512PrefetchBytes>
MOESERVE_AVX512_TARGET inline void wide_dot_block(const float* x, int64_t K, const uint16_t* w, int64_t ldw, float* y,
                                                  int64_t ldy, int64_t rs = 1) {
  constexpr int U = TB == 1 ? 2 : 1;  // 16-weight vectors per row and step: 2 * TB * U >= 4 accumulators at R = 2
  constexpr int kStepBytes = 16 * U * 2;
  __m512 acc[TB][R][U];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[t][r][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    if constexpr (PF)
      for (int r = 0; r < R; ++r)  // each line of the rows once: steps of kStepBytes cover whole lines in turn
        if ((reinterpret_cast<uintptr_t>(w + r * rs * ldw + k) & 63) < kStepBytes)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * rs * ldw + k) + PFB, _MM_HINT_T1);
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r) {
        const __m512 wv = widen16(w + r * rs * ldw + k + 16 * u, tail_mask16(16));
        for (int t = 0; t < TB; ++t)
          acc[t][r][u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + t * K + k + 16 * u), wv, acc[t][r][u]);
      }
  }
  for (; k < K; k += 16) {
    const __mmask16 mask = tail_mask16(K - k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = widen16(w + r * rs * ldw + k, mask);
      for (int t = 0; t < TB; ++t)
        acc[t][r][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + t * K + k), wv, acc[t][r][0]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < R; ++r) {
      for (int u = 1; u < U; ++u) acc[t][r][0] = _mm512_add_ps(acc[t][r][0], acc[t][r][u]);
      y[t * ldy + r * rs] = _mm512_reduce_add_ps(acc[t][r][0]);
    }
}

// All n tokens against R rows: token blocks of up to kAvx512TokenBlock, the rows streamed from memory by the
// first block and re-read from L1 by the others (a pair of rows is 2 * 2K bytes: 4-14 KiB at K = 1024-3584).
template <int R, bool PF>
MOESERVE_AVX512_TARGET inline void wide_dot_token_block(int64_t tb, const float* x, int64_t K, const uint16_t* w,
                                                        int64_t ldw, float* y, int64_t ldy) {
  switch (tb) {
    case 1: return wide_dot_block<R, 1, PF>(x, K, w, ldw, y, ldy);
    case 2: return wide_dot_block<R, 2, PF>(x, K, w, ldw, y, ldy);
    case 3: return wide_dot_block<R, 3, PF>(x, K, w, ldw, y, ldy);
    case 4: return wide_dot_block<R, 4, PF>(x, K, w, ldw, y, ldy);
    case 5: return wide_dot_block<R, 5, PF>(x, K, w, ldw, y, ldy);
    case 6: return wide_dot_block<R, 6, PF>(x, K, w, ldw, y, ldy);
    case 7: return wide_dot_block<R, 7, PF>(x, K, w, ldw, y, ldy);
    default: return wide_dot_block<R, 8, PF>(x, K, w, ldw, y, ldy);
  }
}

template <int R>
MOESERVE_AVX512_TARGET void wide_dot_tokens(const float* x, int64_t n, int64_t K, const uint16_t* w, int64_t ldw,
                                            float* y, int64_t ldy) {
  wide_dot_token_block<R, true>(std::min(n, kAvx512TokenBlock), x, K, w, ldw, y, ldy);
  for (int64_t t = kAvx512TokenBlock; t < n; t += kAvx512TokenBlock)
    wide_dot_token_block<R, false>(std::min(n - t, kAvx512TokenBlock), x + t * K, K, w, ldw, y + t * ldy, ldy);
}

// y[t][c] for c in [c0, c1) of x @ W^T for bf16 weight rows and n <= kAvx512MaxTokens tokens, two rows at a time.
MOESERVE_AVX512_TARGET void project_avx512(const float* x, int64_t n, int64_t K, const c10::BFloat16* weights,
                                           int64_t ldw, int64_t c0, int64_t c1, float* y, int64_t ldy) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weights);
  int64_t c = run_rows(n, c0, c1, [&](auto runs, auto tokens, int64_t row, int64_t L) MOESERVE_AVX512_TARGET {
    wide_dot_block<decltype(runs)::value, decltype(tokens)::value, true, kRunPrefetchBytes>(x, K, w + row * ldw, ldw,
                                                                                            y + row, ldy, L);
  });  // then the rest two rows at a time
  for (; c + 2 <= c1; c += 2) wide_dot_tokens<2>(x, n, K, w + c * ldw, ldw, y + c, ldy);
  if (c < c1) wide_dot_tokens<1>(x, n, K, w + c * ldw, ldw, y + c, ldy);
}

// ---- AVX-512 BF16 (where the CPU has it): bf16 pair products for bf16 inputs on bf16 weight rows ----
// From 3 tokens the widening path above is bound by arithmetic, not memory (Zen 4: 0.59 of triad at 4 tokens, 0.26
// at 8), and at 1-2 tokens too once several runs keep enough lines in flight: on Zen 4, in minutes when the host
// had bandwidth to spare (a plain 8-run read loop at 53-55 GB/s), one-token bf16 gate/up projections streamed at
// 48-51 GB/s here against 41-45 on the widening path; when it had none (35 GB/s) both were within 3 %. So
// kPairMinTokens is 1. vdpbf16ps multiplies 32 bf16 weights by 32 bf16 inputs into 16 fp32 sums in one instruction,
// with no widening: twice the products per instruction, half the input bytes. A product of two bf16 is exact in
// fp32 and sums are fp32, so this path is as exact as the widening one — but only where the input is bf16 already
// (the gate/up projection of a bf16 hidden state, a bf16 dense input); the down projection's input, computed here
// in fp32, keeps the widening path rather than being rounded. Blocking: runs side by side at 1-4 tokens (the
// widening path only at 1-2), else as project_avx512, pairs of rows in token blocks of 8, the first block streaming
// the rows (every line asked into L2 ahead) and the others finding them in L1.
#define MOESERVE_AVX512BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int64_t kPairMinTokens = 1;

inline bool use_pairs(int64_t n) {
  return n >= kPairMinTokens && n <= kAvx512MaxTokens && g_isa.load(std::memory_order_relaxed) == kIsaAvx512Bf16;
}

inline __mmask32 tail_mask32(int64_t left) {
  return left >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << left) - 1);
}

// y[t * ldy + r * rs] = dot(xb[t], w[r]) over K for R rows rs rows apart (w[r] at w + r * rs * ldw) and TB tokens;
// xb[t] at xb + t * ldx, bf16; PF: each row's lines asked into L2 PFB bytes ahead.
template <int R, int TB, bool PF, int64_t PFB = kAvx512PrefetchBytes>
MOESERVE_AVX512BF16_TARGET inline void pair_dot_block(const uint16_t* xb, int64_t ldx, int64_t K, const uint16_t* w,
                                                      int64_t ldw, float* y, int64_t ldy, int64_t rs = 1) {
  __m512 acc[TB][R];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      if constexpr (PF) _mm_prefetch(reinterpret_cast<const char*>(w + r * rs * ldw + k) + PFB, _MM_HINT_T1);
      wv[r] = (__m512bh)_mm512_loadu_si512(w + r * rs * ldw + k);
    }
    for (int t = 0; t < TB; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], wv[r], xv);
    }
  }
  if (k < K) {  // masked lanes read as zero on both sides: their products add nothing
    const __mmask32 mask = tail_mask32(K - k);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * rs * ldw + k);
    for (int t = 0; t < TB; ++t) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, xb + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], wv[r], xv);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < R; ++r) y[t * ldy + r * rs] = _mm512_reduce_add_ps(acc[t][r]);
}

template <int R, bool PF>
MOESERVE_AVX512BF16_TARGET inline void pair_dot_token_block(int64_t tb, const uint16_t* xb, int64_t ldx, int64_t K,
                                                            const uint16_t* w, int64_t ldw, float* y, int64_t ldy) {
  switch (tb) {
    case 1: return pair_dot_block<R, 1, PF>(xb, ldx, K, w, ldw, y, ldy);
    case 2: return pair_dot_block<R, 2, PF>(xb, ldx, K, w, ldw, y, ldy);
    case 3: return pair_dot_block<R, 3, PF>(xb, ldx, K, w, ldw, y, ldy);
    case 4: return pair_dot_block<R, 4, PF>(xb, ldx, K, w, ldw, y, ldy);
    case 5: return pair_dot_block<R, 5, PF>(xb, ldx, K, w, ldw, y, ldy);
    case 6: return pair_dot_block<R, 6, PF>(xb, ldx, K, w, ldw, y, ldy);
    case 7: return pair_dot_block<R, 7, PF>(xb, ldx, K, w, ldw, y, ldy);
    default: return pair_dot_block<R, 8, PF>(xb, ldx, K, w, ldw, y, ldy);
  }
}

template <int R>
MOESERVE_AVX512BF16_TARGET void pair_dot_tokens(const uint16_t* xb, int64_t ldx, int64_t n, int64_t K,
                                                const uint16_t* w, int64_t ldw, float* y, int64_t ldy) {
  pair_dot_token_block<R, true>(std::min(n, kAvx512TokenBlock), xb, ldx, K, w, ldw, y, ldy);
  for (int64_t t = kAvx512TokenBlock; t < n; t += kAvx512TokenBlock)
    pair_dot_token_block<R, false>(std::min(n - t, kAvx512TokenBlock), xb + t * ldx, ldx, K, w, ldw, y + t * ldy,
                                   ldy);
}

// y[t][c] for c in [c0, c1) of xb @ W^T: bf16 inputs [n, K] (row stride ldx) on bf16 weight rows, two at a time.
MOESERVE_AVX512BF16_TARGET void project_pairs(const c10::BFloat16* inputs, int64_t ldx, int64_t n, int64_t K,
                                              const c10::BFloat16* weights, int64_t ldw, int64_t c0, int64_t c1,
                                              float* y, int64_t ldy) {
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(inputs);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weights);
  int64_t c = run_rows<4>(n, c0, c1, [&](auto runs, auto tokens, int64_t row, int64_t L) MOESERVE_AVX512BF16_TARGET {
    pair_dot_block<decltype(runs)::value, decltype(tokens)::value, true, kRunPrefetchBytes>(xb, ldx, K, w + row * ldw,
                                                                                            ldw, y + row, ldy, L);
  });  // then the rest two rows at a time
  for (; c + 2 <= c1; c += 2) pair_dot_tokens<2>(xb, ldx, n, K, w + c * ldw, ldw, y + c, ldy);
  if (c < c1) pair_dot_tokens<1>(xb, ldx, n, K, w + c * ldw, ldw, y + c, ldy);
}

// The input of a projection: fp32 rows x [n, K], and where the input was bf16, the same rows as they were (xb, row
// stride ldxb; exact in bf16, so the pair products lose nothing), else xb = nullptr.
struct Input {
  const float* x;
  const c10::BFloat16* xb = nullptr;
  int64_t ldxb = 0;
  Input rows_from(int64_t row, int64_t K) const {  // the same input from row ``row`` on
    return {x + row * K, xb ? xb + row * ldxb : nullptr, ldxb};
  }
};

// x @ W^T (or x @ W) for outputs [c0, c1): bf16 weight rows at few tokens take the AVX-512 paths where the CPU has
// them (pair products where the input is bf16 and there are enough tokens), everything else the AVX2 path.
template <typename W>
void project_any(const Input& in, int64_t n, int64_t K, const W* w, int64_t ldw, bool transposed, int64_t c0,
                 int64_t c1, float* y, int64_t ldy) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    if (!transposed && in.xb != nullptr && use_pairs(n))
      return project_pairs(in.xb, in.ldxb, n, K, w, ldw, c0, c1, y, ldy);
    if (!transposed && use_avx512(n)) return project_avx512(in.x, n, K, w, ldw, c0, c1, y, ldy);
  }
  project(in.x, n, K, w, ldw, transposed, c0, c1, y, ldy);
}

// ---- work distribution: chunks claimed from one atomic ticket by the caller and the pool's workers ----
// The calling thread runs chunks itself and never waits for a worker that has not started: each worker claims
// chunks only while the job lasts, and the caller waits only for chunks already claimed. So a worker descheduled
// by a busy core costs at most the chunk it holds, not the whole call. (torch's at::parallel_for ends in an OpenMP
// barrier that waits for every thread to arrive: with another process busy on one of two cores, a one-token bf16
// projection of 1024 x 3584 took 12 ms at the median that way, 0.8 ms with this pool.) Workers spin for
// kSpinNanoseconds after their last chunk (decode calls follow each other within microseconds), yielding the core
// from kPauseNanoseconds on, then sleep on a futex (std::atomic::wait). The pool has at::get_num_threads() - 1
// workers, grown on demand; a call from a second thread while one runs, or in a forked child (whose workers did
// not survive the fork), simply runs on fewer threads: nothing depends on a worker's arrival.
class ChunkPool {
 public:
  using Body = void (*)(const void* context, int64_t chunk);

  // body(context, c) for every c in [0, num_chunks), on this thread and up to workers - 1 pool threads.
  void run(int64_t num_chunks, int64_t workers, Body body, const void* context) {
    if (num_chunks <= 0) return;
    std::unique_lock<std::mutex> exclusive(call_mutex_, std::try_to_lock);
    if (!exclusive.owns_lock() || workers <= 1 || num_chunks == 1 || num_chunks > kIndexMask) {
      for (int64_t c = 0; c < num_chunks; ++c) body(context, c);
      return;
    }
    grow(workers - 1);
    body_.store(body, std::memory_order_relaxed);
    context_.store(context, std::memory_order_relaxed);
    wanted_.store(workers - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    generation_ = (generation_ + 1) & kGenerationMask;
    const uint64_t first = (generation_ << kGenerationShift) | (static_cast<uint64_t>(num_chunks) << kCountShift);
    ticket_.store(first, std::memory_order_seq_cst);  // publishes body, context, wanted, done; before sleepers_
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      wake_.fetch_add(1, std::memory_order_release);
      wake_.notify_all();
    }
    work(first, body, context);
    for (int spins = 0; done_.load(std::memory_order_acquire) < num_chunks; ++spins) {
      if (spins < 4096) _mm_pause();
      else std::this_thread::yield();  // a worker holding a chunk was descheduled
    }
  }

 private:
  static constexpr int kCountShift = 20, kGenerationShift = 40;
  static constexpr uint64_t kIndexMask = (uint64_t{1} << kCountShift) - 1, kGenerationMask = (uint64_t{1} << 24) - 1;
  static constexpr int64_t kPauseNanoseconds = 20000, kSpinNanoseconds = 500000;

  // Claim and run chunks of the job whose ticket was `seen` until none is left or the job is another one.
  void work(uint64_t seen, Body body, const void* context) {
    uint64_t ticket = seen;
    for (;;) {
      const uint64_t count = (ticket >> kCountShift) & kIndexMask, index = ticket & kIndexMask;
      if ((ticket >> kGenerationShift) != (seen >> kGenerationShift) || index >= count) return;
      if (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acquire, std::memory_order_acquire))
        continue;  // ticket reloaded
      body(context, static_cast<int64_t>(index));
      done_.fetch_add(1, std::memory_order_release);
      ticket = ticket_.load(std::memory_order_acquire);
    }
  }

  void worker(int64_t id) {
    uint64_t last = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t ticket = wait_for_job(last);
      last = ticket;
      // Read after this job's ticket (acquire), body and context are this job's or a later one's; they change only
      // once every chunk of this job is done, and then every claim in `work` fails: a later job's are never run
      // under this job's ticket.
      if (id < wanted_.load(std::memory_order_relaxed))
        work(ticket, body_.load(std::memory_order_relaxed), context_.load(std::memory_order_relaxed));
    }
  }

  // The first ticket of a job other than `last`'s: spin a while (yielding the core after the first microseconds, so
  // a thread of torch's OpenMP pool that needs it is not kept waiting), then sleep until the caller wakes sleepers.
  uint64_t wait_for_job(uint64_t last) {
    const auto start = std::chrono::steady_clock::now();
    const auto yield_from = start + std::chrono::nanoseconds(kPauseNanoseconds);
    const auto sleep_from = start + std::chrono::nanoseconds(kSpinNanoseconds);
    for (int spins = 0;; ++spins) {
      const uint64_t ticket = ticket_.load(std::memory_order_acquire);
      if ((ticket >> kGenerationShift) != (last >> kGenerationShift)) return ticket;
      if ((spins & 63) != 63) {
        _mm_pause();
        continue;
      }
      const auto now = std::chrono::steady_clock::now();
      if (now > sleep_from) break;
      if (now > yield_from) std::this_thread::yield();
    }
    for (;;) {
      const uint32_t wake = wake_.load(std::memory_order_acquire);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      const uint64_t ticket = ticket_.load(std::memory_order_seq_cst);
      if ((ticket >> kGenerationShift) != (last >> kGenerationShift)) {
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        return ticket;
      }
      wake_.wait(wake, std::memory_order_acquire);
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
    }
  }

  void grow(int64_t count) {
    while (static_cast<int64_t>(started_) < count) {
      const int64_t id = started_++;
      std::thread([this, id] { worker(id); }).detach();
    }
  }

  std::mutex call_mutex_;
  uint64_t generation_ = 0;
  int64_t started_ = 0;  // guarded by call_mutex_
  std::atomic<uint64_t> ticket_{0};  // generation (24 bits) | chunk count (20) | next chunk (20)
  std::atomic<int64_t> done_{0}, wanted_{0};
  std::atomic<Body> body_{nullptr};
  std::atomic<const void*> context_{nullptr};
  std::atomic<uint32_t> wake_{0};
  std::atomic<int32_t> sleepers_{0};
};

// Never destroyed: its detached workers outlive static destruction at exit.
ChunkPool& chunk_pool() {
  static ChunkPool* pool = new ChunkPool();
  return *pool;
}

template <typename F>
void for_each_chunk(int64_t num_chunks, const F& body) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_chunks);
  chunk_pool().run(num_chunks, workers, [](const void* f, int64_t c) { (*static_cast<const F*>(f))(c); }, &body);
}

constexpr int64_t kUnitsPerChunk = 128;  // gate units (pairs of gate_up outputs) per chunk
constexpr int64_t kRowsPerChunk = 64;   // down-projection outputs per chunk

struct GateSpec {
  int64_t kind;  // 0 silu on halves, 1 GPT-OSS clamped swiglu on interleaved columns
  float alpha;
  float limit;
};

// exp(x) on 8 floats (Cephes' expf: range reduction to 2^n * e^r, degree-6 polynomial; rel. error < 2e-7).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// x * sigmoid(a * x) = x / (1 + exp(-a x))
inline __m256 swish8(__m256 x, __m256 a) {
  const __m256 e = exp8(_mm256_mul_ps(_mm256_xor_ps(a, _mm256_set1_ps(-0.f)), x));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

// The gate on 8 (gate, up) pairs: silu(g) * u, or GPT-OSS's (clamp(u) + 1) * swish_alpha(min(g, limit)).
inline __m256 gate8(const GateSpec& s, __m256 g, __m256 u) {
  if (s.kind == 0) return _mm256_mul_ps(swish8(g, _mm256_set1_ps(1.f)), u);
  const __m256 limit = _mm256_set1_ps(s.limit);
  g = _mm256_min_ps(g, limit);
  u = _mm256_min_ps(_mm256_max_ps(u, _mm256_xor_ps(limit, _mm256_set1_ps(-0.f))), limit);
  return _mm256_mul_ps(_mm256_add_ps(u, _mm256_set1_ps(1.f)), swish8(g, _mm256_set1_ps(s.alpha)));
}

// Where gate unit j's gate and up values sit in a row of h: halves [g | u] or interleaved (g0 u0 g1 u1 ...).
inline int64_t gate_col(const GateSpec& s, int64_t j) { return s.kind == 0 ? j : 2 * j; }
inline int64_t up_col(const GateSpec& s, int64_t I, int64_t j) { return s.kind == 0 ? I + j : 2 * j + 1; }

template <typename W>
inline float bias_at(const W* b, int64_t i) {
  return b ? static_cast<float>(b[i]) : 0.f;
}

// g[t][j] for gate units j in [j0, j1): projects the gate and up outputs those units need, then gates them.
template <typename W>
void gate_up_chunk(const Input& x, int64_t n, int64_t H, int64_t I, const W* w, int64_t ldw,
                   const W* bias, bool transposed, const GateSpec& gate, int64_t j0, int64_t j1, float* h, float* g) {
  const int64_t ldh = 2 * I;
  if (gate.kind == 0) {
    project_any(x, n, H, w, ldw, transposed, j0, j1, h, ldh);
    project_any(x, n, H, w, ldw, transposed, I + j0, I + j1, h, ldh);
  } else {
    project_any(x, n, H, w, ldw, transposed, 2 * j0, 2 * j1, h, ldh);
  }
  // Gate 8 units at a time; a tail of fewer than 8 units is padded (padding lanes are computed, not stored).
  for (int64_t t = 0; t < n; ++t) {
    const float* ht = h + t * ldh;
    for (int64_t j = j0; j < j1; j += 8) {
      const int64_t lanes = std::min<int64_t>(8, j1 - j);
      alignas(32) float gv[8] = {}, uv[8] = {}, result[8];
      for (int64_t i = 0; i < lanes; ++i) {
        const int64_t gc = gate_col(gate, j + i), uc = up_col(gate, I, j + i);
        gv[i] = ht[gc] + bias_at(bias, gc);
        uv[i] = ht[uc] + bias_at(bias, uc);
      }
      _mm256_store_ps(result, gate8(gate, _mm256_load_ps(gv), _mm256_load_ps(uv)));
      std::copy(result, result + lanes, g + t * I + j);
    }
  }
}

// out[tok[t]][c] += rw[t] * (y[t][c] + bias[c]) for outputs c in [c0, c1) of the down projection.
template <typename W>
void down_chunk(const float* g, int64_t n, int64_t H, int64_t I, const W* w, int64_t ldw, const W* bias,
                bool transposed, int64_t c0, int64_t c1, const int64_t* tok, const float* rw, float* y, float* out) {
  project_any(Input{g}, n, I, w, ldw, transposed, c0, c1, y, H);
  for (int64_t t = 0; t < n; ++t) {
    float* ot = out + tok[t] * H;
    const float* yt = y + t * H;
    for (int64_t c = c0; c < c1; ++c) ot[c] += rw[t] * (yt[c] + bias_at(bias, c));
  }
}

// x[t] = O(hidden[tok[t]]): the expert's tokens, gathered (and widened, for fp32 x) once.
template <typename A, typename O = float>
void gather_rows(const A* hidden, int64_t H, const int64_t* tok, int64_t n, O* x) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < H; ++c) x[t * H + c] = static_cast<O>(hidden[tok[t] * H + c]);
}

void gather_tokens(const Tensor& hidden, const int64_t* tok, int64_t n, float* x) {
  const int64_t H = hidden.size(1);
  switch (hidden.scalar_type()) {
    case at::kFloat: return gather_rows(hidden.const_data_ptr<float>(), H, tok, n, x);
    case at::kBFloat16: return gather_rows(hidden.const_data_ptr<c10::BFloat16>(), H, tok, n, x);
    case at::kHalf: return gather_rows(hidden.const_data_ptr<c10::Half>(), H, tok, n, x);
    default: TORCH_CHECK(false, "hidden must be fp32, bf16 or fp16");
  }
}

// Per-thread scratch that only grows: after the first calls at a given size, no allocation.
template <typename T>
T* scratch(std::vector<T>& buf, int64_t numel) {
  if (static_cast<int64_t>(buf.size()) < numel) buf.resize(numel);
  return buf.data();
}

// Whether a group's projections take the bf16 pair products (bf16 tokens and row-major bf16 weights on AVX-512
// BF16), which read the tokens' bf16 rows as well as their fp32 ones.
bool pair_products(const Tensor& hidden, at::ScalarType dtype, bool transposed) {
  return hidden.scalar_type() == at::kBFloat16 && dtype == at::kBFloat16 && !transposed &&
         g_isa.load(std::memory_order_relaxed) == kIsaAvx512Bf16;
}

struct ExpertArgs {
  const Tensor& gate_up;
  const Tensor& down;
  const std::optional<Tensor>& gate_up_bias;
  const std::optional<Tensor>& down_bias;
};

template <typename T>
const T* optional_ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

void check_expert(const ExpertArgs& e, at::ScalarType dtype, int64_t H, int64_t I, bool transposed) {
  const int64_t gu_rows = transposed ? H : 2 * I, gu_cols = transposed ? 2 * I : H;
  const int64_t dn_rows = transposed ? I : H, dn_cols = transposed ? H : I;
  TORCH_CHECK(e.gate_up.dim() == 2 && e.gate_up.size(0) == gu_rows && e.gate_up.size(1) == gu_cols &&
                  e.gate_up.stride(1) == 1, "gate_up must be [", gu_rows, ", ", gu_cols, "] with unit inner stride");
  TORCH_CHECK(e.down.dim() == 2 && e.down.size(0) == dn_rows && e.down.size(1) == dn_cols && e.down.stride(1) == 1,
              "down must be [", dn_rows, ", ", dn_cols, "] with unit inner stride");
  TORCH_CHECK(e.gate_up.scalar_type() == dtype && e.down.scalar_type() == dtype, "expert weights differ in dtype");
  TORCH_CHECK(!e.gate_up_bias.has_value() || (e.gate_up_bias->is_contiguous() && e.gate_up_bias->numel() == 2 * I &&
                                               e.gate_up_bias->scalar_type() == dtype), "bad gate_up bias");
  TORCH_CHECK(!e.down_bias.has_value() || (e.down_bias->is_contiguous() && e.down_bias->numel() == H &&
                                            e.down_bias->scalar_type() == dtype), "bad down bias");
}

// One expert's weights and its slice of the group's tokens, as raw pointers for the hot loops.
template <typename W>
struct ExpertPtrs {
  const W* gate_up;
  const W* down;
  int64_t ld_gate_up;
  int64_t ld_down;
  const W* gate_up_bias;
  const W* down_bias;
  int64_t row;    // first row of this expert's tokens in x, h, g, y
  int64_t count;  // its tokens
  const int64_t* tok;
  const float* rw;
};

// The whole group in two parallel phases (two barriers per call, however many experts): gate/up projections and
// gating over (expert, unit chunk) pairs, then the down projections over output-column chunks, each chunk running
// every expert in turn so that no two threads ever add into the same out[token][column]. x holds the group's
// gathered token rows (rows in all; expert e's from its `row`).
template <typename W>
void run_experts(const Input& x, int64_t H, int64_t I, const std::vector<ExpertPtrs<W>>& experts, int64_t rows,
                 bool transposed, const GateSpec& gate, float* out) {
  const int64_t G = static_cast<int64_t>(experts.size());
  static thread_local std::vector<float> h_buf, g_buf, y_buf;
  float* h = scratch(h_buf, rows * 2 * I);
  float* g = scratch(g_buf, rows * I);
  float* y = scratch(y_buf, rows * H);
  const int64_t unit_chunks = (I + kUnitsPerChunk - 1) / kUnitsPerChunk;
  for_each_chunk(G * unit_chunks, [&](int64_t c) {
    const ExpertPtrs<W>& e = experts[c / unit_chunks];
    if (e.count == 0) return;
    const int64_t j0 = (c % unit_chunks) * kUnitsPerChunk, j1 = std::min(I, j0 + kUnitsPerChunk);
    gate_up_chunk(x.rows_from(e.row, H), e.count, H, I, e.gate_up, e.ld_gate_up,
                  e.gate_up_bias, transposed, gate, j0, j1, h + e.row * 2 * I, g + e.row * I);
  });
  for_each_chunk((H + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t c) {
    const int64_t c0 = c * kRowsPerChunk, c1 = std::min(H, c0 + kRowsPerChunk);
    for (const ExpertPtrs<W>& e : experts) {
      if (e.count == 0) continue;
      down_chunk(g + e.row * I, e.count, H, I, e.down, e.ld_down, e.down_bias, transposed, c0, c1, e.tok, e.rw,
                 y + e.row * H, out);
    }
  });
}

// The group given as lists (experts_group's arguments).
template <typename W>
void run_group(const Input& x, int64_t H, int64_t I, const Tensor& token_ids, const Tensor& route_weights,
               at::IntArrayRef starts, at::IntArrayRef counts, at::TensorList gate_up, at::TensorList down,
               const c10::List<std::optional<Tensor>>& gate_up_bias, const c10::List<std::optional<Tensor>>& down_bias,
               bool transposed, const GateSpec& gate, float* out, const std::vector<int64_t>& x_rows, int64_t rows) {
  const int64_t G = static_cast<int64_t>(gate_up.size());
  const int64_t* tok = token_ids.const_data_ptr<int64_t>();
  const float* rw = route_weights.const_data_ptr<float>();
  std::vector<ExpertPtrs<W>> experts(G);
  for (int64_t e = 0; e < G; ++e) {
    experts[e] = {gate_up[e].const_data_ptr<W>(), down[e].const_data_ptr<W>(), gate_up[e].stride(0),
                  down[e].stride(0), optional_ptr<W>(gate_up_bias.get(e)), optional_ptr<W>(down_bias.get(e)),
                  x_rows[e], counts[e], tok + starts[e], rw + starts[e]};
  }
  run_experts<W>(x, H, I, experts, rows, transposed, gate, out);
}

// The op. hidden [T, H] (fp32|bf16|fp16, contiguous); token_ids [S] int64 and route_weights [S] fp32, grouped
// by expert; expert e of the group owns entries [starts[e], starts[e] + counts[e]); gate_up[e], down[e] (and
// optional biases) its weights, all of one dtype; out [T, H] fp32 contiguous, accumulated into.
void experts_group(const Tensor& hidden, const Tensor& token_ids, const Tensor& route_weights, at::IntArrayRef starts,
                   at::IntArrayRef counts, at::TensorList gate_up, at::TensorList down,
                   const c10::List<std::optional<Tensor>>& gate_up_bias,
                   const c10::List<std::optional<Tensor>>& down_bias, bool transposed, int64_t gate_kind,
                   double alpha, double limit, const Tensor& out) {
  const int64_t G = static_cast<int64_t>(gate_up.size());
  TORCH_CHECK(static_cast<int64_t>(down.size()) == G && static_cast<int64_t>(starts.size()) == G &&
                  static_cast<int64_t>(counts.size()) == G && static_cast<int64_t>(gate_up_bias.size()) == G &&
                  static_cast<int64_t>(down_bias.size()) == G, "group lists differ in length");
  TORCH_CHECK(gate_kind == 0 || gate_kind == 1, "unknown gate kind ", gate_kind);
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be [T, H] contiguous");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == hidden.sizes(),
              "out must be fp32 [T, H] contiguous");
  TORCH_CHECK(token_ids.scalar_type() == at::kLong && token_ids.is_contiguous(), "token_ids must be int64");
  TORCH_CHECK(route_weights.scalar_type() == at::kFloat && route_weights.is_contiguous(), "route_weights: fp32");
  TORCH_CHECK(route_weights.numel() == token_ids.numel(), "route_weights and token_ids differ in length");
  if (G == 0) return;
  const int64_t T = hidden.size(0), H = hidden.size(1);
  const int64_t I = transposed ? down.front().size(0) : down.front().size(1);
  const at::ScalarType dtype = gate_up.front().scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "weights: fp32, bf16 or fp16");
  const int64_t* tok = token_ids.const_data_ptr<int64_t>();
  std::vector<int64_t> x_rows(G);
  int64_t rows = 0;
  for (int64_t e = 0; e < G; ++e) {
    TORCH_CHECK(starts[e] >= 0 && counts[e] >= 0 && starts[e] + counts[e] <= token_ids.numel(), "bad expert slice");
    for (int64_t s = starts[e]; s < starts[e] + counts[e]; ++s)
      TORCH_CHECK(tok[s] >= 0 && tok[s] < T, "token id out of range");
    check_expert({gate_up[e], down[e], gate_up_bias.get(e), down_bias.get(e)}, dtype, H, I, transposed);
    x_rows[e] = rows;
    rows += counts[e];
  }

  static thread_local std::vector<float> x_buf;
  static thread_local std::vector<c10::BFloat16> xb_buf;
  float* xf = scratch(x_buf, rows * H);
  for (int64_t e = 0; e < G; ++e) gather_tokens(hidden, tok + starts[e], counts[e], xf + x_rows[e] * H);
  Input x{xf};
  if (pair_products(hidden, dtype, transposed)) {  // the bf16 rows too
    c10::BFloat16* xb = scratch(xb_buf, rows * H);
    const c10::BFloat16* src = hidden.const_data_ptr<c10::BFloat16>();
    for (int64_t e = 0; e < G; ++e) gather_rows(src, H, tok + starts[e], counts[e], xb + x_rows[e] * H);
    x.xb = xb;
    x.ldxb = H;
  }
  const GateSpec gate{gate_kind, static_cast<float>(alpha), static_cast<float>(limit)};
  float* o = out.data_ptr<float>();
  if (dtype == at::kFloat) {
    run_group<float>(x, H, I, token_ids, route_weights, starts, counts, gate_up, down, gate_up_bias, down_bias,
                     transposed, gate, o, x_rows, rows);
  } else if (dtype == at::kBFloat16) {
    run_group<c10::BFloat16>(x, H, I, token_ids, route_weights, starts, counts, gate_up, down, gate_up_bias,
                             down_bias, transposed, gate, o, x_rows, rows);
  } else {
    run_group<c10::Half>(x, H, I, token_ids, route_weights, starts, counts, gate_up, down, gate_up_bias, down_bias,
                         transposed, gate, o, x_rows, rows);
  }
}

// The op with a layer's routing as its router gives it: hidden [T, H] (contiguous); top_k_index [T, k] int64 and
// top_k_weights [T, k] (fp32, bf16 or fp16, widened to fp32 as torch's .float() does: exactly); gate_up [E, ...] and
// down [E, ...] the layer's stacked weights (expert e is gate_up[e], down[e], as in the module's own parameters),
// optional stacked biases [E, ...]. The (token, expert) assignments are grouped here, experts ascending and tokens
// ascending within one (the order of engine.offload.experts.plan_routing), each expert's weights read in place
// from its stack, and the sum accumulated in fp32 from zero, as experts_group does for the Python plan's groups:
// the result is the plan's bit for bit (its fp32 sum rounded to hidden's dtype, as torch's .to() rounds). Returns a
// new [T, H] tensor of hidden's dtype: a decode step's one op call per layer, with no zeroing, conversion or list
// arguments around it.
template <typename W>
std::vector<ExpertPtrs<W>> stacked_experts(const Tensor& gate_up, const Tensor& down,
                                           const std::optional<Tensor>& gate_up_bias,
                                           const std::optional<Tensor>& down_bias, const std::vector<int64_t>& count,
                                           const int64_t* tok, const float* rw) {
  const W* gu = gate_up.const_data_ptr<W>();
  const W* dn = down.const_data_ptr<W>();
  const W* gub = optional_ptr<W>(gate_up_bias);
  const W* dnb = optional_ptr<W>(down_bias);
  std::vector<ExpertPtrs<W>> experts;
  int64_t row = 0;
  for (size_t e = 0; e < count.size(); ++e) {
    if (count[e] == 0) continue;
    const int64_t i = static_cast<int64_t>(e);
    experts.push_back({gu + i * gate_up.stride(0), dn + i * down.stride(0), gate_up.stride(1), down.stride(1),
                       gub ? gub + i * gate_up_bias->stride(0) : nullptr, dnb ? dnb + i * down_bias->stride(0) : nullptr,
                       row, count[e], tok + row, rw + row});
    row += count[e];
  }
  return experts;
}

// out[t][n] = O(y[t][n]) for columns [c0, c1) of [T, N] rows: fp32 sums rounded to a 16-bit output (the rounding of
// torch's .to()).
template <typename O>
inline void store_rows(const float* y, int64_t T, int64_t N, int64_t c0, int64_t c1, O* out) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = c0; n < c1; ++n) out[t * N + n] = static_cast<O>(y[t * N + n]);
}

template <typename R>
void widen_weights(const R* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}


Tensor experts_routed(const Tensor& hidden, const Tensor& top_k_index, const Tensor& top_k_weights,
                      const Tensor& gate_up, const Tensor& down, const std::optional<Tensor>& gate_up_bias,
                      const std::optional<Tensor>& down_bias, bool transposed, int64_t gate_kind, double alpha,
                      double limit) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be [T, H] contiguous");
  TORCH_CHECK(top_k_index.dim() == 2 && top_k_index.scalar_type() == at::kLong && top_k_index.size(0) == hidden.size(0),
              "top_k_index must be [T, k] int64 with T = hidden's rows");
  TORCH_CHECK(top_k_weights.sizes() == top_k_index.sizes(), "top_k_weights must be [T, k] like top_k_index");
  const Tensor index = top_k_index.contiguous(), weights = top_k_weights.contiguous();
  TORCH_CHECK(gate_kind == 0 || gate_kind == 1, "unknown gate kind ", gate_kind);
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && down.size(0) == gate_up.size(0),
              "gate_up and down must be stacks [E, ...] of one E");
  const int64_t T = hidden.size(0), H = hidden.size(1), E = gate_up.size(0);
  const int64_t I = transposed ? down.size(1) : down.size(2);
  const at::ScalarType dtype = gate_up.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "weights: fp32, bf16 or fp16");
  const int64_t gu_rows = transposed ? H : 2 * I, gu_cols = transposed ? 2 * I : H;
  const int64_t dn_rows = transposed ? I : H, dn_cols = transposed ? H : I;
  TORCH_CHECK(gate_up.size(1) == gu_rows && gate_up.size(2) == gu_cols && gate_up.stride(2) == 1,
              "gate_up must be [E, ", gu_rows, ", ", gu_cols, "] with unit inner stride");
  TORCH_CHECK(down.size(1) == dn_rows && down.size(2) == dn_cols && down.stride(2) == 1,
              "down must be [E, ", dn_rows, ", ", dn_cols, "] with unit inner stride");
  TORCH_CHECK(down.scalar_type() == dtype, "expert weights differ in dtype");
  TORCH_CHECK(!gate_up_bias || (gate_up_bias->dim() == 2 && gate_up_bias->size(0) == E &&
                                gate_up_bias->size(1) == 2 * I && gate_up_bias->stride(1) == 1 &&
                                gate_up_bias->scalar_type() == dtype), "bad gate_up bias");
  TORCH_CHECK(!down_bias || (down_bias->dim() == 2 && down_bias->size(0) == E && down_bias->size(1) == H &&
                             down_bias->stride(1) == 1 && down_bias->scalar_type() == dtype), "bad down bias");

  const int64_t S = index.numel(), k = index.size(1);
  const int64_t* ids = index.const_data_ptr<int64_t>();
  static thread_local std::vector<float> w_buf, rw_buf, x_buf, sum_buf;
  static thread_local std::vector<int64_t> tok_buf;
  static thread_local std::vector<c10::BFloat16> xb_buf;
  float* w = scratch(w_buf, S);
  switch (weights.scalar_type()) {
    case at::kFloat: std::copy_n(weights.const_data_ptr<float>(), S, w); break;
    case at::kBFloat16: widen_weights(weights.const_data_ptr<c10::BFloat16>(), S, w); break;
    case at::kHalf: widen_weights(weights.const_data_ptr<c10::Half>(), S, w); break;
    default: TORCH_CHECK(false, "top_k_weights must be fp32, bf16 or fp16");
  }
  std::vector<int64_t> count(static_cast<size_t>(E), 0);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(ids[s] >= 0 && ids[s] < E, "expert id ", ids[s], " out of range [0, ", E, ")");
    ++count[ids[s]];
  }
  std::vector<int64_t> next(static_cast<size_t>(E), 0);
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + count[e - 1];
  int64_t* tok = scratch(tok_buf, S);
  float* rw = scratch(rw_buf, S);
  for (int64_t s = 0; s < S; ++s) {  // a stable counting sort: s ascending within an expert
    const int64_t position = next[ids[s]]++;
    tok[position] = s / k;
    rw[position] = w[s];
  }

  // The assignments' token rows, gathered once in their grouped order (and in bf16 for the pair products).
  float* xf = scratch(x_buf, S * H);
  gather_tokens(hidden, tok, S, xf);
  Input x{xf};
  if (pair_products(hidden, dtype, transposed)) {
    c10::BFloat16* xb = scratch(xb_buf, S * H);
    gather_rows(hidden.const_data_ptr<c10::BFloat16>(), H, tok, S, xb);
    x.xb = xb;
    x.ldxb = H;
  }
  const GateSpec gate{gate_kind, static_cast<float>(alpha), static_cast<float>(limit)};
  const bool fp32 = hidden.scalar_type() == at::kFloat;
  Tensor out = fp32 ? hidden.new_zeros(hidden.sizes()) : hidden.new_empty(hidden.sizes());
  float* sums = fp32 ? out.data_ptr<float>() : scratch(sum_buf, T * H);
  if (!fp32) std::fill_n(sums, T * H, 0.f);
  if (dtype == at::kFloat) {
    run_experts<float>(x, H, I, stacked_experts<float>(gate_up, down, gate_up_bias, down_bias, count, tok, rw), S,
                       transposed, gate, sums);
  } else if (dtype == at::kBFloat16) {
    run_experts<c10::BFloat16>(x, H, I, stacked_experts<c10::BFloat16>(gate_up, down, gate_up_bias, down_bias, count,
                                                                       tok, rw), S, transposed, gate, sums);
  } else {
    run_experts<c10::Half>(x, H, I, stacked_experts<c10::Half>(gate_up, down, gate_up_bias, down_bias, count, tok, rw),
                           S, transposed, gate, sums);
  }
  if (hidden.scalar_type() == at::kBFloat16) store_rows(sums, T, H, 0, H, out.data_ptr<c10::BFloat16>());
  else if (hidden.scalar_type() == at::kHalf) store_rows(sums, T, H, 0, H, out.data_ptr<c10::Half>());
  return out;
}

// out [T, N] = x [T, K] @ w [N, K]^T (+ bias [N]): a dense projection (attention, router, LM head) on the experts'
// row paths, split over torch's threads in chunks of output rows. x fp32, bf16 or fp16; w and bias fp32, bf16 or
// fp16, of one dtype; out fp32, or x's dtype (rounded from the fp32 result, in the same parallel pass, so a caller
// in bf16 needs no conversion op after). engine.dense runs the model's one-row products through it.
void dense(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be [T, K] contiguous");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && w.size(1) == x.size(1), "w must be [N, ", x.size(1),
              "] with unit inner stride");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == x.scalar_type()) && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) == T && out.size(1) == N,
              "out must be [", T, ", ", N, "] contiguous, fp32 or x's dtype");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == N && bias->is_contiguous() &&
                                    bias->scalar_type() == w.scalar_type()), "bias must be [N] of w's dtype");
  static thread_local std::vector<float> x_buf, y_buf;
  static thread_local std::vector<int64_t> row_buf;
  float* xf = scratch(x_buf, T * K);
  int64_t* rows = scratch(row_buf, T);
  for (int64_t t = 0; t < T; ++t) rows[t] = t;
  gather_tokens(x, rows, T, xf);
  Input in{xf};
  if (x.scalar_type() == at::kBFloat16) in = {xf, x.const_data_ptr<c10::BFloat16>(), K};  // bf16 pairs if w is bf16
  const at::ScalarType out_type = out.scalar_type();
  float* y = out_type == at::kFloat ? out.data_ptr<float>() : scratch(y_buf, T * N);
  void* o = out.data_ptr();
  const int64_t ldw = w.stride(0);
  auto run = [&](const auto* weights) {
    using W = std::remove_cv_t<std::remove_pointer_t<decltype(weights)>>;
    const W* b = bias.has_value() ? bias->const_data_ptr<W>() : nullptr;
    for_each_chunk((N + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t c) {
      const int64_t c0 = c * kRowsPerChunk, c1 = std::min(N, c0 + kRowsPerChunk);
      project_any(in, T, K, weights, ldw, false, c0, c1, y, N);
      if (b != nullptr)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t n = c0; n < c1; ++n) y[t * N + n] += static_cast<float>(b[n]);
      if (out_type == at::kBFloat16) store_rows(y, T, N, c0, c1, static_cast<c10::BFloat16*>(o));
      else if (out_type == at::kHalf) store_rows(y, T, N, c0, c1, static_cast<c10::Half*>(o));
    });
  };
  switch (w.scalar_type()) {
    case at::kFloat: return run(w.const_data_ptr<float>());
    case at::kBFloat16: return run(w.const_data_ptr<c10::BFloat16>());
    case at::kHalf: return run(w.const_data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "w must be fp32, bf16 or fp16");
  }
}

// `dense` allocating its output: x [..., K] contiguous -> [..., N] in x's dtype. engine.dense's one-row products
// of decode make one op call this way, instead of an allocation, two reshapes and the call from Python.
Tensor dense_rows(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "x must be [..., K] contiguous");
  TORCH_CHECK(w.dim() == 2, "w must be [N, K]");
  const int64_t K = x.size(-1), N = w.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  Tensor out = x.new_empty(shape);
  dense(x.view({-1, K}), w, bias, out.view({-1, N}));
  return out;
}

// ---- RMSNorm of a few rows: the one op engine.norms runs for a model's own RMSNorm modules ----
// out[r] = norm(x[r]) with n = x * (1 / sqrt(mean(x^2) + eps)) in fp32, as transformers' RMSNorm modules compute
// it, then either w * round(n) (round_first, the Llama family: the normalized row is rounded to x's dtype before
// the weight multiplies it, in fp32, and rounds again) or round(w * n) (GPT-OSS). A decode step runs two of
// them per layer; as torch ops each is 6-8 small calls, each slowed by caches the weight stream just emptied.
// x, w and out of one dtype (fp32, bf16 or fp16), [R, H] contiguous (w [H]); one thread: a row is 2-16 KB.
template <typename T>
void rms_norm_rows(const T* x, const T* w, int64_t R, int64_t H, float eps, bool round_first, T* out) {
  for (int64_t r = 0; r < R; ++r) {
    const T* row = x + r * H;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= H; i += 32)
      for (int u = 0; u < 4; ++u) {
        const __m256 v = load8(row + i + 8 * u);
        acc[u] = _mm256_fmadd_ps(v, v, acc[u]);
      }
    for (; i + 8 <= H; i += 8) acc[0] = _mm256_fmadd_ps(load8(row + i), load8(row + i), acc[0]);
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; i < H; ++i) sum += static_cast<float>(row[i]) * static_cast<float>(row[i]);
    const float scale = 1.f / std::sqrt(sum / static_cast<float>(H) + eps);
    T* o = out + r * H;
    for (int64_t j = 0; j < H; ++j) {
      const float n = static_cast<float>(row[j]) * scale;
      o[j] = round_first ? static_cast<T>(static_cast<float>(w[j]) * static_cast<float>(static_cast<T>(n)))
                         : static_cast<T>(static_cast<float>(w[j]) * n);
    }
  }
}

void rms_norm(const Tensor& x, const Tensor& w, double eps, bool round_first, const Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be [R, H] contiguous");
  const int64_t R = x.size(0), H = x.size(1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == H && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "w must be [", H, "] contiguous, of x's dtype");
  TORCH_CHECK(out.sizes() == x.sizes() && out.is_contiguous() && out.scalar_type() == x.scalar_type(),
              "out must be like x");
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat:
      return rms_norm_rows(x.const_data_ptr<float>(), w.const_data_ptr<float>(), R, H, e, round_first,
                           out.data_ptr<float>());
    case at::kBFloat16:
      return rms_norm_rows(x.const_data_ptr<c10::BFloat16>(), w.const_data_ptr<c10::BFloat16>(), R, H, e,
                           round_first, out.data_ptr<c10::BFloat16>());
    case at::kHalf:
      return rms_norm_rows(x.const_data_ptr<c10::Half>(), w.const_data_ptr<c10::Half>(), R, H, e, round_first,
                           out.data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "x must be fp32, bf16 or fp16");
  }
}

// `rms_norm` allocating its output: x [..., H] contiguous -> a tensor like it. engine.norms' decode calls make one op
// call this way, instead of an allocation, two reshapes and the call from Python.
Tensor rms_norm_like(const Tensor& x, const Tensor& w, double eps, bool round_first) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "x must be [..., H] contiguous");
  const int64_t H = x.size(-1);
  Tensor out = x.new_empty(x.sizes());
  rms_norm(x.view({-1, H}), w, eps, round_first, out.view({-1, H}));
  return out;
}

// ---- top-k routing of a few rows: softmax, the k most probable experts, optional renormalization ----
// For each row t of the router's logits [T, E]: p = softmax(float(logits[t])) in fp32, the k largest p in
// descending order, divided by their sum when `renormalize`; scores [T, k] in fp32 or the logits' dtype, indices
// [T, k] int64. What the Mixtral, Qwen-MoE and OLMoE routers compute after their linear layer in 4-6 torch ops
// (engine.routers runs it only where it reproduces the module). Returns true when some row's k+1 largest hold equal
// values (or NaN): torch.topk's order among equal values is its algorithm's (on the CPU the higher id first at 8
// experts, the lower at 64), so the caller recomputes such a call with torch. Equal bf16 logits tie often enough.
template <typename L, typename S>
bool route_rows(const L* logits, int64_t T, int64_t E, int64_t k, bool renormalize, S* scores, int64_t* indices) {
  if (E <= 0) return false;
  static thread_local std::vector<float> p_buf, top_buf;
  static thread_local std::vector<char> taken_buf;
  float* p = scratch(p_buf, E);
  float* top = scratch(top_buf, k);  // the chosen probabilities in fp32: scores are rounded once, at the end
  char* taken = scratch(taken_buf, E);
  bool tied = false;
  for (int64_t t = 0; t < T; ++t) {
    const L* row = logits + t * E;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<float>(row[e]));
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(static_cast<float>(row[e]) - m));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    S* s = scores + t * k;
    int64_t* ids = indices + t * k;
    for (int64_t e = 0; e < E; ++e) taken[e] = 0;
    float chosen = 0.f, last = 0.f;
    for (int64_t j = 0; j <= k && j < E; ++j) {  // k is small (2-8): passes taking the first largest remaining
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)  // NaN ranks above every number, as in torch.topk
        if (!taken[e] && (best < 0 || (std::isnan(p[e]) && !std::isnan(p[best])) || p[e] > p[best])) best = e;
      if (j > 0 && !(p[best] < last)) tied = true;  // equal (or NaN) neighbours: torch's order is its own
      last = p[best];
      if (j == k) break;  // the (k+1)-th only tells whether the k-th was tied
      taken[best] = 1;
      ids[j] = best;
      top[j] = p[best];
      chosen += p[best];
    }
    for (int64_t j = 0; j < k; ++j) s[j] = static_cast<S>(renormalize ? top[j] / chosen : top[j]);
  }
  return tied;
}

bool route_topk(const Tensor& logits, int64_t k, bool renormalize, const Tensor& scores, const Tensor& indices) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits must be [T, E] contiguous");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "k must be in 1..", E);
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == T && scores.size(1) == k && scores.is_contiguous() &&
                  (scores.scalar_type() == at::kFloat || scores.scalar_type() == logits.scalar_type()),
              "scores must be [T, k] contiguous, fp32 or the logits' dtype");
  TORCH_CHECK(indices.sizes() == scores.sizes() && indices.is_contiguous() && indices.scalar_type() == at::kLong,
              "indices must be [T, k] int64 contiguous");
  auto run = [&](const auto* l) {
    using L = std::remove_cv_t<std::remove_pointer_t<decltype(l)>>;
    int64_t* ids = indices.data_ptr<int64_t>();
    if (scores.scalar_type() == at::kFloat) return route_rows(l, T, E, k, renormalize, scores.data_ptr<float>(), ids);
    return route_rows(l, T, E, k, renormalize, scores.data_ptr<L>(), ids);
  };
  switch (logits.scalar_type()) {
    case at::kFloat: return run(logits.const_data_ptr<float>());
    case at::kBFloat16: return run(logits.const_data_ptr<c10::BFloat16>());
    case at::kHalf: return run(logits.const_data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "logits must be fp32, bf16 or fp16");
  }
}

// ---- decode attention: one new token of each request over its own context ----
// out[t][h] = sum_j p_j v[g][j] / (sum_j p_j + exp(sink[h] - m)), p_j = exp(scale * q[h][t] . k[g][j] - m), over the
// request's context rows j, for the query heads h of key/value head g (G = H / Hk heads share one), m the largest
// logit (the sink's included). A decode token reads every key and value row of its context once; torch's SDPA does
// the same arithmetic at 2-13 x the time per call on the machines we measured, bf16 worst and the gap growing with
// the context (benchmarks/decode_attention.py). Work is split over (request, key/value head) pairs on the same
// chunk pool as the projections before it, whose workers are still spinning then. Products and sums in fp32 (exp to
// < 2e-7 relative), the result rounded once to the query's dtype.
template <typename T>
inline float dot_widened(const float* q, const T* k, int64_t d) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= d; i += 32)  // four independent sums: one would wait on each FMA's latency
    for (int u = 0; u < 4; ++u) acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8 * u), load8(k + i + 8 * u), acc[u]);
  for (; i + 8 <= d; i += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc[0]);
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < d; ++i) sum += q[i] * static_cast<float>(k[i]);
  return sum;
}

template <typename T>
inline void axpy_widened(float a, const T* v, int64_t d, float* y) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(v + i), _mm256_loadu_ps(y + i)));
  for (; i < d; ++i) y[i] += a * static_cast<float>(v[i]);
}

// p[j] = exp(p[j] - m) for j < n; returns their sum.
inline float exp_shifted(float* p, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; j < n; ++j) sum += (p[j] = std::exp(p[j] - m));
  return sum;
}

struct AttentionShape {
  int64_t G, d, dv;                  // query heads per key/value head, key and value head dims
  int64_t q_head, q_token;           // query strides (elements): [H, T, d]
  int64_t k_head, k_row, v_head, v_row;  // key [Hk, R, d] and value [Hk, R, dv] strides
  int64_t o_token, o_head;           // out strides: [T, H, dv]
  float scale;
};

// The G query heads of key/value head g for the token at query row t, over context rows [begin, end): key and value
// rows begin..end-1, or with slots, rows slots[begin..end-1].
template <typename T>
void attend(const AttentionShape& a, const T* q, const T* k, const T* v, const float* sinks, const int64_t* slots,
            int64_t t, int64_t g, int64_t begin, int64_t end, T* out) {
  const int64_t n = end - begin, G = a.G, d = a.d, dv = a.dv;
  static thread_local std::vector<float> q_buf, p_buf, acc_buf, denominator_buf;
  float* qf = scratch(q_buf, G * d);
  float* denominators = scratch(denominator_buf, G);
  float* p = scratch(p_buf, G * n);
  float* acc = scratch(acc_buf, G * dv);
  for (int64_t hh = 0; hh < G; ++hh) {
    const T* qh = q + (g * G + hh) * a.q_head + t * a.q_token;
    for (int64_t i = 0; i < d; ++i) qf[hh * d + i] = a.scale * static_cast<float>(qh[i]);
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* kj = k + g * a.k_head + (slots ? slots[begin + j] : begin + j) * a.k_row;
    for (int64_t hh = 0; hh < G; ++hh) p[hh * n + j] = dot_widened(qf + hh * d, kj, d);
  }
  std::fill(acc, acc + G * dv, 0.f);
  for (int64_t hh = 0; hh < G; ++hh) {
    float* ph = p + hh * n;
    float m = sinks ? sinks[g * G + hh] : -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, ph[j]);
    denominators[hh] = exp_shifted(ph, n, m) + (sinks ? std::exp(sinks[g * G + hh] - m) : 0.f);
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + g * a.v_head + (slots ? slots[begin + j] : begin + j) * a.v_row;
    for (int64_t hh = 0; hh < G; ++hh) axpy_widened(p[hh * n + j], vj, dv, acc + hh * dv);
  }
  for (int64_t hh = 0; hh < G; ++hh) {
    T* oh = out + t * a.o_token + (g * G + hh) * a.o_head;
    const float inverse = 1.f / denominators[hh];
    for (int64_t i = 0; i < dv; ++i) oh[i] = static_cast<T>(acc[hh * dv + i] * inverse);
  }
}

// A few-row router in one call (engine.routers.KernelTopKRouter): its logits = hidden [T, H] @ weight [E, H]^T in
// hidden's dtype (dense_rows: as F.linear rounds them), then route_topk over them into new scores ([T, k], fp32 or
// the logits' dtype) and indices ([T, k] int64). The last output is route_topk's verdict: true when some row's top
// k + 1 probabilities hold equal values (the caller then runs torch's own selection).
std::tuple<Tensor, Tensor, Tensor, bool> router_topk(const Tensor& hidden, const Tensor& weight, int64_t k,
                                                     bool renormalize, bool scores_in_logits_dtype) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [T, H]");
  const Tensor logits = dense_rows(hidden, weight, std::nullopt);
  const int64_t T = logits.size(0);
  Tensor scores = logits.new_empty({T, k}, logits.options().dtype(scores_in_logits_dtype ? logits.scalar_type()
                                                                                          : at::kFloat));
  Tensor indices = logits.new_empty({T, k}, logits.options().dtype(at::kLong));
  const bool tied = route_topk(logits, k, renormalize, scores, indices);
  return {logits, scores, indices, tied};
}

// One layer's new KV rows into the paged store (engine.attention.PagedKVStore.update): store [heads, slots, dim]
// contiguous, rows [1, heads, T, dim] as the model's attention hands them (any strides but a unit inner one: keys
// come out of RoPE, values are a transposed view), slots [T] int64: store[h][slots[t]] = rows[0][h][t]. Both the
// key and the value rows in one call, where two index_copy_ calls cost ~5 us each in decode.
void write_rows(const Tensor& store, const Tensor& rows, const int64_t* slot, int64_t T, const char* what) {
  TORCH_CHECK(store.dim() == 3 && store.is_contiguous(), what, " store must be [heads, slots, dim] contiguous");
  TORCH_CHECK(rows.dim() == 4 && rows.size(0) == 1 && rows.size(1) == store.size(0) && rows.size(2) == T &&
                  rows.size(3) == store.size(2) && rows.stride(3) == 1,
              what, " rows must be [1, ", store.size(0), ", ", T, ", ", store.size(2), "] with unit inner stride");
  TORCH_CHECK(rows.scalar_type() == store.scalar_type(), what, " rows and store differ in dtype");
  const int64_t heads = store.size(0), num_slots = store.size(1), bytes = store.size(2) * store.element_size();
  const int64_t element = store.element_size();
  char* dst = static_cast<char*>(store.data_ptr());
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " out of range");
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(dst + (h * num_slots + slot[t]) * bytes, src + (h * rows.stride(1) + t * rows.stride(2)) * element,
                  bytes);
}

void kv_write(const Tensor& keys, const Tensor& values, const Tensor& key, const Tensor& value, const Tensor& slots) {
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be [T] int64");
  const int64_t T = slots.size(0);
  write_rows(keys, key, slots.const_data_ptr<int64_t>(), T, "key");
  write_rows(values, value, slots.const_data_ptr<int64_t>(), T, "value");
}

// The op. query [H, T, d], key [Hk, R, d], value [Hk, R, dv] (one dtype: fp32, bf16 or fp16; unit inner stride,
// Hk divides H); spans [S, 3] int64: (query row t, first context row, context length) of each decode token;
// window > 0 limits a token to its context's last `window` rows (a sliding window); sinks [H] fp32 or None;
// slots [C] int64 or None: context row r is key/value row slots[r] (the whole KV store read in place, no gathered
// copy), else row r; out [T, H, dv] of the query's dtype, unit inner stride: the spans' rows are written, the
// others left alone.
void decode_attention(const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& spans, double scale,
                      int64_t window, const std::optional<Tensor>& sinks, const std::optional<Tensor>& slots,
                      const Tensor& out) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3 && out.dim() == 3,
              "query [H, T, d], key [Hk, R, d], value [Hk, R, dv], out [T, H, dv]");
  const int64_t H = query.size(0), T = query.size(1), d = query.size(2), Hk = key.size(0), R = key.size(1);
  const int64_t dv = value.size(2);
  TORCH_CHECK(Hk > 0 && H % Hk == 0 && key.size(2) == d && value.size(0) == Hk && value.size(1) == R,
              "key/value heads must divide the query heads, with matching rows and head dims");
  TORCH_CHECK(out.size(0) == T && out.size(1) == H && out.size(2) == dv, "out must be [", T, ", ", H, ", ", dv, "]");
  const at::ScalarType dtype = query.scalar_type();
  TORCH_CHECK(key.scalar_type() == dtype && value.scalar_type() == dtype && out.scalar_type() == dtype,
              "query, key, value and out must share one dtype");
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1 && value.stride(2) == 1 && out.stride(2) == 1,
              "unit inner strides");
  TORCH_CHECK(spans.scalar_type() == at::kLong && spans.dim() == 2 && spans.size(1) == 3 && spans.is_contiguous(),
              "spans must be [S, 3] int64 contiguous");
  TORCH_CHECK(!sinks.has_value() || (sinks->scalar_type() == at::kFloat && sinks->numel() == H &&
                                     sinks->is_contiguous()), "sinks must be [H] fp32 contiguous");
  TORCH_CHECK(!slots.has_value() || (slots->scalar_type() == at::kLong && slots->dim() == 1 && slots->is_contiguous()),
              "slots must be [C] int64 contiguous");
  const int64_t S = spans.size(0), C = slots.has_value() ? slots->numel() : R;
  const int64_t* span = spans.const_data_ptr<int64_t>();
  const int64_t* slot = slots.has_value() ? slots->const_data_ptr<int64_t>() : nullptr;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(span[3 * s] >= 0 && span[3 * s] < T && span[3 * s + 1] >= 0 && span[3 * s + 2] > 0 &&
                    span[3 * s + 1] + span[3 * s + 2] <= C, "span ", s, " out of range");
    for (int64_t r = span[3 * s + 1]; slot && r < span[3 * s + 1] + span[3 * s + 2]; ++r)
      TORCH_CHECK(slot[r] >= 0 && slot[r] < R, "slot ", slot[r], " out of range (", R, " rows)");
  }
  const AttentionShape a{H / Hk, d, dv, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
                         value.stride(0), value.stride(1), out.stride(0), out.stride(1), static_cast<float>(scale)};
  const float* sink = sinks.has_value() ? sinks->const_data_ptr<float>() : nullptr;
  auto run = [&](const auto* q) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(q)>>;
    const T* k = key.const_data_ptr<T>();
    const T* v = value.const_data_ptr<T>();
    T* o = out.data_ptr<T>();
    for_each_chunk(S * Hk, [&](int64_t c) {
      const int64_t* sp = span + 3 * (c / Hk);
      const int64_t end = sp[1] + sp[2];
      const int64_t begin = window > 0 ? std::max(sp[1], end - window) : sp[1];
      attend(a, q, k, v, sink, slot, sp[0], c % Hk, begin, end, o);
    });
  };
  switch (dtype) {
    case at::kFloat: return run(query.const_data_ptr<float>());
    case at::kBFloat16: return run(query.const_data_ptr<c10::BFloat16>());
    case at::kHalf: return run(query.const_data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "query must be fp32, bf16 or fp16");
  }
}

// decode_attention on the model's own [1, heads, T, dim] tensors (transformers' attention layout, batch 1), into a
// new [1, T, H, dv] output of the query's dtype: the paged attention function's one call per layer in decode, with
// no indexing or allocation around it. Rows of tokens no span names (prompt chunks) are left for the caller.
Tensor decode_attention_rows(const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& spans,
                             double scale, int64_t window, const std::optional<Tensor>& sinks,
                             const std::optional<Tensor>& slots) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4 && query.size(0) == 1 && key.size(0) == 1 &&
                  value.size(0) == 1, "query, key and value must be [1, heads, rows, dim]");
  Tensor out = query.new_empty({1, query.size(2), query.size(1), value.size(3)});
  decode_attention(query.select(0, 0), key.select(0, 0), value.select(0, 0), spans, scale, window, sinks, slots,
                   out.select(0, 0));
  return out;
}

// The instruction set the kernel's decode paths use: 0 AVX2 (every CPU the kernel loads on), 1 AVX-512, 2 AVX-512
// with bf16 pair products (the default is the best the CPU has). ``choice`` >= 0 selects one; returns the one in use.
int64_t experts_isa(int64_t choice) {
  if (choice >= 0) {
    TORCH_CHECK(choice <= best_isa(), "this CPU lacks the instruction set ", choice, " (best: ", best_isa(), ")");
    g_isa.store(choice);
  }
  return g_isa.load();
}

// How many runs of rows each thread reads side by side at few tokens (1, 4 or kRuns; see "several runs of rows side
// by side"). ``choice`` >= 0 selects a count; returns the one in use.
int64_t experts_runs(int64_t choice) {
  if (choice >= 0) {
    TORCH_CHECK(choice == 1 || choice == 4 || choice == 8, "runs must be 1, 4 or 8, not ", choice);
    g_runs.store(choice);
  }
  return g_runs.load();
}

}  // namespace

TORCH_LIBRARY(moeserve, m) {
  m.def("experts_isa(int choice) -> int", &experts_isa);
  m.def("experts_runs(int choice) -> int", &experts_runs);
  m.def("dense(Tensor x, Tensor w, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("dense_rows(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("router_topk(Tensor hidden, Tensor weight, int k, bool renormalize, bool scores_in_logits_dtype) -> "
        "(Tensor, Tensor, Tensor, bool)");
  m.def("decode_attention_rows(Tensor query, Tensor key, Tensor value, Tensor spans, float scale, int window, "
        "Tensor? sinks, Tensor? slots) -> Tensor");
  m.def("kv_write(Tensor(a!) keys, Tensor(b!) values, Tensor key, Tensor value, Tensor slots) -> ()");
  m.def("rms_norm(Tensor x, Tensor w, float eps, bool round_first, Tensor(a!) out) -> ()");
  m.def("rms_norm_like(Tensor x, Tensor w, float eps, bool round_first) -> Tensor");
  m.def("route_topk(Tensor logits, int k, bool renormalize, Tensor(a!) scores, Tensor(b!) indices) -> bool");
  m.def("experts_best_isa() -> int", [] { return static_cast<int64_t>(best_isa()); });
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor spans, float scale, int window, "
        "Tensor? sinks, Tensor? slots, Tensor(a!) out) -> ()");
  m.def(
      "experts_group(Tensor hidden, Tensor token_ids, Tensor route_weights, int[] starts, int[] counts, "
      "Tensor[] gate_up, Tensor[] down, Tensor?[] gate_up_bias, Tensor?[] down_bias, bool transposed, "
      "int gate_kind, float alpha, float limit, Tensor(a!) out) -> ()");
  m.def(
      "experts_routed(Tensor hidden, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up, Tensor down, "
      "Tensor? gate_up_bias, Tensor? down_bias, bool transposed, int gate_kind, float alpha, float limit) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeserve, CPU, m) {
  m.impl("experts_group", &experts_group);
  m.impl("experts_routed", &experts_routed);
  m.impl("dense", &dense);
  m.impl("dense_rows", &dense_rows);
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_like", &rms_norm_like);
  m.impl("route_topk", &route_topk);
  m.impl("decode_attention", &decode_attention);
  m.impl("kv_write", &kv_write);
  m.impl("decode_attention_rows", &decode_attention_rows);
  m.impl("router_topk", &router_topk);
}
