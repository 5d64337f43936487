// CPU kernel templates of the revdeq_native ops (the exact ones: exact_impl.h). Included by kernels_default.cpp and
// kernels_avx2.cpp, each after defining CPU_CAPABILITY (DEFAULT or AVX2): the code below
// lands in revdeq::cpu::<CPU_CAPABILITY> and uses at::vec::<CPU_CAPABILITY>::Vectorized.
//
// Design
// - Arithmetic in acc_t: double for a double state, else float. A "block" is two
//   Vectorized<acc_t> (16 floats or 8 doubles with 256-bit vectors); load_block/store_block
//   convert from/to the storage dtype (bf16/fp16 through at::vec's converters; float<->double
//   through a small aligned buffer that the compiler vectorizes).
// - A range's tail (< one block) goes through the same vector code on a zero-padded copy, so
//   every element gets the same bits whichever thread, range split or tail position it falls
//   to: results never depend on the thread count.
// - Elementwise ops: at::parallel_for over elements, grain kGrain (ATen's GRAIN_SIZE).
// - Per-sample sums: each row is cut into fixed chunks of kChunk elements, (row, chunk) pairs
//   are the parallel tasks, so one huge row (B = 1) spreads over all threads as well as many
//   small rows do. Chunk partials are doubles, summed per row in chunk order afterwards:
//   deterministic. Inside a chunk, squares accumulate in acc_t vector lanes for kFlushBlocks
//   blocks (16 terms per lane) and are then folded into double lanes, so float32 sums stay
//   within a few ulps of the exact value for any row length.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT or AVX2) before including kernels_impl.h"
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace revdeq::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename state_t>
using acc_t_of = std::conditional_t<std::is_same_v<state_t, double>, double, float>;

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

constexpr int64_t kGrain = 32768;     // elements per thread at least
constexpr int64_t kChunk = 16384;     // elements per partial sum of a row
constexpr int64_t kFlushBlocks = 16;  // blocks summed in acc_t lanes before a fold into double

template <typename acc_t>
constexpr int64_t kBlock = 2 * Vectorized<acc_t>::size();

static_assert(Vectorized<c10::BFloat16>::size() == kBlock<float> &&
                  Vectorized<c10::Half>::size() == kBlock<float>,
              "load_to_float/convert_from_float move one 16-bit vector = two float vectors");
static_assert(kChunk % kBlock<float> == 0 && kChunk % kBlock<double> == 0);

// kBlock<acc_t> elements of src_t -> two Vectorized<acc_t>.
template <typename acc_t, typename src_t>
C10_ALWAYS_INLINE void load_block(const src_t* p, Vectorized<acc_t>& lo, Vectorized<acc_t>& hi) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  if constexpr (std::is_same_v<src_t, acc_t>) {
    lo = Vec::loadu(p);
    hi = Vec::loadu(p + W);
  } else if constexpr (std::is_same_v<acc_t, float> && is_reduced_v<src_t>) {
    at::vec::load_to_float<src_t>(p, lo, hi);
#ifdef CPU_CAPABILITY_AVX2
  } else if constexpr (std::is_same_v<acc_t, double> && std::is_same_v<src_t, float>) {
    // float64 states with float32 f: the hot mix of the original's language model.
    lo = Vec(_mm256_cvtps_pd(_mm_loadu_ps(p)));
    hi = Vec(_mm256_cvtps_pd(_mm_loadu_ps(p + W)));
#endif
  } else {  // float <-> double, bf16/fp16 -> double
    __at_align__ acc_t buf[2 * W];
    for (int64_t k = 0; k < 2 * W; ++k) {
      buf[k] = static_cast<acc_t>(p[k]);
    }
    lo = Vec::loadu(buf);
    hi = Vec::loadu(buf + W);
  }
}

// Two Vectorized<acc_t> -> kBlock<acc_t> elements of dst_t (round to nearest even).
template <typename acc_t, typename dst_t>
C10_ALWAYS_INLINE void store_block(dst_t* p, const Vectorized<acc_t>& lo,
                                   const Vectorized<acc_t>& hi) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  if constexpr (std::is_same_v<dst_t, acc_t>) {
    lo.store(p);
    hi.store(p + W);
  } else if constexpr (std::is_same_v<acc_t, float> && is_reduced_v<dst_t>) {
    at::vec::convert_from_float<dst_t>(lo, hi).store(p);
#ifdef CPU_CAPABILITY_AVX2
  } else if constexpr (std::is_same_v<acc_t, double> && std::is_same_v<dst_t, float>) {
    _mm_storeu_ps(p, _mm256_cvtpd_ps(lo));  // rounds to nearest even, like static_cast
    _mm_storeu_ps(p + W, _mm256_cvtpd_ps(hi));
#endif
  } else {  // same rounding as Tensor.copy_: double -> bf16/fp16 goes through float
    __at_align__ acc_t buf[2 * W];
    lo.store(buf);
    hi.store(buf + W);
    for (int64_t k = 0; k < 2 * W; ++k) {
      p[k] = static_cast<dst_t>(buf[k]);
    }
  }
}

// The relax update of one block: s <- (1-b) s + b f (fused multiply-add where the ISA has
// one), or the inverse s <- (s - b f) / (1-b). Shared by relax_/unrelax_ and
// relax_residual_, so both write the same bits.
template <bool kInverse, typename state_t, typename f_t, typename acc_t = acc_t_of<state_t>>
C10_ALWAYS_INLINE void relax_block(state_t* s, const f_t* f, const Vectorized<acc_t>& one_minus_b,
                                   const Vectorized<acc_t>& b) {
  Vectorized<acc_t> s0, s1, f0, f1;
  load_block(s, s0, s1);
  load_block(f, f0, f1);
  if constexpr (kInverse) {
    s0 = (s0 - f0 * b) / one_minus_b;
    s1 = (s1 - f1 * b) / one_minus_b;
  } else {
    s0 = at::vec::fmadd(s0, one_minus_b, f0 * b);
    s1 = at::vec::fmadd(s1, one_minus_b, f1 * b);
  }
  store_block(s, s0, s1);
}

template <bool kInverse, typename state_t, typename f_t, typename acc_t = acc_t_of<state_t>>
void relax_range(state_t* s, const f_t* f, int64_t begin, int64_t end,
                 const Vectorized<acc_t>& one_minus_b, const Vectorized<acc_t>& b) {
  constexpr int64_t B = kBlock<acc_t>;
  int64_t i = begin;
  for (; i + B <= end; i += B) {
    relax_block<kInverse>(s + i, f + i, one_minus_b, b);
  }
  if (i < end) {  // tail: same vector code on a zero-padded copy
    const int64_t m = end - i;
    state_t sb[B] = {};
    f_t fb[B] = {};
    std::copy_n(s + i, m, sb);
    std::copy_n(f + i, m, fb);
    relax_block<kInverse>(sb, fb, one_minus_b, b);
    std::copy_n(sb, m, s + i);
  }
}

// Reads s, f; writes s: 3 streams, like a.add_(f).
template <bool kInverse, typename state_t, typename f_t>
void relax_loop(state_t* s, const f_t* f, int64_t n, double beta) {
  using acc_t = acc_t_of<state_t>;
  const Vectorized<acc_t> one_minus_b(static_cast<acc_t>(1.0 - beta));
  const Vectorized<acc_t> b(static_cast<acc_t>(beta));
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    relax_range<kInverse>(s, f, begin, end, one_minus_b, b);
  });
}

// Adds one block's (z - f)^2 and f^2 into the acc_t accumulators; with kUpdate also relaxes
// y <- (1-b) y + b f from the same load of f.
template <bool kUpdate, typename state_t, typename f_t, typename acc_t = acc_t_of<state_t>>
C10_ALWAYS_INLINE void residual_block(state_t* y, const state_t* z, const f_t* f,
                                      const Vectorized<acc_t>& one_minus_b,
                                      const Vectorized<acc_t>& b, Vectorized<acc_t> (&acc)[4]) {
  Vectorized<acc_t> z0, z1, f0, f1;
  load_block(z, z0, z1);
  load_block(f, f0, f1);
  if constexpr (kUpdate) {
    Vectorized<acc_t> y0, y1;
    load_block(y, y0, y1);
    y0 = at::vec::fmadd(y0, one_minus_b, f0 * b);  // = relax_block<false>
    y1 = at::vec::fmadd(y1, one_minus_b, f1 * b);
    store_block(y, y0, y1);
  }
  const Vectorized<acc_t> d0 = z0 - f0, d1 = z1 - f1;
  acc[0] = at::vec::fmadd(d0, d0, acc[0]);
  acc[1] = at::vec::fmadd(d1, d1, acc[1]);
  acc[2] = at::vec::fmadd(f0, f0, acc[2]);
  acc[3] = at::vec::fmadd(f1, f1, acc[3]);
}

// sums[0] = sum (z - f)^2, sums[1] = sum f^2 over len contiguous elements (one row chunk).
template <bool kUpdate, typename state_t, typename f_t, typename acc_t = acc_t_of<state_t>>
void chunk_sums(state_t* y, const state_t* z, const f_t* f, int64_t len,
                const Vectorized<acc_t>& one_minus_b, const Vectorized<acc_t>& b, double* sums) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size(), B = kBlock<acc_t>;
  double lanes_res[B] = {}, lanes_f[B] = {};
  auto fold = [&](const Vec (&acc)[4]) {
    __at_align__ acc_t buf[B];
    acc[0].store(buf);
    acc[1].store(buf + W);
    for (int64_t k = 0; k < B; ++k) lanes_res[k] += static_cast<double>(buf[k]);
    acc[2].store(buf);
    acc[3].store(buf + W);
    for (int64_t k = 0; k < B; ++k) lanes_f[k] += static_cast<double>(buf[k]);
  };
  const int64_t body = len - len % B;
  int64_t i = 0;
  while (i < body) {
    Vec acc[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
    const int64_t stop = std::min(body, i + kFlushBlocks * B);
    for (; i < stop; i += B) {
      residual_block<kUpdate>(kUpdate ? y + i : nullptr, z + i, f + i, one_minus_b, b, acc);
    }
    fold(acc);
  }
  if (i < len) {  // tail: zero padding adds 0 to both sums
    const int64_t m = len - i;
    state_t yb[B] = {}, zb[B] = {};
    f_t fb[B] = {};
    if constexpr (kUpdate) std::copy_n(y + i, m, yb);
    std::copy_n(z + i, m, zb);
    std::copy_n(f + i, m, fb);
    Vec acc[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
    residual_block<kUpdate>(yb, zb, fb, one_minus_b, b, acc);
    fold(acc);
    if constexpr (kUpdate) std::copy_n(yb, m, y + i);
  }
  double res = 0.0, sq_f = 0.0;
  for (int64_t k = 0; k < B; ++k) {
    res += lanes_res[k];
    sq_f += lanes_f[k];
  }
  sums[0] = res;
  sums[1] = sq_f;
}

// Rows shorter than one block: the update runs flat over the rows' elements (the relax_
// code, so it writes the same bits), the sums run per row in double. Rows are taken
// kChunk elements at a time so the second read of f hits the cache.
template <bool kUpdate, typename state_t, typename f_t, typename acc_t = acc_t_of<state_t>>
void short_rows(state_t* y, const state_t* z, const f_t* f, int64_t row_begin, int64_t row_end,
                int64_t cols, const Vectorized<acc_t>& one_minus_b, const Vectorized<acc_t>& b,
                acc_t* out_res, acc_t* out_f) {
  const int64_t rows_per_step = std::max<int64_t>(1, kChunk / std::max<int64_t>(cols, 1));
  for (int64_t r0 = row_begin; r0 < row_end; r0 += rows_per_step) {
    const int64_t r1 = std::min(row_end, r0 + rows_per_step);
    if constexpr (kUpdate) relax_range<false>(y, f, r0 * cols, r1 * cols, one_minus_b, b);
    for (int64_t r = r0; r < r1; ++r) {
      double res = 0.0, sq_f = 0.0;
      for (int64_t j = r * cols; j < (r + 1) * cols; ++j) {
        const acc_t fj = static_cast<acc_t>(f[j]);
        const double d = static_cast<double>(static_cast<acc_t>(z[j]) - fj);
        res += d * d;
        sq_f += static_cast<double>(fj) * static_cast<double>(fj);
      }
      out_res[r] = static_cast<acc_t>(res);
      out_f[r] = static_cast<acc_t>(sq_f);
    }
  }
}

// Reads z, f (and y); writes y when kUpdate: 2 streams (4 with the update).
template <bool kUpdate, typename state_t, typename f_t, typename acc_t = acc_t_of<state_t>>
void residual_loop(state_t* y, const state_t* z, const f_t* f, int64_t rows, int64_t cols,
                   double beta, acc_t* out_res, acc_t* out_f) {
  const Vectorized<acc_t> one_minus_b(static_cast<acc_t>(1.0 - beta));
  const Vectorized<acc_t> b(static_cast<acc_t>(beta));
  if (cols < kBlock<acc_t>) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      short_rows<kUpdate>(y, z, f, r0, r1, cols, one_minus_b, b, out_res, out_f);
    });
    return;
  }
  const int64_t chunks = (cols + kChunk - 1) / kChunk;
  const int64_t tasks = rows * chunks;
  std::vector<double> partial(chunks > 1 ? 2 * tasks : 0);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::min(cols, kChunk));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / chunks, chunk = t % chunks;
      const int64_t start = row * cols + chunk * kChunk;
      const int64_t len = std::min(kChunk, cols - chunk * kChunk);
      double sums[2];
      chunk_sums<kUpdate>(kUpdate ? y + start : nullptr, z + start, f + start, len, one_minus_b,
                          b, sums);
      if (chunks == 1) {
        out_res[row] = static_cast<acc_t>(sums[0]);
        out_f[row] = static_cast<acc_t>(sums[1]);
      } else {
        partial[2 * t] = sums[0];
        partial[2 * t + 1] = sums[1];
      }
    }
  });
  if (chunks > 1) {  // second, deterministic pass: chunk partials in order
    for (int64_t row = 0; row < rows; ++row) {
      double res = 0.0, sq_f = 0.0;
      for (int64_t t = row * chunks; t < (row + 1) * chunks; ++t) {
        res += partial[2 * t];
        sq_f += partial[2 * t + 1];
      }
      out_res[row] = static_cast<acc_t>(res);
      out_f[row] = static_cast<acc_t>(sq_f);
    }
  }
}

// Reads grad, vjp; writes grad, cotangent: 1 pass, 4 tensor-sized memory streams.
// The eager composites are 3 passes and 7 streams each (plus an allocation for cot):
//   y half-step (scale_after):  gy += v (3 streams); cot = b * gy (2); gy *= 1-b (2)
//   z half-step:                gz *= 1-b (2);       gz += v (3);      cot = b * gz (2)
template <bool kScaleAfter, typename grad_t, typename vjp_t, typename cot_t>
void adjoint_loop(grad_t* g, const vjp_t* v, cot_t* c, int64_t n, double beta) {
  using acc_t = acc_t_of<grad_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t B = kBlock<acc_t>;
  const Vec one_minus_b(static_cast<acc_t>(1.0 - beta));
  const Vec b(static_cast<acc_t>(beta));
  auto block = [&](grad_t* gp, const vjp_t* vp, cot_t* cp) {
    Vec g0, g1, v0, v1;
    load_block(gp, g0, g1);
    load_block(vp, v0, v1);
    Vec c0, c1;
    if constexpr (kScaleAfter) {  // s = g + v; g <- (1-b) s; c <- b s
      const Vec s0 = g0 + v0, s1 = g1 + v1;
      g0 = s0 * one_minus_b;
      g1 = s1 * one_minus_b;
      c0 = s0 * b;
      c1 = s1 * b;
    } else {  // g <- (1-b) g + v; c <- b g
      g0 = at::vec::fmadd(g0, one_minus_b, v0);
      g1 = at::vec::fmadd(g1, one_minus_b, v1);
      c0 = g0 * b;
      c1 = g1 * b;
    }
    store_block(gp, g0, g1);
    store_block(cp, c0, c1);
  };
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + B <= end; i += B) {
      block(g + i, v + i, c + i);
    }
    if (i < end) {
      const int64_t m = end - i;
      grad_t gb[B] = {};
      vjp_t vb[B] = {};
      cot_t cb[B] = {};
      std::copy_n(g + i, m, gb);
      std::copy_n(v + i, m, vb);
      block(gb, vb, cb);
      std::copy_n(gb, m, g + i);
      std::copy_n(cb, m, c + i);
    }
  });
}

// Tensor-level entries: AT_DISPATCH over the state dtype x the f dtype(s).
#define REVDEQ_DISPATCH_STATE(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)
#define REVDEQ_DISPATCH_F(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

void relax(const at::Tensor& state, const at::Tensor& f_out, double beta, bool inverse) {
  const int64_t n = state.numel();
  if (n == 0) return;
  REVDEQ_DISPATCH_STATE(state.scalar_type(), "revdeq_relax_cpu", [&] {
    using state_t = scalar_t;
    REVDEQ_DISPATCH_F(f_out.scalar_type(), "revdeq_relax_cpu", [&] {
      using f_t = scalar_t;
      state_t* s = state.mutable_data_ptr<state_t>();
      const f_t* f = f_out.const_data_ptr<f_t>();
      if (inverse) {
        relax_loop<true>(s, f, n, beta);
      } else {
        relax_loop<false>(s, f, n, beta);
      }
    });
  });
}

void residual(const at::Tensor& y, const at::Tensor& z, const at::Tensor& f_out, double beta,
              const at::Tensor& sq_res, const at::Tensor& sq_f) {
  const int64_t rows = z.size(0);
  if (rows == 0) return;
  const int64_t cols = z.numel() / rows;
  REVDEQ_DISPATCH_STATE(z.scalar_type(), "revdeq_residual_cpu", [&] {
    using state_t = scalar_t;
    using acc_t = acc_t_of<state_t>;
    REVDEQ_DISPATCH_F(f_out.scalar_type(), "revdeq_residual_cpu", [&] {
      using f_t = scalar_t;
      const state_t* zp = z.const_data_ptr<state_t>();
      const f_t* fp = f_out.const_data_ptr<f_t>();
      acc_t* res = sq_res.mutable_data_ptr<acc_t>();
      acc_t* sqf = sq_f.mutable_data_ptr<acc_t>();
      if (y.defined()) {
        residual_loop<true>(y.mutable_data_ptr<state_t>(), zp, fp, rows, cols, beta, res, sqf);
      } else {
        residual_loop<false, state_t>(nullptr, zp, fp, rows, cols, beta, res, sqf);
      }
    });
  });
}

void adjoint(const at::Tensor& grad, const at::Tensor& vjp, const at::Tensor& cotangent,
             double beta, bool scale_after) {
  const int64_t n = grad.numel();
  if (n == 0) return;
  REVDEQ_DISPATCH_STATE(grad.scalar_type(), "revdeq_adjoint_cpu", [&] {
    using grad_t = scalar_t;
    REVDEQ_DISPATCH_F(vjp.scalar_type(), "revdeq_adjoint_cpu", [&] {
      using vjp_t = scalar_t;
      REVDEQ_DISPATCH_F(cotangent.scalar_type(), "revdeq_adjoint_cpu", [&] {
        using cot_t = scalar_t;
        grad_t* g = grad.mutable_data_ptr<grad_t>();
        const vjp_t* v = vjp.const_data_ptr<vjp_t>();
        cot_t* c = cotangent.mutable_data_ptr<cot_t>();
        if (scale_after) {
          adjoint_loop<true>(g, v, c, n, beta);
        } else {
          adjoint_loop<false>(g, v, c, n, beta);
        }
      });
    });
  });
}

#undef REVDEQ_DISPATCH_STATE
#undef REVDEQ_DISPATCH_F

#include "exact_impl.h"

}  // namespace

const KernelTable kernels = {C10_STRINGIZE(CPU_CAPABILITY), &relax, &residual, &adjoint,
                             &exact::update, &exact::residual};

}  // namespace revdeq::cpu::CPU_CAPABILITY
