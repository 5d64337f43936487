// Pieces shared by the CUDA kernels of kernels.cu and exact.cu: block shape, 16-byte vector
// access, the deterministic team reduction of per-sample sums and its second pass, grid
// sizing, the launch, dtype dispatch. (kernels.cu's design comment explains the choices.)
// Internal linkage on purpose: each translation unit gets its own copy of every kernel below.
#pragma once

#include <ATen/Dispatch.h>
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

}  // namespace
}  // namespace revdeq::cuda

#define REVDEQ_DISPATCH_STATE(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)
#define REVDEQ_DISPATCH_F(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
