// Fused multi-scale deformable attention (MSDA), CPU forward + backward.
//
// Shapes (all tensors contiguous, same floating dtype: float32 or float64):
//   value               (N, S, M, D)
//   spatial_shapes      (L, 2)  int64, (H, W) per level
//   level_start_index   (L,)    int64
//   sampling_locations  (N, Lq, M, L, P, 2)  normalised (x, y)
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
//
// Bilinear sampling with zeros outside the map, grid_sample(align_corners=False)
// pixel convention: pixel x = loc_x * W - 0.5, pixel y = loc_y * H - 0.5.
//
// Design
//  * One pass over (n, q, m) items, D-wide inner loops (vectorised with `omp simd`); no
//    temporary proportional to S in the forward pass.
//  * Parallel with OpenMP (the runtime torch itself uses, so torch.set_num_threads
//    applies), dynamic scheduling through an atomic work counter: robust when a core is
//    shared with other processes.
//  * The backward pass writes grad_value without atomics: work is partitioned into
//    (n, m, level) units, which own disjoint row sets grad_value[n, level rows, m, :].
//    When there are fewer units than threads, the queries of each unit are further split
//    into chunks with private (S, D) accumulation buffers that are reduced at the end.
//  * Each worker is compiled twice, for baseline x86-64 and for AVX2+FMA, and the
//    variant is chosen at run time from the CPU flags (no -march needed at build time).
//
// The operator schema lives in Python (torch.library, engine/ops/ms_deform_attn.py);
// this module only exposes `forward` and `backward` through pybind11.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MSDA_X86_DISPATCH 1
#define MSDA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define MSDA_X86_DISPATCH 0
#define MSDA_TARGET_AVX2
#endif

#if defined(__GNUC__)
#define MSDA_INLINE inline __attribute__((always_inline))
#else
#define MSDA_INLINE inline
#endif

namespace {

struct Levels {
  std::vector<int64_t> H, W, start;
};

Levels read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
  const int64_t L = spatial_shapes.size(0);
  const int64_t* ss = spatial_shapes.data_ptr<int64_t>();
  const int64_t* ls = level_start_index.data_ptr<int64_t>();
  Levels lv;
  lv.H.resize(L);
  lv.W.resize(L);
  lv.start.resize(L);
  for (int64_t l = 0; l < L; ++l) {
    lv.H[l] = ss[2 * l];
    lv.W[l] = ss[2 * l + 1];
    lv.start[l] = ls[l];
  }
  return lv;
}

bool cpu_has_avx2() {
#if MSDA_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// ------------------------------------------------------------------------------ samples
// One bilinear sample: the four corner pointers into value (or into a zero row for
// out-of-bounds corners), their weights, and their spatial index inside the level (-1
// when out of bounds). Corner order: (h_low, w_low), (h_low, w_high), (h_high, w_low),
// (h_high, w_high).
template <typename scalar_t>
struct Sample {
  const scalar_t* p[4];
  scalar_t w[4];
  int64_t sidx[4];
  scalar_t lh, lw;
  int64_t level;
  bool valid;
};

template <typename scalar_t>
MSDA_INLINE void make_sample(const scalar_t* level_base, const scalar_t* zero_row, int64_t H,
                             int64_t W, int64_t row_stride, scalar_t h_im, scalar_t w_im,
                             Sample<scalar_t>& s) {
  // NaN fails every comparison; +-inf and huge values fail the range test, so the
  // integer conversions below only ever see values in [-1, H) x [-1, W).
  s.valid = h_im >= scalar_t(-1) && h_im < scalar_t(H) && w_im >= scalar_t(-1) &&
            w_im < scalar_t(W);
  if (!s.valid) return;
  const scalar_t hf = std::floor(h_im);
  const scalar_t wf = std::floor(w_im);
  const int64_t h_low = static_cast<int64_t>(hf);
  const int64_t w_low = static_cast<int64_t>(wf);
  const int64_t h_high = h_low + 1;
  const int64_t w_high = w_low + 1;
  const scalar_t lh = h_im - hf;
  const scalar_t lw = w_im - wf;
  const scalar_t hh = scalar_t(1) - lh;
  const scalar_t hw = scalar_t(1) - lw;
  s.lh = lh;
  s.lw = lw;
  s.w[0] = hh * hw;
  s.w[1] = hh * lw;
  s.w[2] = lh * hw;
  s.w[3] = lh * lw;
  const bool h0 = h_low >= 0, h1 = h_high <= H - 1;
  const bool w0 = w_low >= 0, w1 = w_high <= W - 1;
  const bool ok[4] = {h0 && w0, h0 && w1, h1 && w0, h1 && w1};
  const int64_t hs[4] = {h_low, h_low, h_high, h_high};
  const int64_t ws[4] = {w_low, w_high, w_low, w_high};
  for (int c = 0; c < 4; ++c) {
    if (ok[c]) {
      s.sidx[c] = hs[c] * W + ws[c];
      s.p[c] = level_base + s.sidx[c] * row_stride;
    } else {
      s.sidx[c] = -1;
      s.p[c] = zero_row;
    }
  }
}

template <int rw>
MSDA_INLINE void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, rw, 3);
}

// The P samples of level l of one (n, q, m) item (smp[0..P)), with their value rows
// prefetched so that the D-wide loops that follow overlap the memory latency of every
// sample instead of paying it one by one.
template <typename scalar_t>
MSDA_INLINE void make_level_samples(const scalar_t* value_nm, const Levels& lv,
                                    const scalar_t* loc_i, int64_t l, int64_t P,
                                    int64_t row_stride, int64_t D, const scalar_t* zero_row,
                                    Sample<scalar_t>* smp) {
  const int64_t H = lv.H[l], W = lv.W[l];
  const scalar_t* level_base = value_nm + lv.start[l] * row_stride;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t lp = l * P + p;
    const scalar_t h_im = loc_i[2 * lp + 1] * scalar_t(H) - scalar_t(0.5);
    const scalar_t w_im = loc_i[2 * lp] * scalar_t(W) - scalar_t(0.5);
    Sample<scalar_t>& s = smp[p];
    s.level = l;
    make_sample(level_base, zero_row, H, W, row_stride, h_im, w_im, s);
    if (s.valid) {
      for (int c = 0; c < 4; ++c)
        if (s.sidx[c] >= 0) prefetch_row<0>(s.p[c], D * int64_t(sizeof(scalar_t)));
    }
  }
}

// All L * P samples of one item (smp[0..L*P)).
template <typename scalar_t>
MSDA_INLINE void make_samples(const scalar_t* value_nm, const Levels& lv,
                              const scalar_t* loc_i, int64_t L, int64_t P,
                              int64_t row_stride, int64_t D, const scalar_t* zero_row,
                              Sample<scalar_t>* smp) {
  for (int64_t l = 0; l < L; ++l)
    make_level_samples(value_nm, lv, loc_i, l, P, row_stride, D, zero_row, smp + l * P);
}

// ------------------------------------------------------------------------------ forward
template <typename scalar_t>
struct FwdArgs {
  const scalar_t* value;
  const scalar_t* loc;
  const scalar_t* attn;
  scalar_t* out;
  const Levels* lv;
  int64_t N, S, M, D, Lq, L, P;
  std::atomic<int64_t>* next;  // dynamic work counter over (n, q, m) items
  int64_t chunk;
};

// DC > 0: the channel count D is the compile-time constant DC (fully unrolled D loops);
// DC == 0: D is read at run time.
template <typename scalar_t, int DC>
MSDA_INLINE void forward_worker_body(const FwdArgs<scalar_t>& a) {
  const int64_t D = DC > 0 ? DC : a.D;
  const int64_t M = a.M, Lq = a.Lq, L = a.L, P = a.P, LP = L * P;
  const int64_t row_stride = M * D;  // distance between two spatial positions
  const int64_t total = a.N * Lq * M;
  std::vector<scalar_t> zero_row(D, scalar_t(0));
  std::vector<scalar_t> acc_buf(D);
  std::vector<Sample<scalar_t>> smp(LP);
  scalar_t* __restrict__ acc = acc_buf.data();
  for (;;) {
    const int64_t begin = a.next->fetch_add(a.chunk, std::memory_order_relaxed);
    if (begin >= total) break;
    const int64_t end = std::min(total, begin + a.chunk);
    for (int64_t i = begin; i < end; ++i) {
      // i enumerates (n, q, m) in output order.
      const int64_t m = i % M;
      const int64_t n = i / (Lq * M);
      const scalar_t* loc_i = a.loc + i * (LP * 2);
      const scalar_t* attn_i = a.attn + i * LP;
      const scalar_t* value_nm = a.value + n * a.S * row_stride + m * D;
      make_samples(value_nm, *a.lv, loc_i, L, P, row_stride, D, zero_row.data(), smp.data());
      for (int64_t d = 0; d < D; ++d) acc[d] = scalar_t(0);
      for (int64_t lp = 0; lp < LP; ++lp) {
        const Sample<scalar_t>& s = smp[lp];
        if (!s.valid) continue;
        const scalar_t aw = attn_i[lp];
        const scalar_t c0 = aw * s.w[0], c1 = aw * s.w[1], c2 = aw * s.w[2], c3 = aw * s.w[3];
        const scalar_t* __restrict__ p0 = s.p[0];
        const scalar_t* __restrict__ p1 = s.p[1];
        const scalar_t* __restrict__ p2 = s.p[2];
        const scalar_t* __restrict__ p3 = s.p[3];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          acc[d] += c0 * p0[d] + c1 * p1[d] + c2 * p2[d] + c3 * p3[d];
        }
      }
      scalar_t* __restrict__ o = a.out + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d];
    }
  }
}

template <typename scalar_t, int DC>
void forward_worker_generic(const FwdArgs<scalar_t>& a) {
  forward_worker_body<scalar_t, DC>(a);
}

template <typename scalar_t, int DC>
MSDA_TARGET_AVX2 void forward_worker_avx2(const FwdArgs<scalar_t>& a) {
  forward_worker_body<scalar_t, DC>(a);
}

// ----------------------------------------------------------------------------- backward
template <typename scalar_t>
struct BwdArgs {
  const scalar_t* value;
  const scalar_t* loc;
  const scalar_t* attn;
  const scalar_t* grad_out;
  scalar_t* grad_value;
  scalar_t* grad_loc;
  scalar_t* grad_attn;
  scalar_t* buf;  // private grad_value buffers (chunks - 1, pairs, S, D), may be null
  const Levels* lv;
  int64_t N, S, M, D, Lq, L, P;
  int64_t chunks, q_per_chunk;
  std::atomic<int64_t>* next;  // dynamic work counter over (pair, level, chunk) tasks
};

// Tasks are (n, m, level, query chunk): the grad_value rows of one level of one (n, m)
// pair belong to exactly one task per chunk, so no two threads ever write the same row.
// Splitting by level as well as by pair gives L times more (and smaller) tasks for the
// dynamic scheduler, and keeps each task's value / grad_value working set to one level.
template <typename scalar_t, int DC>
MSDA_INLINE void backward_worker_body(const BwdArgs<scalar_t>& a) {
  const int64_t D = DC > 0 ? DC : a.D;
  const int64_t S = a.S, M = a.M, Lq = a.Lq, L = a.L, P = a.P, LP = L * P;
  const Levels& lv = *a.lv;
  const int64_t row_stride = M * D;
  const int64_t pairs = a.N * M;
  const int64_t tasks = pairs * L * a.chunks;
  const int64_t esz = int64_t(sizeof(scalar_t));
  std::vector<scalar_t> zero_row(D, scalar_t(0));
  // Four distinct write-only rows that absorb the (zero-weighted) scatter of
  // out-of-bounds corners, so that the D loop below needs no per-corner branches.
  std::vector<scalar_t> trash(4 * D, scalar_t(0));
  std::vector<Sample<scalar_t>> smp(P);
  std::vector<scalar_t*> gvp(4 * P);
  for (;;) {
    const int64_t t = a.next->fetch_add(1, std::memory_order_relaxed);
    if (t >= tasks) break;
    const int64_t c = t % a.chunks, unit = t / a.chunks;
    const int64_t l = unit % L, pair = unit / L;
    const int64_t n = pair / M, m = pair % M;
    const int64_t q0 = c * a.q_per_chunk, q1 = std::min(Lq, q0 + a.q_per_chunk);
    const int64_t H = lv.H[l], W = lv.W[l], level_rows = H * W;
    // Chunk 0 writes grad_value directly (and zero-fills its rows first: grad_value is
    // allocated uninitialised); the others write their zero-initialised private buffer.
    scalar_t* gv_level;
    int64_t gv_stride;
    if (c == 0) {
      gv_stride = row_stride;
      gv_level = a.grad_value + (n * S + lv.start[l]) * row_stride + m * D;
      for (int64_t s = 0; s < level_rows; ++s) {
        scalar_t* __restrict__ row = gv_level + s * row_stride;
        for (int64_t d = 0; d < D; ++d) row[d] = scalar_t(0);
      }
    } else {
      gv_stride = D;
      gv_level = a.buf + (((c - 1) * pairs + pair) * S + lv.start[l]) * D;
    }
    const scalar_t* value_nm = a.value + n * S * row_stride + m * D;
    const scalar_t sW = scalar_t(W), sH = scalar_t(H);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t i = (n * Lq + q) * M + m;  // (n, q, m) index
      const scalar_t* __restrict__ go = a.grad_out + i * D;
      const scalar_t* loc_i = a.loc + i * (LP * 2);
      const scalar_t* attn_l = a.attn + i * LP + l * P;
      scalar_t* gloc_l = a.grad_loc + i * (LP * 2) + l * P * 2;
      scalar_t* gattn_l = a.grad_attn + i * LP + l * P;
      if (q + 1 < q1) {
        // Items of one (n, m) pair are M items apart: their per-item rows form a strided
        // stream that the hardware prefetcher does not follow. Fetch the next one now.
        const int64_t j = i + M;
        prefetch_row<0>(a.loc + j * (LP * 2) + l * P * 2, P * 2 * esz);
        prefetch_row<0>(a.attn + j * LP + l * P, P * esz);
        prefetch_row<0>(a.grad_out + j * D, D * esz);
        prefetch_row<1>(a.grad_loc + j * (LP * 2) + l * P * 2, P * 2 * esz);
        prefetch_row<1>(a.grad_attn + j * LP + l * P, P * esz);
      }
      make_level_samples(value_nm, lv, loc_i, l, P, row_stride, D, zero_row.data(), smp.data());
      for (int64_t p = 0; p < P; ++p) {
        const Sample<scalar_t>& s = smp[p];
        if (!s.valid) continue;
        for (int k = 0; k < 4; ++k) {
          if (s.sidx[k] >= 0) {
            gvp[4 * p + k] = gv_level + s.sidx[k] * gv_stride;
            prefetch_row<1>(gvp[4 * p + k], D * esz);
          } else {
            gvp[4 * p + k] = trash.data() + k * D;
          }
        }
      }
      for (int64_t p = 0; p < P; ++p) {
        const Sample<scalar_t>& s = smp[p];
        if (!s.valid) {
          gloc_l[2 * p] = scalar_t(0);
          gloc_l[2 * p + 1] = scalar_t(0);
          gattn_l[p] = scalar_t(0);
          continue;
        }
        const scalar_t lh = s.lh, lw = s.lw;
        const scalar_t hh = scalar_t(1) - lh, hw = scalar_t(1) - lw;
        const scalar_t aw = attn_l[p];
        const scalar_t w0 = s.w[0], w1 = s.w[1], w2 = s.w[2], w3 = s.w[3];
        const scalar_t c0 = aw * w0, c1 = aw * w1, c2 = aw * w2, c3 = aw * w3;
        const scalar_t* __restrict__ p0 = s.p[0];
        const scalar_t* __restrict__ p1 = s.p[1];
        const scalar_t* __restrict__ p2 = s.p[2];
        const scalar_t* __restrict__ p3 = s.p[3];
        scalar_t* __restrict__ g0 = gvp[4 * p + 0];
        scalar_t* __restrict__ g1 = gvp[4 * p + 1];
        scalar_t* __restrict__ g2 = gvp[4 * p + 2];
        scalar_t* __restrict__ g3 = gvp[4 * p + 3];
        // The three scalar gradients are linear in the dot products <grad_out, corner_k>:
        // one FMA per corner and channel.
        scalar_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t g = go[d];
          dot0 += g * p0[d];
          dot1 += g * p1[d];
          dot2 += g * p2[d];
          dot3 += g * p3[d];
          g0[d] += c0 * g;
          g1[d] += c1 * g;
          g2[d] += c2 * g;
          g3[d] += c3 * g;
        }
        const scalar_t ga = w0 * dot0 + w1 * dot1 + w2 * dot2 + w3 * dot3;
        const scalar_t gh = hw * (dot2 - dot0) + lw * (dot3 - dot1);  // d/d h_im
        const scalar_t gw = hh * (dot1 - dot0) + lh * (dot3 - dot2);  // d/d w_im
        gattn_l[p] = ga;
        gloc_l[2 * p] = aw * gw * sW;
        gloc_l[2 * p + 1] = aw * gh * sH;
      }
    }
  }
}

template <typename scalar_t, int DC>
void backward_worker_generic(const BwdArgs<scalar_t>& a) {
  backward_worker_body<scalar_t, DC>(a);
}

template <typename scalar_t, int DC>
MSDA_TARGET_AVX2 void backward_worker_avx2(const BwdArgs<scalar_t>& a) {
  backward_worker_body<scalar_t, DC>(a);
}

// Worker for (dtype, D, CPU): float32 gets unrolled variants for the common head dims.
template <typename scalar_t>
using FwdFn = void (*)(const FwdArgs<scalar_t>&);
template <typename scalar_t>
using BwdFn = void (*)(const BwdArgs<scalar_t>&);

template <typename scalar_t>
FwdFn<scalar_t> pick_forward(int64_t D) {
  const bool avx2 = cpu_has_avx2();
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (D == 32) return avx2 ? &forward_worker_avx2<float, 32> : &forward_worker_generic<float, 32>;
    if (D == 64) return avx2 ? &forward_worker_avx2<float, 64> : &forward_worker_generic<float, 64>;
  }
  return avx2 ? &forward_worker_avx2<scalar_t, 0> : &forward_worker_generic<scalar_t, 0>;
}

template <typename scalar_t>
BwdFn<scalar_t> pick_backward(int64_t D) {
  const bool avx2 = cpu_has_avx2();
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (D == 32) return avx2 ? &backward_worker_avx2<float, 32> : &backward_worker_generic<float, 32>;
    if (D == 64) return avx2 ? &backward_worker_avx2<float, 64> : &backward_worker_generic<float, 64>;
  }
  return avx2 ? &backward_worker_avx2<scalar_t, 0> : &backward_worker_generic<scalar_t, 0>;
}

// ------------------------------------------------------------------------------ drivers
// Runs fn(args) on every OpenMP thread (or inline when the job is small).
// Thread count: torch's intra-op setting (torch.set_num_threads), applied to the calling
// thread's OpenMP ICV exactly as at::parallel_for does.
inline int64_t max_threads() {
  at::internal::lazy_init_num_threads();
  return omp_get_max_threads();
}

template <typename Args>
void run_parallel(void (*fn)(const Args&), const Args& args, bool parallel) {
  if (!parallel || omp_in_parallel() || max_threads() == 1) {
    fn(args);
    return;
  }
#pragma omp parallel
  fn(args);
}

constexpr int64_t kParallelWork = 1 << 15;  // multiply-adds below which we stay serial

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const Levels& lv, const scalar_t* loc,
                    const scalar_t* attn, scalar_t* out, int64_t N, int64_t S, int64_t M,
                    int64_t D, int64_t Lq, int64_t L, int64_t P) {
  std::atomic<int64_t> next{0};
  FwdArgs<scalar_t> a{value, loc, attn, out, &lv, N, S, M, D, Lq, L, P, &next, 32};
  run_parallel<FwdArgs<scalar_t>>(pick_forward<scalar_t>(D), a, N * Lq * M * L * P * D > kParallelWork);
}

template <typename scalar_t>
void backward_kernel(const scalar_t* value, const Levels& lv, const scalar_t* loc,
                     const scalar_t* attn, const scalar_t* grad_out, scalar_t* grad_value,
                     scalar_t* grad_loc, scalar_t* grad_attn, int64_t N, int64_t S, int64_t M,
                     int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t pairs = N * M;
  if (pairs == 0 || Lq == 0) return;
  const bool parallel = pairs * Lq * L * P * D > kParallelWork && !omp_in_parallel();
  const int64_t threads = parallel ? max_threads() : 1;
  // Split the queries of each (pair, level) unit only when the units alone cannot keep the
  // threads busy.
  const int64_t units = pairs * L;
  int64_t chunks = 1;
  if (units < threads) chunks = std::min<int64_t>(Lq, (threads + units - 1) / units);
  const int64_t q_per_chunk = (Lq + chunks - 1) / chunks;
  chunks = (Lq + q_per_chunk - 1) / q_per_chunk;  // no empty chunk
  std::vector<scalar_t> buf(static_cast<size_t>((chunks - 1) * pairs * S * D), scalar_t(0));
  std::atomic<int64_t> next{0};
  BwdArgs<scalar_t> a{value, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
                      buf.empty() ? nullptr : buf.data(), &lv, N, S, M, D, Lq, L, P,
                      chunks, q_per_chunk, &next};
  run_parallel<BwdArgs<scalar_t>>(pick_backward<scalar_t>(D), a, parallel);
  if (chunks == 1) return;
  // Reduce private buffers into grad_value, parallel over (pair, s): disjoint rows.
  const int64_t row_stride = M * D;
  const int64_t rows = pairs * S;
  const scalar_t* bp = buf.data();
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pair = r / S, s = r % S;
    const int64_t n = pair / M, m = pair % M;
    scalar_t* __restrict__ dst = grad_value + (n * S + s) * row_stride + m * D;
    for (int64_t c = 1; c < chunks; ++c) {
      const scalar_t* __restrict__ src = bp + (((c - 1) * pairs + pair) * S + s) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
    }
  }
}

// --------------------------------------------------------------------------- entry points
void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& loc,
                  const at::Tensor& attn) {
  TORCH_CHECK(value.device().is_cpu() && spatial_shapes.device().is_cpu() &&
                  level_start_index.device().is_cpu() && loc.device().is_cpu() &&
                  attn.device().is_cpu(),
              "ms_deform_attn (CPU kernel): all inputs must be CPU tensors");
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, M, D)");
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "value must be float32 or float64, got ", value.scalar_type());
  TORCH_CHECK(loc.scalar_type() == value.scalar_type(),
              "sampling_locations must have the dtype of value");
  TORCH_CHECK(attn.scalar_type() == value.scalar_type(),
              "attention_weights must have the dtype of value");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "spatial_shapes must be int64");
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong,
              "level_start_index must be int64");
  TORCH_CHECK(value.is_contiguous() && spatial_shapes.is_contiguous() &&
                  level_start_index.is_contiguous() && loc.is_contiguous() &&
                  attn.is_contiguous(),
              "all inputs must be contiguous");
  const int64_t N = value.size(0), M = value.size(2);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "spatial_shapes must be (L, 2)");
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "level_start_index must be (L,)");
  TORCH_CHECK(loc.dim() == 6 && loc.size(0) == N && loc.size(2) == M && loc.size(3) == L &&
                  loc.size(5) == 2,
              "sampling_locations must be (N, Lq, M, L, P, 2)");
  TORCH_CHECK(attn.dim() == 5 && attn.size(0) == N && attn.size(1) == loc.size(1) &&
                  attn.size(2) == M && attn.size(3) == L && attn.size(4) == loc.size(4),
              "attention_weights must be (N, Lq, M, L, P)");
  // Memory safety: every level must lie inside [0, S).
  const int64_t S = value.size(1);
  const Levels lv = read_levels(spatial_shapes, level_start_index);
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(lv.H[l] > 0 && lv.W[l] > 0, "spatial_shapes must be positive");
    TORCH_CHECK(lv.start[l] >= 0 && lv.start[l] + lv.H[l] * lv.W[l] <= S, "level ", l,
                " does not fit inside value's S dimension");
  }
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
               attention_weights);
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3),
                P = sampling_locations.size(4);
  at::Tensor out = at::empty({N, Lq, M * D}, value.options());
  if (out.numel() == 0) return out;
  const Levels lv = read_levels(spatial_shapes, level_start_index);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), lv,
                             sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                             N, S, M, D, Lq, L, P);
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& grad_output,
                                                const at::Tensor& value,
                                                const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
               attention_weights);
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3),
                P = sampling_locations.size(4);
  TORCH_CHECK(grad_output.device().is_cpu() &&
                  grad_output.scalar_type() == value.scalar_type(),
              "grad_output must be a CPU tensor with the dtype of value");
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.numel() == N * Lq * M * D,
              "grad_output must be contiguous with shape (N, Lq, M * D)");
  if (N * Lq * M * D * L * P == 0)
    return {at::zeros_like(value), at::zeros_like(sampling_locations),
            at::zeros_like(attention_weights)};
  // Every element of the three gradients is written by the kernel (grad_value slices are
  // zero-filled by the task that owns them, in parallel).
  at::Tensor grad_value = at::empty_like(value);
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  const Levels lv = read_levels(spatial_shapes, level_start_index);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(value.data_ptr<scalar_t>(), lv,
                              sampling_locations.data_ptr<scalar_t>(),
                              attention_weights.data_ptr<scalar_t>(),
                              grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
                              grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), N,
                              S, M, D, Lq, L, P);
  });
  return {grad_value, grad_loc, grad_attn};
}

std::string isa() { return cpu_has_avx2() ? "avx2+fma" : "x86-64 baseline"; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused multi-scale deformable attention, CPU (float32/float64, OpenMP)";
  m.def("forward", &ms_deform_attn_forward,
        "MSDA forward: (value, spatial_shapes, level_start_index, sampling_locations, "
        "attention_weights) -> (N, Lq, M*D)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &ms_deform_attn_backward,
        "MSDA backward: (grad_output, value, spatial_shapes, level_start_index, "
        "sampling_locations, attention_weights) -> [grad_value, grad_locations, "
        "grad_weights]",
        py::call_guard<py::gil_scoped_release>());
  m.def("isa", &isa, "instruction set of the kernel variant selected for this CPU");
}
