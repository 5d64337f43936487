// Checks the host emulation of CUDA itself (cuda_emulation.h), on kernels with known answers
// and on broken ones it must catch, so that the kernels' results under it mean something.
//
//   self_test run     prints one line per check; exits 0 if all hold, 1 otherwise
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emulation.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  failures += !ok;
}

// The message of the launch's exception, or "" when it ran.
template <typename... Params, typename... Args>
std::string launch_error(void (*kernel)(Params...), int grid, int threads, Args... args) {
  try {
    cuda_emulation::launch(kernel, grid, threads, args...);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// A block's sum through shared memory and a warp butterfly, as team_sum does it.
__global__ void block_sum(const int* in, int* warp_sums, int* block_total) {
  __shared__ int partial[8];
  int v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  warp_sums[blockIdx.x * blockDim.x + threadIdx.x] = v;  // every lane holds its warp's sum
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
    block_total[blockIdx.x] = total;
  }
}

__global__ void any_thread(int chosen, int* out) {
  out[threadIdx.x] = __syncthreads_or(static_cast<int>(threadIdx.x) == chosen);
}

__global__ void returns_before_barrier(int quitter) {
  if (static_cast<int>(threadIdx.x) == quitter) return;
  __syncthreads();
}

__global__ void shuffles_past_the_block(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 16);
}

// Thread 0 publishes a value; without the barrier the others may read it before it is written.
template <bool kBarrier>
__global__ void publish(int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 1000 + static_cast<int>(blockIdx.x);
  if (kBarrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || std::strcmp(argv[1], "run") != 0) {
    std::fprintf(stderr, "usage: self_test run\n");
    return 2;
  }
  constexpr int kBlocks = 3, kThreads = 256;
  std::vector<int> in(kBlocks * kThreads), lanes(in.size()), totals(kBlocks);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i * 7 % 101);
  cuda_emulation::launch(block_sum, kBlocks, kThreads, in.data(), lanes.data(), totals.data());
  bool lanes_ok = true, totals_ok = true;
  for (int b = 0; b < kBlocks; ++b) {
    int block = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      int warp = 0;
      for (int l = 0; l < 32; ++l) warp += in[b * kThreads + w * 32 + l];
      for (int l = 0; l < 32; ++l) lanes_ok = lanes_ok && lanes[b * kThreads + w * 32 + l] == warp;
      block += warp;
    }
    totals_ok = totals_ok && totals[b] == block;
  }
  check(lanes_ok, "__shfl_xor_sync butterfly: every lane holds its warp's sum");
  check(totals_ok, "__shared__ + __syncthreads: every block's sum, blocks in order");

  std::vector<int> any(kThreads, -1);
  cuda_emulation::launch(any_thread, 1, kThreads, 77, any.data());
  bool any_ok = true;
  for (int v : any) any_ok = any_ok && v == 1;
  cuda_emulation::launch(any_thread, 1, kThreads, -1, any.data());
  for (int v : any) any_ok = any_ok && v == 0;
  check(any_ok, "__syncthreads_or: one thread's predicate reaches all, none gives 0");

  const std::string quit = launch_error(returns_before_barrier, 2, kThreads, 5);
  check(quit.find("deadlocks") != std::string::npos, "a thread returning before __syncthreads fails the launch: " + quit);

  std::vector<int> past(48);
  const std::string shuffle = launch_error(shuffles_past_the_block, 1, 48, past.data());
  check(shuffle.find("past the block") != std::string::npos,
        "a shuffle with a lane past a 48-thread block fails the launch: " + shuffle);

  // Launches alternate ascending and descending thread order: one of two shows the race.
  std::vector<int> published(2 * kThreads);
  int racy_wrong = 0, synced_wrong = 0;
  for (int launch = 0; launch < 4; ++launch) {
    const bool racy = launch < 2;  // two launches each: one ascending, one descending
    cuda_emulation::launch(racy ? publish<false> : publish<true>, 2, kThreads, published.data());
    for (int i = 0; i < 2 * kThreads; ++i) {
      (racy ? racy_wrong : synced_wrong) += published[i] != 1000 + i / kThreads;
    }
  }
  check(racy_wrong > 0 && synced_wrong == 0,
        "a missing barrier shows (" + std::to_string(racy_wrong) + " stale reads), its barrier mends it (" +
            std::to_string(synced_wrong) + ")");

  return failures == 0 ? 0 : 1;
}
