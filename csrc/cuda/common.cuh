// Pieces shared by the CUDA kernels of kernels.cu and exact.cu: block shape, 16-byte vector
// access, the per-sample sums (task loop, deterministic team reduction, second pass, host-side
// split), grid sizing, the launch, dtype dispatch. (kernels.cu's design comment explains the
// choices.)
// Internal linkage on purpose: each translation unit gets its own copy of every kernel below.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#endif

#include <algorithm>
#include <cstdint>

#include "kernels.cuh"
#include "row_tasks.cuh"

namespace revdeq::cuda {
namespace {

constexpr int kThreads = 256;  // every kernel's block size (team_sum relies on it)
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int64_t kChunk = 16384;  // elements per partial sum of a long row

// Elements per vector: 16 bytes of the narrowest of the tensors Ts.
template <typename... Ts>
constexpr int kVec = static_cast<int>(16 / std::min({sizeof(Ts)...}));

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// N elements moved as 16-byte accesses; N * sizeof(T) is 16, 32 or 64 bytes.
template <typename T, int N>
struct alignas(16) Pack {
  static_assert(N * sizeof(T) % 16 == 0, "a pack is a whole number of 16-byte accesses");
  T v[N];
};

template <int N, typename acc_t, typename T>
__device__ __forceinline__ void load_vec(const T* p, acc_t (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    out[k] = static_cast<acc_t>(pack.v[k]);
  }
}

// Rounds to nearest even, as Tensor.copy_ does (double -> bf16/fp16 through float).
template <int N, typename T, typename acc_t>
__device__ __forceinline__ void store_vec(T* p, const acc_t (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    pack.v[k] = static_cast<T>(in[k]);
  }
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// Adds a and b over a team of `team` threads (a power of two <= kThreads; teams are the
// consecutive aligned groups of threadIdx.x) in a fixed order; the sums land in the team's
// first thread. Every thread of the block calls it, equally often: it syncs the block.
__device__ __forceinline__ void team_sum(double& a, double& b, int team,
                                         double (&shared)[2][kWarps]) {
  // The butterfly leaves the same bits in every lane: x + y == y + x in IEEE arithmetic.
  for (int offset = (team < kWarpSize ? team : kWarpSize) / 2; offset > 0; offset /= 2) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
  if (team > kWarpSize) {
    const int warp = threadIdx.x / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) {
      shared[0][warp] = a;
      shared[1][warp] = b;
    }
    __syncthreads();
    if (threadIdx.x % team == 0) {  // lane 0 of the team's first warp: a, b are that warp's
      for (int w = 1; w < team / kWarpSize; ++w) {
        a += shared[0][warp + w];
        b += shared[1][warp + w];
      }
    }
    __syncthreads();  // shared is rewritten by the next call
  }
}

// A task's sums, from lane 0 of its team: to out_*[task] when its row is one task
// (partial == nullptr), else to partial[2 task], partial[2 task + 1] for finish_sums_kernel.
template <typename out_t>
__device__ __forceinline__ void write_task_sums(int64_t task, double res, double sq_f, out_t* out_res,
                                                out_t* out_f, double* partial) {
  if (partial == nullptr) {
    out_res[task] = static_cast<out_t>(res);
    out_f[task] = static_cast<out_t>(sq_f);
  } else {
    partial[2 * task] = res;
    partial[2 * task + 1] = sq_f;
  }
}

// The task loop of the per-sample-sum kernels (kernels.cu's residual_kernel, exact.cu's
// exact_residual_kernel). A team of `team` threads takes task t, elements [begin, end) of row
// t / chunks (row_tasks.cuh): element(i, res, sq_f) adds the scalar head and tail, vector(k,
// res, sq_f) the whole V-element vectors between. The team's lanes are then summed in a fixed
// order and the task's sums written. Block-uniform: every thread runs the loop equally often,
// as team_sum requires.
template <int V, typename out_t, typename Element, typename Vector>
__device__ __forceinline__ void sum_tasks(int64_t rows, int64_t cols, int64_t chunks, int team,
                                          bool vectorized, Element element, Vector vector,
                                          out_t* out_res, out_t* out_f, double* partial,
                                          double (&shared)[2][kWarps]) {
  const int lane = threadIdx.x % team;
  const int teams_per_block = kThreads / team;
  const int64_t tasks = rows * chunks;
  const int64_t task_len = chunks == 1 ? cols : kChunk;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * teams_per_block; base < tasks;
       base += static_cast<int64_t>(gridDim.x) * teams_per_block) {
    const int64_t task = base + threadIdx.x / team;
    double res = 0.0, sq_f = 0.0;
    if (task < tasks) {
      const auto [begin, head, body, end] =
          row_tasks::task_span(task, cols, chunks, task_len, vectorized, V);
      for (int64_t i = begin + lane; i < head; i += team) {
        element(i, res, sq_f);
      }
      for (int64_t k = head / V + lane; k < body / V; k += team) {
        vector(k, res, sq_f);
      }
      for (int64_t i = body + lane; i < end; i += team) {
        element(i, res, sq_f);
      }
    }
    team_sum(res, sq_f, team, shared);
    if (task < tasks && lane == 0) {
      write_task_sums(task, res, sq_f, out_res, out_f, partial);
    }
  }
}

// Second pass for split rows: out_*[row] = the row's chunk partials, in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_sums_kernel(const double* partial, int64_t rows, int64_t chunks, acc_t* out_res,
                       acc_t* out_f) {
  __shared__ double shared[2][kWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // block-uniform
    double res = 0.0, sq_f = 0.0;
    for (int64_t c = row * chunks + threadIdx.x; c < (row + 1) * chunks; c += kThreads) {
      res += partial[2 * c];
      sq_f += partial[2 * c + 1];
    }
    team_sum(res, sq_f, kThreads, shared);
    if (threadIdx.x == 0) {
      out_res[row] = static_cast<acc_t>(res);
      out_f[row] = static_cast<acc_t>(sq_f);
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// The grid for `blocks` blocks' worth of work: at most one wave of resident blocks (the
// kernels loop over the rest).
inline int grid_for(int64_t blocks, const Launch& launch) {
  const int64_t wave = std::max(1, launch.resident_threads / kThreads);
  return static_cast<int>(std::clamp<int64_t>(blocks, 1, wave));
}

// Runs kernel on `grid` blocks of kThreads threads on the launch's stream, and checks the
// launch. Built by the host compiler instead of nvcc (tests/cuda_emulation), the kernel runs
// on the host: the test harness defines cuda_emulation::launch.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int grid, const Launch& launch, Args... args) {
#if defined(__CUDACC__)
  kernel<<<grid, kThreads, 0, launch.stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  cuda_emulation::launch(kernel, grid, kThreads, args...);
#endif
}

// The smallest power of two >= the task's vector count, at most a block.
inline int team_size(int64_t vectors) {
  int team = 1;
  while (team < vectors && team < kThreads) {
    team *= 2;
  }
  return team;
}

// A per-sample sum over a [rows, cols] view as tasks (row_tasks.cuh): a row is one task, or
// kChunk-element tasks when it is longer, whose double partials finish() then adds per row.
struct RowSums {
  int64_t rows, cols, chunks, task_len, tasks;
  // Freed when the caller returns, while the kernels may still run: the caching allocator
  // hands the block out again only in stream order, so nothing touches it before they finish.
  at::Tensor partial;
  double* partial_ptr;  // nullptr when chunks == 1: the first pass writes the row sums itself

  // rows >= 1; cols may be 0, then every task is empty and writes 0.
  explicit RowSums(const at::Tensor& t)
      : rows(t.size(0)),
        cols(t.numel() / rows),
        chunks(cols > kChunk ? ceil_div(cols, kChunk) : 1),
        task_len(chunks == 1 ? cols : kChunk),
        tasks(rows * chunks),
        partial(chunks > 1 ? at::empty({2 * tasks}, t.options().dtype(at::kDouble)) : at::Tensor()),
        partial_ptr(chunks > 1 ? partial.mutable_data_ptr<double>() : nullptr) {}

  // Threads per task for V-element vectors, and the grid for teams of that size.
  int team(int V) const { return team_size(ceil_div(task_len, V)); }
  int grid(int team, const Launch& launch) const {
    return grid_for(ceil_div(tasks, kThreads / team), launch);
  }

  // The second pass, on split rows only.
  template <typename acc_t>
  void finish(acc_t* res, acc_t* sq_f, const Launch& launch) const {
    if (chunks > 1) {
      launch_kernel(finish_sums_kernel<acc_t>, grid_for(rows, launch), launch,
                    partial_ptr, rows, chunks, res, sq_f);
    }
  }
};

}  // namespace
}  // namespace revdeq::cuda

#define REVDEQ_DISPATCH_STATE(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)
#define REVDEQ_DISPATCH_F(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
